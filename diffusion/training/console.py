"""One console line per logged batch, the full metrics in the run's log file.

Composer's ``ConsoleLogger`` prints every metric of a logged batch on a line of its own (epoch, batch, sample
counters, microbatch size, three clocks in hours, the loss, the learning rate: ~12 lines a batch, more with
callbacks). :class:`CompactConsoleLogger` prints instead, every ``console_log_interval``::

    [batch 20/60] loss 0.3412 | lr 1.00e-03 | 6.1 samples/s | 0:01:12
    [eval at batch 30/60] ValidationLoss 0.2975

(the loss and its logged parts, the first learning rate, training throughput over the interval, time since the
fit started), and writes every metric it was given as one line through the python logger ``diffusion.metrics``.
That logger does not reach the console: ``diffusion.training.run_setup.run_log`` sends it to the run's
``train.log``, and without a run folder its records are dropped. ``train.py`` gives the Trainer this logger in
place of composer's (``log_to_console`` in a config chooses whether there is one).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional, TextIO, Union

from composer.core import State, Time, TimeUnit
from composer.loggers import Logger, LoggerDestination

__all__ = ['CompactConsoleLogger', 'METRICS_LOG']

# Every metric of each console line, for the run's log file only (run_setup.run_log gives it its handler).
METRICS_LOG = logging.getLogger('diffusion.metrics')
METRICS_LOG.propagate = False
METRICS_LOG.setLevel(logging.INFO)

_LOSS, _LOSS_PARTS, _LR = 'loss/train/total', 'loss/train/', 'lr-'


def _number(value: Any) -> Optional[float]:
    """A float from a python number or a one-element tensor; None for anything else."""
    try:
        return float(value.item() if hasattr(value, 'item') else value)
    except (TypeError, ValueError, RuntimeError):
        return None


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f'{hours}:{minutes:02d}:{secs:02d}'


class CompactConsoleLogger(LoggerDestination):
    """Print one line per logged batch and one per evaluation; every metric goes to ``diffusion.metrics``.

    Args:
        log_interval: How often a training line is printed (``'10ba'``, ``'1ep'``; an int is epochs, as in
            composer's console logger). The first batch and the last are always printed.
        stream: Where the lines go; None: ``sys.stderr`` at the moment of writing (so the run log's tee of
            stderr into ``train.log`` sees them).
    """

    def __init__(self, log_interval: Union[int, str, Time] = '1ba', stream: Optional[TextIO] = None) -> None:
        self.log_interval = Time.from_input(log_interval, TimeUnit.EPOCH)
        if self.log_interval.unit not in (TimeUnit.EPOCH, TimeUnit.BATCH):
            raise ValueError(f'console_log_interval must be in batches or epochs, got {log_interval}')
        self.stream = stream
        self.metrics: dict[str, Any] = {}
        self._last_batch = self._fit_start_batch = -1  # the batch of the last training line; the fit's first
        self._since: Optional[tuple[int, float]] = None  # (samples, training seconds) at the last training line
        self._start = time.monotonic()

    # -- what the trainer and callbacks log ------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        del step
        self.metrics.update(metrics)

    # -- when lines are printed ------------------------------------------------------------------------------
    def fit_start(self, state: State, logger: Logger) -> None:
        self._start = time.monotonic()
        self._last_batch = self._fit_start_batch = int(state.timestamp.batch)
        self._since = (int(state.timestamp.sample), state.timestamp.total_wct.total_seconds())

    def batch_end(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        first = self._last_batch == self._fit_start_batch  # the fit's first batch, also after a resume
        if self.log_interval.unit == TimeUnit.BATCH and (batch % int(self.log_interval) == 0 or first):
            self._train_line(state)

    def epoch_end(self, state: State, logger: Logger) -> None:
        if self.log_interval.unit == TimeUnit.EPOCH and int(state.timestamp.epoch) % int(self.log_interval) == 0:
            self._train_line(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) != self._last_batch:
            self._train_line(state)
        self.metrics = {}

    def eval_start(self, state: State, logger: Logger) -> None:
        self.metrics = {}  # training metrics not yet printed are not this evaluation's

    def eval_end(self, state: State, logger: Logger) -> None:
        where = f'eval at {self._progress(state)}'
        labels = {key.split('/')[1] for key in self.metrics if key.startswith('metrics/') and key.count('/') >= 2}
        parts = []
        for key, value in self.metrics.items():
            number = _number(value)
            if number is None or not key.startswith('metrics/'):
                continue
            name = key.split('/', 2)[2] if len(labels) == 1 else key[len('metrics/'):]
            parts.append(f'{name} {number:.4f}')
        self._write(f'[{where}] ' + (' | '.join(parts) or 'no metrics'))
        self._record(f'{where}:', self.metrics)
        self.metrics = {}

    # -- the lines -------------------------------------------------------------------------------------------
    @staticmethod
    def _progress(state: State) -> str:
        batch = int(state.timestamp.batch)
        total = state.max_duration
        if total is None:
            return f'batch {batch}'
        if total.unit == TimeUnit.BATCH:
            return f'batch {batch}/{total.value}'
        if total.unit == TimeUnit.EPOCH:
            return f'epoch {int(state.timestamp.epoch)}/{total.value}, batch {batch}'
        return f'batch {batch}, {total.unit.name.lower()} {int(state.timestamp.get(total.unit))}/{total.value}'

    def _train_line(self, state: State) -> None:
        parts = []
        loss = _number(self.metrics.get(_LOSS))
        if loss is not None:
            parts.append(f'loss {loss:.4f}')
        for key, value in self.metrics.items():  # the loss's own parts (e.g. loss/train/repa), by their last name
            number = _number(value)
            if key.startswith(_LOSS_PARTS) and key != _LOSS and number is not None:
                parts.append(f'{key[len(_LOSS_PARTS):]} {number:.4f}')
        lr = next((_number(v) for k, v in self.metrics.items() if k.startswith(_LR)), None)
        if lr is not None:
            parts.append(f'lr {lr:.2e}')
        samples, seconds = int(state.timestamp.sample), state.timestamp.total_wct.total_seconds()
        if self._since is not None and seconds > self._since[1] and samples > self._since[0]:
            parts.append(f'{(samples - self._since[0]) / (seconds - self._since[1]):.1f} samples/s')
        parts.append(_clock(time.monotonic() - self._start))
        where = self._progress(state)
        self._write(f'[{where}] ' + ' | '.join(parts))
        self._record(f'train {where}:', self.metrics)
        self._last_batch, self._since = int(state.timestamp.batch), (samples, seconds)
        self.metrics = {}

    def _write(self, line: str) -> None:
        print(line, file=self.stream or sys.stderr, flush=True)

    @staticmethod
    def _record(where: str, metrics: dict[str, Any]) -> None:
        values = [f'{k}={n:.6g}' for k, n in ((k, _number(v)) for k, v in metrics.items()) if n is not None]
        METRICS_LOG.info('%s %s', where, ' '.join(values))
