"""Find, check and build the components a training config names (model, data, optimizer, algorithms, ...).

Every component registers itself by name when its module is imported (:data:`COMPONENT_MODULES`); a config block
``{name: ..., **kwargs}`` is checked against the registered constructor's signature before anything is built, so
a typo is one line naming the key. Training (``diffusion.training``), the dry run, generation and export all
build models through here.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from diffusion.config import ConfigError, TrainConfig

__all__ = ['COMPONENT_MODULES', 'import_components', 'build_mapping', 'check_components', 'build_components',
           'device_batch_size', 'fsdp_config']

# Modules whose import registers components by name. Listed once, here.
COMPONENT_MODULES = (
    'diffusion.schedules',
    'diffusion.flow_matching',
    'diffusion.models',
    'diffusion.data.dataset',
    'diffusion.algorithms',
    'diffusion.callbacks',
)


def import_components() -> None:
    """Import every module that registers a model, backbone, schedule, dataloader or callback."""
    for module in COMPONENT_MODULES:
        importlib.import_module(module)


def build_mapping(reg: Any, blocks: dict[str, Any], where: str) -> list[Any]:
    """Build ``{label: {kwargs}}`` blocks (llm-foundry style); ``name:`` inside a block overrides the label."""
    from diffusion import registry
    built = []
    for label, kwargs in (blocks or {}).items():
        kwargs = dict(kwargs or {})
        kwargs.setdefault('name', label)
        built.append(registry.build(reg, kwargs, f'{where}.{label}'))
    return built


def device_batch_size(cfg: TrainConfig, world_size: int) -> int:
    if cfg.global_train_batch_size % world_size:
        raise ConfigError(f'global_train_batch_size={cfg.global_train_batch_size} is not divisible by the '
                          f'number of processes ({world_size})')
    return cfg.global_train_batch_size // world_size


def fsdp_config(cfg: TrainConfig) -> Any:
    """The ``fsdp_config`` block as composer's ``FSDPConfig`` (checked on any machine), or None."""
    if cfg.fsdp_config is None:
        return None
    from composer.utils.parallelism import FSDPConfig
    allowed = [f.name for f in dataclasses.fields(FSDPConfig)]
    unknown = sorted(set(cfg.fsdp_config) - set(allowed))
    if unknown:
        raise ConfigError(f'fsdp_config: unknown key(s) {unknown}; composer FSDPConfig accepts {allowed}')
    try:
        return FSDPConfig(**cfg.fsdp_config)
    except (TypeError, ValueError) as err:
        raise ConfigError(f'fsdp_config: {err}') from err


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
        'algorithms': build_mapping(registry.algorithms, cfg.algorithms, 'algorithms'),
        'callbacks': build_mapping(registry.callbacks, cfg.callbacks, 'callbacks'),
        'loggers': build_mapping(registry.loggers, cfg.loggers, 'loggers'),
    }
