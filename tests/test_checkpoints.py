"""Checkpoints as composer writes them at scale: sharded folders (FSDP ``state_dict_type: sharded``), large files, no
frozen encoders.

The sharded checkpoint here is written the way composer writes one (``composer.utils.checkpoint._save_checkpoint``):
two gloo processes, the backbone wrapped in torch's FSDP on the CPU, the model state dict from
``get_model_state_dict(full_state_dict=False)``, saved with ``torch.distributed.checkpoint.save`` through a
``FileSystemWriter`` on the folder ``ep{epoch}-ba{batch}`` with ``DefaultSavePlanner(dedup_save_to_lowest_rank=True)``,
rank 0 alone saving the RNG state, and ``latest-rank0.pt`` linking to the folder. Run as a script, this file is
that writer (one process per rank).
"""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BATCH = 6


def _overrides(data: str) -> list[str]:
    return [f'variables.data={data}', 'callbacks={}', 'eval_loader=null']


def _write_sharded(out: Path, data: str) -> None:
    """One rank of the writer (RANK / WORLD_SIZE / MASTER_* from the environment)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dist_cp
    from composer.core import Timestamp
    from composer.utils import reproducibility
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel

    from diffusion import registry
    from diffusion.builders import import_components
    from diffusion.config import load_config, save_config

    dist.init_process_group('gloo')
    cfg = load_config(REPO / 'yamls/tiny-cpu.yaml', _overrides(data))
    import_components()
    torch.manual_seed(0)
    model = registry.build(registry.models, cfg.model, 'model')
    with torch.no_grad():  # trained weights, not the initial ones
        for p in model.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    if dist.get_rank() == 0:
        save_config(cfg, out / 'config.yaml')
        torch.save(model.state_dict(), out / 'expected.pt')
    model.backbone = FullyShardedDataParallel(model.backbone, device_id=torch.device('cpu'), use_orig_params=True)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False, cpu_offload=True))
    state = {'state': {'model': sd, 'timestamp': {'Timestamp': Timestamp(batch=BATCH, sample=4 * BATCH).state_dict()},
                       'run_name': 'sharded', 'algorithms': []},
             'rng': reproducibility.get_rng_state()}
    if dist.get_rank() > 0:
        state.pop('rng')
    folder = out / f'ep0-ba{BATCH}'
    dist_cp.save(state, storage_writer=dist_cp.FileSystemWriter(str(folder)),
                 planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))
    dist.barrier()
    if dist.get_rank() == 0:
        os.symlink(folder.name, out / 'latest-rank0.pt')
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def sharded_run(tmp_path_factory) -> Path:
    """A save folder with one sharded checkpoint of the tiny model (2 ranks), its config.yaml and the expected
    weights (``expected.pt``)."""
    out = tmp_path_factory.mktemp('sharded')
    env = dict(os.environ, MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port()), WORLD_SIZE='2',
               OMP_NUM_THREADS='1', PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, __file__, str(out), 'data/demo_photos'], cwd=REPO,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), '\n'.join(log[-3000:] for log in logs)
    return out


def test_sharded_checkpoint_layout_is_composers(sharded_run):
    folder = sharded_run / f'ep0-ba{BATCH}'
    assert sorted(p.name for p in folder.iterdir()) == ['.metadata', '__0_0.distcp', '__1_0.distcp']
    assert os.readlink(sharded_run / 'latest-rank0.pt') == folder.name


def test_repair_keeps_a_complete_sharded_checkpoint_and_sets_aside_unfinished_ones(sharded_run, tmp_path, caplog):
    """Finding 5: a sharded checkpoint is a folder; `repair_latest_checkpoint` checks its index and shards."""
    from diffusion.checkpoints import load_checkpoint_state
    from diffusion.training.checkpointing import checkpoint_is_complete, repair_latest_checkpoint
    run = tmp_path / 'run'
    shutil.copytree(sharded_run, run, symlinks=True)
    good = run / f'ep0-ba{BATCH}'
    assert checkpoint_is_complete(good)
    # Later saves that did not finish: killed before rank 0 wrote the index, a shard cut short, a shard gone
    # (e.g. a rotation's rmtree interrupted).
    no_index, short, missing = run / 'ep0-ba9', run / 'ep0-ba12', run / 'ep1-ba15'
    for broken in (no_index, short, missing):
        shutil.copytree(good, broken)
    (no_index / '.metadata').unlink()
    shard = short / '__1_0.distcp'
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    (missing / '__1_0.distcp').unlink()
    for broken in (no_index, short, missing):
        assert not checkpoint_is_complete(broken)
    os.unlink(run / 'latest-rank0.pt')
    os.symlink(missing.name, run / 'latest-rank0.pt')  # composer linked the newest before the kill

    assert repair_latest_checkpoint(str(run)) == good
    assert os.readlink(run / 'latest-rank0.pt') == good.name
    assert sorted(p.name for p in run.iterdir() if p.name.startswith('ep')) == [
        'ep0-ba12.corrupt', f'ep0-ba{BATCH}', 'ep0-ba9.corrupt', 'ep1-ba15.corrupt']
    assert sorted(p.name for p in good.iterdir()) == ['.metadata', '__0_0.distcp', '__1_0.distcp']
    state = load_checkpoint_state(run / 'latest-rank0.pt', only=('timestamp',))
    assert state['state']['timestamp']['Timestamp']['batch'] == BATCH
    # Run again (the next restart): nothing more to do, the folders set aside stay as they are.
    assert repair_latest_checkpoint(str(run)) == good and good.is_dir()
    assert (run / 'ep0-ba9.corrupt').is_dir() and not list(run.glob('*.corrupt.corrupt'))


@pytest.mark.integration
def test_composer_sharded_run_autoresumes_past_an_unfinished_save_and_rotates_earlier_folders(tmp_path, capsys,
                                                                                             monkeypatch):
    """A real composer FSDP run (one process on the CPU, ``state_dict_type: sharded``): killed during a later
    save (a folder with a shard and no index, ``latest`` already on it), the same command resumes from the last
    complete folder; the unfinished one is set aside and kept, and the earlier process's folder is rotated out by
    ``save_num_checkpoints_to_keep`` (AdoptEarlierCheckpoints)."""
    from omegaconf import OmegaConf

    from diffusion.training.train import main
    monkeypatch.chdir(REPO)
    ckpt, recipe = tmp_path / 'ckpt', tmp_path / 'tiny-no-callbacks.yaml'
    raw = OmegaConf.load(REPO / 'yamls/tiny-cpu.yaml')
    del raw['callbacks']  # no sample grid: the run only trains and checkpoints
    OmegaConf.save(raw, recipe)
    args = [str(recipe), f'variables.data={REPO / "data/demo_photos"}',
            'variables.run_name=sharded', f'save_folder={ckpt}', 'eval_loader=null',
            'save_interval=2ba', 'eval_first=false', 'autoresume=true', 'save_overwrite=false',
            'save_num_checkpoints_to_keep=1', 'global_train_batch_size=4', 'progress_bar=false',
            'fsdp_config={state_dict_type: sharded, sharding_strategy: FULL_SHARD}']
    assert main(args + ['max_duration=4ba']) == 0  # run.py's main, in this process
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith('ep')) == ['ep0-ba4']
    unfinished = ckpt / 'ep0-ba6'
    unfinished.mkdir()
    shutil.copy(ckpt / 'ep0-ba4' / '__0_0.distcp', unfinished)
    os.unlink(ckpt / 'latest-rank0.pt')
    os.symlink(unfinished.name, ckpt / 'latest-rank0.pt')
    capsys.readouterr()
    assert main(args + ['max_duration=8ba']) == 0
    out = capsys.readouterr().out
    # resumed from batch 4 (not from the unfinished save at 6): the first loss of this run is batch 5's
    assert 'run sharded: 8 batches' in out and '(at batch 5:' in out, out[-2000:]
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith('ep')) == ['ep0-ba6.corrupt', 'ep1-ba8']
    assert os.readlink(ckpt / 'latest-rank0.pt') == 'ep1-ba8'


def test_load_model_reads_a_sharded_checkpoint(sharded_run):
    """generate / eval / export load a run saved with sharded checkpoints (folder or its `latest` link)."""
    from diffusion.checkpoints import find_checkpoint, load_model
    expected = torch.load(sharded_run / 'expected.pt', map_location='cpu', weights_only=True)
    assert find_checkpoint(sharded_run) == sharded_run / f'ep0-ba{BATCH}'
    model, info = load_model(sharded_run)
    assert info.batch == BATCH and info.weights == 'training' and info.run_name == 'sharded'
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Checkpoints without the frozen encoders
# ---------------------------------------------------------------------------------------------
FROZEN = ('autoencoder.', 'text_encoder.')


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory, demo_photos):
    """A 2-batch tiny-cpu run (real MiniLM text encoder, seeded random autoencoder) with composer's EMA."""
    from diffusion.config import load_config
    from diffusion.training.train import build_trainer
    from omegaconf import OmegaConf
    raw = OmegaConf.to_container(OmegaConf.load(REPO / 'yamls/tiny-cpu.yaml'))
    raw['callbacks'], raw['eval_loader'] = {}, None
    raw['algorithms'] = {'ema': {'half_life': '1ba'}}
    out = tmp_path_factory.mktemp('tiny_run')
    trainer = build_trainer(load_config(base=raw, overrides=[
        f'variables.data={demo_photos}', f'save_folder={out}', 'max_duration=2ba', 'save_interval=2ba',
        'global_train_batch_size=4', 'scheduler.t_warmup=0ba', 'log_to_console=false', 'progress_bar=false']))
    trainer.fit()
    trainer.close()
    return trainer, out


