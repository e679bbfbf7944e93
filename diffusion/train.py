"""Turn a validated config into a ``composer.Trainer`` (and run it).

The Trainer is the training loop: everything specific to diffusion lives in the model, the data, the
algorithms and the callbacks that the config names. ``run.py`` calls :func:`main`.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from diffusion.config import ConfigError, TrainConfig, check_data_paths, cli_config, load_config, save_config

log = logging.getLogger(__name__)

__all__ = ['import_components', 'check_components', 'build_components', 'build_trainer', 'train', 'main']

# Modules whose import registers components by name. Listed once, here.
COMPONENT_MODULES = (
    'diffusion.schedules',
    'diffusion.models',
    'diffusion.data.dataset',
    'diffusion.algorithms',
    'diffusion.callbacks',
)


def import_components() -> None:
    """Import every module that registers a model, backbone, schedule, dataloader or callback."""
    for module in COMPONENT_MODULES:
        importlib.import_module(module)


def _build_mapping(reg: Any, blocks: dict[str, Any], where: str) -> list[Any]:
    """Build ``{label: {kwargs}}`` blocks (llm-foundry style); ``name:`` inside a block overrides the label."""
    from diffusion import registry
    built = []
    for label, kwargs in (blocks or {}).items():
        kwargs = dict(kwargs or {})
        kwargs.setdefault('name', label)
        built.append(registry.build(reg, kwargs, f'{where}.{label}'))
    return built


def _device_batch_size(cfg: TrainConfig, world_size: int) -> int:
    if cfg.global_train_batch_size % world_size:
        raise ConfigError(f'global_train_batch_size={cfg.global_train_batch_size} is not divisible by the '
                          f'number of processes ({world_size})')
    return cfg.global_train_batch_size // world_size


def fsdp_config(cfg: TrainConfig) -> Any:
    """The ``fsdp_config`` block as composer's ``FSDPConfig`` (checked on any machine), or None."""
    if cfg.fsdp_config is None:
        return None
    import dataclasses

    from composer.utils.parallelism import FSDPConfig
    allowed = [f.name for f in dataclasses.fields(FSDPConfig)]
    unknown = sorted(set(cfg.fsdp_config) - set(allowed))
    if unknown:
        raise ConfigError(f'fsdp_config: unknown key(s) {unknown}; composer FSDPConfig accepts {allowed}')
    try:
        return FSDPConfig(**cfg.fsdp_config)
    except (TypeError, ValueError) as err:
        raise ConfigError(f'fsdp_config: {err}') from err


def _check_hardware(cfg: TrainConfig) -> str:
    fsdp_config(cfg)  # a bad FSDP block is a config error here too, not only on the GPU cluster
    device = cfg.device or ('gpu' if torch.cuda.is_available() else 'cpu')
    if device == 'gpu' and not torch.cuda.is_available():
        raise ConfigError('device: gpu was asked for, but no CUDA device is visible')
    if device == 'cpu' and cfg.precision != 'fp32':
        raise ConfigError(f'precision: {cfg.precision} needs a GPU; Composer trains on CPU in fp32 only '
                          '(override with precision=fp32)')
    if cfg.fsdp_config is not None and not torch.cuda.is_available():
        raise ConfigError('fsdp_config: composer FSDP needs CUDA GPUs with NCCL; it cannot run on this machine. '
                          'Set fsdp_config=null to train with DDP (gloo on CPU).')
    return device


def check_components(cfg: TrainConfig) -> None:
    """Check every component block (names, argument names, simple types, nested blocks) before building any.

    Raises:
        UnknownComponentError: Naming the block's key, what is wrong and what it accepts.
    """
    from diffusion import registry
    registry.check(registry.models, cfg.model, 'model')
    registry.check(registry.dataloaders, cfg.train_loader, 'train_loader', ('batch_size',))
    if cfg.eval_loader is not None:
        registry.check(registry.dataloaders, cfg.eval_loader, 'eval_loader', ('batch_size',))
    registry.check(registry.optimizers, cfg.optimizer, 'optimizer', ('params',))
    if cfg.scheduler:
        registry.check(registry.schedulers, cfg.scheduler, 'scheduler')
    for where in ('algorithms', 'callbacks', 'loggers'):
        reg = getattr(registry, where)
        for label, kwargs in (getattr(cfg, where) or {}).items():
            registry.check(reg, {'name': label, **(kwargs or {})}, f'{where}.{label}')


