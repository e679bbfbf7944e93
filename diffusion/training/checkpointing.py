"""Kill-safe training: atomic checkpoint files, a checked ``latest`` before autoresume, resume-exact randomness.

A long run is killed at any moment (SIGKILL, pre-emption, node failure) and started again with the same command.
Three things make the restarted run continue exactly:

* **Atomic writes.** Composer writes a checkpoint straight to its final name, so a kill mid-write leaves a
  truncated file there. ``composer_compat.install_atomic_checkpoint_writes`` makes every local checkpoint file
  appear under its final name only once complete (write to a temporary name in the same folder, fsync, ``os.replace``).
* **A checked ``latest``.** Before composer's autoresume reads ``latest-rank{rank}.pt``,
  :func:`repair_latest_checkpoint` verifies the file it points to (a zip integrity test of every record) and,
  when it is truncated, corrupt or missing, logs a warning and points ``latest`` at the newest good checkpoint.
* **Resume-exact randomness.** The training noise and timesteps (``LatentDiffusion``), dropout and masking
  draw from torch's global generator. Composer restores that generator from the checkpoint, but a resumed run
  then consumes it differently from an uninterrupted one (``iter(dataloader)`` draws a base seed at the resume
  point, evaluation and sampling callbacks run at other times). :class:`PerBatchSeed` reseeds the global
  generators at every batch from ``(seed, rank, batch index)``, so the randomness of batch ``n`` depends on
  nothing that happened before it. Data order and augmentations are already a function of (seed, epoch,
  sample) and streaming resumes mid-epoch sample-exact (see ``diffusion/data/dataset.py``).

With composer's deterministic mode (``deterministic_mode: true``) the weights of a killed and resumed run equal
those of an uninterrupted run bit for bit (``tests/test_resume.py``).

One more fix concerns several nodes sharing a checkpoint folder (a cluster's shared filesystem): composer's
autoresume makes local rank 0 of every node write, wait on and then delete a "signal file" in the checkpoint
folder, under a name broadcast from rank 0, so the same name on every node. On a shared folder the second node's
delete fails (``FileNotFoundError: ._signal_file_node0_...``) and the job dies before training.
``composer_compat.install_node_signal_files`` appends each node's own rank to that name (``tests/test_multinode.py``).
"""
from __future__ import annotations

import logging
import os
import random
import re
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger

log = logging.getLogger(__name__)

__all__ = ['AdoptEarlierCheckpoints', 'PerBatchSeed', 'checkpoint_is_complete', 'repair_latest_checkpoint']


# =============================================================================================
# A checked `latest` before autoresume
# =============================================================================================
_BATCH = re.compile(r'ba(\d+)')


def checkpoint_is_complete(path: str | Path) -> bool:
    """Whether a ``.pt`` checkpoint (a torch zip archive) is whole: every record present and its CRC right."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def _batch_of(path: Path) -> int:
    found = _BATCH.findall(path.name)
    return int(found[-1]) if found else -1


def _checkpoints(folder: Path, suffix: str) -> list[Path]:
    """This rank's checkpoint files in ``folder`` (not the ``latest`` symlink, not unfinished writes)."""
    return [p for p in folder.iterdir() if p.name.endswith(suffix) and not p.is_symlink()
            and not p.name.startswith('.tmp-')]


def repair_latest_checkpoint(save_folder: str, latest_name: str = 'latest-rank{rank}.pt',
                             rank: int = 0) -> Optional[Path]:
    """Point ``latest`` at the newest complete checkpoint of ``save_folder`` (local folders only).

    A truncated or corrupt file (or a leftover temporary file) is renamed ``<name>.corrupt`` with a warning, so
    that neither autoresume nor composer's later save to the same name trips over it.

    Args:
        save_folder: The run's checkpoint folder (already formatted with the run name).
        latest_name: Composer's ``save_latest_filename`` pattern.
        rank: This process's global rank.

    Returns:
        The checkpoint ``latest`` now points at, or None when there is none (a fresh start).
    """
    folder = Path(save_folder)
    if '://' in save_folder or not folder.is_dir():
        return None
    latest = folder / latest_name.format(rank=rank)
    suffix = f'-rank{rank}.pt'
    for leftover in folder.glob(f'.tmp-*{suffix}'):
        log.warning('removing an unfinished checkpoint write %s', leftover)
        leftover.unlink()
    candidates = sorted(_checkpoints(folder, suffix), key=_batch_of, reverse=True)
    good = None
    for path in candidates:
        if checkpoint_is_complete(path):
            good = path
            break
        log.warning('checkpoint %s is truncated or corrupt: renamed to %s.corrupt; resuming from an earlier one',
                    path, path.name)
        path.rename(path.with_name(path.name + '.corrupt'))
    current = latest.resolve() if latest.is_symlink() else None
    if good is None:
        if latest.is_symlink():
            latest.unlink()
        return None
    if current != good.resolve():
        if current is not None:
            log.warning('%s pointed at %s; it now points at %s', latest.name, current.name, good.name)
        tmp = latest.with_name(latest.name + '.tmp-link')
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(good.name, tmp)
        os.replace(tmp, latest)  # atomic: there is always a `latest` once one checkpoint exists
    return good


# =============================================================================================
# Resume-exact randomness
# =============================================================================================
class PerBatchSeed(Callback):
    """Reseed ``random``, numpy and torch at every batch from ``(seed, rank, batch index)``.

    Composer's ``state.seed`` is the run's seed plus the rank, so ranks draw different noise; the batch index
    comes from the checkpointed timestamp, so a resumed run draws the same numbers at the same batch.
    Logs nothing.
    """

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_START:
            seed = int(np.random.SeedSequence([int(state.seed), int(state.timestamp.batch)]).generate_state(1)[0])
            # What composer's reproducibility.seed_all does, without its log line at every batch.
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)


class AdoptEarlierCheckpoints(Callback):
    """Hand the checkpoints an earlier (killed) process wrote to composer's rotation, so that
    ``save_num_checkpoints_to_keep`` counts them too (composer's saver only rotates files it wrote itself).

    Args:
        save_folder: The run's local checkpoint folder (formatted).
    """

    def __init__(self, save_folder: str) -> None:
        self.save_folder = Path(save_folder)

    def fit_start(self, state: State, logger: Logger) -> None:
        from composer.callbacks import CheckpointSaver
        from composer.utils import dist
        savers = [c for c in state.callbacks if isinstance(c, CheckpointSaver)]
        if not savers or not self.save_folder.is_dir():
            return
        suffix = f'-rank{dist.get_global_rank()}.pt'
        earlier = sorted(_checkpoints(self.save_folder, suffix), key=_batch_of)
        for saver in savers:
            known = {os.path.abspath(p) for p in saver.saved_checkpoints}
            saver.saved_checkpoints[:0] = [str(p) for p in earlier if os.path.abspath(p) not in known]
