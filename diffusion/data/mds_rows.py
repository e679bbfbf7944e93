"""Derive a new MDS dataset from an existing one, row by row, across ranks, resumably.

``convert/caption.py`` and ``convert/precompute_latents.py`` both read every row of a source dataset, add or
replace a few columns, and keep every other column as it was. This module holds that shared part:

* :class:`RowReader` reads a local MDS split and decodes columns, except image columns, which stay as their
  stored bytes: they are written back byte for byte (streaming's JPEG/PNG encoders would re-compress a decoded
  image, losing quality and breaking the ``sha256`` column).
* :func:`map_dataset` shards the rows over ranks (rank ``r`` of ``W`` takes rows ``r, r+W, ...``; launch with
  ``composer -n W`` or ``torchrun``), writes each rank's rows with the project's one resumable writer
  (:class:`diffusion.data.writer.DatasetWriter`) and, on rank 0, merges the ranks into one ``index.json`` per
  split.

Output layout (``W`` ranks, splits as in the source)::

    out/train/index.json                       merged index: what readers open
    out/train/rank-00000/train/part-00000/...  rank 0's committed parts (DatasetWriter layout)
    out/train/rank-00000/.journal/             its resume journal
    out/eval/...
    out/report.json                            kept/skipped counts summed over ranks and splits
    out/attribution.csv                        creator/licence of every row, from every rank
"""
from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
from streaming.base.format.mds.encodings import mds_decode
from tqdm import tqdm

log = logging.getLogger(__name__)

__all__ = ['RowReader', 'find_splits', 'map_dataset', 'rank_and_world']

# Encodings whose decode/encode round trip is lossy or slow: such columns stay as their stored bytes.
_RAW_ENCODINGS = ('jpeg', 'png', 'pil', 'jpeg_array', 'jpegarray', 'list[pil]', 'list[jpeg]', 'list[png]')

# Given a list of rows, return one dict of new/replaced column values per row, or a str: the reason to skip it.
RowFn = Callable[[list[dict[str, Any]]], list[Any]]


def find_splits(src: str | os.PathLike) -> list[str]:
    """Split folders of an MDS dataset: sub-folders holding ``index.json`` (``''`` if ``src`` itself holds one)."""
    root = Path(src)
    if (root / 'index.json').exists():
        return ['']
    splits = sorted(p.parent.name for p in root.glob('*/index.json'))
    if not splits:
        raise FileNotFoundError(f'{root} holds no MDS dataset: no index.json in it or in its sub-folders')
    return splits


class RowReader:
    """Random access to the rows of one local MDS split.

    Columns and shard sizes come from the split's ``index.json`` (MDS's documented on-disk format); rows are read
    with streaming's public ``reader_from_json`` and the shard reader's ``get_sample_data`` (a row's raw bytes).
    The row layout parsed in :meth:`raw` (a uint32 size per variable-size column, then the columns) is MDS's
    format; ``tests/test_multirank_convert.py`` pins it against streaming's own decoding of every column.

    Args:
        src: Dataset folder.
        split: Split sub-folder (``''`` for none).

    Attributes:
        columns: Column name -> MDS encoding, identical in every shard (checked).
    """

    def __init__(self, src: str | os.PathLike, split: str = '') -> None:
        from streaming.base.format import reader_from_json
        folder = Path(src) / split if split else Path(src)
        infos = json.loads((folder / 'index.json').read_text())['shards']
        if not infos:
            raise ValueError(f'{src}/{split}: the index names no shards')
        self.columns: dict[str, str] = dict(zip(infos[0]['column_names'], infos[0]['column_encodings']))
        for info in infos[1:]:
            if dict(zip(info['column_names'], info['column_encodings'])) != self.columns:
                raise ValueError(f'{src}/{split}: shards disagree on columns; cannot derive a dataset from it')
        self._sizes = [info['column_sizes'] for info in infos]
        self._shards = [reader_from_json(str(folder), None, info) for info in infos]
        self._ends = np.cumsum([info['samples'] for info in infos])

    def __len__(self) -> int:
        return int(self._ends[-1])

    def raw(self, index: int) -> dict[str, bytes]:
        """The stored bytes of every column of row ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f'row {index} out of range [0, {len(self)})')
        shard_id = int(np.searchsorted(self._ends, index, side='right'))
        idx = index - (int(self._ends[shard_id - 1]) if shard_id else 0)
        data = self._shards[shard_id].get_sample_data(idx)
        sizes, pos = [], 0
        for size in self._sizes[shard_id]:
            if size is None:  # variable-size column: its size is in the row header
                size = int(np.frombuffer(data[pos:pos + 4], np.uint32)[0])
                pos += 4
            sizes.append(size)
        row = {}
        for name, size in zip(self.columns, sizes):
            row[name] = data[pos:pos + size]
            pos += size
        return row

    def row(self, index: int, columns: Optional[Sequence[str]] = None) -> dict[str, Any]:
        """Row ``index``: columns decoded, image columns left as bytes (see the module docstring).

        Args:
            index: Row number in this split.
            columns: Only these columns (default: all).
        """
        raw = self.raw(index)
        names = columns if columns is not None else list(self.columns)
        return {c: raw[c] if self.columns[c] in _RAW_ENCODINGS else mds_decode(self.columns[c], raw[c])
                for c in names}


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (initialising gloo/nccl when launched on several ranks)."""
    from composer.utils import dist
    if dist.get_world_size() > 1 and not dist.is_initialized():
        dist.initialize_dist('gpu' if os.environ.get('CUDA_VISIBLE_DEVICES') else 'cpu')
    return dist.get_global_rank(), dist.get_world_size()


