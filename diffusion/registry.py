"""Registries: every component a YAML names is looked up here by ``name:``.

Composer's and llm-foundry's own optimizers, schedulers, algorithms, callbacks and loggers live in
llm-foundry's registries and are used from there (never copied). This module adds the few Composer
algorithms llm-foundry does not register (EMA, low-precision GroupNorm, ...) and creates the
project's own registries for models, backbones, noise schedules, text encoders, autoencoders and
dataloaders, all with llm-foundry's registry utilities.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from composer import algorithms as composer_algorithms
from llmfoundry import registry as foundry_registry
from llmfoundry.utils.registry_utils import TypedRegistry, construct_from_registry, create_registry

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

# ---------------------------------------------------------------------------------------------
# The project's own registries
# ---------------------------------------------------------------------------------------------
models = create_registry(
    'diffusion', 'models', generic_type=Callable[..., Any], entry_points=True,
    description='ComposerModels built from a `model:` block (e.g. latent_diffusion).')
backbones = create_registry(
    'diffusion', 'backbones', generic_type=Callable[..., Any], entry_points=True,
    description='Denoising networks (UNet presets, transformers) built from `backbone:` blocks.')
autoencoders = create_registry(
    'diffusion', 'autoencoders', generic_type=Callable[..., Any], entry_points=True,
    description='Frozen image autoencoders (VAE) built from `autoencoder:` blocks.')
text_encoders = create_registry(
    'diffusion', 'text_encoders', generic_type=Callable[..., Any], entry_points=True,
    description='Frozen text encoders (with their tokenizers) built from `text_encoder:` blocks.')
noise_schedules = create_registry(
    'diffusion', 'noise_schedules', generic_type=Callable[..., Any], entry_points=True,
    description='Noise schedules (DDPM scaled-linear, cosine, EDM) built from `noise_schedule:` blocks.')
dataloaders = create_registry(
    'diffusion', 'dataloaders', generic_type=Callable[..., Any], entry_points=True,
    description='Dataloader builders (return a DataLoader or DataSpec) for `train_loader:` / `eval_loader:`.')

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
    """A config named a component that no registry holds."""


def _check_kwargs(ctor: Callable[..., Any], kwargs: dict[str, Any], where: str, name: str) -> None:
    """Reject keyword arguments the constructor does not take, naming them and the accepted ones."""
    try:
        params = inspect.signature(ctor).parameters
    except (TypeError, ValueError):  # some builtins have no signature: let the call itself complain
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise UnknownComponentError(f'{where}: {name!r} does not take argument(s) {unknown}; '
                                    f'it accepts {accepted}')


def build(registry: TypedRegistry, block: dict[str, Any] | Any, where: str = '', **extra: Any) -> Any:
    """Build a component from a ``{name: ..., **kwargs}`` block.

    Args:
        registry: The registry to look the name up in.
        block: A mapping with a ``name`` key and the constructor's keyword arguments.
        where: The config path of the block (e.g. ``model.backbone``), used in error messages.
        **extra: Keyword arguments added by the caller (objects the YAML cannot hold).

    Returns:
        The constructed object.

    Raises:
        UnknownComponentError: If the name is missing or not registered; the message lists the
            registered names.
    """
    kwargs = dict(block)
    name = kwargs.pop('name', None)
    namespace = '.'.join(registry.namespace)
    if name is None:
        raise UnknownComponentError(f'{where or namespace}: a component block needs `name:`; '
                                    f'registered names: {sorted(registry.get_all())}')
    if name not in registry.get_all():
        raise UnknownComponentError(f'{where or namespace}: unknown name {name!r} in registry '
                                    f'{namespace!r}; registered names: {sorted(registry.get_all())}')
    kwargs.update(extra)
    _check_kwargs(registry.get(name), kwargs, where or namespace, name)
    return construct_from_registry(name, registry, partial_function=False, kwargs=kwargs)
