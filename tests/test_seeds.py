"""Per-image seeds drive all randomness of every sampler: image i with seed s is the same in any batch.

The sampler-level tests use a batch-independent toy denoiser, so a batch and a single image must agree
bit for bit; the model-level test runs the real tiny UNet (batched convolutions may round differently in the
last bits, hence a 1e-5 tolerance on latents of unit scale).
"""
from __future__ import annotations

import pytest
import torch

from diffusion.samplers import STOCHASTIC_SAMPLERS, generators_for, image_generators, sample
from diffusion.schedules import DDPMSchedule, EDMSchedule

SAMPLERS = [('ddpm', name) for name in ('ddim', 'euler', 'euler_ancestral', 'heun', 'dpmpp_2m', 'ddpm')] + \
           [('edm', name) for name in ('euler', 'heun', 'dpmpp_2m')]
SHAPE = (4, 8, 8)


def _schedule(kind: str):
    return DDPMSchedule(prediction_type='v_prediction') if kind == 'ddpm' else EDMSchedule()


def _toy_denoiser(x_in, t):
    return 0.3 * x_in + 0.01 * t.float()  # element-wise: no image sees another


def _run(kind: str, name: str, seeds, init_noise=None) -> torch.Tensor:
    scheduler = _schedule(kind).make_scheduler(name)
    return sample(_toy_denoiser, scheduler, (len(seeds), *SHAPE), num_steps=4, generator=image_generators(seeds),
                  init_noise=init_noise, progress=False)


@pytest.mark.parametrize('kind,name', SAMPLERS)
def test_image_depends_on_its_seed_not_its_batch(kind, name):
    batch = _run(kind, name, [3, 5, 9])
    alone = _run(kind, name, [5])
    elsewhere = _run(kind, name, [11, 7, 5, 2])
    assert torch.equal(batch[1], alone[0]) and torch.equal(batch[1], elsewhere[2])
    assert not torch.allclose(batch[0], batch[1])


@pytest.mark.parametrize('kind,name', SAMPLERS)
def test_per_step_noise_comes_from_the_seed(kind, name):
    """With the starting noise fixed, only stochastic samplers still depend on the seed (their step noise)."""
    start = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(0))
    a, b = _run(kind, name, [1], init_noise=start), _run(kind, name, [2], init_noise=start)
    stochastic = kind == 'ddpm' and name in STOCHASTIC_SAMPLERS
    assert torch.equal(a, b) is not stochastic
    assert torch.equal(a, _run(kind, name, [1], init_noise=start))


def test_generators_for_conventions():
    one = generators_for(3, seed=4)
    assert isinstance(one, torch.Generator) and one.initial_seed() == 4 and one.device.type == 'cpu'
    per_image = generators_for(2, seed=[4, 8])
    assert [g.initial_seed() for g in per_image] == [4, 8]
    assert generators_for(2).initial_seed() == 0
    with pytest.raises(ValueError, match='one per image'):
        generators_for(3, seed=[1, 2])
    with pytest.raises(ValueError, match='not both'):
        generators_for(1, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match='one per image'):
        sample(_toy_denoiser, DDPMSchedule().make_scheduler('ddim'), (2, *SHAPE), num_steps=1,
               generator=image_generators([1]), progress=False)


@pytest.fixture(scope='module')
def model():
    from test_models import tiny_model
    return tiny_model().eval()


@pytest.mark.parametrize('sampler', ['ddim', 'euler_ancestral', 'ddpm'])
def test_generate_image_is_batch_independent(model, sampler):
    kw = dict(num_inference_steps=3, guidance_scale=3.0, height=32, width=32, sampler=sampler, output_type='latent')
    batch = model.generate(['a cat', 'a red bus', 'a dog'], seed=[10, 20, 30], **kw)
    alone = model.generate(['a red bus'], seed=[20], **kw)
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-5)
    moved = model.generate(['a red bus', 'a dog'], seed=[20, 31], **kw)
    torch.testing.assert_close(moved[0:1], alone, rtol=0, atol=1e-5)


def test_generate_latents_with_stochastic_sampler_needs_seeds(model):
    start = torch.randn(1, 4, 8, 8)
    kw = dict(num_inference_steps=2, height=32, width=32, output_type='latent', latents=start)
    with pytest.raises(ValueError, match='seed'):
        model.generate(['a cat'], sampler='euler_ancestral', **kw)
    a = model.generate(['a cat'], sampler='euler_ancestral', seed=[1], **kw)
    b = model.generate(['a cat'], sampler='euler_ancestral', seed=[2], **kw)
    assert not torch.equal(a, b)  # same start, different step noise
    torch.testing.assert_close(model.generate(['a cat'], sampler='ddim', **kw),
                               model.generate(['a cat'], sampler='ddim', **kw), rtol=0, atol=0)
