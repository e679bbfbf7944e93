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
    table = [line for line in text.splitlines() if not line.startswith('WARNING: ')]
    assert table[-2].startswith('cost_usd ')  # the table (then any warnings) precedes the JSON line
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


# ------------------------------------------------------------------------------------------------------------------
# The recipe linter (diffusion/training/recipe_lint.py): per-GPU memory, weight decay per step, microbatches,
# streaming cache; warnings where a recipe is off.
# ------------------------------------------------------------------------------------------------------------------
# Every full-scale recipe with its own model or settings. s-c-256 IS sd2-base-cc (base:), and the NC recipes differ
# from their C twins only in data paths and run names (checked below), so their figures are the same.
FULL = ['sd2-base-cc.yaml', 'commoncanvas/s-c-512.yaml', 'commoncanvas/l-c-256.yaml', 'commoncanvas/autoencoder.yaml',
        'microdit/256-masked.yaml', 'microdit/256-unmasked.yaml', 'microdit/512-masked.yaml',
        'microdit/512-unmasked.yaml']
TWINS = {'commoncanvas/s-c-256.yaml': 'sd2-base-cc.yaml', 'commoncanvas/s-nc-256.yaml': 'sd2-base-cc.yaml',
         'commoncanvas/s-nc-512.yaml': 'commoncanvas/s-c-512.yaml', 'commoncanvas/l-nc-256.yaml': 'commoncanvas/l-c-256.yaml'}
# The public MicroDiT configs (SonyResearch/micro_diffusion configs/res_*.yaml): torch AdamW, weight decay 0.1.
MICRODIT_LR = {'microdit/256-masked.yaml': 2.4e-4, 'microdit/256-unmasked.yaml': 8e-5,
               'microdit/512-masked.yaml': 8e-5, 'microdit/512-unmasked.yaml': 8e-5}
ENCODER_WARNING = 'frozen encoders are not FSDP-wrapped'


def _config(name: str, *overrides: str):
    from diffusion.config import load_config
    return load_config(REPO / 'yamls' / name, overrides)


@pytest.mark.parametrize('name', FULL + list(TWINS))
def test_weight_decay_per_step_of_every_full_recipe(name):
    """Finding 1: one real step of the recipe's own optimizer on a weight of 1 with a zero gradient loses at most
    1e-5 (the reference SD2-base-256: torch AdamW lr 1e-4 x wd 0.01 = 1e-6); composer's decoupled_adamw with
    weight_decay 0.01 lost 0.01 per step. MicroDiT keeps its public config's AdamW (lr x 0.1)."""
    from diffusion.training.recipe_lint import MAX_DECAY_PER_STEP, optimizer_probe
    cfg = _config(name)
    decay, state_bytes = optimizer_probe(cfg.optimizer)
    assert state_bytes == 8  # AdamW's two fp32 moments per parameter
    if name in MICRODIT_LR:
        assert cfg.optimizer['name'] == 'adamw' and cfg.optimizer['weight_decay'] == 0.1
        assert decay == pytest.approx(MICRODIT_LR[name] * 0.1, rel=1e-6)
        assert decay <= (cfg.throughput.get('max_decay_per_step') or MAX_DECAY_PER_STEP) * (1 + 1e-6)
    else:
        assert decay <= MAX_DECAY_PER_STEP, f'{name}: weights lose {decay:.3g} per step'


def test_nc_recipes_lint_as_their_c_twins():
    keep = ('optimizer', 'fsdp_config', 'precision', 'global_train_batch_size', 'device_train_microbatch_size',
            'throughput', 'model', 'algorithms')
    for name, twin in TWINS.items():
        a, b = _config(name), _config(twin)
        assert all(getattr(a, k) == getattr(b, k) for k in keep), name
        la, lb = dict(a.train_loader), dict(b.train_loader)
        assert {k: v for k, v in la.items() if k not in ('remote', 'local')} == \
            {k: v for k, v in lb.items() if k not in ('remote', 'local')}, name


@pytest.fixture(scope='module')
def full_figures():
    """The dry run's figures of every full recipe (meta device, ~5-10 s each)."""
    from diffusion.training.dry_run import estimate
    return {name: estimate(_config(name)) for name in FULL}


