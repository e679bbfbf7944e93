"""Latent scaling in one place: scaling_factor, the SD3/Flux-style shift_factor, and latents stored already scaled."""
from __future__ import annotations

import pytest
import torch

from diffusion.models.autoencoders import TINY_VAE_CONFIG

SHIFT, SCALE = 0.0609, 1.5305  # SD3's VAE config values


@pytest.fixture(scope='module')
def shifted_model():
    from test_models import tiny_model
    vae = {'name': 'autoencoder_kl', 'config': {**TINY_VAE_CONFIG, 'shift_factor': SHIFT, 'scaling_factor': SCALE}}
    return tiny_model(autoencoder=vae).eval()


def test_autoencoder_reads_shift_factor_from_its_config(shifted_model):
    from diffusion import registry
    assert shifted_model.autoencoder.shift_factor == pytest.approx(SHIFT)
    assert shifted_model.shift_factor == pytest.approx(SHIFT) and shifted_model.scaling_factor == pytest.approx(SCALE)
    plain = registry.build(registry.autoencoders, {'name': 'autoencoder_kl', 'config': 'tiny'}, 'ae')
    assert plain.shift_factor == 0.0  # SD-style VAEs have no shift (config value absent / None)
    override = registry.build(registry.autoencoders, {'name': 'autoencoder_kl', 'config': 'tiny', 'shift_factor': 0.2},
                              'ae')
    assert override.shift_factor == 0.2


def test_scale_subtracts_shift_then_scales_and_unscale_inverts(shifted_model):
    raw = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted_model.scale(raw), (raw - SHIFT) * SCALE)
    torch.testing.assert_close(shifted_model.unscale(shifted_model.scale(raw)), raw)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # Online encoding and precomputed RAW latents go through the same scale.
    online = shifted_model.batch_latents({'image': images})
    stored = shifted_model.batch_latents({'latents': shifted_model.autoencoder.encode(images)})
    torch.testing.assert_close(online, stored)
    torch.testing.assert_close(online, (shifted_model.autoencoder.encode(images) - SHIFT) * SCALE)


def test_latents_stored_scaled_are_not_scaled_twice(shifted_model):
    raw = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    already = shifted_model.scale(raw)
    mixed = torch.stack([already[0], raw[1], already[2]])
    flags = torch.tensor([True, False, True])
    out = shifted_model.batch_latents({'latents': mixed, 'latents_scaled': flags})
    torch.testing.assert_close(out, already)


def test_export_refuses_a_shifted_autoencoder(shifted_model):
    from diffusion.export.to_diffusers import ExportError, to_diffusers_pipeline
    with pytest.raises(ExportError, match='shift_factor'):
        to_diffusers_pipeline(shifted_model)
