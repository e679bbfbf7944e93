"""What ``run.py`` does around the Trainer: threads per process, a guarded run folder, a quiet log kept on disk.

* :func:`set_process_threads`: torch's intra-op threads from the cores each local process gets (``composer -n 2``
  on 2 cores ran 2.6-7x slower per batch with every process using every core), unless ``OMP_NUM_THREADS`` is set.
* :func:`check_run_folder`: a new run under an existing run folder whose saved ``config.yaml`` has other settings
  stops with one line, instead of repointing ``latest`` and replacing the summary, config and sample grids.
* :func:`run_log`: the run's log also written to ``<run folder>/train.log`` (python logging, the console lines
  and every metric behind them, prints and warnings), the config printed as one short summary, known library
  noise dropped where raised.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from diffusion.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

__all__ = ['check_run_folder', 'config_summary', 'local_run_folder', 'quiet_library_noise', 'run_log',
           'set_process_threads', 'threads_per_process']


# ---------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------
def threads_per_process(cpus: int, local_world_size: int) -> int:
    """The cores each of ``local_world_size`` processes on a machine with ``cpus`` cores gets (at least 1)."""
    return max(1, cpus // max(1, local_world_size))


def set_process_threads(env: Optional[dict[str, str]] = None) -> int:
    """Set torch's intra-op threads to this process's share of the cores (``LOCAL_WORLD_SIZE``: the processes
    composer's launcher starts on this machine) and log it; ``OMP_NUM_THREADS``, when set, is left to decide.

    Returns:
        The number of intra-op threads torch uses.
    """
    import torch
    env = os.environ if env is None else env
    if env.get('OMP_NUM_THREADS'):
        log.info('torch threads: %d (OMP_NUM_THREADS=%s)', torch.get_num_threads(), env['OMP_NUM_THREADS'])
        return torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    local = int(env.get('LOCAL_WORLD_SIZE') or 1)
    # One process keeps torch's own choice (already one thread a core, and a resumed run keeps its numerics);
    # several on one machine share the cores.
    threads = threads_per_process(cpus, local) if local > 1 else torch.get_num_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.info('torch threads: %d per process (%d cores / %d process%s on this machine; set OMP_NUM_THREADS to '
             'choose)', threads, cpus, local, '' if local == 1 else 'es')
    return threads


# ---------------------------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------------------------
def local_run_folder(cfg: TrainConfig) -> Optional[Path]:
    """The local folder of a run's record: the save folder, or its parent when it is ``.../checkpoints`` (the
    recipes' ``outputs/<run_name>/checkpoints``); None without a local save folder."""
    if not cfg.save_folder or '://' in cfg.save_folder:
        return None
    folder = Path(cfg.save_folder.format(run_name=cfg.run_name))
    return folder.parent if folder.name == 'checkpoints' else folder


# Keys that do not change what a run trains: a run's record may be continued under other values of these.
_BOOKKEEPING = {'autoresume', 'save_overwrite', 'load_path', 'load_weights_only', 'load_strict_model_weights',
                'load_ignore_keys', 'console_log_interval', 'log_to_console', 'progress_bar', 'python_log_level',
                'eval_interval', 'eval_first', 'eval_subset_num_batches', 'save_interval', 'save_folder',
                'save_num_checkpoints_to_keep', 'save_weights_only', 'dist_timeout', 'device_train_microbatch_size',
                'device_eval_batch_size', 'callbacks', 'loggers', 'dry_run', 'throughput', 'device', 'variables'}


def _has_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and (any(folder.glob('*.pt')) or any(p.is_dir() and (p / '.metadata').exists()
                                                                 for p in folder.iterdir()))


def check_run_folder(cfg: TrainConfig, overwrite_asked: bool) -> None:
    """Refuse to start a new run over an existing run's record with other settings.

    A run resumes (``autoresume`` with a checkpoint in the save folder): allowed. A new run where
    ``<save folder>/config.yaml`` exists and differs in a key that changes what is trained (not bookkeeping such
    as intervals, loggers or callbacks): a :class:`ConfigError`, unless ``overwrite_asked`` (``save_overwrite=true``
    on the command line; the recipes' own ``save_overwrite: true`` only lets composer replace checkpoint files).

    Raises:
        ConfigError: One line naming the folder, the differing keys and the three ways on.
    """
    from omegaconf import OmegaConf
    folder = Path(cfg.save_folder.format(run_name=cfg.run_name)) if local_run_folder(cfg) else None
    if folder is None or not (folder / 'config.yaml').is_file() or overwrite_asked:
        return
    if cfg.autoresume and _has_checkpoint(folder):
        return
    old = OmegaConf.to_container(OmegaConf.load(folder / 'config.yaml'))
    new = dataclasses.asdict(cfg)
    changed = sorted(k for k in set(old) | set(new) if k not in _BOOKKEEPING and old.get(k) != new.get(k))
    if changed:
        raise ConfigError(f'{folder} holds run {old.get("run_name")!r} trained with other settings ({", ".join(changed)}'
                          f' differ); resume it (autoresume=true with its settings), pass a new run_name=..., '
                          f'or pass save_overwrite=true to replace it')


def overwrite_asked(argv: Sequence[str]) -> bool:
    """Whether the command line (not the YAML) says ``save_overwrite=true``."""
    return any(re.fullmatch(r'\+*save_overwrite=(true|True|1|yes)', a.strip()) for a in argv)


# ---------------------------------------------------------------------------------------------
# Output: quiet, and kept on disk
# ---------------------------------------------------------------------------------------------
class _Tee:
    """A text stream writing to the terminal stream and to the run's log file."""

    def __init__(self, stream: Any, file: Any):
        self._stream, self._file = stream, file

    def write(self, text: str) -> int:
        self._file.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._file.flush()
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the terminal stream
        return getattr(self._stream, name)


class _DropDefaultsNotices(logging.Filter):
    """streaming logs, per dataset and rank, which unset arguments it defaulted (``predownload``,
    ``num_canonical_nodes``, ``shuffle_block_size``): INFO lines with nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return 'was not specified' not in record.getMessage()


def quiet_library_noise() -> None:
    """Drop, where they are raised, the library messages a normal run prints with nothing for the user to do."""
    # Composer splits every eval batch into microbatches of device_eval_batch_size; the last, shorter batch of an
    # eval set is then "not split" (correctly) with a warning at every evaluation.
    warnings.filterwarnings('ignore', message=r'Cannot split (list|tensor) of length', category=UserWarning,
                            module=r'composer\.core\.data_spec')
    # eval_subset_num_batches larger than a small eval set: composer evaluates the whole set, as asked.
    warnings.filterwarnings('ignore', message=r'DataloaderNumBatchesWarning', module=r'composer\.core\.state')
    streaming_log = logging.getLogger('streaming.base.dataset')
    if not any(isinstance(f, _DropDefaultsNotices) for f in streaming_log.filters):
        streaming_log.addFilter(_DropDefaultsNotices())


def config_summary(cfg: TrainConfig) -> str:
    """The config in a few lines: the components by name and the numbers that set the run's length."""
    def name(block: Any) -> str:
        return block.get('name', '?') if isinstance(block, dict) else '-'

    model = cfg.model
    parts = {'model': name(model) + ''.join(f' {k}={name(model.get(k))}' for k in ('backbone', 'autoencoder',
                                                                                    'text_encoder') if k in model),
             'data': f"{cfg.train_loader.get('local') or cfg.train_loader.get('remote') or 'streams'}"
                     f" ({cfg.train_loader.get('resolution', '?')} px)",
             'batch': f'{cfg.global_train_batch_size} for {cfg.max_duration}',
             'optimizer': f"{name(cfg.optimizer)} lr={cfg.optimizer.get('lr')}",
             'precision': cfg.precision, 'seed': cfg.seed}
    return f'run {cfg.run_name}: ' + '; '.join(f'{k} {v}' for k, v in parts.items())


@contextlib.contextmanager
def run_log(cfg: TrainConfig, rank: int) -> Iterator[Optional[Path]]:
    """Within: python logging, prints and warnings also go to ``<run folder>/train.log`` (rank 0, appended), and
    so do the full metrics behind each console line (``diffusion.metrics``, never on the console); prints the
    config summary once."""
    from diffusion.training.console import METRICS_LOG
    quiet_library_noise()
    folder = local_run_folder(cfg)
    if folder is None or rank != 0:
        yield None
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / 'train.log'
    file = path.open('a', encoding='utf-8', buffering=1)
    handler = logging.FileHandler(path, encoding='utf-8')
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
    root = logging.getLogger()
    root.addHandler(handler)
    METRICS_LOG.addHandler(handler)
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, file), _Tee(err, file)
    try:
        log.info('%s', config_summary(cfg))
        from composer.utils import dist
        world, local = dist.get_world_size(), dist.get_local_world_size()
        log.info('processes: %d on %d node%s', world, world // local, '' if world // local == 1 else 's')
        log.info('log: %s; full config: %s', path, Path(cfg.save_folder.format(run_name=cfg.run_name)) /
                 'config.yaml')
        yield path
    finally:
        sys.stdout, sys.stderr = out, err
        root.removeHandler(handler)
        METRICS_LOG.removeHandler(handler)
        handler.close()
        file.close()


def tensorboard_in_run_folder(cfg: TrainConfig) -> None:
    """A ``tensorboard`` logger without ``log_dir`` writes to ``<run folder>/tensorboard`` (composer's default is
    ``./tensorboard_logs`` in whatever folder the command ran from)."""
    folder = local_run_folder(cfg)
    for label, block in list(cfg.loggers.items()):
        block = dict(block or {})
        if block.get('name', label) == 'tensorboard' and not block.get('log_dir') and folder is not None:
            cfg.loggers[label] = {**block, 'log_dir': str(folder / 'tensorboard')}