def build_components(cfg: TrainConfig, device_batch_size: int = 1) -> dict[str, Any]:
    """Build model, dataloaders, optimizer, scheduler, algorithms, callbacks and loggers from a config.

    Separate from :func:`build_trainer` so tests can build every YAML (at tiny size) without training.
    """
    from diffusion import registry  # imports llm-foundry (~30 s): only once the config is known to be valid
    import_components()
    for block, key in ((cfg.train_loader, 'train_loader'), (cfg.eval_loader or {}, 'eval_loader')):
        if 'batch_size' in block:
            raise ConfigError(f'{key}.batch_size: set global_train_batch_size (train) or device_eval_batch_size '
                              '(eval) at the top level instead')
    check_components(cfg)
    model = registry.build(registry.models, cfg.model, 'model')
    train_dl = registry.build(registry.dataloaders, cfg.train_loader, 'train_loader', batch_size=device_batch_size)
    eval_dl = None
    if cfg.eval_loader is not None:
        eval_dl = registry.build(registry.dataloaders, cfg.eval_loader, 'eval_loader',
                                 batch_size=cfg.device_eval_batch_size or device_batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    if hasattr(model, 'param_groups'):  # e.g. MoE experts at a different learning rate
        params = model.param_groups(cfg.optimizer)
    optimizer = registry.build(registry.optimizers, cfg.optimizer, 'optimizer', params=params)
    scheduler = registry.build(registry.schedulers, cfg.scheduler, 'scheduler') if cfg.scheduler else None
    return {
        'model': model,
        'train_dataloader': train_dl,
        'eval_dataloader': eval_dl,
        'optimizers': optimizer,
        'schedulers': scheduler,
        'algorithms': _build_mapping(registry.algorithms, cfg.algorithms, 'algorithms'),
        'callbacks': _build_mapping(registry.callbacks, cfg.callbacks, 'callbacks'),
        'loggers': _build_mapping(registry.loggers, cfg.loggers, 'loggers'),
    }


def _kill_safe(cfg: TrainConfig, parts: dict[str, Any], rank: int) -> None:
    """Atomic checkpoint files, a checked ``latest`` before autoresume, per-batch seeds, per-node autoresume signal
    files (diffusion/checkpointing.py)."""
    from diffusion.checkpointing import (AdoptEarlierCheckpoints, PerBatchSeed, install_atomic_checkpoint_writes,
                                         install_node_signal_files, repair_latest_checkpoint)
    install_atomic_checkpoint_writes()
    install_node_signal_files()  # several nodes autoresuming from one shared checkpoint folder
    parts['callbacks'] = parts['callbacks'] + [PerBatchSeed()]
    if cfg.autoresume and cfg.save_folder and '://' not in cfg.save_folder:
        folder = cfg.save_folder.format(run_name=cfg.run_name)
        if rank == 0:
            repair_latest_checkpoint(folder)
        parts['callbacks'].append(AdoptEarlierCheckpoints(folder))


def build_trainer(cfg: TrainConfig) -> Any:
    """Build the ``composer.Trainer`` a config describes (initialising torch.distributed when launched)."""
    from composer import Trainer
    from composer.utils import dist, get_device, reproducibility

    device = _check_hardware(cfg)
    reproducibility.seed_all(cfg.seed)
    if dist.get_world_size() > 1 and not dist.is_initialized():
        dist.initialize_dist(get_device(device), timeout=cfg.dist_timeout)
    parts = build_components(cfg, _device_batch_size(cfg, dist.get_world_size()))
    if cfg.save_folder and '://' not in cfg.save_folder and dist.get_global_rank() == 0:
        # The resolved config beside the checkpoints: generation, evaluation and export rebuild the model from it.
        save_config(cfg, Path(cfg.save_folder.format(run_name=cfg.run_name)) / 'config.yaml')
    parallelism = {'fsdp': dict(cfg.fsdp_config)} if cfg.fsdp_config is not None else None
    # Composer's in-memory logger keeps the metric history that train() writes to summary.json.
    from composer.loggers import InMemoryLogger
    parts['loggers'] = parts['loggers'] + [InMemoryLogger()]
    _kill_safe(cfg, parts, dist.get_global_rank())
    trainer = Trainer(
        **parts,
        run_name=cfg.run_name,
        seed=cfg.seed,
        max_duration=cfg.max_duration,
        eval_interval=cfg.eval_interval if parts['eval_dataloader'] is not None else 1,
        eval_subset_num_batches=cfg.eval_subset_num_batches,
        device=device,
        precision=cfg.precision,
        device_train_microbatch_size=cfg.device_train_microbatch_size,
        parallelism_config=parallelism,
        dist_timeout=cfg.dist_timeout,
        save_folder=cfg.save_folder,
        save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=cfg.save_overwrite,
        save_weights_only=cfg.save_weights_only,
        load_path=cfg.load_path,
        load_weights_only=cfg.load_weights_only,
        load_strict_model_weights=cfg.load_strict_model_weights,
        load_ignore_keys=list(cfg.load_ignore_keys) or None,
        autoresume=cfg.autoresume,
        deterministic_mode=cfg.deterministic_mode,
        console_log_interval=cfg.console_log_interval,
        log_to_console=cfg.log_to_console,
        progress_bar=cfg.progress_bar,
        python_log_level=cfg.python_log_level,
        step_schedulers_every_batch=True,
    )
    # The resolved config as dotted keys, for trackers (MLflow params, W&B config, ...).
    trainer.logger.log_hyperparameters(_flat(dataclasses.asdict(cfg)))
    from diffusion.algorithms.speedup_report import report_speedups
    report_speedups(trainer, cfg.precision, _device_batch_size(cfg, dist.get_world_size()),
                    cfg.device_train_microbatch_size, cfg.fsdp_config)
    return trainer


def _flat(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


def _history(trainer: Any) -> dict[str, list[list[float]]]:
    """Eval metrics and train loss over batches, from composer's InMemoryLogger."""
    from composer.loggers import InMemoryLogger
    mem = next((d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger)), None)
    if mem is None:
        return {}
    out = {}
    for key, values in mem.data.items():
        if key.startswith('metrics/') or key == 'loss/train/total':
            out[key] = [[int(ts.batch), float(v)] for ts, v in values if isinstance(v, (int, float, torch.Tensor))]
    return out


def summarize(trainer: Any, seconds: float) -> dict[str, Any]:
    """What a run did: batches, samples, time, losses and eval metrics (first and last), checkpoint."""
    state = trainer.state
    history = _history(trainer)
    summary: dict[str, Any] = {
        'run_name': state.run_name, 'batches': int(state.timestamp.batch), 'samples': int(state.timestamp.sample),
        'epochs': int(state.timestamp.epoch), 'seconds': round(seconds, 1),
        'last_checkpoint': str(trainer.saved_checkpoints[-1]) if trainer.saved_checkpoints else None,
        'history': history,
    }
    for key, points in history.items():
        if points:
            summary.setdefault('first', {})[key] = points[0]
            summary.setdefault('last', {})[key] = points[-1]
    return summary


def _format(summary: dict[str, Any]) -> str:
    lines = [f"run {summary['run_name']}: {summary['batches']} batches, {summary['samples']} samples, "
             f"{summary['epochs']} epochs in {summary['seconds']} s"]
    for key, (batch, value) in (summary.get('last') or {}).items():
        first_batch, first = summary['first'][key]
        change = f' (at batch {first_batch}: {first:.4f})' if first_batch != batch else ''
        lines.append(f'  {key} at batch {batch}: {value:.4f}{change}')
    if summary['last_checkpoint']:
        lines.append(f"  last checkpoint: {summary['last_checkpoint']}")
    return '\n'.join(lines)


def train(cfg: TrainConfig) -> Any:
    """Build the trainer, (evaluate first,) fit, print a summary and save it as ``summary.json``."""
    start = time.time()
    trainer = build_trainer(cfg)
    if cfg.eval_first and trainer.state.evaluators and int(trainer.state.timestamp.batch) == 0:
        trainer.eval()  # the starting validation loss, to compare the end against
    trainer.fit()
    from composer.utils import dist
    if dist.get_global_rank() == 0:
        summary = summarize(trainer, time.time() - start)
        print(_format(summary), flush=True)
        if cfg.save_folder and '://' not in cfg.save_folder:
            path = Path(cfg.save_folder.format(run_name=cfg.run_name)) / 'summary.json'
            path.write_text(json.dumps(summary, indent=1))
            print(f'  summary: {path}', flush=True)
    return trainer


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``run.py YAML [key.path=value ...]``: exit status 2 with a readable message on a config error."""
    # A typo is reported here, before the heavy imports.
    cfg, status = cli_config(argv, 'composer run.py yamls/CONFIG.yaml [key.path=value ...]')
    if cfg is None:
        return status
    try:
        check_data_paths(cfg)
    except ConfigError as err:
        print(f'config error: {err}', file=sys.stderr)
        return 2
    from diffusion.registry import UnknownComponentError
    try:
        if cfg.dry_run:  # build on the meta device, print parameters, FLOPs and cost; no data, no weights
            from diffusion.dry_run import run_dry
            run_dry(cfg)
        else:
            train(cfg)
    except (ConfigError, UnknownComponentError) as err:
        print(f'config error: {err}', file=sys.stderr)
        return 2
    return 0
