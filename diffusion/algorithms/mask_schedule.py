"""Mask-ratio schedule for masking backbones (MicroDiT's deferred masking), as a Composer algorithm.

MicroDiT pretrains with 75 % of the patches masked and finetunes unmasked (Sehwag et al. 2025, Sec. 4); with this
algorithm one run can do both: ``[['0ba', 0.75], ['0.9dur', 0.0]]`` masks 75 % for the first 90 % of training,
then nothing.
"""
from __future__ import annotations

import logging
from typing import Any, Union

from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger
from torch import nn

from diffusion import registry

log = logging.getLogger(__name__)

__all__ = ['MaskSchedule', 'set_mask_ratio', 'parse_schedule']


def set_mask_ratio(model: nn.Module, ratio: float) -> int:
    """Set the training mask ratio of every masking module in ``model`` (those with a ``mask_ratio``).

    Returns:
        The number of modules changed (0 means the model has no masking backbone).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f'mask ratio must be in [0, 1), got {ratio}')
    changed = 0
    for module in model.modules():
        if hasattr(module, 'mask_ratio') and isinstance(getattr(module, 'mask_ratio'), float | int):
            module.mask_ratio = float(ratio)
            changed += 1
    return changed


def parse_schedule(schedule: Union[dict[str, float], list[Any]]) -> list[tuple[Time, float]]:
    """``{time: ratio}`` (or ``[[time, ratio], ...]``) -> ``[(Time, ratio)]`` in the given (chronological) order.

    Times are composer time strings (``'0ba'``, ``'500ba'``, ``'2ep'``, ``'0.9dur'``); units may differ between
    entries (each is compared with the clock in its own unit), but entries of one unit must increase.
    """
    pairs = list(schedule.items()) if isinstance(schedule, dict) else [tuple(p) for p in schedule]
    if not pairs:
        raise ValueError('mask_schedule.schedule is empty')
    parsed = [(Time.from_timestring(str(t)), float(r)) for t, r in pairs]
    last: dict[TimeUnit, float] = {}
    for time, ratio in parsed:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f'mask_schedule.schedule: mask ratio must be in [0, 1), got {ratio}')
        if time.value < last.get(time.unit, float('-inf')):
            raise ValueError(f'mask_schedule.schedule: list entries in chronological order ({time} comes after '
                             f'{last[time.unit]}{time.unit.value})')
        last[time.unit] = time.value
    return parsed


class MaskSchedule(Algorithm):
    """Piecewise-constant mask ratio over training (YAML: ``algorithms: {mask_schedule: {schedule: {...}}}``).

    At every batch start the ratio of the last entry (in the given order) whose time has been reached is set on the
    backbone (before the first entry: the model's own ``mask_ratio``). Logs ``mask_ratio``.

    Args:
        schedule: ``[[time, ratio], ...]`` or ``{time: ratio}``, e.g. ``[['0ba', 0.75], ['0.9dur', 0.0]]``.
    """

    def __init__(self, schedule: Union[dict[str, float], list[Any]]) -> None:
        self.schedule = parse_schedule(schedule)
        self.current: float | None = None

    def ratio_at(self, state: State) -> float | None:
        """The scheduled ratio at the state's current time (None before the first entry)."""
        def now(unit: TimeUnit) -> float:
            if unit == TimeUnit.DURATION:
                return float(state.get_elapsed_duration() or 0.0)
            return float(state.timestamp.get(unit).value)

        reached = [ratio for t, ratio in self.schedule if now(t.unit) >= t.value]
        return reached[-1] if reached else None

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.FIT_START, Event.BATCH_START)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        ratio = self.ratio_at(state)
        if ratio is None or ratio == self.current:
            return
        if set_mask_ratio(state.model, ratio) == 0:
            raise ValueError('mask_schedule: the model has no masking backbone (no module with a mask_ratio)')
        log.info('mask_schedule: mask ratio %.3f from %s', ratio, state.timestamp.batch)
        self.current = ratio
        logger.log_metrics({'mask_ratio': ratio})


registry.algorithms.register('mask_schedule', func=MaskSchedule)
