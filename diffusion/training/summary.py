"""What a run did, for people and for ``summary.json``: batches, samples, time, first and last loss and metrics.

The history comes from a logger the Trainer is given (:func:`summary_logger`, a :class:`RunHistory`); rank 0
prints and writes it at the end of ``diffusion.training.train.train``.

Composer's ``InMemoryLogger`` keeps every value it is given with a ``Timestamp`` each, on every rank: ~2 GB per
rank over SD2's 550k batches. :class:`RunHistory` is that logger with a fixed memory: per key it keeps the first
value, the last value and at most ``max_points`` evenly spaced values in between, scalars only.
"""
from __future__ import annotations

import numbers
from typing import Any, Optional

import torch
from composer.loggers import InMemoryLogger

__all__ = ['RunHistory', 'flat', 'format_summary', 'summarize', 'summary_logger']


def _scalar(value: Any) -> Optional[Any]:
    """A float, or a one-element tensor (detached; a CUDA one stays on the device until read: no host sync here);
    None for anything else (images, tables, histograms are not kept)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.detach().reshape(())
        return value.item() if value.device.type == 'cpu' else value.clone()
    return float(value) if isinstance(value, numbers.Real) else None


class RunHistory(InMemoryLogger):
    """Composer's in-memory logger with bounded memory: ``data[key]`` holds at most ``max_points`` + 1 points.

    Every ``stride``-th value of a key is kept; when ``max_points`` are held, every other one is dropped and the
    stride doubles, so the kept points stay evenly spaced over the run and always include the first. The last
    value is ``most_recent_values[key]`` (at ``most_recent_timestamps[key]``), as in composer's logger.

    Args:
        max_points: Points kept per key (besides the last value).
    """

    def __init__(self, max_points: int = 256) -> None:
        super().__init__()
        if max_points < 2:
            raise ValueError(f'max_points must be at least 2, got {max_points}')
        self.max_points = max_points
        self._stride: dict[str, int] = {}
        self._count: dict[str, int] = {}

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        assert self.state is not None, 'RunHistory is used by a Trainer (its INIT event gives it the state)'
        timestamp = self.state.timestamp
        for key, raw in metrics.items():
            value = _scalar(raw)
            if value is None:
                continue
            count, stride = self._count.get(key, 0), self._stride.get(key, 1)
            self._count[key] = count + 1
            self.most_recent_values[key] = value
            self.most_recent_timestamps[key] = timestamp
            if count % stride:
                continue
            points = self.data.setdefault(key, [])
            points.append((timestamp, value))
            if len(points) > self.max_points:
                del points[1::2]
                self._stride[key] = stride * 2


def summary_logger() -> RunHistory:
    """The logger whose metric history :func:`summarize` reads."""
    return RunHistory()


def flat(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


def _history(trainer: Any) -> dict[str, list[list[float]]]:
    """Eval metrics and train loss over batches (thinned, the last value included), from the :class:`RunHistory`
    (or any composer ``InMemoryLogger``) among the trainer's loggers."""
    mem = next((d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger)), None)
    if mem is None:
        return {}
    out = {}
    for key, values in mem.data.items():
        if not (key.startswith('metrics/') or key == 'loss/train/total'):
            continue
        # composer logs a batch's train loss before it counts the batch (eval metrics after): the loss of the
        # k-th batch carries timestamp k - 1, so it is shifted to k, the batch number the console prints
        shift = 1 if key.startswith('loss/train') else 0
        points = [[int(ts.batch) + shift, float(v)] for ts, v in values if isinstance(v, (int, float, torch.Tensor))]
        last_ts, last = mem.most_recent_timestamps.get(key), mem.most_recent_values.get(key)
        if last_ts is not None and isinstance(last, (int, float, torch.Tensor)) and \
                (not points or points[-1][0] != int(last_ts.batch) + shift):
            points.append([int(last_ts.batch) + shift, float(last)])
        out[key] = points
    return out


def summarize(trainer: Any, seconds: float) -> dict[str, Any]:
    """What a run did: batches, samples, time, losses and eval metrics (first and last), checkpoint."""
    state = trainer.state
    history = _history(trainer)
    summary: dict[str, Any] = {
        'run_name': state.run_name, 'batches': int(state.timestamp.batch), 'samples': int(state.timestamp.sample),
        'epochs': int(state.timestamp.epoch), 'seconds': round(seconds, 1),
        'last_checkpoint': str(trainer.saved_checkpoints[-1]) if trainer.saved_checkpoints else None,
        'history': history,
    }
    for key, points in history.items():
        if points:
            summary.setdefault('first', {})[key] = points[0]
            summary.setdefault('last', {})[key] = points[-1]
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"run {summary['run_name']}: {summary['batches']} batches, {summary['samples']} samples, "
             f"{summary['epochs']} epochs in {summary['seconds']} s"]
    for key, (batch, value) in (summary.get('last') or {}).items():
        first_batch, first = summary['first'][key]
        change = f' (at batch {first_batch}: {first:.4f})' if first_batch != batch else ''
        lines.append(f'  {key} at batch {batch}: {value:.4f}{change}')
    if summary['last_checkpoint']:
        lines.append(f"  last checkpoint: {summary['last_checkpoint']}")
    return '\n'.join(lines)
