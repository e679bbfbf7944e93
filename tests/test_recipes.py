"""Every full-scale recipe runs a real composer ``Trainer.fit`` at tiny width with its own optimizer, scheduler,
algorithms, callbacks, checkpoint format and autoresume.

Each recipe is built as written and only its sizes shrink (``scripts/gpu_check.py``'s ``shrink``: mini widths, a
tiny random VAE and CLIP text encoder, precomputed latents of the demo photos, batch 2, 2 batches, EMA starting
after the first batch, sample grids of 2 sampler steps) and run as written: its own ``precision`` (``amp_bf16``
with CUDA autocast's dtype rules emulated on the CPU, ``DIFFUSION_EMULATE_GPU_PRECISION=1``) and ``fsdp_config``
(composer's FSDP on the CPU over gloo, one process, state_dict_type full or sharded), through
``diffusion.training.train.build_trainer`` exactly as ``run.py`` builds it. The fp32 path without FSDP (how the
CPU recipes train) is run by the ``gpu_check --device cpu`` rehearsal test at the end.

Each run: fit to batch 2 (crossing the EMA start), a sample grid, the recipe's checkpoint written; then the same
config with a longer ``max_duration`` autoresumes from that checkpoint and continues to batch 3. A stage that
loads an earlier stage (``load_path``) loads that stage's shrunk checkpoint. ``compile_backbone`` compiles with
the ``aot_eager`` backend here (graph capture and AOT autograd, no inductor C++ code generation).
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from diffusion.config import load_config

pytestmark = pytest.mark.integration  # processes of its own or a whole pipeline: pytest -m "not integration" skips it

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('gpu_check', REPO / 'scripts' / 'gpu_check.py')
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

STEPS, MORE = 2, 1  # batches of the first run (EMA starts after its first); batches the autoresumed run adds
# The references' weight decay as torch AdamW's (per step: lr x wd): mosaicml/diffusion's SD2 / SDXL recipes 0.01,
# micro_diffusion 0.1; latent diffusion's autoencoders train with Adam, no decay.
REFERENCE_WD = {'unet': 0.01, 'microdit': 0.1, 'autoencoder_kl_training': 0.0}


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    """One intra-op thread: these are tiny ops, and with the 2 cores shared, OpenMP's spinning threads made
    them ~10x slower (a 3-batch fit: 57 s with 2 threads, 6 s with 1, at load 8)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def assets(demo_photos, tmp_path_factory):
    return gpu_check.make_assets(tmp_path_factory.mktemp('recipe_assets'), 'cpu', photos=demo_photos)


@pytest.fixture(scope='module')
def runs() -> dict[str, dict[str, Any]]:
    """Finished first runs by recipe: later stages load their checkpoints."""
    return {}


def _config(name: str, assets: dict[str, Any], out: Path, start: int, load_path, steps: int):
    raw = gpu_check.shrink(name, assets, out, mode='tiny', steps=steps, batch=2, start=start, load_path=load_path)
    raw['device'] = 'cpu'
    return load_config(base=raw)


def _first_run(name: str, assets, runs, root: Path) -> dict[str, Any]:
    """Fit ``name`` for STEPS batches (after its parent stage, when it loads one); cached per recipe."""
    if name in runs:
        return runs[name]
    from diffusion.training.train import build_trainer
    parent = gpu_check.stage_parent(name)
    load_path, start = None, 0
    if parent is not None:
        before = _first_run(parent, assets, runs, root)
        load_path = before['checkpoint']
        assert load_path, f'{parent} wrote no checkpoint for {name} to load'
        start = 0 if gpu_check.raw_weights_only(name) else before['batch']
    out = root / Path(name).stem
    cfg = _config(name, assets, out, start, load_path, STEPS)
    trainer = build_trainer(cfg)
    assert int(trainer.state.timestamp.batch) == start, 'a loaded full state must continue its clock'
    trainer.fit()
    run = {'cfg': cfg, 'trainer': trainer, 'start': start, 'out': out,
           'batch': int(trainer.state.timestamp.batch),
           'latest': Path(cfg.save_folder) / 'latest-rank0.pt'}
    # The checkpoint of this batch by its own name: the autoresumed run moves `latest` on.
    run['checkpoint'] = str(run['latest'].resolve()) if run['latest'].exists() else None
    trainer.close()
    runs[name] = run
    return run


