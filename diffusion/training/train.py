"""Turn a validated config into a ``composer.Trainer`` (and run it).

The Trainer is the training loop: everything specific to diffusion lives in the model, the data, the
algorithms and the callbacks that the config names. ``run.py`` calls :func:`main`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from diffusion.builders import build_components, device_batch_size, fsdp_config
from diffusion.config import ConfigError, TrainConfig, check_data_paths, cli_config, save_config
from diffusion.training.console import CompactConsoleLogger
from diffusion.training.summary import flat, format_summary, summarize, summary_logger

log = logging.getLogger(__name__)

__all__ = ['build_trainer', 'train', 'main', 'place_unsharded_parts']

def _check_hardware(cfg: TrainConfig) -> str:
    """The device to train on; refuses a precision the device cannot run.

    On a CPU composer trains in fp32 only, except under :func:`~diffusion.training.composer_compat.
    emulate_gpu_precision_on_cpu` (tests: ``DIFFUSION_EMULATE_GPU_PRECISION=1``), which runs ``amp_bf16`` with CUDA
    autocast's dtype rules. FSDP runs on a CPU too (gloo; ``composer_compat.install_cpu_fsdp``): slower than DDP
    there, but the recipe's own sharding, checkpoint format and EMA paths.
    """
    from diffusion.training.composer_compat import gpu_precision_emulated
    fsdp_config(cfg)  # a bad FSDP block is a config error here too, not only on the GPU cluster
    device = cfg.device or ('gpu' if torch.cuda.is_available() else 'cpu')
    if device == 'gpu' and not torch.cuda.is_available():
        raise ConfigError('device: gpu was asked for, but no CUDA device is visible')
    emulated = gpu_precision_emulated() and cfg.precision == 'amp_bf16'
    if device == 'cpu' and cfg.precision != 'fp32' and not emulated:
        raise ConfigError(f'precision: {cfg.precision} needs a GPU; Composer trains on CPU in fp32 only '
                          '(override with precision=fp32)')
    return device


def _install_compat(device: str) -> None:
    """The composer patches every run needs (diffusion/training/composer_compat.py)."""
    from diffusion.training import composer_compat
    composer_compat.install_cpu_fsdp()  # no-op with a CUDA device
    composer_compat.install_fsdp_ema_context()
    if device == 'cpu' and composer_compat.gpu_precision_emulated():
        composer_compat.emulate_gpu_precision_on_cpu()


def place_unsharded_parts(model: torch.nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer of ``model`` that no FSDP module holds to ``device``.

    Composer moves the whole model to the training device only without a parallelism config; under FSDP it wraps
    each child of the ComposerModel (``device_id`` moves the wrapped backbone) and leaves the children marked
    ``_fsdp_wrap = False`` where they were built: the frozen VAE and text encoder stayed on the CPU, so the first
    dropped caption (encoded on the CPU, in fp32, against bf16 GPU activations) and ``generate()`` failed.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    def move(module: torch.nn.Module) -> None:
        if isinstance(module, FullyShardedDataParallel):
            return  # FSDP placed its own (sharded) parameters
        if not any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
            module.to(device)
            return
        for param in module.parameters(recurse=False):  # a module around FSDP units: its own tensors, then below
            param.data = param.data.to(device)
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(device))
        for child in module.children():
            move(child)
    move(model)


def _kill_safe(cfg: TrainConfig, parts: dict[str, Any], rank: int) -> None:
    """Atomic checkpoint files, a checked ``latest`` before autoresume, per-batch seeds, per-node autoresume signal
    files (diffusion/training/checkpointing.py, composer_compat.py)."""
    from diffusion.training.checkpointing import AdoptEarlierCheckpoints, PerBatchSeed, repair_latest_checkpoint
    from diffusion.training.composer_compat import install_atomic_checkpoint_writes, install_node_signal_files
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
    _install_compat(device)
    reproducibility.seed_all(cfg.seed)
    if dist.get_world_size() > 1 and not dist.is_initialized():
        dist.initialize_dist(get_device(device), timeout=cfg.dist_timeout)
    parts = build_components(cfg, device_batch_size(cfg, dist.get_world_size()))
    if cfg.save_folder and '://' not in cfg.save_folder and dist.get_global_rank() == 0:
        # The resolved config beside the checkpoints: generation, evaluation and export rebuild the model from it.
        save_config(cfg, Path(cfg.save_folder.format(run_name=cfg.run_name)) / 'config.yaml')
    parallelism = {'fsdp': dict(cfg.fsdp_config)} if cfg.fsdp_config is not None else None
    # One console line per logged batch (diffusion/training/console.py) instead of composer's line per metric.
    console = [CompactConsoleLogger(cfg.console_log_interval)] if cfg.log_to_console else []
    parts['loggers'] = parts['loggers'] + [summary_logger()] + console
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
        log_to_console=False,  # the CompactConsoleLogger above prints instead
        progress_bar=cfg.progress_bar,
        python_log_level=cfg.python_log_level,
        step_schedulers_every_batch=True,
    )
    if trainer.state.fsdp_enabled:
        place_unsharded_parts(trainer.state.model, trainer.state.device.tensor_to_device(torch.empty(0)).device)
    # The resolved config as dotted keys, for trackers (MLflow params, W&B config, ...).
    trainer.logger.log_hyperparameters(flat(dataclasses.asdict(cfg)))
    from diffusion.algorithms.speedup_report import report_speedups
    report_speedups(trainer, cfg.precision, device_batch_size(cfg, dist.get_world_size()),
                    cfg.device_train_microbatch_size, cfg.fsdp_config)
    return trainer


def train(cfg: TrainConfig) -> Any:
    """Build the trainer, (evaluate first,) fit, print a summary and save it as ``summary.json``; the log also
    goes to ``<run folder>/train.log`` (diffusion/training/run_setup.py)."""
    from diffusion.training.run_setup import run_log, set_process_threads, tensorboard_in_run_folder
    with run_log(cfg, int(os.environ.get('RANK', 0))):
        set_process_threads()
        tensorboard_in_run_folder(cfg)
        return _train(cfg)


def _train(cfg: TrainConfig) -> Any:
    start = time.time()
    trainer = build_trainer(cfg)
    if cfg.eval_first and trainer.state.evaluators and int(trainer.state.timestamp.batch) == 0:
        trainer.eval()  # the starting validation loss, to compare the end against
    trainer.fit()
    from composer.utils import dist
    if dist.get_global_rank() == 0:
        summary = summarize(trainer, time.time() - start)
        print(format_summary(summary), flush=True)
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
        from diffusion.training.run_setup import check_run_folder, overwrite_asked
        if not cfg.dry_run:
            check_run_folder(cfg, overwrite_asked(sys.argv[1:] if argv is None else argv))
    except ConfigError as err:
        print(f'config error: {err}', file=sys.stderr)
        return 2
    from diffusion.registry import UnknownComponentError
    try:
        if cfg.dry_run:  # build on the meta device, print parameters, FLOPs and cost; no data, no weights
            from diffusion.training.dry_run import run_dry
            run_dry(cfg)
        else:
            train(cfg)
    except (ConfigError, UnknownComponentError) as err:
        print(f'config error: {err}', file=sys.stderr)
        return 2
    return 0
