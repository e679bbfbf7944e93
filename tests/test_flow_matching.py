"""Flow matching: the rectified-flow maths against closed forms and diffusers' flow-matching schedulers, the
samplers on a flow whose exact solution is known, and the schedule inside LatentDiffusion with both backbones
(generation with per-image seeds, resolution transfer, a short real Trainer.fit each)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusion import registry
from diffusion.flow_matching import (FlowMatchingSchedule, euler_step, flow_min_snr_weight, flow_sigmas,
                                     logit_normal_times, rf_interpolate, rf_snr, rf_velocity, time_shift,
                                     x0_from_velocity)
from diffusion.samplers import FLOW_SAMPLING, sample, sampling_defaults
from diffusion.schedules import min_snr_weight

REPO = Path(__file__).resolve().parents[1]
SHIFTS = [1.0, 3.0, 2**0.5]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# The maths against diffusers' FlowMatchEulerDiscreteScheduler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('shift', SHIFTS)
@pytest.mark.parametrize('steps', [1, 4, 28])
def test_sigmas_and_timesteps_equal_diffusers(shift, steps):
    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(steps)
    ours = flow_sigmas(steps, shift)
    assert torch.equal(ours, reference.sigmas)  # bit for bit
    assert torch.equal(ours[:-1] * 1000, reference.timesteps)
    made = FlowMatchingSchedule(shift=shift).make_scheduler('euler')
    made.set_timesteps(steps)
    assert torch.equal(made.sigmas, reference.sigmas)


@pytest.mark.parametrize('shift', SHIFTS)
def test_time_shift_is_diffusers_shift_and_divides_the_snr(shift):
    reference = FlowMatchEulerDiscreteScheduler(shift=shift)  # its training table is the shifted 1/T .. 1
    base = torch.linspace(1, 1000, 1000, dtype=torch.float64).flip(0) / 1000
    torch.testing.assert_close(time_shift(base, shift).float(), reference.sigmas, rtol=0, atol=2e-7)  # 1 float32 ulp
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(rf_snr(time_shift(t, shift)), rf_snr(t) / shift**2, rtol=1e-10, atol=0)
    torch.testing.assert_close(time_shift(time_shift(t, shift), 2.0), time_shift(t, 2.0 * shift), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match='positive'):
        time_shift(t, 0.0)


def test_add_noise_matches_diffusers_scale_noise():
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(10)
    x0, noise = torch.randn(3, 4, 8, 8, generator=_gen(0)), torch.randn(3, 4, 8, 8, generator=_gen(1))
    picks = reference.timesteps[[0, 4, 9]]
    sigmas = reference.sigmas[[0, 4, 9]]
    theirs = torch.cat([reference.scale_noise(x0[i:i + 1], picks[i:i + 1], noise[i:i + 1]) for i in range(3)])
    schedule = FlowMatchingSchedule(shift=3.0)
    torch.testing.assert_close(schedule.add_noise(x0, noise, sigmas), theirs, rtol=0, atol=1e-6)
    assert torch.equal(schedule.network_inputs(x0, sigmas)[1], picks)  # the network's time input = diffusers'


@pytest.mark.parametrize('shift', [1.0, 3.0])
def test_one_euler_step_equals_diffusers(shift):
    reference = FlowMatchingSchedule(shift=shift).make_scheduler('euler')
    reference.set_timesteps(8)
    x, v = torch.randn(2, 4, 8, 8, generator=_gen(2)), torch.randn(2, 4, 8, 8, generator=_gen(3))
    for i in (0, 1):
        reference._step_index = i
        theirs = reference.step(v, reference.timesteps[i], x, return_dict=False)[0]
        ours = euler_step(x, v, reference.sigmas[i], reference.sigmas[i + 1])
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_velocity_identities():
    x0, noise = torch.randn(4, 4, 8, 8, generator=_gen(4), dtype=torch.float64), \
        torch.randn(4, 4, 8, 8, generator=_gen(5), dtype=torch.float64)
    t = torch.tensor([0.0, 0.2, 0.7, 1.0], dtype=torch.float64)
    x_t = rf_interpolate(x0, noise, t)
    v = rf_velocity(x0, noise)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[3], noise[3])
    torch.testing.assert_close(x0_from_velocity(x_t, v, t), x0)
    torch.testing.assert_close(x_t + (1 - t).view(-1, 1, 1, 1) * v, noise)  # eps = x_t + (1 - t) v
    schedule = FlowMatchingSchedule()
    assert torch.equal(schedule.training_target(x0, noise, x_t, t), noise - x0)


def test_logit_normal_times_and_their_shift():
    t = logit_normal_times(200_000, 0.0, 1.0, generator=_gen(6))
    logits = torch.logit(t.double())
    assert abs(logits.mean().item()) < 0.01 and abs(logits.std().item() - 1.0) < 0.01
    t2 = logit_normal_times(200_000, 0.5, 0.6, generator=_gen(6))
    assert abs(torch.logit(t2.double()).mean().item() - 0.5) < 0.01
    assert torch.equal(logit_normal_times(5, generator=_gen(7)), logit_normal_times(5, generator=_gen(7)))
    plain, shifted = FlowMatchingSchedule(), FlowMatchingSchedule(shift=3.0)
    torch.testing.assert_close(shifted.sample_times(1000, generator=_gen(8)),
                               time_shift(plain.sample_times(1000, generator=_gen(8)), 3.0))
    uniform = FlowMatchingSchedule(time_sampling='uniform').sample_times(200_000, generator=_gen(9))
    assert abs(uniform.mean().item() - 0.5) < 0.01
    with pytest.raises(ValueError, match='time_sampling'):
        FlowMatchingSchedule(time_sampling='cosmap')


def test_min_snr_weight_is_the_eps_space_min_snr():
    gamma = 5.0
    t = torch.tensor([1e-3, 0.1, 0.3, 0.5, 0.9, 0.999], dtype=torch.float64)
    v_err = torch.randn(6, 16, generator=_gen(10), dtype=torch.float64)
    eps_err = (1 - t)[:, None] * v_err  # eps = x_t + (1 - t) v
    x0_err = -t[:, None] * v_err  # x0 = x_t - t v
    s = rf_snr(t)
    weighted_v = flow_min_snr_weight(t, gamma)[:, None] * v_err**2
    torch.testing.assert_close(weighted_v, min_snr_weight(s, gamma, 'epsilon')[:, None] * eps_err**2)
    torch.testing.assert_close(weighted_v, s.clamp(max=gamma)[:, None] * x0_err**2)
    assert (flow_min_snr_weight(t, gamma) < 1).all()
    assert flow_min_snr_weight(torch.tensor([1.0]), gamma).item() == 1.0  # the project's rule at snr = 0
    assert flow_min_snr_weight(torch.tensor([0.0]), gamma).item() == 0.0  # finite at snr = inf
    schedule = FlowMatchingSchedule(loss_weighting='min_snr', min_snr_gamma=gamma)
    torch.testing.assert_close(schedule.loss_weight(t.float()), flow_min_snr_weight(t, gamma).float())
    assert torch.equal(FlowMatchingSchedule().loss_weight(t), torch.ones(6))


# ---------------------------------------------------------------------------------------------
# Samplers on an exactly known flow
# ---------------------------------------------------------------------------------------------


def _gaussian_velocity(x: torch.Tensor, t: torch.Tensor, std: float) -> torch.Tensor:
    """Exact velocity E[eps - x0 | x_t] for data x0 ~ N(0, std^2) (per coordinate, independent)."""
    var = (1 - t)**2 * std**2 + t**2
    return (t - (1 - t) * std**2) / var * x


@pytest.mark.parametrize('shift', [1.0, 2.0])
def test_samplers_solve_the_gaussian_flow_at_their_order(shift):
    """The ODE maps noise x_1 to x_0 = std * x_1 exactly. Doubling the steps halves Euler's error (1st order) and
    cuts Heun's (2nd order) by well over half; Heun is far closer at equal steps."""
    std, shape = 0.5, (3, 2, 4, 4)
    noise = torch.randn(shape, generator=_gen(11), dtype=torch.float64)
    fn = lambda x, t: _gaussian_velocity(x, t.double() / 1000, std)  # noqa: E731
    errors = {}
    for name in ('euler', 'heun'):
        for steps in (12, 24):
            scheduler = FlowMatchingSchedule(shift=shift).make_scheduler(name)
            out = sample(fn, scheduler, shape, num_steps=steps, init_noise=noise, dtype=torch.float64,
                         progress=False)
            errors[name, steps] = ((out - std * noise).abs().max() / noise.abs().max()).item()
    assert errors['euler', 12] < 0.1 and 0.4 < errors['euler', 24] / errors['euler', 12] < 0.6
    assert errors['heun', 12] < 2e-3 and errors['heun', 24] / errors['heun', 12] < 0.35
    assert errors['heun', 12] < errors['euler', 12] / 20


