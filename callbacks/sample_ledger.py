"""Which samples each rank trained on, and a digest of its weights: a ledger for checking data sharding."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from diffusion import registry
from diffusion.models.wrapping import unwrap

log = logging.getLogger(__name__)

__all__ = ['SampleLedger', 'weights_digest']


def weights_digest(state_dict: dict[str, Any]) -> str:
    """SHA-1 over the names and bytes of every tensor of a state dict (order-independent)."""
    sha = hashlib.sha1()
    for name in sorted(state_dict):
        value = state_dict[name]
        if isinstance(value, torch.Tensor):
            sha.update(name.encode())
            sha.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


class SampleLedger(Callback):
    """Write, per rank, the value of ``key`` for every training sample and a digest of the final weights.

    With streaming, every rank should see a disjoint share of each epoch, and after DDP's gradient averaging
    every rank should hold the same weights; the ledger lets a test or a person check both. Each rank appends
    JSON lines to ``<folder>/rank<r>.jsonl``: ``{"batch": i, "samples": [...]}`` per batch and
    ``{"fit_end": batch, "weights_sha1": ...}`` at the end (over the model's ``state_dict``, i.e. what a
    checkpoint stores).

    Args:
        folder: Output folder; ``{run_name}`` is filled in.
        key: The batch key that identifies a sample (e.g. ``caption`` with ``caption_dropout: 0``).
    """

    def __init__(self, folder: str = 'outputs/{run_name}/ledger', key: str = 'caption') -> None:
        self.folder = folder
        self.key = key

    def _write(self, state: State, record: dict[str, Any]) -> None:
        folder = Path(self.folder.format(run_name=state.run_name))
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f'rank{dist.get_global_rank()}.jsonl', 'a') as f:
            f.write(json.dumps(record) + '\n')

    def after_dataloader(self, state: State, logger: Logger) -> None:
        values = state.batch[self.key]
        values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
        self._write(state, {'batch': int(state.timestamp.batch), 'samples': values})

    def fit_end(self, state: State, logger: Logger) -> None:
        model = unwrap(state.model)
        self._write(state, {'fit_end': int(state.timestamp.batch), 'weights_sha1': weights_digest(model.state_dict())})


registry.callbacks.register('sample_ledger', func=SampleLedger)
