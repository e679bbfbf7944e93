"""End to end: the tiny config trains with a real composer Trainer, checkpoints round-trip, runs resume,
and DDP over gloo runs with two processes."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion.config import ConfigError, load_config
from diffusion.builders import build_components
from diffusion.training.train import build_trainer

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(data: Path, out: Path, **extra: str) -> list[str]:
    over = {
        'variables.data': str(data),
        'variables.run_name': 'test-tiny',
        'save_folder': str(out / 'ckpt'),
        'callbacks.sample_images.folder': str(out / 'samples'),
        'callbacks.sample_images.num_inference_steps': '2',
        'max_duration': '4ba',
        'eval_interval': '2ba',
        'save_interval': '2ba',
        'console_log_interval': '1ba',
    }
    over.update(extra)
    return [f'{k}={v}' for k, v in over.items()]


@pytest.fixture(scope='module')
def first_run(demo_photos, tmp_path_factory):
    out = tmp_path_factory.mktemp('tiny_run')
    cfg = load_config(REPO / 'yamls/tiny-cpu.yaml', tiny_overrides(demo_photos, out))
    trainer = build_trainer(cfg)
    trainer.fit()
    return trainer, out


def test_tiny_fit_writes_checkpoint_and_samples(first_run):
    trainer, out = first_run
    assert int(trainer.state.timestamp.batch) == 4
    assert torch.isfinite(trainer.state.loss).all()
    ckpts = sorted((out / 'ckpt').glob('*.pt'))
    assert ckpts, 'no checkpoint written'
    pngs = sorted((out / 'samples').glob('*.png'))
    assert pngs, 'no sample grid written'
    from PIL import Image
    with Image.open(pngs[-1]) as im:
        assert im.size[0] > 64 and im.size[1] >= 64
    val = trainer.state.eval_metrics['eval']['ValidationLoss'].compute()
    assert torch.isfinite(val)


def test_checkpoint_round_trip_and_resume(first_run, demo_photos, tmp_path):
    trainer, out = first_run
    ckpt = out / 'ckpt' / 'latest-rank0.pt'
    assert ckpt.exists()
    # A new trainer that loads the checkpoint has the same weights and continues at batch 4.
    cfg = load_config(REPO / 'yamls/tiny-cpu.yaml',
                      tiny_overrides(demo_photos, tmp_path, max_duration='6ba', load_path=str(ckpt)))
    resumed = build_trainer(cfg)
    assert int(resumed.state.timestamp.batch) == 4
    before = trainer.state.model.backbone.state_dict()
    after = resumed.state.model.backbone.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(before[key], after[key], rtol=0, atol=0)
    resumed.fit()
    assert int(resumed.state.timestamp.batch) == 6
    moved = resumed.state.model.backbone.state_dict()
    assert any(not torch.equal(before[k], moved[k]) for k in before), 'training after resume changed nothing'


def test_weights_only_load_into_fresh_model(first_run, demo_photos, tmp_path):
    trainer, out = first_run
    ckpt = out / 'ckpt' / 'latest-rank0.pt'
    state = torch.load(ckpt, map_location='cpu', weights_only=False)
    weights = state['state']['model']
    cfg = load_config(REPO / 'yamls/tiny-cpu.yaml', tiny_overrides(demo_photos, tmp_path))
    fresh = build_components(cfg, 2)['model']
    result = fresh.load_state_dict(weights, strict=True)  # strict: a key mismatch raises
    assert result.missing_keys == [] and result.unexpected_keys == []
    key = next(k for k in weights if k.startswith('backbone.'))
    torch.testing.assert_close(fresh.state_dict()[key], weights[key], rtol=0, atol=0)  # the weights arrived


def test_cpu_rejects_gpu_only_precision(demo_photos, tmp_path, monkeypatch):
    monkeypatch.delenv('DIFFUSION_EMULATE_GPU_PRECISION', raising=False)
    cfg = load_config(REPO / 'yamls/tiny-cpu.yaml', tiny_overrides(demo_photos, tmp_path) + ['precision=amp_bf16'])
    with pytest.raises(ConfigError, match='precision'):
        build_trainer(cfg)


def test_amp_bf16_on_cpu_with_cuda_autocast_rules(demo_photos, tmp_path, monkeypatch):
    # DIFFUSION_EMULATE_GPU_PRECISION=1 (tests): composer's amp_bf16 runs on the CPU with CUDA autocast's dtype
    # rules (diffusion/training/autocast_rules.py): matmuls in bf16, softmax and norms in fp32, as on a GPU.
    from composer.core import Precision
    monkeypatch.setenv('DIFFUSION_EMULATE_GPU_PRECISION', '1')
    seen = {}

    def inside_forward(module, args, out):
        seen.setdefault('autocast', torch.is_autocast_enabled('cpu'))
        seen.setdefault('dtype', torch.get_autocast_dtype('cpu'))
        x = torch.randn(2, 3)
        seen.setdefault('softmax', torch.softmax(x, -1).dtype)  # CUDA's rule: fp32 (CPU autocast's: bf16)
        seen.setdefault('matmul', (x @ x.T).dtype)

    over = tiny_overrides(demo_photos, tmp_path, max_duration='1ba', eval_interval='100ba') + [
        'precision=amp_bf16', 'save_folder=null', 'callbacks.sample_images.prompts=[a cat]',
        'callbacks.sample_images.num_inference_steps=1']
    trainer = build_trainer(load_config(REPO / 'yamls/tiny-cpu.yaml', over))
    trainer.state.model.backbone.register_forward_hook(inside_forward)
    trainer.fit()
    assert trainer.state.precision == Precision.AMP_BF16 and torch.isfinite(trainer.state.loss).all()
    assert seen == {'autocast': True, 'dtype': torch.bfloat16, 'softmax': torch.float32, 'matmul': torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.state.model.parameters())  # fp32 master weights


def test_run_py_reports_config_errors():
    proc = subprocess.run([sys.executable, 'run.py', 'yamls/tiny-cpu.yaml', 'no_such_key=1'], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert 'no_such_key' in proc.stderr and 'Allowed keys' in proc.stderr
    assert 'Traceback' not in proc.stderr