# ---------------------------------------------------------------------------------------------
# In LatentDiffusion, both backbones
# ---------------------------------------------------------------------------------------------

SMALL = dict(dim=64, head_dim=16, multiple_of=32, patch_mixer_dim=32, sample_size=8)
BACKBONES = {
    'microdit': {'name': 'microdit', 'preset': 'microdit-mini', **SMALL},
    'unet': {'name': 'unet', 'preset': 'mini-s', 'sample_size': 8},
}


def _model(backbone: str, **model_kwargs) -> torch.nn.Module:
    block = {'name': 'latent_diffusion', 'autoencoder': {'name': 'autoencoder_kl', 'config': 'tiny'},
             'text_encoder': {'name': 'tiny_clip'}, 'backbone': BACKBONES[backbone],
             'noise_schedule': {'name': 'flow_matching', 'shift': 1.5}, **model_kwargs}
    torch.manual_seed(0)
    model = registry.build(registry.models, block, 'model').eval()
    with torch.no_grad():  # zero-initialised output layers would make every image the same
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize('backbone', ['microdit', 'unet'])
def test_generate_with_per_image_seeds_and_cfg(backbone):
    model = _model(backbone)
    assert isinstance(model.noise_schedule, FlowMatchingSchedule)
    assert sampling_defaults(model) == FLOW_SAMPLING == {'sampler': 'euler', 'num_inference_steps': 28,
                                                         'guidance_scale': 7.0}
    for sampler in ('euler', 'heun') if backbone == 'microdit' else ('euler',):  # the UNet is slow on a CPU
        kw = dict(num_inference_steps=2, sampler=sampler, guidance_scale=4.0, height=32, width=32,
                  output_type='latent')
        pair = model.generate(['a red bicycle', 'a lighthouse'], seed=[1, 2], **kw)
        alone = model.generate(['a lighthouse'], seed=[2], **kw)  # image 1 is its own, whatever the batch
        torch.testing.assert_close(alone[0], pair[1], rtol=1e-4, atol=1e-4)  # batched float sums
        assert torch.isfinite(pair).all() and not torch.allclose(pair[0], pair[1])
    unguided = model.generate(['a lighthouse'], seed=[2], **{**kw, 'guidance_scale': 1.0})
    assert not torch.allclose(unguided, alone)  # CFG changes the result
    with pytest.raises(ValueError, match='flow_matching'):
        model.generate(['a cat'], seed=[0], sampler='ddim', num_inference_steps=1, output_type='latent')


