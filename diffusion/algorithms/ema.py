"""Composer's EMA over floating-point parameters and buffers only (YAML name ``ema``; replaces composer's in the
registry under the same class name, so checkpoints keep their ``EMA`` entry).

Composer's ``EMAParameters`` copies every buffer of the model and ``compute_ema`` averages each one as
``ema * smoothing + value * (1 - smoothing)``, then copies the float result back into the buffer's own dtype. An
integer buffer is truncated: the text encoders' ``position_ids`` (0..511) lose ~100 of their values at the first
update with smoothing 0.9999 (``75.99999`` becomes 75), and every evaluation, sample grid and checkpoint with the EMA
weights swapped in runs the text encoder with those wrong positions. Integer buffers are counters and index tables,
not weights: here they are left out of the average (the model keeps its own).
"""
from __future__ import annotations

from typing import Any

from composer.algorithms import EMA as ComposerEMA
from composer.core import Event, State
from composer.loggers import Logger

from diffusion import registry

__all__ = ['EMA']


class EMA(ComposerEMA):
    """Composer's :class:`~composer.algorithms.EMA` without integer (and boolean) buffers."""

    def _float_buffers_only(self) -> None:
        if self.ema_model is not None:
            buffers = self.ema_model.named_buffers_dict
            self.ema_model.named_buffers_dict = {k: v for k, v in buffers.items() if v.is_floating_point()}

    def match(self, event: Event, state: State) -> bool:
        matched = super().match(event, state)  # creates the averaged copy when EMA starts
        self._float_buffers_only()
        return matched

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        super().apply(event, state, logger)  # creates the copy at INIT
        self._float_buffers_only()

    def load_state_dict(self, state: dict[str, Any], strict: bool = False) -> None:
        super().load_state_dict(state, strict)  # a checkpoint of composer's own EMA holds integer buffers too
        self._float_buffers_only()


registry.algorithms.register('ema', func=EMA)
