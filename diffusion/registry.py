"""Registries: every component a YAML names is looked up here by ``name:``.

Composer's and llm-foundry's own optimizers, schedulers, algorithms, callbacks and loggers live in
llm-foundry's registries and are used from there (never copied). This module adds the few Composer
algorithms llm-foundry does not register (EMA, low-precision GroupNorm, ...) and creates the
project's own registries for models, backbones, noise schedules, text encoders, autoencoders and
dataloaders, all with llm-foundry's registry utilities.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import types
import typing
import warnings
from typing import Any, Callable, Optional, Union

import torch
from composer import algorithms as composer_algorithms

with warnings.catch_warnings():  # llm-foundry imports pkg_resources: its deprecation notice would open every command
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)
    from llmfoundry import registry as foundry_registry
from llmfoundry.utils.registry_utils import TypedRegistry, construct_from_registry, create_registry

from diffusion.config import describe_type

# ---------------------------------------------------------------------------------------------
# Composer / llm-foundry components, reused by name
# ---------------------------------------------------------------------------------------------
optimizers = foundry_registry.optimizers
schedulers = foundry_registry.schedulers
algorithms = foundry_registry.algorithms
callbacks = foundry_registry.callbacks
loggers = foundry_registry.loggers

# Composer algorithms that llm-foundry leaves out but diffusion recipes use.
_EXTRA_ALGORITHMS = {
    'ema': composer_algorithms.EMA,
    'low_precision_groupnorm': composer_algorithms.LowPrecisionGroupNorm,
    'channels_last': composer_algorithms.ChannelsLast,
}
for _name, _cls in _EXTRA_ALGORITHMS.items():
    if _name not in algorithms.get_all():
        algorithms.register(_name, func=_cls)

# torch's own AdamW, for its fused kernel (`optimizer: {name: adamw, fused: true}`): one kernel per step instead of a
# Python loop over every parameter tensor, which on a CPU costs as much as a small model's forward pass
# (bench/speedups.py measures it as `fused_adamw`). Note: torch's weight decay is lr * wd (coupled to the learning
# rate), composer's decoupled_adamw's is wd / initial lr scaled; with weight_decay 0 the two are the same update.
if 'adamw' not in optimizers.get_all():
    optimizers.register('adamw', func=torch.optim.AdamW)

# ---------------------------------------------------------------------------------------------
# The project's own registries
# ---------------------------------------------------------------------------------------------


def _project_registry(name: str, description: str) -> TypedRegistry:
    return create_registry('diffusion', name, generic_type=Callable[..., Any], entry_points=True,
                           description=description)


models = _project_registry('models', 'ComposerModels built from a `model:` block (e.g. latent_diffusion).')
backbones = _project_registry('backbones',
                              'Denoising networks (UNet presets, transformers) built from `backbone:` blocks.')
autoencoders = _project_registry('autoencoders', 'Frozen image autoencoders (VAE) built from `autoencoder:` blocks.')
text_encoders = _project_registry('text_encoders',
                                  'Frozen text encoders (with their tokenizers) built from `text_encoder:` blocks.')
noise_schedules = _project_registry(
    'noise_schedules', 'Noise schedules (DDPM scaled-linear, cosine, EDM) built from `noise_schedule:` blocks.')
dataloaders = _project_registry(
    'dataloaders', 'Dataloader builders (return a DataLoader or DataSpec) for `train_loader:` / `eval_loader:`.')

REGISTRIES: dict[str, TypedRegistry] = {
    'optimizers': optimizers,
    'schedulers': schedulers,
    'algorithms': algorithms,
    'callbacks': callbacks,
    'loggers': loggers,
    'models': models,
    'backbones': backbones,
    'autoencoders': autoencoders,
    'text_encoders': text_encoders,
    'noise_schedules': noise_schedules,
    'dataloaders': dataloaders,
}


class UnknownComponentError(ValueError):
    """A config named a component that no registry holds, or gave it an argument it does not take."""


# Builders that take ``**kwargs`` and pass them on: the callables whose parameters those kwargs may name
# ("module:attr" strings, imported only when a block is checked), plus extra accepted names. Keyed by
# (registry namespace, registered name). Without this, a typo such as ``train_loader.shufle`` would slip through
# ``**kwargs`` and fail deep inside the library, or be silently ignored.
KWARGS_TARGETS: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]] = {
    ('models', 'latent_diffusion'): (('diffusion.models.latent_diffusion:LatentDiffusion',), ()),
    ('models', 'autoencoder_kl_training'): (('diffusion.models.autoencoder_training:AutoencoderTraining',), ()),
    ('backbones', 'unet'): (('diffusers:UNet2DConditionModel',), ('pooled_text_dim',)),
    ('dataloaders', 'image_caption'): (('diffusion.data.dataset:StreamingImageCaptionDataset',
                                        'streaming:StreamingDataset'), ()),
}

# Arguments that hold a nested component block, and the registry it is looked up in.
NESTED_BLOCKS = {'backbone': 'backbones', 'autoencoder': 'autoencoders', 'text_encoder': 'text_encoders',
                 'noise_schedule': 'noise_schedules'}


def _import(path: str) -> Any:
    module, attr = path.split(':')
    return getattr(importlib.import_module(module), attr)


def _params(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # some builtins have no signature
        return {}


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """Resolved annotations of ``fn`` (or a class's ``__init__``); {} when they cannot be resolved."""
    try:
        return typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # noqa: BLE001 - unresolvable forward references: skip the type check, not the build
        return {}


def _accepted(ctor: Callable[..., Any], registry_name: str, name: str) -> tuple[Optional[list[str]], dict[str, Any]]:
    """Names ``ctor`` accepts (None: anything) and their annotations, following declared ``**kwargs`` targets."""
    params = _params(ctor)
    if not params:
        return None, {}
    hints = _hints(ctor)
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != 'self']
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return names, hints
    if (registry_name, name) not in KWARGS_TARGETS:
        return None, hints
    targets, extra = KWARGS_TARGETS[(registry_name, name)]
    names += list(extra)
    for target in map(_import, targets):
        target_params = _params(target)
        names += [n for n, p in target_params.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in names and n != 'self']
        hints = {**_hints(target), **hints}
    return names, hints