def test_checkpoints_leave_out_the_frozen_encoders(tiny_run, demo_photos, tmp_path):
    """Finding 9 / issue 26: a checkpoint holds what trains (backbone, optimizer, EMA), not the frozen encoders;
    the model rebuilt from the config has the same encoders, and every loader accepts their absence."""
    from composer.utils import reproducibility

    from diffusion.checkpoints import load_model
    from diffusion.config import load_config
    from diffusion.models.frozen_state import include_frozen_parts
    from diffusion.training.train import build_trainer
    trainer, out = tiny_run
    ckpt = (out / 'latest-rank0.pt').resolve()
    state = torch.load(ckpt, map_location='cpu', weights_only=False)
    model = trainer.state.model
    assert not [k for k in state['state']['model'] if k.startswith(FROZEN)]
    assert any(k.startswith('backbone.') for k in state['state']['model'])
    # Size: the same checkpoint with the encoders put back is larger by their bytes (~91 MB of MiniLM).
    with include_frozen_parts(model):
        complete = model.state_dict()
    frozen_bytes = sum(v.numel() * v.element_size() for k, v in complete.items() if k.startswith(FROZEN))
    state['state']['model'] = complete
    torch.save(state, tmp_path / 'with_encoders.pt')
    before, after = (tmp_path / 'with_encoders.pt').stat().st_size, ckpt.stat().st_size
    print(f'tiny-cpu checkpoint: {before / 1e6:.1f} MB with the frozen encoders, {after / 1e6:.1f} MB without')
    assert before - after >= 0.99 * frozen_bytes > 80e6

    # generate / eval / export: the encoders come from the config and equal those the run trained with.
    loaded, info = load_model(out, weights='training')
    for part in ('autoencoder', 'text_encoder'):
        theirs = getattr(loaded, part).state_dict()
        for name, value in getattr(model, part).state_dict().items():
            assert torch.equal(theirs[name], value), f'{part}.{name}'
    # Composer's load_path, strict, with and without load_weights_only (stage 2 loading stage 1).
    for weights_only in ('true', 'false'):
        reproducibility.seed_all(1)  # the encoders do not depend on the global seed
        cfg = load_config(out / 'config.yaml', [f'save_folder={tmp_path}/s2-{weights_only}', f'load_path={ckpt}',
                                                f'load_weights_only={weights_only}', 'load_strict_model_weights=true',
                                                'max_duration=3ba', 'autoresume=false'])
        resumed = build_trainer(cfg)
        assert int(resumed.state.timestamp.batch) == (0 if weights_only == 'true' else 2)
        with include_frozen_parts(model), include_frozen_parts(resumed.state.model):
            a, b = model.state_dict(), resumed.state.model.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
        resumed.close()



