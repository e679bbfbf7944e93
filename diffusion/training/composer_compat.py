"""Every patch of a composer or streaming internal, in one place, pinned to the versions it was written against.

Composer and streaming are used through their public APIs everywhere else. Where their behaviour has to change
and no public hook exists, the change lives here, is installed explicitly (never at import), and
:func:`check_pins` fails loudly when an installed version differs from the one each patch was read against
(``tests/test_composer_compat.py``): read the new version's code, re-check the patch, then move the pin.
"""
from __future__ import annotations

import os
from typing import Any

from composer.utils import checkpoint as composer_checkpoint
from composer.utils import dist as composer_dist

__all__ = ['PINNED', 'check_pins', 'install_atomic_checkpoint_writes', 'install_node_signal_files']

# The versions every patch below was read against.
PINNED = {'mosaicml': '0.32.1', 'mosaicml-streaming': '0.12.0'}


def check_pins() -> None:
    """Raise when composer or streaming is not the version the patches here were written against."""
    from importlib.metadata import version
    wrong = {name: version(name) for name, want in PINNED.items() if version(name) != want}
    if wrong:
        raise RuntimeError(f'diffusion/training/composer_compat.py patches internals of {PINNED}, installed: '
                           f'{wrong}; re-read the patched functions in the new version and update PINNED')


# =============================================================================================
# Atomic checkpoint files
# =============================================================================================
_original_write = composer_checkpoint._write_checkpoint_file


def _atomic_write_checkpoint_file(state_dict: dict[str, Any], filename: str) -> None:
    """Composer's writer, into ``.tmp-<pid>-<name>`` beside the target, then renamed over it in one step."""
    # The prefix keeps the extension (composer picks tar / compression from it).
    tmp = os.path.join(os.path.dirname(filename), f'.tmp-{os.getpid()}-{os.path.basename(filename)}')
    try:
        _original_write(state_dict, tmp)
        with open(tmp, 'rb') as f:  # the bytes reach the disk before the name does
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def install_atomic_checkpoint_writes() -> None:
    """Make composer's local checkpoint files atomic (idempotent; composer calls the writer by module name)."""
    composer_checkpoint._write_checkpoint_file = _atomic_write_checkpoint_file


# =============================================================================================
# Autoresume with a checkpoint folder shared by several nodes
# =============================================================================================
_original_signal_file_name = composer_dist.get_node_signal_file_name


def _node_signal_file_name(rng: Any = None) -> str:
    """Composer's signal file name (rank 0's, the same on every rank) plus this node's own rank.

    The ranks of one node still agree on the name (they wait on it together); two nodes no longer write and
    delete the same file when the folder is shared.
    """
    return f'{_original_signal_file_name(rng)}-of-node{composer_dist.get_node_rank()}'


def install_node_signal_files() -> None:
    """Give each node its own autoresume signal file (idempotent; composer calls ``dist.<name>`` by module)."""
    composer_dist.get_node_signal_file_name = _node_signal_file_name