def _type_ok(value: Any, tp: Any) -> bool:
    """Whether a YAML value fits a simple annotation (int, float, bool, str, Optional/Union of them).

    Anything more complex (containers, classes, composer ``Time``) is accepted here and left to the constructor.
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True  # not a simple type: not checked here


def _time_error(value: Any, tp: Any) -> Optional[str]:
    """A message when ``tp`` admits a composer ``Time`` and ``value`` is a string that is not a time string."""
    if not isinstance(value, str) or 'Time' not in str(tp):
        return None
    from diffusion.config import time_string_error
    return time_string_error(value)


def check(registry: TypedRegistry, block: dict[str, Any] | Any, where: str = '', extra: tuple[str, ...] = ()) -> Any:
    """Check a ``{name: ..., **kwargs}`` block without building it: name, argument names, simple types, nested blocks.

    Args:
        registry: The registry to look the name up in.
        block: The block from the config.
        where: Its config path (e.g. ``model.backbone``), used in messages.
        extra: Argument names the caller adds (e.g. ``params``, ``batch_size``).

    Returns:
        The registered constructor.

    Raises:
        UnknownComponentError: Naming the key, what is wrong and what is accepted.
    """
    namespace = '.'.join(registry.namespace)
    where = where or namespace
    if not isinstance(block, dict):
        raise UnknownComponentError(f'{where}: must be a block (a mapping with `name:`), got {block!r}')
    name = block.get('name')
    if name is None:
        raise UnknownComponentError(f'{where}: a component block needs `name:`; '
                                    f'registered names: {sorted(registry.get_all())}')
    if name not in registry.get_all():
        raise UnknownComponentError(f'{where}.name: unknown name {name!r} in registry '
                                    f'{namespace!r}; registered names: {sorted(registry.get_all())}')
    ctor = registry.get(name)
    reg_name = registry.namespace[-1]
    accepted, hints = _accepted(ctor, reg_name, name)
    kwargs = {k: v for k, v in block.items() if k != 'name'}
    if accepted is not None:
        unknown = sorted(set(kwargs) - set(accepted) - set(extra))
        if unknown:
            allowed = sorted(set(accepted) - set(extra))
            raise UnknownComponentError(f'{where}: {name!r} does not take argument(s) {unknown}'
                                        f'{_did_you_mean(unknown, allowed)}; it accepts {allowed}')
    for key, value in kwargs.items():
        tp = hints.get(key)
        if tp is not None and not _type_ok(value, tp):
            raise UnknownComponentError(f'{where}.{key}: expected {describe_type(tp)}, got '
                                        f'{type(value).__name__}: {value!r}')
        bad_time = _time_error(value, tp)
        if bad_time:
            raise UnknownComponentError(f'{where}.{key}: {bad_time}')
        if key in NESTED_BLOCKS and isinstance(value, dict):
            check(REGISTRIES[NESTED_BLOCKS[key]], value, f'{where}.{key}')
    return ctor


def _did_you_mean(unknown: list[str], accepted: list[str]) -> str:
    close = {u: difflib.get_close_matches(u, accepted, n=1) for u in unknown}
    hints = [f'{u!r} -> {c[0]!r}' for u, c in close.items() if c]
    return f' (did you mean {", ".join(hints)}?)' if hints else ''


def build(registry: TypedRegistry, block: dict[str, Any] | Any, where: str = '', **extra: Any) -> Any:
    """Build a component from a ``{name: ..., **kwargs}`` block, after :func:`check`.

    Args:
        registry: The registry to look the name up in.
        block: A mapping with a ``name`` key and the constructor's keyword arguments.
        where: The config path of the block (e.g. ``model.backbone``), used in error messages.
        **extra: Keyword arguments added by the caller (objects the YAML cannot hold).

    Returns:
        The constructed object.

    Raises:
        UnknownComponentError: If the name is missing or not registered (the message lists the registered
            names), an argument is unknown or ill-typed, or the constructor rejects a value (its ``ValueError``).
    """
    check(registry, block, where, tuple(extra))
    kwargs = dict(block)
    name = kwargs.pop('name')
    kwargs.update(extra)
    try:
        return construct_from_registry(name, registry, partial_function=False, kwargs=kwargs)
    except UnknownComponentError:
        raise
    except ValueError as err:  # a constructor rejecting a config value: report it with the block's path
        raise UnknownComponentError(f'{where or ".".join(registry.namespace)} ({name!r}): {err}') from err
