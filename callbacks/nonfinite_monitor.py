"""Stop training on a NaN or infinite loss, naming the step and the loss."""
from __future__ import annotations

import logging
from typing import Any

import torch
from composer.callbacks import NaNMonitor
from composer.core import State
from composer.loggers import Logger

from diffusion import registry

log = logging.getLogger(__name__)

__all__ = ['NonFiniteLossError', 'NonFiniteLossMonitor']


class NonFiniteLossError(RuntimeError):
    """The training loss was NaN or infinite."""


def _named_losses(loss: Any) -> dict[str, torch.Tensor]:
    if isinstance(loss, torch.Tensor):
        return {'total': loss}
    if isinstance(loss, dict):
        return dict(loss)
    if isinstance(loss, (list, tuple)):
        return {str(i): v for i, v in enumerate(loss)}
    raise TypeError(f'loss is of type {type(loss)}; expected a tensor, a sequence or a dict of tensors')


class NonFiniteLossMonitor(NaNMonitor):
    """Composer's :class:`~composer.callbacks.NaNMonitor`, extended to infinities and a message that names the step.

    After every loss computation it checks each loss term; a NaN or an infinity raises
    :class:`NonFiniteLossError` (a ``RuntimeError``, like composer's), which stops ``Trainer.fit``, with the
    batch index and the loss value(s) in the message, e.g. ``non-finite training loss at batch 7 (epoch 0):
    total=nan``.
    """

    def after_loss(self, state: State, logger: Logger) -> None:
        losses = _named_losses(state.loss)
        bad = {k: v for k, v in losses.items() if not bool(torch.isfinite(v.detach()).all())}
        if bad:
            values = ', '.join(f'{k}={v.detach().float().mean().item():g}' for k, v in bad.items())
            message = (f'non-finite training loss at batch {int(state.timestamp.batch)} '
                       f'(epoch {int(state.timestamp.epoch)}): {values}')
            log.error(message)
            raise NonFiniteLossError(message)


registry.callbacks.register('nonfinite_loss_monitor', func=NonFiniteLossMonitor)