def test_training_step_and_resolution_shift():
    model = _model('microdit', resolution=64, base_resolution=32).train()
    schedule = model.noise_schedule
    assert schedule.resolution_shift == 2.0 and schedule.shift == 3.0  # base shift 1.5 x 64 / 32
    scheduler = schedule.make_scheduler('euler')
    scheduler.set_timesteps(4)
    assert torch.equal(scheduler.sigmas, flow_sigmas(4, 3.0))
    latents = torch.randn(3, 4, 8, 8, generator=_gen(12))
    batch = {'latents': latents, 'caption': ['a', 'b', 'c']}
    pred, target, weight = model(batch)
    assert pred.shape == target.shape == latents.shape and torch.equal(weight, torch.ones(3))
    loss = model.loss((pred, target, weight), batch)
    loss.backward()
    assert torch.isfinite(loss) and model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert torch.equal(model.eval().eval_forward(batch)[1], model.eval_forward(batch)[1])  # fixed noise, times


def test_diffusers_export_refuses_and_native_export_generates(tmp_path):
    from diffusion.export.native import export_native, load_native
    from diffusion.export.to_diffusers import ExportError, to_diffusers_pipeline
    model = _model('unet')
    with pytest.raises(ExportError, match='natively'):
        to_diffusers_pipeline(model, sampler='euler')
    block = {'name': 'latent_diffusion', 'autoencoder': {'name': 'autoencoder_kl', 'config': 'tiny'},
             'text_encoder': {'name': 'tiny_clip'}, 'backbone': BACKBONES['unet'],
             'noise_schedule': {'name': 'flow_matching', 'shift': 1.5}}
    export_native(model, block, tmp_path / 'export')
    loaded = load_native(tmp_path / 'export')
    kw = dict(prompts=['a red bicycle'], num_inference_steps=2, seed=[3], height=32, width=32)
    torch.testing.assert_close(loaded.generate(**kw), model.generate(**kw), rtol=0, atol=0)


