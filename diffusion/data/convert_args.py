"""Helpers shared by the data scripts in ``convert/`` (they are scripts, not a package, so they import these).

* :func:`add_writer_args`, :func:`writer_from_args` and :func:`print_summary`: the output options every image
  converter takes, the :class:`~diffusion.data.writer.DatasetWriter` they describe (a resume with changed options
  is one line naming them as typed, e.g. ``--size``), and the end-of-run summary that names skipped files.
* :func:`add_map_args` adds the options every row-by-row deriving script takes (``--src``, ``--out``,
  ``--splits``, ``--limit``, ``--commit-every``, ``--batch-size``, ``--device``).
* :func:`resolve_device` turns ``--device auto`` into this rank's GPU, or the CPU.
* :func:`rank_from_env` finds this process's rank and the number of ranks, from the composer / torchrun launcher
  (``RANK``, ``WORLD_SIZE``) or a Slurm job array (``SLURM_ARRAY_TASK_ID``, ``SLURM_ARRAY_TASK_COUNT``), without
  starting torch.distributed: conversion ranks never talk to each other.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from diffusion.data.writer import DatasetWriter

# Skipped files the summary names on the console (all of them are in report.json).
SUMMARY_SKIPPED_LINES = 10


def add_map_args(parser: argparse.ArgumentParser, *, batch_size: int, commit_every: int) -> None:
    """Add the options of a script that derives a dataset row by row (captions, latents)."""
    parser.add_argument('--src', required=True, help='source MDS dataset folder (with train/ eval/ splits)')
    parser.add_argument('--out', required=True, help='output folder (a new MDS dataset)')
    parser.add_argument('--batch-size', type=int, default=batch_size)
    parser.add_argument('--device', default='auto',
                        help="'auto' (cuda:<local rank> if available, else cpu), 'cpu', ...")
    parser.add_argument('--splits', nargs='*', default=None, help='splits to convert (default: all)')
    parser.add_argument('--limit', type=int, default=None, help='only the first N rows of each split')
    parser.add_argument('--commit-every', type=int, default=commit_every,
                        help='rows per committed part (resume granularity)')


def resolve_device(name: str) -> str:
    """``auto``: ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``; any other name as given."""
    if name != 'auto':
        return name
    import torch  # imported here: the image converters never need torch
    return f'cuda:{os.environ.get("LOCAL_RANK", "0")}' if torch.cuda.is_available() else 'cpu'


def rank_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) of this process: ``RANK``/``WORLD_SIZE`` (composer, torchrun), else a Slurm job
    array's ``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` / ``SLURM_ARRAY_TASK_COUNT``, else (0, 1).

    Raises:
        ValueError: If the variables are not integers or the rank is outside ``[0, world)``.
    """
    env = os.environ if environ is None else environ
    if 'WORLD_SIZE' in env:
        rank, world = env.get('RANK', '0'), env['WORLD_SIZE']
    elif 'SLURM_ARRAY_TASK_COUNT' in env:
        rank = str(int(env['SLURM_ARRAY_TASK_ID']) - int(env.get('SLURM_ARRAY_TASK_MIN', '0')))
        world = env['SLURM_ARRAY_TASK_COUNT']
    else:
        return 0, 1
    try:
        r, w = int(rank), int(world)
    except ValueError as err:
        raise ValueError(f'rank {rank!r} / world size {world!r} from the environment are not integers') from err
    if not 0 <= r < w:
        raise ValueError(f'rank {r} is not in [0, {w}) (check RANK/WORLD_SIZE or the Slurm array range)')
    return r, w


