"""What a run did, for people and for ``summary.json``: batches, samples, time, first and last loss and metrics.

The history comes from a logger the Trainer is given (:func:`summary_logger`); rank 0 prints and writes it at the
end of ``diffusion.training.train.train``.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ['flat', 'format_summary', 'summarize', 'summary_logger']


def summary_logger() -> Any:
    """The logger whose metric history :func:`summarize` reads (composer's in-memory logger)."""
    from composer.loggers import InMemoryLogger
    return InMemoryLogger()


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
    """Eval metrics and train loss over batches, from composer's InMemoryLogger."""
    from composer.loggers import InMemoryLogger
    mem = next((d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger)), None)
    if mem is None:
        return {}
    out = {}
    for key, values in mem.data.items():
        if key.startswith('metrics/') or key == 'loss/train/total':
            out[key] = [[int(ts.batch), float(v)] for ts, v in values if isinstance(v, (int, float, torch.Tensor))]
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