# ---------------------------------------------------------------------------------------------
# The run history behind summary.json: bounded memory
# ---------------------------------------------------------------------------------------------
def test_run_history_memory_is_bounded_and_keeps_first_and_last(tiny_run):
    """Finding 9: composer's InMemoryLogger on every rank grew ~2 GB per rank over 550k batches. The summary's
    logger keeps per key the first, the last and at most `max_points` evenly spaced values."""
    import tracemalloc
    import types

    from composer.core import State
    from composer.devices import DeviceCPU
    from composer.loggers import Logger

    from diffusion.training.summary import _history, summarize, summary_logger
    model, _ = tiny_run[0].state.model, None
    state = State(model=model, rank_zero_seed=0, run_name='history', device=DeviceCPU())
    history = summary_logger()
    logger = Logger(state, destinations=[history])
    history.init(state, logger)

    def log_batches(n: int) -> None:
        for _ in range(n):
            batch = int(state.timestamp.batch)
            logger.log_metrics({'loss/train/total': torch.tensor(1.0 / (batch + 1)), 'lr-DecoupledAdamW/group0': 1e-4,
                                'throughput/batches_per_sec': 3.0, 'metrics/eval/MeanMetric': float(batch)})
            state.timestamp = state.timestamp.to_next_batch(samples=4)

    log_batches(10_000)
    tracemalloc.start()
    held = tracemalloc.get_traced_memory()[0]
    log_batches(10_000)
    grown = tracemalloc.get_traced_memory()[0] - held
    tracemalloc.stop()
    # Composer's InMemoryLogger grows by ~20 MB here (a Timestamp and a value per key and batch).
    assert grown < 1_000_000, f'the history grew by {grown} bytes over 10,000 batches'
    for key, points in history.data.items():
        assert len(points) <= history.max_points + 1, key
    points = _history(types.SimpleNamespace(logger=logger))['loss/train/total']
    assert points[0] == [1, 1.0] and points[-1] == [20_000, pytest.approx(1 / 20_000)]  # batch numbers from 1
    gaps = {b - a for (a, _), (b, _) in zip(points[:-2], points[1:-1])}
    assert len(gaps) == 1, f'kept points are not evenly spaced: {sorted(gaps)}'

    # A real run's summary.json still has the first and last train loss, at the batch numbers the console prints
    # (1 and 2 of a 2-batch run), and its last eval metric at the batch it followed.
    summary = summarize(tiny_run[0], 1.0)
    assert summary['first']['loss/train/total'][0] == 1 and summary['last']['loss/train/total'][0] == 2
    assert summary['batches'] == 2


if __name__ == '__main__':
    _write_sharded(Path(sys.argv[1]), sys.argv[2])
