"""Dry run: every recipe is built on the meta device (no weights, no data) and priced from a declared throughput."""
import json
import types
from pathlib import Path

import pytest
import torch

from diffusion.training.train import main

REPO = Path(__file__).resolve().parents[1]
# CommonCanvas (Gokaslan et al. 2024), throughput table: 11,600 img/s on 128 A100 at 256 px; stage 1 of
# CommonCanvas-S is 550k steps at batch 2048.
PAPER_IMG_PER_S, PAPER_GPUS, STEPS, BATCH = 11_600, 128, 550_000, 2048
A100_BF16_PEAK = 312e12


def dry_run(capsys, *args: str) -> tuple[int, dict, str]:
    status = main([*args, 'dry_run=true'])
    out = capsys.readouterr().out.strip().splitlines()
    return status, (json.loads(out[-1]) if status == 0 else {}), '\n'.join(out)


def test_commoncanvas_s_stage1_estimate_matches_the_paper(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    status, fig, text = dry_run(capsys, 'yamls/commoncanvas/s-c-256.yaml', 'throughput.usd_per_gpu_hour=2.0')
    assert status == 0
    assert text.splitlines()[-2].startswith('cost_usd ')  # the table precedes the JSON line
    assert fig['parameters_total'] == fig['parameters_trainable'] == 865_910_724  # SD2-base UNet
    assert fig['images'] == STEPS * BATCH
    gpu_hours = STEPS * BATCH / PAPER_IMG_PER_S * PAPER_GPUS / 3600  # 3,452.6 A100-hours
    assert fig['gpu_hours'] == pytest.approx(gpu_hours, rel=1e-3)
    assert fig['wall_clock_hours'] == pytest.approx(gpu_hours / PAPER_GPUS, rel=1e-3)  # ~27 h on 128 GPUs
    assert fig['cost_usd'] == pytest.approx(2.0 * gpu_hours, rel=1e-3)
    # The counted FLOPs and the paper's throughput imply a plausible utilisation of an A100 (bf16).
    mfu = fig['train_flops_per_image'] * PAPER_IMG_PER_S / PAPER_GPUS / A100_BF16_PEAK
    assert 0.05 < mfu < 0.6, mfu
    assert fig['not_built'] == ['text_encoder (clip)', 'autoencoder (pretrained)']


def test_throughput_block_mistakes_are_config_errors(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(['yamls/commoncanvas/s-c-256.yaml', 'throughput.images_per_sec=3', 'dry_run=true']) == 2
    err = capsys.readouterr().err
    assert "throughput: unknown key(s) ['images_per_sec']" in err and 'images_per_second_per_gpu' in err


def test_meta_flop_count_equals_the_count_on_real_tensors():
    from torch.utils.flop_counter import FlopCounterMode

    from diffusion import registry
    from diffusion.training.dry_run import _meta_batch, _step_flops
    block = {'name': 'latent_diffusion', 'scaling_factor': 1.0, 'noise_schedule': {'name': 'ddpm'},
             'backbone': {'name': 'unet', 'preset': 'mini-s', 'sample_size': 8}}
    info = {'latent_channels': 4, 'downsample': 4, 'text_dim': 384, 'pooled_dim': 0}
    cfg = types.SimpleNamespace(train_loader={'resolution': 32})
    with torch.device('meta'):
        meta_model = registry.build(registry.models, block, 'model')
    torch.manual_seed(0)
    real_model = registry.build(registry.models, block, 'model')
    batch = {k: torch.zeros(v.shape, dtype=v.dtype) if not v.is_floating_point() else torch.randn(v.shape)
             for k, v in _meta_batch(cfg, real_model, info, 2).items()}
    # PyTorch's fused CPU attention kernel has no FLOP formula registered (the GPU kernels do), so compare both
    # counts with attention in its math form (matmuls), where every op is counted.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH):
        with counter:
            real_model.loss(real_model(batch), batch).backward()
        meta_flops = _step_flops(cfg, meta_model, info, n=2)
    assert meta_flops == counter.get_total_flops() // 2 > 0