def _fit(demo_photos: Path, tmp_path: Path, yaml: str, schedule: dict, **extra: str):
    from omegaconf import OmegaConf

    from diffusion.config import load_config, load_yaml
    from diffusion.training.train import build_trainer
    raw = OmegaConf.to_container(load_yaml(REPO / yaml))
    raw['model']['noise_schedule'] = schedule
    over = {'variables.data': str(demo_photos), 'save_folder': str(tmp_path / 'ckpt'),
            'callbacks.sample_images.folder': str(tmp_path / 'samples'),
            'callbacks.sample_images.num_inference_steps': '1', 'max_duration': '3ba', 'eval_interval': '3ba',
            'save_interval': '3ba', 'eval_first': 'false', 'global_train_batch_size': '4',
            'device_eval_batch_size': '4', **extra}
    trainer = build_trainer(load_config(base=raw, overrides=[f'{k}={v}' for k, v in over.items()]))
    before = {k: v.clone() for k, v in trainer.state.model.backbone.state_dict().items()}
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 3 and torch.isfinite(trainer.state.loss).all()
    after = trainer.state.model.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert sorted((tmp_path / 'samples').glob('*.png'))
    return trainer


def test_unet_trains_with_flow_matching(demo_photos, tmp_path):
    trainer = _fit(demo_photos, tmp_path, 'yamls/tiny-cpu.yaml', {'name': 'flow_matching'})
    assert isinstance(trainer.state.model.noise_schedule, FlowMatchingSchedule)


def test_microdit_trains_with_flow_matching_and_tread(demo_photos, tmp_path):
    trainer = _fit(demo_photos, tmp_path, 'yamls/microdit/mini-cpu.yaml',
                   {'name': 'flow_matching', 'loss_weighting': 'min_snr'},
                   **{'model.backbone.tread': '{ratio: 0.5, start: 1, end: 5}',
                      'algorithms.mask_schedule.schedule': '[[0ba, 0.5], [2ba, 0.0]]'})
    backbone = trainer.state.model.backbone
    assert backbone.tread is not None and backbone.tread.ratio == 0.5 and backbone.mask_ratio == 0.0
