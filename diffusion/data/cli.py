"""Helpers shared by the data scripts in ``convert/`` (they are scripts, not a package, so they import these).

* :func:`add_map_args` adds the options every row-by-row deriving script takes (``--src``, ``--out``,
  ``--splits``, ``--limit``, ``--commit-every``, ``--batch-size``, ``--device``).
* :func:`resolve_device` turns ``--device auto`` into this rank's GPU, or the CPU.
* :func:`rank_from_env` finds this process's rank and the number of ranks, from the composer / torchrun launcher
  (``RANK``, ``WORLD_SIZE``) or a Slurm job array (``SLURM_ARRAY_TASK_ID``, ``SLURM_ARRAY_TASK_COUNT``), without
  starting torch.distributed: conversion ranks never talk to each other.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Mapping


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


def load_convert_script(name: str) -> ModuleType:
    """Import ``convert/<name>.py`` of this repository as a module (tests and benches call its ``main``)."""
    path = Path(__file__).resolve().parents[2] / 'convert' / f'{name}.py'
    spec = importlib.util.spec_from_file_location(f'convert_{name}', path)
    if spec is None or spec.loader is None:
        raise ImportError(f'cannot load {path}')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
