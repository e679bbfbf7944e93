"""Activation checkpointing of the backbone's blocks, chosen by the backbone's own policy."""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from torch.utils.checkpoint import checkpoint

from diffusion import registry
from diffusion.models.wrapping import unwrap

log = logging.getLogger(__name__)

__all__ = ['ActivationCheckpointing', 'apply_activation_checkpointing']


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # evaluation and sampling: nothing to save memory on
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: Any) -> int:
    """Recompute the activations of ``model.backbone``'s blocks in the backward pass instead of storing them.

    The blocks are those the backbone's ``activation_checkpointing_fn(module)`` selects (the same policy composer
    applies under FSDP). Each selected block's ``forward`` is wrapped in ``torch.utils.checkpoint`` (non-reentrant)
    in place, so module and parameter names, checkpoints and EMA stay as in a run without it.

    Returns:
        The number of blocks wrapped.
    """
    backbone = model.backbone
    policy = getattr(backbone, 'activation_checkpointing_fn', None)
    if policy is None:
        raise ValueError(f'{type(backbone).__name__} has no activation_checkpointing_fn(module) policy')
    wrapped = 0
    for module in backbone.modules():
        if module is not backbone and policy(module) and not getattr(module, '_checkpointed_forward', False):
            module.forward = functools.partial(_checkpointed, module.forward)
            module._checkpointed_forward = True
            wrapped += 1
    return wrapped


class ActivationCheckpointing(Algorithm):
    """Activation checkpointing of backbone blocks at ``Event.INIT`` (YAML: ``algorithms: {activation_checkpointing: {}}``).

    Trades compute (one more forward of each block in the backward pass) for activation memory. Under composer's
    FSDP use ``fsdp_config.activation_checkpointing: true`` instead, which applies the same policy.
    """

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        n = apply_activation_checkpointing(unwrap(state.model))
        log.info('activation_checkpointing: acts on any device: %d backbone blocks recompute their activations '
                 'in the backward pass', n)


registry.algorithms.register('activation_checkpointing', func=ActivationCheckpointing)
