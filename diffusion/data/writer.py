"""The one resumable, atomic MDS writer shared by every converter.

Usage::

    with DatasetWriter(out_dir, config=vars(args)) as writer:
        for item in items:
            if writer.done(item.key):          # finished by an earlier, interrupted run
                continue
            try:
                writer.write(make_sample(item))  # a dict with every column of ``writer.columns``
            except SkipSample as err:
                writer.skip(err.reason, key=item.key, source='openmoji')
    print(writer.summary())

or, with worker processes and a progress bar, ``run_conversion(fn, items, writer, workers=2)``
(:mod:`diffusion.data.pool`); the converters' shared command-line options are in :mod:`diffusion.data.convert_args`.

Layout of ``out_dir``::

    train/index.json            merged index of every committed part (what readers open)
    train/part-00000/...        shards written by streaming's MDSWriter, one folder per part
    eval/index.json, eval/part-*/
    .journal/part-00000.json    keys kept/skipped by that part: the commit record
    .journal/config.json        the converter's arguments; a resume with other arguments is refused
    report.json                 counts kept and skipped, per split, per source and per reason; every
                                skipped file by name with its reason (``skipped_files``)
    attribution.csv             key, creator, licence, licence URL, source and path of every image

How it is resumable and atomic: samples go to streaming's ``MDSWriter`` in a fresh part folder. Every
``commit_every`` samples the part is finished (shards and the part's own index.json written), then
its journal is written to a temporary file and renamed into place (the commit point), then each
split's merged ``index.json`` is rewritten the same way. A killed run loses at most the uncommitted
part, whose folder has no journal and is deleted on the next run; samples committed earlier are
recognised by key (:meth:`DatasetWriter.done`) and by sha256 (duplicates), so a re-run with the same
arguments finishes the dataset without duplicating or losing a sample. Readers only ever see a
complete ``index.json`` that names complete shards. (streaming's ``merge_index`` is not used for the
merged index because it moves a finished file over the old one non-atomically.)

On many machines (``rank`` given): rank ``r`` names its parts ``rank-0000r-part-*`` and its journals the
same, so ranks share ``out`` without touching each other's files; ranks do not write the merged
``index.json``, ``report.json`` or ``attribution.csv``: one :func:`merge_ranks` call after every rank
finished writes them over every committed part of every rank. De-duplication by sha256 is per rank.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import signal
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from streaming import MDSWriter

log = logging.getLogger(__name__)

# The column schema of every converted dataset (see the README, "MDS column schema").
DEFAULT_COLUMNS: dict[str, str] = {
    'image': 'jpeg',
    'caption': 'str',
    'caption_source': 'str',
    'caption_weak': 'int',
    'license': 'str',
    'license_url': 'str',
    'creator': 'str',
    'source': 'str',
    'source_path': 'str',
    'width': 'int',
    'height': 'int',
    'sha256': 'str',
    'key': 'str',
}
ATTRIBUTION_FIELDS = ('key', 'split', 'creator', 'license', 'license_url', 'source', 'source_path')
CRASH_ENV = 'DIFFUSION_WRITER_CRASH_AFTER'  # testing hook: SIGKILL this process after N writes


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename.

    A reader sees the old file or the new one, never a partial one. (No fsync: on the shared VMs
    used here fsync stalled for minutes; the guarantee needed is atomic visibility, which the
    rename gives, not durability against power loss.)
    """
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _bucket(key: str) -> float:
    """A key's place in [0, 1], from a hash: the same on every run and every machine."""
    return int(hashlib.sha1(key.encode('utf-8')).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_for_key(key: str, eval_fraction: float) -> str:
    """Deterministic train/eval assignment from a hash of the sample key."""
    return 'eval' if _bucket(key) < eval_fraction else 'train'


def held_out_keys(keys: Sequence[str], eval_fraction: float,
                  usable: Callable[[str], bool] = lambda key: True) -> set[str]:
    """The keys of the eval split of a whole dataset: those :func:`split_for_key` holds out, and for a small set
    that the hash leaves without a usable one, the ``round(n * eval_fraction)`` (at least one) keys of lowest hash
    that ``usable`` accepts (a converter checks that the item converts, so only a few are tried), so that any set of
    2+ items has an eval split when ``eval_fraction > 0``. Deterministic for a given set of keys."""
    keys = sorted(set(keys))
    held = {k for k in keys if split_for_key(k, eval_fraction) == 'eval'}
    if len(held) < 8:  # a small set's few held-out keys: each must be kept for the split to exist
        held = {k for k in held if usable(k)}
    if held or eval_fraction <= 0 or len(keys) < 2:
        return held
    want = min(len(keys) - 1, max(1, round(len(keys) * eval_fraction)))
    for key in sorted(keys, key=_bucket):
        if len(held) == want:
            break
        if usable(key):
            held.add(key)
    return held


def make_sample(clean: Any, *, key: str, caption: str, caption_source: str, license_id: str, creator: str,
                source: str, source_path: str, image_format: str = 'jpeg', quality: int = 90,
                license_link: str = '') -> dict[str, Any]:
    """Assemble a row of :data:`DEFAULT_COLUMNS` from a :class:`~diffusion.data.sanitize.CleanImage`.

    The image is encoded here (in the worker process), so the writer only copies bytes. ``license_link`` is the
    licence URL the source states (e.g. Flickr's); the canonical URL of ``license_id`` when empty.
    """
    from diffusion.data.licenses import license_url
    from diffusion.data.sanitize import encode_image, is_weak_caption

    return {
        'image': encode_image(clean.image, image_format, quality),
        'caption': caption,
        'caption_source': caption_source,
        'caption_weak': int(is_weak_caption(caption)),
        'license': license_id,
        'license_url': license_link or license_url(license_id),
        'creator': creator,
        'source': source,
        'source_path': source_path,
        'width': clean.width,
        'height': clean.height,
        'sha256': clean.sha256,
        'key': key,
    }


def columns_for(image_format: str) -> dict[str, str]:
    """:data:`DEFAULT_COLUMNS` with the ``image`` column encoded as ``jpeg`` or ``png``."""
    if image_format not in ('jpeg', 'png'):
        raise ValueError(f'image format must be jpeg or png, got {image_format!r}')
    return dict(DEFAULT_COLUMNS, image=image_format)


class ConfigChanged(ValueError):
    """A resume asked for with other arguments than the dataset in ``out`` was written with.

    ``changed`` maps each differing argument to (recorded value, new value); :mod:`diffusion.data.convert_args` turns it
    into one line naming the options as a user types them.
    """

    def __init__(self, out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
        self.out = out
        self.changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
        super().__init__(f'{out} holds a dataset written with other arguments ({self.changed}: recorded, now); '
                         f'use another out folder, the same arguments, or overwrite=True')


class DatasetWriter:
    """Resumable, atomic, de-duplicating writer of an MDS dataset with train/eval splits.

    Args:
        out: Output folder (local).
        columns: MDS column name -> encoding; defaults to :data:`DEFAULT_COLUMNS`.
        compression: streaming compression (``zstd``, ``zstd:7``, ``gzip`` ...) or None.
        size_limit: Shard size limit passed to ``MDSWriter`` (bytes or ``'64mb'``).
        commit_every: Samples per committed part; at most this many are redone after a kill.
        eval_fraction: Share of keys hashed into the ``eval`` split when :meth:`write` gets no split.
        dedup: Skip samples whose ``sha256`` was already written (reason ``duplicate``).
        config: The converter's arguments. A resume whose config differs raises :class:`ConfigChanged`.
        overwrite: Delete an existing dataset in ``out`` instead of resuming it (single rank only).
        rank: This writer is one of several ranks writing ``out`` (see the module docstring).
    """

    def __init__(self,
                 out: str | os.PathLike,
                 columns: dict[str, str] | None = None,
                 *,
                 compression: str | None = None,
                 size_limit: int | str = '64mb',
                 commit_every: int = 256,
                 eval_fraction: float = 0.0,
                 dedup: bool = True,
                 config: dict[str, Any] | None = None,
                 overwrite: bool = False,
                 rank: int | None = None) -> None:
        self.out = Path(out)
        self.rank = rank
        self._prefix = 'part-' if rank is None else f'rank-{rank:05d}-part-'
        self._merge_on_commit = rank is None  # with ranks, merge_ranks() merges once all have finished
        self.columns = dict(columns or DEFAULT_COLUMNS)
        self.compression = compression
        self.size_limit = size_limit
        self.commit_every = commit_every
        self.eval_fraction = eval_fraction
        self.dedup = dedup
        self._journal_dir = self.out / '.journal'
        if overwrite and rank is not None:
            raise ValueError('overwrite=True with ranks would delete the other ranks\' parts; clear out first')
        if overwrite and self.out.exists():
            shutil.rmtree(self.out)
        self._journal_dir.mkdir(parents=True, exist_ok=True)
        self._check_config(config)
        self._kept: list[dict[str, Any]] = []  # committed + current part, in write order
        self._skipped: list[list[str]] = []  # [key, reason, source]
        self._done: set[str] = set()
        self._seen_sha: set[str] = set()
        self._part = self._load_journals()
        self._open: dict[str, MDSWriter] = {}
        self._part_kept: list[dict[str, Any]] = []
        self._part_skipped: list[list[str]] = []
        self._writes = 0
        self._crash_after = int(os.environ.get(CRASH_ENV, '0') or 0)

    # -- resume --------------------------------------------------------------------------------
    def _check_config(self, config: dict[str, Any] | None) -> None:
        path = self._journal_dir / 'config.json'
        if config is None:
            return
        config = json.loads(json.dumps(config, default=str))
        if path.exists():
            old = json.loads(path.read_text())
            if old != config:
                raise ConfigChanged(self.out, old, config)
        else:
            write_json_atomic(path, config)

    def _load_journals(self) -> int:
        """Load committed parts, delete uncommitted part folders; return the next part number."""
        committed = sorted(self._journal_dir.glob(f'{self._prefix}*.json'))
        names = {p.stem for p in committed}
        self._kept, self._skipped = _read_journals(committed)
        for row in self._kept:
            self._done.add(row['key'])
            self._seen_sha.add(row['sha256'])
        self._done.update(row[0] for row in self._skipped if row[0])
        for folder in self.out.glob(f'*/{self._prefix}*'):
            if folder.is_dir() and folder.name not in names:
                log.info('removing uncommitted part %s', folder)
                shutil.rmtree(folder)
        numbers = [int(p.stem.rsplit('-', 1)[1]) for p in committed]
        return max(numbers, default=-1) + 1

    def done(self, key: str) -> bool:
        """Whether ``key`` was already written or skipped by a committed part."""
        return key in self._done

    # -- writing -------------------------------------------------------------------------------
    def write(self, sample: dict[str, Any], split: str | None = None) -> bool:
        """Write one sample (a dict holding every column) to ``split`` (default: hashed from key).

        Returns:
            False if the sample was skipped as a duplicate (same ``sha256``) or its key is done.
        """
        missing = [c for c in self.columns if c not in sample]
        if missing:
            raise ValueError(f'sample {sample.get("key")!r} lacks columns {missing}')
        key = sample['key']
        if key in self._done:
            return False
        if self.dedup and sample.get('sha256') in self._seen_sha:
            self.skip('duplicate', key=key, source=sample.get('source', ''))
            return False
        split = split or split_for_key(key, self.eval_fraction)
        writer = self._open.get(split)
        if writer is None:
            folder = self.out / split / f'{self._prefix}{self._part:05d}'
            writer = MDSWriter(out=str(folder), columns=self.columns, compression=self.compression,
                               size_limit=self.size_limit)
            self._open[split] = writer
        writer.write({c: sample[c] for c in self.columns})
        row = {f: str(sample.get(f, '')) for f in ATTRIBUTION_FIELDS}
        row.update(split=split, sha256=sample.get('sha256', ''))
        self._part_kept.append(row)
        self._done.add(key)
        self._seen_sha.add(row['sha256'])
        self._writes += 1
        if self._crash_after and self._writes >= self._crash_after:
            os.kill(os.getpid(), signal.SIGKILL)  # testing hook: die like a killed job would
        if len(self._part_kept) + len(self._part_skipped) >= self.commit_every:
            self.commit()
        return True

    def skip(self, reason: str, key: str | None = None, source: str = '', name: str = '', detail: str = '') -> None:
        """Count a skipped sample under ``reason`` (and remember ``key`` as done once committed); ``name`` (the
        file the user knows it by) and ``detail`` (the error) are listed in the report's ``skipped_files``."""
        self._part_skipped.append([key or '', reason, source, name, detail])
        if key:
            self._done.add(key)

    def commit(self) -> None:
        """Finish the current part and make it durable (see the module docstring)."""
        if not self._part_kept and not self._part_skipped:
            return
        for writer in self._open.values():
            writer.finish()
        name = f'{self._prefix}{self._part:05d}'
        write_json_atomic(self._journal_dir / f'{name}.json',
                          {'kept': self._part_kept, 'skipped': self._part_skipped})
        self._kept.extend(self._part_kept)
        self._skipped.extend(self._part_skipped)
        splits = set(self._open)
        self._open, self._part_kept, self._part_skipped = {}, [], []
        self._part += 1
        if self._merge_on_commit:
            committed = _committed_parts(self.out)
            for split in splits:
                merge_index(self.out / split, [self.out / split / name / 'index.json' for name in committed])

    # -- reporting -----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Counts kept and skipped: totals, per split, per source and per reason."""
        return summarize(self._kept + self._part_kept, self._skipped + self._part_skipped)

    def finish(self) -> dict[str, Any]:
        """Commit; on a single rank also write ``report.json`` and ``attribution.csv``; return the summary."""
        self.commit()
        report = self.summary()
        if self.rank is None:
            write_json_atomic(self.out / 'report.json', report)
            write_attribution(self.out / 'attribution.csv', self._kept)
        return report

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.finish()
        else:  # keep what is complete, so a re-run continues from here
            self.commit()


# ---------------------------------------------------------------------------------------------
# Merging parts: the one index merge and the one attribution writer (also used by mds_rows)
# ---------------------------------------------------------------------------------------------
def summarize(kept: Sequence[dict[str, Any]], skipped: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Counts kept and skipped: totals, per split, per source and per reason; every skipped file by name.

    A skipped row is ``[key, reason, source]`` and, since skipped files are named, ``name`` and ``detail``.
    """
    by_source: dict[str, dict[str, Any]] = defaultdict(lambda: {'kept': 0, 'skipped': Counter()})
    for row in kept:
        by_source[row['source']]['kept'] += 1
    for row in skipped:
        by_source[row[2]]['skipped'][row[1]] += 1
    files = [{'name': (row[3] if len(row) > 3 else '') or row[0], 'reason': row[1],
              'detail': row[4] if len(row) > 4 else ''} for row in skipped]
    return {
        'kept': len(kept),
        'skipped': len(skipped),
        'splits': dict(Counter(row['split'] for row in kept)),
        'skipped_by_reason': dict(Counter(row[1] for row in skipped)),
        'by_source': {s: {'kept': v['kept'], 'skipped': dict(v['skipped'])}
                      for s, v in sorted(by_source.items())},
        'skipped_files': files,
    }


def _read_journals(records: Iterable[Path]) -> tuple[list[dict[str, Any]], list[list[str]]]:
    kept: list[dict[str, Any]] = []
    skipped: list[list[str]] = []
    for record in records:
        part = json.loads(record.read_text())
        kept.extend(part['kept'])
        skipped.extend(part['skipped'])
    return kept, skipped


def _committed_parts(out: Path) -> list[str]:
    """Names of the parts (of every rank) whose journal exists: the only parts readers may see."""
    return sorted(p.stem for p in (out / '.journal').glob('*part-*.json'))


def merge_index(split_dir: str | os.PathLike, part_indexes: Iterable[str | os.PathLike]) -> int:
    """Atomically write ``split_dir/index.json`` naming the shards of every existing part index.

    Args:
        split_dir: The folder readers open; every part index must lie below it.
        part_indexes: ``index.json`` files of finished parts (missing ones are ignored).

    Returns:
        The number of samples the merged index names.
    """
    split_dir = Path(split_dir)
    shards = []
    for index in map(Path, part_indexes):
        if not index.exists():
            continue
        prefix = index.parent.relative_to(split_dir).as_posix()
        for shard in json.loads(index.read_text())['shards']:
            for field in ('raw_data', 'zip_data', 'raw_meta', 'zip_meta'):
                if shard.get(field):
                    shard[field]['basename'] = f'{prefix}/{shard[field]["basename"]}'
            shards.append(shard)
    split_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(split_dir / 'index.json', {'version': 2, 'shards': shards})
    return sum(shard['samples'] for shard in shards)


def write_attribution(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Atomically write the attribution file: :data:`ATTRIBUTION_FIELDS` of every kept image."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    with open(tmp, 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=list(ATTRIBUTION_FIELDS), extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def merge_ranks(out: str | os.PathLike) -> dict[str, Any]:
    """The merge step after a multi-rank conversion: one ``index.json`` per split over every committed part
    of every rank, one ``report.json`` and one ``attribution.csv``. Idempotent; returns the report."""
    out = Path(out)
    committed = _committed_parts(out)
    kept, skipped = _read_journals(out / '.journal' / f'{name}.json' for name in committed)
    for split in sorted({row['split'] for row in kept}):
        merge_index(out / split, [out / split / name / 'index.json' for name in committed])
    report = summarize(kept, skipped)
    write_json_atomic(out / 'report.json', report)
    write_attribution(out / 'attribution.csv', kept)
    return report