def _encoder_keys(keys) -> list[str]:
    return sorted(k for k in keys if '.autoencoder.' in f'.{k}' or '.text_encoder.' in f'.{k}')


def _checkpoint_model_keys(path: Path, sharded: bool) -> list[str]:
    if sharded:
        from torch.distributed.checkpoint import FileSystemReader
        return list(FileSystemReader(str(path.resolve())).read_metadata().state_dict_metadata)
    return list(torch.load(path, map_location='cpu', weights_only=False)['state']['model'])


@pytest.mark.parametrize('name', gpu_check.FULL_RECIPES)
def test_full_recipe_fits_checkpoints_and_autoresumes(name, assets, runs, tmp_path_factory, monkeypatch):
    from composer.algorithms import EMA, GradientClipping

    from diffusion.training.train import build_trainer
    assert (REPO / 'yamls' / name).exists(), f'yamls/{name} is missing'
    # amp_bf16 with CUDA autocast's dtype rules (diffusion/training/autocast_rules.py, composer_compat.py)
    monkeypatch.setenv('DIFFUSION_EMULATE_GPU_PRECISION', '1')
    run = _first_run(name, assets, runs, tmp_path_factory.mktemp('recipes'))
    cfg, trainer = run['cfg'], run['trainer']
    full = load_config(REPO / 'yamls' / name)
    model = trainer.state.model
    loss = trainer.state.loss
    loss = loss['total'] if isinstance(loss, dict) else loss
    assert run['batch'] == run['start'] + STEPS and torch.isfinite(loss).all()
    algos = {type(a) for a in trainer.state.algorithms}
    if 'gradient_clipping' in (full.algorithms or {}):
        assert GradientClipping in algos
    for frozen in ('autoencoder', 'text_encoder'):  # the frozen encoders stay frozen (norm surgery included)
        part = getattr(model, frozen, None)
        if part is not None:
            assert not any(p.requires_grad for p in part.parameters()), f'{frozen} parameters became trainable'
    for algo, norm in (('low_precision_layernorm', 'LPLayerNorm'), ('low_precision_groupnorm', 'LPGroupNorm')):
        if algo in (full.algorithms or {}) and cfg.precision == 'amp_bf16':
            assert any(type(m).__name__ == norm for m in model.backbone.modules()), f'{algo}: no {norm} in the backbone'
    if 'ema' in (full.algorithms or {}):
        ema = next(a for a in trainer.state.algorithms if isinstance(a, EMA))
        assert ema.ema_started, 'EMA did not start inside the run'
    grids = [c for c in trainer.state.callbacks if type(c).__name__ == 'SampleImages']
    if grids:
        assert grids[0].saved and grids[0].saved[-1].exists(), 'no sample grid written'
        if 'ema' in (full.algorithms or {}):
            assert grids[0].weights_used[-1] == 'ema', 'the grid at fit end was not drawn with the EMA weights'

    # The recipe's checkpoint format; the frozen encoders are not in it (they load from their own weights).
    sharded = cfg.fsdp_config is not None and cfg.fsdp_config.get('state_dict_type') == 'sharded'
    latest = run['latest']
    assert latest.exists(), 'no checkpoint written'
    assert latest.resolve().is_dir() == sharded, f'checkpoint format: sharded={sharded}, found {latest.resolve()}'
    if model.__class__.__name__ == 'LatentDiffusion':
        assert not _encoder_keys(_checkpoint_model_keys(latest, sharded)), 'frozen encoders in the checkpoint'

    # Autoresume: the same config, longer: it starts from the saved batch and continues.
    more = _config(name, assets, run['out'], run['start'], cfg.load_path, STEPS + MORE)
    resumed = build_trainer(more)
    assert int(resumed.state.timestamp.batch) == run['batch'], 'autoresume did not continue from the saved batch'
    resumed.fit()
    assert int(resumed.state.timestamp.batch) == run['batch'] + MORE
    resumed.close()