def test_full_recipes_print_memory_and_no_warning(capsys, monkeypatch, full_figures):
    """`composer run.py yamls/sd2-base-cc.yaml dry_run=true` prints the per-GPU memory table and no warning; every
    full recipe's estimate fits its GPU, uses at least a third of it or its whole device batch, has a cache limit
    and a fixed canonical node count."""
    monkeypatch.chdir(REPO)
    status, fig, text = dry_run(capsys, 'yamls/sd2-base-cc.yaml')
    assert status == 0
    for row in ('mem_params_gib', 'mem_grads_gib', 'mem_optimizer_gib', 'mem_ema_gib', 'mem_activations_gib',
                'mem_total_gib', 'decay_per_step', 'microbatches_per_step', 'cache_limit_gib'):
        assert any(line.startswith(row + ' ') for line in text.splitlines()), row
    assert fig['warnings'] == []
    assert not [line for line in text.splitlines() if line.startswith('WARNING')]
    for name, f in full_figures.items():
        assert f['warnings'] == [], name
        assert f['mem_total_gib'] < f['gpu_memory_gib'], name
        assert f['memory_fraction'] >= 1 / 3 or f['microbatch_size'] == f['device_batch_size'], name
        assert f['cache_limit_gib'] and f['mem_activations_gib'] > 0, name


def test_fsdp_recipes_move_their_encoders_to_the_gpu(full_figures):
    for name, f in full_figures.items():
        assert not [w for w in f['warnings'] if ENCODER_WARNING in w], name


def test_lint_warns_on_the_recipe_as_it_was():
    """The S recipe before its fixes (composer's decoupled_adamw at weight_decay 0.01, microbatch 16, no cache limit,
    no fixed canonical nodes) on one 8-GPU node warns on each; a microbatch too large for the GPU warns too. The
    fixed recipe on the same node does not."""
    import dataclasses

    from diffusion.training.dry_run import estimate
    cfg = _config('sd2-base-cc.yaml', 'throughput.num_gpus=8')
    loader = {k: v for k, v in cfg.train_loader.items() if k not in ('cache_limit', 'num_canonical_nodes')}
    old = dataclasses.replace(cfg, device_train_microbatch_size=16, train_loader=loader, optimizer={
        'name': 'decoupled_adamw', 'lr': 1e-4, 'betas': [0.9, 0.999], 'eps': 1e-8, 'weight_decay': 0.01})
    warnings = ' | '.join(estimate(old)['warnings'])
    assert 'weight decay removes 0.01 of every weight per step' in warnings
    assert 'microbatch 16 uses' in warnings and 'under a third' in warnings
    assert 'no cache_limit' in warnings and 'no fixed num_canonical_nodes' in warnings
    fixed = estimate(cfg)
    assert [w for w in fixed['warnings'] if ENCODER_WARNING not in w] == []
    assert fixed['microbatch_size'] == 128 and fixed['microbatches_per_step'] == 2
    too_big = estimate(_config('sd2-base-cc.yaml', 'throughput.num_gpus=8', 'variables.resolution=512'))
    assert any('exceeds the A100' in w for w in too_big['warnings'])  # 128 images at 512 px: ~125 GiB


def test_activation_bytes_are_what_autograd_keeps():
    """The measured activations of a Linear + GELU stack: its input, the GELU input and the second Linear's input,
    in the autocast dtype; parameters are not activations; checkpointing keeps block inputs + one block."""
    from diffusion.training.recipe_lint import activation_bytes

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(),
                                                                  torch.nn.Linear(32, 8)) for _ in range(3))

        def forward(self, batch):
            x = batch['x']
            for block in self.blocks:
                x = block(x)
            return x

        def loss(self, out, batch):
            return out.sum()

    with torch.device('meta'):
        model = Stack()
    batch = {'x': torch.empty(4, 8, device='meta')}
    per_block = 4 * (8 + 32 + 32)  # Linear input (4x8), GELU input (4x32), second Linear input (4x32)
    assert activation_bytes(model, batch, itemsize=2) == 3 * per_block * 2
    assert activation_bytes(model, batch, itemsize=4) == 3 * per_block * 4
    is_block = lambda m: isinstance(m, torch.nn.Sequential)  # noqa: E731
    assert activation_bytes(model, batch, 2, is_block) == (3 * 4 * 8 + per_block) * 2