def add_writer_args(parser: Any) -> None:
    """Add the options every converter takes to an ``argparse.ArgumentParser``."""
    group = parser.add_argument_group('output')
    group.add_argument('--out', required=True, help='output folder (MDS splits, report.json, attribution.csv)')
    group.add_argument('--workers', type=int, default=1, help='worker processes')
    group.add_argument('--size', type=int, default=512, help='longer side of stored images (no upscaling)')
    group.add_argument('--min-size', type=int, default=64, help='minimum shorter side of a source image')
    group.add_argument('--max-pixels', type=int, default=89_478_485, help='decompression-bomb limit (w*h)')
    group.add_argument('--image-format', choices=('jpeg', 'png'), default='jpeg')
    group.add_argument('--quality', type=int, default=90, help='JPEG quality')
    group.add_argument('--compression', default=None, help='MDS shard compression, e.g. zstd (default none)')
    group.add_argument('--size-limit', default='64mb', help='MDS shard size limit')
    group.add_argument('--eval-fraction', type=float, default=0.05, help='share of keys in the eval split')
    group.add_argument('--commit-every', type=int, default=256, help='samples per committed part')
    group.add_argument('--overwrite', action='store_true', help='delete --out first instead of resuming')


# Options that may change between resumed runs (every rank of a multi-rank run records the same config).
_RUN_ONLY = ('workers', 'overwrite', 'cache_dir', 'rank', 'merge')


def _as_typed(name: str, value: Any) -> str:
    """An option as a user types it: ``--size 64``, ``--keep-empty-captions``, or ``--license-set`` not given."""
    flag = f'--{name.replace("_", "-")}'
    if value is True:
        return flag
    if value in (None, False):
        return f'no {flag}'
    return f'{flag} {value}'


def writer_from_args(args: Any, rank: int | None = None,
                     extra_columns: dict[str, str] | None = None) -> DatasetWriter:
    """Build the :class:`DatasetWriter` for a converter's parsed arguments (``rank``: one of several ranks).

    ``extra_columns`` adds a converter's own columns (name -> MDS encoding) to :data:`DEFAULT_COLUMNS`. A resume
    with other options than the dataset in ``--out`` was written with exits with one line naming them.
    """
    from diffusion.data.writer import ConfigChanged, DatasetWriter, columns_for

    config = {k: v for k, v in sorted(vars(args).items()) if k not in _RUN_ONLY}
    columns = dict(columns_for(args.image_format), **(extra_columns or {}))
    try:
        return DatasetWriter(args.out, columns, compression=args.compression,
                             size_limit=args.size_limit, commit_every=args.commit_every,
                             eval_fraction=args.eval_fraction, config=config, overwrite=args.overwrite, rank=rank)
    except ConfigChanged as err:
        then = ', '.join(_as_typed(k, old) for k, (old, _) in err.changed.items())
        now = ', '.join(_as_typed(k, new) for k, (_, new) in err.changed.items())
        again = 'add --overwrite to start it again' if rank is None else 'delete it to start again'
        raise SystemExit(f'error: --out {args.out} holds a dataset converted with {then} (now {now}): run with the '
                         f'same options to resume it, choose another --out, or {again}') from None


def print_summary(report: dict[str, Any], out: str | os.PathLike) -> None:
    """The short end-of-run summary every converter CLI prints: counts, then the skipped files by name."""
    print(f'kept {report["kept"]} (splits {report["splits"]}), skipped {report["skipped"]} '
          f'{report["skipped_by_reason"]} -> {out}')
    files = report.get('skipped_files', [])
    for row in files[:SUMMARY_SKIPPED_LINES]:
        print(f'  skipped {row["name"]}: {row["reason"]}' + (f' ({row["detail"]})' if row['detail'] else ''))
    if len(files) > SUMMARY_SKIPPED_LINES:
        print(f'  ... and {len(files) - SUMMARY_SKIPPED_LINES} more skipped files: {Path(out) / "report.json"}')
    if report['kept'] and not report['splits'].get('eval'):
        print('  no eval split: nothing was held out (--eval-fraction), so training runs without evaluation')
    for source, counts in report['by_source'].items():
        print(f'  {source or "-"}: kept {counts["kept"]}, skipped {counts["skipped"]}')