@pytest.mark.parametrize('name', gpu_check.FULL_RECIPES)
def test_weight_decay_per_step_is_that_of_the_references(name):
    """One optimizer step with zero gradients at the full learning rate: the weights shrink by the decay alone."""
    from diffusion import registry
    from diffusion.builders import import_components
    assert (REPO / 'yamls' / name).exists(), f'yamls/{name} is missing'
    import_components()
    cfg = load_config(REPO / 'yamls' / name)
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))  # 1 - 1e-6 is not exact in fp32
    optimizer = registry.build(registry.optimizers, cfg.optimizer, 'optimizer', params=[weight])
    weight.grad = torch.zeros_like(weight)
    optimizer.step()
    decay = 1.0 - float(weight.detach()[0])
    family = cfg.model.get('backbone', {}).get('name') or cfg.model['name']
    reference = float(cfg.optimizer['lr']) * REFERENCE_WD[family]
    assert decay <= reference * 1.001 + 1e-12, f'weights shrink by {decay:.2e} per step (reference: {reference:.1e})'


@pytest.mark.parametrize('name', gpu_check.FULL_RECIPES)
def test_gpu_check_widths_build_on_the_meta_device(name, assets, tmp_path):
    """The GPU check's reduced widths are valid configs of the same model class, with the recipe's latent size."""
    from diffusion import registry
    from diffusion.builders import check_components
    assert (REPO / 'yamls' / name).exists(), f'yamls/{name} is missing'
    no_data = {'vae': assets['vae'], 'photos': tmp_path, 'latents': lambda text_encoder, res: tmp_path}
    raw = gpu_check.shrink(name, no_data, tmp_path, mode='gpu', steps=20, batch=32)
    cfg = load_config(base=raw)
    check_components(cfg)
    full = load_config(REPO / 'yamls' / name)
    assert cfg.precision == full.precision and cfg.fsdp_config == full.fsdp_config
    with torch.device('meta'):
        model = registry.build(registry.models, cfg.model, 'model')
    params = sum(p.numel() for p in getattr(model, 'backbone', model).parameters())
    assert 10e6 < params < 1e9, params
    if cfg.train_loader.get('use_latents'):  # the tiny VAE downsamples 4x, the recipes' 8x: same latent side
        assert cfg.train_loader['resolution'] // gpu_check.VAE_DOWNSAMPLE == full.train_loader['resolution'] // 8


def test_gpu_check_refuses_without_a_gpu():
    env = {'CUDA_VISIBLE_DEVICES': '', 'PATH': '/usr/bin:/bin'}
    proc = subprocess.run([sys.executable, 'scripts/gpu_check.py'], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and 'no CUDA GPU' in proc.stderr
    assert proc.stdout == ''


def test_gpu_check_cpu_rehearsal_runs_recipes_and_prints_json(tmp_path, capsys, demo_photos):
    """``--device cpu``: the same shrinking, build, FLOP count and fit as on the GPU, 2 fp32 steps each; a
    stage loads the checkpoint of the stage before it."""
    names = ['commoncanvas/s-c-256.yaml', 'commoncanvas/s-c-512.yaml', 'microdit/256-masked.yaml']
    status = gpu_check.main(['--device', 'cpu', '--only', *names, '--out', str(tmp_path), '--photos',
                             str(demo_photos)])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert status == 0, lines[-1]
    assert [r['recipe'] for r in result['recipes']] == names and result['ok']
    for row in result['recipes']:
        assert row['batches'] == 2 and row['gflop_per_step'] > 0 and row['step_s'] > 0 and row['mfu'] is None
    assert any(line.startswith('recipe') for line in lines)  # the table
    broken = gpu_check.main(['--device', 'cpu', '--only', 'no/such.yaml', '--out', str(tmp_path / 'x')])
    assert broken == 1 and not json.loads(capsys.readouterr().out.strip().splitlines()[-1])['ok']
