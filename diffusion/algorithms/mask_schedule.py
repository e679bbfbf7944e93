"""Mask-ratio schedule for masking backbones (MicroDiT's deferred masking), as a Composer algorithm.

MicroDiT pretrains with 75 % of the patches masked and finetunes unmasked (Sehwag et al. 2025, Sec. 4); with this
algorithm one run can do both: ``{'0dur': 0.75, '0.9dur': 0.0}`` masks 75 % for the first 90 % of training, then
nothing.
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
    """``{time: ratio}`` (or ``[[time, ratio], ...]``) -> sorted ``[(Time, ratio)]``; times are composer time
    strings (``'0ba'``, ``'500ba'``, ``'2ep'``, ``'0.9dur'``), all in one unit."""
    pairs = list(schedule.items()) if isinstance(schedule, dict) else [tuple(p) for p in schedule]
    if not pairs:
        raise ValueError('mask_schedule.schedule is empty')
    parsed = [(Time.from_timestring(str(t)), float(r)) for t, r in pairs]
    units = {t.unit for t, _ in parsed}
    if len(units) > 1:
        raise ValueError('mask_schedule.schedule: use one time unit for all entries, got '
                         f'{sorted(u.value for u in units)}')
    for _, ratio in parsed:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f'mask_schedule.schedule: mask ratio must be in [0, 1), got {ratio}')
    return sorted(parsed, key=lambda p: p[0].value)


class MaskSchedule(Algorithm):
    """Piecewise-constant mask ratio over training (YAML: ``algorithms: {mask_schedule: {schedule: {...}}}``).

    At every batch start the ratio of the last entry whose time has been reached is set on the backbone (before
    the first entry: the model's own ``mask_ratio``). Logs ``mask_ratio``.

    Args:
        schedule: ``{time: ratio}``, e.g. ``{'0dur': 0.75, '0.9dur': 0.0}``.
    """

    def __init__(self, schedule: Union[dict[str, float], list[Any]]) -> None:
        self.schedule = parse_schedule(schedule)
        self.current: float | None = None

    def ratio_at(self, state: State) -> float | None:
        """The scheduled ratio at the state's current time (None before the first entry)."""
        unit = self.schedule[0][0].unit
        now = float(state.get_elapsed_duration() or 0.0) if unit == TimeUnit.DURATION \
            else state.timestamp.get(unit).value
        reached = [ratio for t, ratio in self.schedule if now >= t.value]
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
