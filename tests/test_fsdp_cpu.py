"""Composer's FSDP on a CPU, two processes over gloo, with a full recipe's own wrapping: CommonCanvas-L
(yamls/commoncanvas/l-c-256.yaml: FULL_SHARD, mixed_precision DEFAULT, sharded state dict, activation checkpointing,
amp_bf16 under CUDA autocast's dtype rules) plus the EMA block of yamls/commoncanvas/s-c-512.yaml, shrunk to tiny
width as tests/test_yamls.py shrinks recipes. A run is SIGKILLed (both ranks) after a sharded checkpoint, resumed
by autoresume, and ends with the same weights, optimizer state and EMA as an uninterrupted run. Global batch 4 over
20 photos: 5 batches an epoch, so the checkpoint it resumes from is mid-epoch.

Two launches of two processes each, with the environment composer's launcher gives its ranks: ``run.py`` (killed),
then tests/fsdp_worker.py (the resumption, then the uninterrupted reference, in the same processes).
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusion.config import load_yaml
from test_yamls import full_then_tiny, latents, tiny_vae  # noqa: F401 (fixtures: tiny VAE folder, latents)

pytestmark = pytest.mark.integration  # processes of its own or a whole pipeline: pytest -m "not integration" skips it

REPO = Path(__file__).resolve().parents[1]
RECIPE = 'commoncanvas/l-c-256.yaml'
EMA_FROM = 'commoncanvas/s-c-512.yaml'
SMOOTHING = 0.5  # the recipe's 0.9999 at the recipe's time scale; 0.5 makes 4 steps of averaging visible
WRAPPER_PREFIXES = ('_fsdp_wrapped_module.', '_checkpoint_wrapped_module.')


def recipe_config(demo_photos: Path, tiny_vae: Path, latents, out: Path) -> Path:
    """The recipe at tiny width, with its own FSDP block and precision, 4 batches, a checkpoint every batch."""
    full = OmegaConf.to_container(load_yaml(REPO / 'yamls' / RECIPE), resolve=False)
    raw = full_then_tiny(RECIPE, demo_photos, tiny_vae, latents)  # sizes shrunk; precision / FSDP reset there
    raw.update(precision=full['precision'], fsdp_config=full['fsdp_config'])
    assert raw['fsdp_config']['state_dict_type'] == 'sharded' and raw['precision'] == 'amp_bf16'
    raw['model']['backbone'].update(block_out_channels=[32, 32, 32], attention_head_dim=[1, 1, 1],
                                    transformer_layers_per_block=[1, 1, 1], layers_per_block=1)
    ema = OmegaConf.to_container(load_yaml(REPO / 'yamls' / EMA_FROM), resolve=False)['algorithms']['ema']
    raw['algorithms']['ema'] = dict(ema, ema_start='1ba', smoothing=SMOOTHING)
    raw['scheduler']['t_warmup'] = '1ba'
    raw['callbacks']['sample_images'].update(prompts=['a cat'], num_inference_steps=1, folder=str(out / 'samples'))
    raw.update(global_train_batch_size=4, device_train_microbatch_size=1, max_duration='4ba', save_interval='1ba',
               save_num_checkpoints_to_keep=-1, save_folder=str(out / 'ckpt'), console_log_interval='1ba',
               deterministic_mode=True, device='cpu')
    path = out / 'recipe.yaml'
    OmegaConf.save(raw, path)
    return path


def launch(args: list[str], logs: Path, port: int) -> list[subprocess.Popen]:
    """Two ranks on this machine, with the variables composer's launcher sets (``composer -n 2``)."""
    env = dict(os.environ, WORLD_SIZE='2', LOCAL_WORLD_SIZE='2', NODE_RANK='0', MASTER_ADDR='127.0.0.1',
               MASTER_PORT=str(port), PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', DIFFUSION_EMULATE_GPU_PRECISION='1')
    return [subprocess.Popen([sys.executable, *args], cwd=REPO, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                             stdout=open(f'{logs}{r}.log', 'w'), stderr=subprocess.STDOUT) for r in range(2)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def logs_of(prefix: Path) -> str:
    return '\n'.join(Path(f'{prefix}{r}.log').read_text()[-4000:] for r in range(2))


def checkpoint(folder: Path, batch: int, tmp: Path) -> dict:
    """A sharded checkpoint folder read back into one state dict (torch's own converter, no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    [shards] = [p for p in folder.iterdir() if p.is_dir() and re.fullmatch(rf'ep\d+-ba{batch}', p.name)]
    assert (shards / '.metadata').exists() and len(list(shards.glob('__*_0.distcp'))) == 2, list(shards.iterdir())
    dest = tmp / f'{folder.parent.name}-ba{batch}.pt'
    dcp_to_torch_save(shards, dest)
    return torch.load(dest, map_location='cpu', weights_only=False)['state']


def ema_state(state: dict) -> dict:
    [ema] = [s for name, s in state['algorithms'] if name == 'EMA']
    return ema


def clean(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, '')
    return name


def test_fsdp_on_cpu_ema_sharded_checkpoint_sigkill_and_autoresume(demo_photos, tiny_vae, latents, tmp_path):
    killed, ref = tmp_path / 'killed', tmp_path / 'ref'
    killed.mkdir(), ref.mkdir()
    killed_cfg = recipe_config(demo_photos, tiny_vae, latents, killed)
    ref_cfg = recipe_config(demo_photos, tiny_vae, latents, ref)

    # 1. run.py on two ranks, both SIGKILLed as soon as a sharded checkpoint at batch >= 2 is the latest.
    procs = launch(['run.py', str(killed_cfg)], killed / 'run', free_port())
    latest, deadline = killed / 'ckpt' / 'latest-rank0.pt', time.time() + 600
    while time.time() < deadline and all(p.poll() is None for p in procs):
        target = os.readlink(latest) if latest.is_symlink() else ''
        if re.search(r'ba([2-9]|\d\d)$', target) and (latest / '.metadata').exists():
            break
        time.sleep(0.02)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    codes = [p.wait() for p in procs]
    assert codes == [-signal.SIGKILL] * 2, f'the run ended before it was killed: {codes}\n{logs_of(killed / "run")}'
    at_kill = int(re.search(r'ba(\d+)$', os.readlink(latest)).group(1))
    assert at_kill < 4, at_kill

    # 2. The same recipe again (autoresume), then the uninterrupted reference, in one two-rank launch.
    procs = launch(['tests/fsdp_worker.py', str(tmp_path / 'rank{rank}.json'), str(killed_cfg), str(ref_cfg)],
                   tmp_path / 'worker', free_port())
    codes = [p.wait(timeout=900) for p in procs]
    assert codes == [0, 0], logs_of(tmp_path / 'worker')
    for rank in range(2):
        resumed, whole = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert resumed['start_batch'] == at_kill, 'autoresume did not start from the sharded checkpoint'
        assert whole['start_batch'] == 0 and resumed['end_batch'] == whole['end_batch'] == 4
        for report in (resumed, whole):
            assert report['fsdp_children'] == ['backbone'] and report['precision'] == 'amp_bf16'
            assert report['local_backbone_numel'] < report['full_backbone_numel']  # sharded over the two ranks
            assert report['devices'] == ['cpu'] and report['loss_finite']
            assert report['sample_grid_weights'] == ['ema']  # the grid at fit end, EMA swapped in under FSDP
            placed = report['after_placing_on_meta']  # the frozen encoders move; FSDP's shards stay where they are
            assert placed['text_encoder'] == placed['autoencoder'] == ['meta'] and placed['backbone'] == ['cpu']
    assert sorted(p.name for p in (ref / 'samples').glob('*.png')) == ['ba4.png']  # sampled with EMA weights

    # 3. Resumed == uninterrupted: model (the EMA weights, swapped in for checkpointing), optimizer state and
    # the EMA algorithm's copy (the training weights), bit for bit.
    a, b = checkpoint(killed / 'ckpt', 4, tmp_path), checkpoint(ref / 'ckpt', 4, tmp_path)
    for key in ('model', 'optimizers'):
        flat_a, flat_b = _tensors(a[key]), _tensors(b[key])
        assert flat_a.keys() == flat_b.keys() and flat_a
        for name in flat_a:
            assert torch.equal(flat_a[name], flat_b[name]), f'{key}: {name} differs after the resume'
    ema_a, ema_b = ema_state(a)['ema_model'], ema_state(b)['ema_model']
    for name, value in ema_b['named_parameters_dict'].items():
        assert torch.equal(ema_a['named_parameters_dict'][name], value), name

    # 4. EMA under sharding: at every checkpoint k the model holds EMA_k and EMA's copy the training weights W_k;
    # EMA_k = s * EMA_(k-1) + (1 - s) * W_k for every trainable (sharded) parameter.
    states = {k: checkpoint(ref / 'ckpt', k, tmp_path) for k in (1, 2, 3, 4)}
    for k in (2, 3, 4):
        ema = ema_state(states[k])
        assert ema['ema_started'] and ema['ema_weights_active']
        training = {clean(n): w for n, w in ema['ema_model']['named_parameters_dict'].items()}
        assert training and all(n.startswith('backbone.') for n in training)
        previous, current = states[k - 1]['model'], states[k]['model']
        for name, w in training.items():
            expected = SMOOTHING * previous[name].float() + (1 - SMOOTHING) * w.float()
            torch.testing.assert_close(current[name].float(), expected, rtol=1e-5, atol=1e-7)
    # (the warm-up's first step has lr 0: the weights move from batch 3 on)
    moved = [n for n, w in training.items() if not torch.equal(states[4]['model'][n], w)]
    assert len(moved) > len(training) // 2, 'the EMA weights equal the training weights'


def _tensors(tree, prefix=''):
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _tensors(sub, f'{prefix}.{key}').items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _tensors(sub, f'{prefix}.{i}').items()}
    return {}