def _barrier() -> None:
    from composer.utils import dist
    if dist.get_world_size() > 1:
        dist.barrier()


def _batches(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def _row_key(row: dict[str, Any], split: str, index: int) -> str:
    key = row.get('key')
    return str(key) if key not in (None, '') else f'{split or "all"}/{index}'


def map_dataset(src: str | os.PathLike, out: str | os.PathLike, fn: RowFn, new_columns: dict[str, str], *,
                config: dict[str, Any], batch_size: int = 8, commit_every: int = 256,
                splits: Optional[Sequence[str]] = None, desc: str = 'rows', limit: Optional[int] = None,
                rank: Optional[int] = None, world: Optional[int] = None) -> dict[str, Any]:
    """Write ``out``: every row of ``src`` with the columns ``fn`` returns added or replaced.

    Resumable: rows committed by an earlier run (recognised by their ``key``) are not processed again; a
    re-run with other ``config`` is refused by the writer.

    Args:
        src: Source dataset folder.
        out: Output folder.
        fn: Called with batches of rows (image columns as bytes); returns per row a dict of new column
            values, or a str, the reason to skip the row (counted in the report).
        new_columns: Encodings of the added/replaced columns (replacing a column may change its encoding).
        config: Arguments recorded with the output; a resume must give the same.
        batch_size: Rows per ``fn`` call.
        commit_every: Rows per committed part (at most this many are redone after a kill).
        splits: Splits to convert (default: all found in ``src``).
        desc: Progress bar label.
        limit: Convert only the first ``limit`` rows of each split (quick looks; recorded in ``config``).
        rank: With ``world``: act as this rank without torch.distributed (no barriers; run every rank, rank 0
            last, e.g. as separate jobs or in tests). Default: from the launcher's environment.
        world: Number of ranks with ``rank``.

    Returns:
        On rank 0 the merged report (``kept``, ``skipped``, ``skipped_by_reason``, ``splits``); on other ranks
        their own part of it.
    """
    from diffusion.data.writer import DatasetWriter
    manual = rank is not None and world is not None
    if not manual:
        rank, world = rank_and_world()
    assert rank is not None and world is not None
    if not 0 <= rank < world:
        raise ValueError(f'rank {rank} is not in [0, {world})')
    out = Path(out)
    splits = list(splits) if splits is not None else find_splits(src)
    for split in splits:
        reader = RowReader(src, split)
        columns = {**reader.columns, **new_columns}
        rank_dir = out / (split or '.') / f'rank-{rank:05d}'
        n = len(reader) if limit is None else min(limit, len(reader))
        mine = list(range(rank, n, world))
        cfg = {**config, 'split': split, 'rank': rank, 'world_size': world, 'limit': limit}
        with DatasetWriter(rank_dir, columns, config=cfg, commit_every=commit_every, dedup=False) as writer:
            _convert_split(reader, writer, fn, mine, split, batch_size, f'{desc} {split or ""} r{rank}'.strip())
    if not manual:
        _barrier()
    report: dict[str, Any] = {}
    if rank == 0:
        report = _merge(out, splits, world)
    if not manual:
        _barrier()
    return report


def _convert_split(reader: RowReader, writer: Any, fn: RowFn, indices: list[int], split: str, batch_size: int,
                   desc: str) -> None:
    keys = {i: _row_key(reader.row(i, ['key'] if 'key' in reader.columns else []), split, i) for i in indices}
    pending = [i for i in indices if not writer.done(keys[i])]
    with tqdm(total=len(pending), desc=desc, unit='row', dynamic_ncols=True) as bar:
        for batch in _batches(pending, batch_size):
            rows = [reader.row(i) for i in batch]
            results = fn(rows)
            if len(results) != len(rows):
                raise RuntimeError(f'the row function returned {len(results)} results for {len(rows)} rows')
            for i, row, result in zip(batch, rows, results):
                if isinstance(result, str):
                    writer.skip(result, key=keys[i], source=str(row.get('source', '')))
                else:
                    writer.write({**row, **result, 'key': keys[i]}, split=split or 'all')
            bar.update(len(batch))


def _merge(out: Path, splits: Sequence[str], world: int) -> dict[str, Any]:
    """Rank 0: one ``index.json`` per split over every rank's parts, one report, one attribution file."""
    from diffusion.data.writer import merge_index, write_attribution, write_json_atomic
    totals: dict[str, Any] = {'kept': 0, 'skipped': 0, 'skipped_by_reason': Counter(), 'splits': {}}
    attribution: list[dict[str, str]] = []
    for split in splits:
        split_dir = out / (split or '.')
        rank_dirs = [split_dir / f'rank-{r:05d}' for r in range(world)]
        kept = merge_index(split_dir, [rank_dir / (split or 'all') / 'index.json' for rank_dir in rank_dirs])
        for rank_dir in rank_dirs:
            report_file = rank_dir / 'report.json'
            if report_file.exists():
                rep = json.loads(report_file.read_text())
                totals['skipped'] += rep['skipped']
                totals['skipped_by_reason'].update(rep['skipped_by_reason'])
            if (rank_dir / 'attribution.csv').exists():
                with open(rank_dir / 'attribution.csv', newline='', encoding='utf-8') as f:
                    attribution.extend(csv.DictReader(f))
        totals['kept'] += kept
        totals['splits'][split or 'all'] = kept
    totals['skipped_by_reason'] = dict(totals['skipped_by_reason'])
    write_json_atomic(out / 'report.json', totals)
    write_attribution(out / 'attribution.csv', attribution)
    return totals
