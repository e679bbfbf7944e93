"""UNet backbone presets: published parameter counts, CPU forward passes, options and registry."""
from __future__ import annotations

import pytest
import torch

from diffusion import registry
from diffusion.models.unet import PRESETS, UNetBackbone, build_unet, unet_config

# Exact parameter counts of diffusers' UNet2DConditionModel built from the published configs: the ``unet/config.json``
# of stabilityai/stable-diffusion-2-base (SD2, Rombach et al. 2022) and of stabilityai/stable-diffusion-xl-base-1.0
# (SDXL, Podell et al. 2023, Table 1: 2.6B UNet parameters).
PUBLISHED = {'sd2-base': 865_910_724, 'sdxl-base': 2_567_463_684}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('preset', sorted(PUBLISHED))
def test_real_presets_match_published_parameter_counts(preset):
    backbone = build_unet(preset, device='meta')
    assert next(backbone.parameters()).device.type == 'meta'
    assert _count(backbone) == PUBLISHED[preset]


def test_real_preset_configs_are_sd2_and_sdxl():
    sd2 = unet_config('sd2-base')
    assert sd2['cross_attention_dim'] == 1024 and sd2['use_linear_projection'] is True
    assert tuple(sd2['attention_head_dim']) == (5, 10, 20, 20)
    sdxl = unet_config('sdxl-base')
    assert sdxl['addition_embed_type'] == 'text_time'
    assert sdxl['projection_class_embeddings_input_dim'] == 2816
    assert tuple(sdxl['transformer_layers_per_block']) == (1, 2, 10) and sdxl['cross_attention_dim'] == 2048


@pytest.fixture(scope='module')
def mini_s():
    torch.manual_seed(0)
    return build_unet('mini-s', cross_attention_dim=384).eval()


def test_mini_s_size_and_forward(mini_s):
    assert 5e6 <= _count(mini_s) <= 20e6
    x = torch.randn(2, 4, 16, 16)
    text = torch.randn(2, 7, 384)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4])
    with torch.no_grad():
        out = mini_s(x, torch.tensor([10, 900]), text_hidden=text, text_mask=mask)
        # Masked-out tokens must not matter: change them, output unchanged.
        text2 = text.clone()
        text2[1, 3:] = torch.randn(4, 384)
        out2 = mini_s(x, torch.tensor([10, 900]), text_hidden=text2, text_mask=mask)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, out2)


def test_mini_s_accepts_float_timesteps_and_trains(mini_s):
    """EDM passes float c_noise; the backbone must backprop through it."""
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = mini_s(x, torch.tensor([-0.3, 0.7]), text_hidden=torch.randn(2, 5, 384))
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_mini_l_uses_pooled_text_and_time_ids():
    torch.manual_seed(0)
    backbone = build_unet('mini-l', cross_attention_dim=64, pooled_text_dim=32, block_out_channels=(32, 64, 96),
                          attention_head_dim=(1, 2, 3)).eval()
    assert backbone.uses_added_conditioning
    assert backbone.unet.config.projection_class_embeddings_input_dim == 6 * 32 + 32
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 64)
    pooled = torch.randn(2, 32)
    ids = torch.tensor([[256., 256., 0., 0., 256., 256.], [512., 384., 16., 0., 256., 256.]])
    with torch.no_grad():
        out = backbone(x, torch.tensor([5, 5]), text_hidden=text, text_pooled=pooled, time_ids=ids)
        other_ids = backbone(x, torch.tensor([5, 5]), text_hidden=text, text_pooled=pooled, time_ids=ids.flip(0))
        other_pooled = backbone(x, torch.tensor([5, 5]), text_hidden=text, text_pooled=-pooled, time_ids=ids)
    assert out.shape == x.shape
    assert not torch.allclose(out, other_ids) and not torch.allclose(out, other_pooled)
    with pytest.raises(ValueError, match='text_pooled'):
        backbone(x, torch.tensor([5, 5]), text_hidden=text)


def test_xformers_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA: the CPU error path is not reachable')
    with pytest.raises(RuntimeError, match='xformers.*CUDA'):
        build_unet('mini-s', attention='xformers', device='meta')


def test_sdpa_is_default_and_bad_options_error():
    from diffusers.models.attention_processor import AttnProcessor2_0
    backbone = build_unet('mini-s', device='meta')
    assert all(isinstance(p, AttnProcessor2_0) for p in backbone.unet.attn_processors.values())
    with pytest.raises(ValueError, match='unknown UNet preset'):
        build_unet('sd3', device='meta')
    with pytest.raises(ValueError, match='unknown override'):
        build_unet('mini-s', cross_attn_dim=384, device='meta')
    with pytest.raises(ValueError, match='attention backend'):
        build_unet('mini-s', attention='flash', device='meta')


def test_gradient_checkpointing_and_fsdp_policies():
    backbone = build_unet('mini-s', gradient_checkpointing=True, device='meta')
    assert backbone.unet.is_gradient_checkpointing
    wrapped = [m for m in backbone.modules() if backbone.fsdp_wrap_fn(m)]
    kinds = {type(m).__name__ for m in wrapped}
    assert kinds == {'Transformer2DModel', 'ResnetBlock2D'}
    assert not backbone.fsdp_wrap_fn(backbone.unet)
    assert sum(map(backbone.activation_checkpointing_fn, backbone.modules())) == len(wrapped)


def test_pretrained_roundtrip_and_clear_error(tmp_path, mini_s):
    mini_s.unet.save_pretrained(tmp_path / 'pipe' / 'unet')  # pipeline layout: unet/ subfolder
    loaded = build_unet(pretrained=str(tmp_path / 'pipe'), cross_attention_dim=384)
    for (name, a), (_, b) in zip(mini_s.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match='disagrees'):
        build_unet(pretrained=str(tmp_path / 'pipe'), cross_attention_dim=1024)
    missing = tmp_path / 'no-such-unet'
    missing.mkdir()
    with pytest.raises(RuntimeError, match='no-such-unet.*No model hub is reachable offline'):
        build_unet(pretrained=str(missing))


def test_registry_builds_unet_by_name():
    assert 'unet' in registry.backbones.get_all()
    backbone = registry.build(registry.backbones, {'name': 'unet', 'preset': 'mini-l', 'device': 'meta'},
                              where='model.backbone')
    assert isinstance(backbone, UNetBackbone)
    assert set(PRESETS) == {'sd2-base', 'sdxl-base', 'mini-s', 'mini-l'}
