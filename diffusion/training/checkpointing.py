"""Kill-safe training: atomic checkpoint files, a checked ``latest`` before autoresume, resume-exact randomness.

A long run is killed at any moment (SIGKILL, pre-emption, node failure) and started again with the same command.
Three things make the restarted run continue exactly:

* **Atomic writes.** Composer writes a full checkpoint straight to its final name, so a kill mid-write leaves a
  truncated file there. ``composer_compat.install_atomic_checkpoint_writes`` makes every local checkpoint file
  appear under its final name only once complete (write to a temporary name in the same folder, fsync, ``os.replace``).
  Sharded checkpoints do not go through that writer: torch.distributed.checkpoint writes each rank's shard into the
  checkpoint folder (fsynced) and, once all ranks are done, rank 0 writes the ``.metadata`` index the same atomic
  way (``.metadata.tmp``, then a rename), so a folder without its index is an unfinished save.
* **A checked ``latest``.** Before composer's autoresume reads ``latest-rank{rank}.pt``,
  :func:`repair_latest_checkpoint` verifies what it points to (:func:`checkpoint_is_complete`: a zip test of a
  checkpoint file, CRCs included up to 1 GB and record headers and sizes above; the index and shard sizes of a
  sharded folder) and, when it is truncated, corrupt, unfinished or missing, logs a warning and points ``latest``
  at the newest good checkpoint.
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
import struct
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger

from diffusion.checkpoints import checkpoint_batch, is_sharded_checkpoint_name

log = logging.getLogger(__name__)

__all__ = ['AdoptEarlierCheckpoints', 'PerBatchSeed', 'checkpoint_is_complete', 'repair_latest_checkpoint']


# =============================================================================================
# A checked `latest` before autoresume
# =============================================================================================
# Files up to this size get the full zip test (CRC of every record, ~1 s a GB); larger ones the structural check.
FULL_CHECK_BYTES = 1 << 30
_LOCAL_HEADER = struct.Struct('<4s22xHH')  # signature, (version ... sizes), name length, extra length


def _records_in_place(archive: zipfile.ZipFile, path: Path, size: int) -> bool:
    """Every record of the central directory starts with its local header (right signature and name) and its
    data ends inside the file. Reads the central directory and 30 bytes plus a name per record, not the data."""
    infos = archive.infolist()
    if not infos:
        return False
    with open(path, 'rb') as f:
        for info in infos:
            f.seek(info.header_offset)
            raw = f.read(_LOCAL_HEADER.size)
            if len(raw) < _LOCAL_HEADER.size:
                return False
            signature, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
            name = f.read(name_len).decode('utf-8' if info.flag_bits & 0x800 else 'cp437', errors='replace')
            if signature != b'PK\x03\x04' or name != info.orig_filename:
                return False
            if info.header_offset + _LOCAL_HEADER.size + name_len + extra_len + info.compress_size > size:
                return False
    return True


def checkpoint_is_complete(path: str | Path, full_check_bytes: int = FULL_CHECK_BYTES) -> bool:
    """Whether a checkpoint is whole.

    * A ``.pt`` file (a torch zip archive) of at most ``full_check_bytes``: every record present and its CRC right.
    * A larger one (SD2's 12-16 GB, checked on rank 0 while the other ranks wait against the dist timeout):
      the central directory reads and every record's header and data lie in place (:func:`_records_in_place`),
      which catches a truncated or overwritten file without reading the tensors; a flipped bit inside tensor
      data is not looked for.
    * A sharded checkpoint folder: its ``.metadata`` index reads and every shard it names exists and is long
      enough (``diffusion.checkpoints.sharded_checkpoint_problems``).
    """
    path = Path(path)
    if path.is_dir():
        from diffusion.checkpoints import sharded_checkpoint_problems
        return not sharded_checkpoint_problems(path)
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            if size <= full_check_bytes:
                return archive.testzip() is None
            return _records_in_place(archive, path, size)
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, struct.error):
        return False


def _batch_of(path: Path) -> int:
    batch = checkpoint_batch(path.name)
    return -1 if batch is None else batch


def _is_sharded_folder(path: Path) -> bool:
    """A sharded checkpoint folder, whole or not: composer's ``ep*-ba*`` name, or an index or shard inside."""
    if not path.is_dir() or path.is_symlink():
        return False
    return is_sharded_checkpoint_name(path.name) or (path / '.metadata').exists() or \
        any(path.glob('.metadata*')) or any(path.glob('*.distcp'))


def _checkpoints(folder: Path, suffix: str) -> list[Path]:
    """This rank's checkpoint files in ``folder`` and the sharded checkpoint folders (not the ``latest`` symlink,
    not unfinished writes, not checkpoints set aside as ``.corrupt``)."""
    found = []
    for p in folder.iterdir():
        if p.is_symlink() or p.name.startswith('.tmp-') or '.corrupt' in p.name:
            continue
        if p.name.endswith(suffix) or _is_sharded_folder(p):
            found.append(p)
    return found


def _set_aside(path: Path) -> Path:
    """Rename a broken checkpoint (file or folder) to ``<name>.corrupt`` (``.corrupt-2``, ... if taken)."""
    target, n = path.with_name(path.name + '.corrupt'), 1
    while target.exists() or target.is_symlink():
        n += 1
        target = path.with_name(f'{path.name}.corrupt-{n}')
    path.rename(target)
    return target


def repair_latest_checkpoint(save_folder: str, latest_name: str = 'latest-rank{rank}.pt',
                             rank: int = 0, full_check_bytes: int = FULL_CHECK_BYTES) -> Optional[Path]:
    """Point ``latest`` at the newest complete checkpoint of ``save_folder`` (local folders only).

    Candidates are this rank's ``*-rank{rank}.pt`` files and sharded checkpoint folders (FSDP
    ``state_dict_type: sharded``: composer writes ``ep{epoch}-ba{batch}/`` with one ``__{rank}_0.distcp`` shard per
    rank and the ``.metadata`` index rank 0 writes last, and links ``latest-rank0.pt`` to the folder; every rank
    then loads through rank 0's link). They are checked newest first with :func:`checkpoint_is_complete`. A
    truncated or corrupt file, an unfinished sharded folder (no index, a shard missing or short), or a leftover
    temporary file is renamed ``<name>.corrupt`` with a warning, so that neither autoresume nor composer's later
    save to the same name trips over it.

    Args:
        save_folder: The run's checkpoint folder (already formatted with the run name).
        latest_name: Composer's ``save_latest_filename`` pattern.
        rank: This process's global rank.
        full_check_bytes: See :func:`checkpoint_is_complete`.

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
        if checkpoint_is_complete(path, full_check_bytes):
            good = path
            break
        moved = _set_aside(path)
        log.warning('checkpoint %s is truncated or corrupt (or an unfinished sharded save): renamed to %s; '
                    'resuming from an earlier one', path, moved.name)
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

    Full checkpoints: the saver lists the ``...-rank{rank}.pt`` files and deletes the oldest. Sharded checkpoints:
    each rank's saver lists its own shard ``<folder>/__{rank}_0.distcp`` and, on rank 0, deletes the oldest one's
    whole folder; the earlier folders are adopted in that form. Folders set aside as ``.corrupt`` by
    :func:`repair_latest_checkpoint` are neither.

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
        rank = dist.get_global_rank()
        found = _checkpoints(self.save_folder, f'-rank{rank}.pt')
        if state.fsdp_sharded_state_dict_enabled:
            earlier = [p / f'__{rank}_0.distcp' for p in found if p.is_dir()]
        else:
            earlier = [p for p in found if p.is_file()]
        earlier.sort(key=lambda p: _batch_of(p.parent if p.name.endswith('.distcp') else p))
        for saver in savers:
            known = {os.path.abspath(p) for p in saver.saved_checkpoints}
            saver.saved_checkpoints[:0] = [str(p) for p in earlier if os.path.abspath(p) not in known]
