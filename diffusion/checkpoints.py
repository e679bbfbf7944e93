"""Load a trained ``LatentDiffusion`` from a composer checkpoint and the ``config.yaml`` beside it.

Training writes ``<save_folder>/config.yaml`` (the resolved train config) next to composer's checkpoints
``<save_folder>/ep*-ba*-rank0.pt`` and ``latest-rank0.pt``. Generation, evaluation and export rebuild the model
from that config and copy the weights in.

Unpickling: the checkpoint is read with ``torch.load(weights_only=True)``. Composer checkpoints hold a few
plain-data objects besides tensors (``datetime.timedelta`` in the timestamp, numpy arrays and dtypes in the RNG
state, ``torch.torch_version.TorchVersion``); exactly these classes are allow-listed with
``torch.serialization.safe_globals``. A checkpoint that needs anything else is refused unless
``allow_unsafe=True``, which falls back to full unpickling with a logged warning (only for files you trust).

Sharded checkpoints (FSDP ``state_dict_type: sharded``): composer writes each checkpoint as a folder
``<save_folder>/ep{epoch}-ba{batch}/`` (FSDP's ``sharded_ckpt_prefix_dir``) with one ``__{rank}_0.distcp`` file per
rank and the ``.metadata`` index that rank 0 writes last (torch.distributed.checkpoint); ``latest-rank0.pt`` links
to the folder. :func:`load_checkpoint_state` reads such a folder into the same nested dict a full checkpoint
holds, in one process, without torch.distributed: the index is unpickled with an allow-list of
torch.distributed.checkpoint's own metadata classes, each stored item (a ``torch.save`` blob at an offset of a
shard file) with the same weights-only rules as a full checkpoint, and tensor chunks are put back together.

Frozen encoders: checkpoints written since ``diffusion/models/frozen_state.py`` carry no autoencoder and text
encoder weights; the model rebuilt from the config keeps its own (see that module).

EMA: when composer's ``EMA`` algorithm ran, a checkpoint holds two sets of weights. At checkpoint time composer
swaps the EMA weights into the model, so ``state.model`` holds the EMA weights and the algorithm's
``ema_model.named_parameters_dict`` the training weights when ``ema_weights_active`` is true (and the
reverse when it is false). :func:`model_weights` untangles this.
"""
from __future__ import annotations

import datetime
import io
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ['CheckpointInfo', 'SAFE_GLOBALS', 'checkpoint_batch', 'checkpoints_by_batch', 'find_checkpoint',
           'is_sharded_checkpoint', 'is_sharded_checkpoint_name', 'load_checkpoint_state', 'load_model',
           'model_weights', 'read_sharded_metadata', 'sharded_checkpoint_problems']

WEIGHT_CHOICES = ('auto', 'ema', 'training')


def _safe_globals() -> list[Any]:
    from torch.torch_version import TorchVersion
    # The function a pickled array is rebuilt with, as numpy's own pickling names it (numpy._core's
    # _reconstruct), taken from the pickle protocol rather than imported from numpy's private module.
    reconstruct = np.empty(0).__reduce__()[0]
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith('DType')]
    return [datetime.timedelta, TorchVersion, np.ndarray, np.dtype, reconstruct, *dtypes]


SAFE_GLOBALS: list[Any] = _safe_globals()


@dataclass
class CheckpointInfo:
    """Where a loaded model came from (recorded in manifests, eval JSON and export metadata)."""
    checkpoint: str
    config: str
    weights: str  # 'ema' or 'training'
    has_ema: bool
    batch: Optional[int] = None
    run_name: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {'checkpoint': self.checkpoint, 'config': self.config, 'weights': self.weights,
                'has_ema': self.has_ema, 'batch': self.batch, 'run_name': self.run_name}


# ---------------------------------------------------------------------------------------------
# Checkpoint names: composer's ``ep{epoch}-ba{batch}-rank{rank}.pt`` files and ``ep{epoch}-ba{batch}`` sharded folders
# ---------------------------------------------------------------------------------------------
_BATCH_IN_NAME = re.compile(r'ba(\d+)')
# Composer's default folder name of a sharded checkpoint (FSDP's ``sharded_ckpt_prefix_dir``).
_SHARDED_NAME = re.compile(r'^ep\d+-ba\d+$')


def checkpoint_batch(name: str) -> Optional[int]:
    """The batch count a checkpoint's name carries (the last ``ba<N>`` in it: ``ep0-ba200-rank0.pt`` -> 200,
    ``ep1-ba8`` -> 8), or None when it carries none (``latest-rank0.pt``)."""
    found = _BATCH_IN_NAME.findall(name)
    return int(found[-1]) if found else None


def is_sharded_checkpoint_name(name: str) -> bool:
    """Whether ``name`` is composer's name of a sharded checkpoint folder, ``ep{epoch}-ba{batch}``."""
    return bool(_SHARDED_NAME.match(name))


def checkpoints_by_batch(folder: Union[str, Path], rank: int = 0) -> list[tuple[int, Path]]:
    """``(batch, path)`` of the checkpoint files ``ep*-ba*-rank{rank}.pt`` in a save folder, oldest first."""
    found = []
    for path in Path(folder).glob(f'ep*-ba*-rank{rank}.pt'):
        batch = checkpoint_batch(path.name)
        if batch is not None:
            found.append((batch, path))
    return sorted(found)


def find_checkpoint(path: Union[str, Path]) -> Path:
    """A checkpoint file or sharded checkpoint folder, or a save folder (then what its ``latest-rank0.pt`` links
    to, else its newest checkpoint file or sharded folder)."""
    path = Path(path)
    if path.is_file() or is_sharded_checkpoint(path):
        return path
    if path.is_dir():
        latest = path / 'latest-rank0.pt'
        if latest.exists():
            return latest.resolve()
        found = [p for p in path.glob('*.pt') if p.is_file()] + [p for p in path.iterdir()
                                                                   if is_sharded_checkpoint(p)]
        if found:
            return max(found, key=lambda p: p.stat().st_mtime)
        raise FileNotFoundError(f'no composer checkpoint (*.pt file or sharded folder) in folder {path}')
    raise FileNotFoundError(f'checkpoint {path} does not exist')


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint folders)
# ---------------------------------------------------------------------------------------------
_METADATA = '.metadata'
# What torch.distributed.checkpoint's index pickles besides its own metadata classes (torch 2.7).
_INDEX_GLOBALS = {('torch.distributed.checkpoint.filesystem', '_StorageInfo'), ('torch', 'Size'),
                  ('torch.serialization', '_get_layout'), ('pathlib', 'PosixPath'), ('pathlib', 'WindowsPath'),
                  ('collections', 'OrderedDict')}


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles a ``.metadata`` index: torch.distributed.checkpoint's metadata classes and plain data only."""

    def find_class(self, module: str, name: str) -> Any:
        if module == 'torch.distributed.checkpoint.metadata' or (module, name) in _INDEX_GLOBALS or (
                module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'{module}.{name} is not allowed in a sharded checkpoint index')


def is_sharded_checkpoint(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a sharded checkpoint folder (it holds a ``.metadata`` index)."""
    return Path(path).is_dir() and (Path(path) / _METADATA).is_file()


def read_sharded_metadata(folder: Union[str, Path]) -> Any:
    """The ``torch.distributed.checkpoint.metadata.Metadata`` index of a sharded checkpoint folder."""
    with open(Path(folder) / _METADATA, 'rb') as f:
        return _IndexUnpickler(f).load()


def sharded_checkpoint_problems(folder: Union[str, Path]) -> list[str]:
    """What makes a sharded checkpoint folder incomplete ([] when it is whole).

    Complete means: the ``.metadata`` index exists and reads, and every item it lists lies inside its shard file
    (the file exists and reaches the item's offset + length). Reads only the index and the files' sizes.
    """
    folder = Path(folder)
    if not (folder / _METADATA).is_file():
        return [f'no {_METADATA} index (the save did not finish)']
    try:
        metadata = read_sharded_metadata(folder)
        items = list((metadata.storage_data or {}).values())
    except Exception as err:  # noqa: BLE001 - any unreadable index is an incomplete checkpoint
        return [f'{_METADATA} unreadable: {type(err).__name__}: {err}']
    if not items:
        return [f'{_METADATA} lists no stored items']
    ends: dict[str, int] = {}
    for item in items:
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    problems = []
    for name, end in sorted(ends.items()):
        shard = folder / name
        size = shard.stat().st_size if shard.is_file() else None
        if size is None:
            problems.append(f'shard {name} is missing')
        elif size < end:
            problems.append(f'shard {name} is truncated ({size} of at least {end} bytes)')
    return problems


def _load_item(blob: bytes, allow_unsafe: bool, where: str) -> Any:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(io.BytesIO(blob), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_unsafe:
            raise pickle.UnpicklingError(
                f'{where}: weights-only loading failed ({str(err).splitlines()[-1][:200]}). If you trust the '
                'checkpoint, pass allow_unsafe=True (CLI: --allow-unsafe-pickle).') from err
        return torch.load(io.BytesIO(blob), map_location='cpu', weights_only=False)


def _nest(flat_items: dict[tuple, Any]) -> dict[str, Any]:
    """``{('state', 'model', 'w'): v, ('rng', 0, 'torch'): t}`` -> nested dicts, integer keys made lists."""
    root: dict[Any, Any] = {}
    for path, value in flat_items.items():
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    def listify(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = {k: listify(v) for k, v in node.items()}
        if node and all(isinstance(k, int) for k in node) and sorted(node) == list(range(len(node))):
            return [node[i] for i in range(len(node))]
        return node
    return listify(root)


def load_sharded_state(folder: Union[str, Path], allow_unsafe: bool = False,
                       only: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
    """Read a composer sharded checkpoint folder into one nested dict (as a full checkpoint's), on the CPU.

    Args:
        folder: The checkpoint folder.
        allow_unsafe: See :func:`load_checkpoint_state`.
        only: Read only these entries of ``state`` (e.g. ``('model', 'algorithms')``; every item costs a
            ``torch.load``, and the optimizer state has three times as many as the model).
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    folder = Path(folder)
    problems = sharded_checkpoint_problems(folder)
    if problems:
        raise ValueError(f'sharded checkpoint {folder} is incomplete: {"; ".join(problems)}')
    metadata = read_sharded_metadata(folder)
    storage = metadata.storage_data
    files: dict[str, Any] = {}

    def blob(index: Any) -> bytes:
        info = storage[index]
        if getattr(info, 'transform_descriptors', None):
            raise ValueError(f'{folder}: stored with transforms {info.transform_descriptors}, which are not read here')
        if info.relative_path not in files:
            files[info.relative_path] = open(folder / info.relative_path, 'rb')
        f = files[info.relative_path]
        f.seek(info.offset)
        return f.read(info.length)

    by_fqn: dict[str, list[Any]] = {}
    for index in storage:
        by_fqn.setdefault(index.fqn, []).append(index)
    flat: dict[tuple, Any] = {}
    try:
        for fqn, entry in metadata.state_dict_metadata.items():
            path = tuple(metadata.planner_data[fqn])
            if only is not None and (path[0] != 'state' or path[1] not in only):
                continue
            where = f'{folder}:{fqn}'
            if isinstance(entry, TensorStorageMetadata):
                value = torch.empty(entry.size, dtype=entry.properties.dtype)
                for index in by_fqn.get(fqn, []):
                    chunk = _load_item(blob(index), allow_unsafe, where)
                    region = tuple(slice(o, o + n) for o, n in zip(index.offset, chunk.shape))
                    value[region] = chunk
            else:
                value = _load_item(blob(by_fqn[fqn][0]), allow_unsafe, where)
            flat[path] = value
    finally:
        for f in files.values():
            f.close()
    return _nest(flat)


def load_checkpoint_state(path: Union[str, Path], allow_unsafe: bool = False,
                          only: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
    """Load a composer checkpoint with weights-only unpickling (see the module docstring).

    Args:
        path: The ``.pt`` file, or a sharded checkpoint folder (or the ``latest`` link to one).
        allow_unsafe: If weights-only loading fails, fall back to full unpickling (logged warning).
        only: For a sharded folder, the ``state`` entries to read (see :func:`load_sharded_state`); a ``.pt`` file
            is read whole.

    Raises:
        pickle.UnpicklingError: The file needs classes outside the allow-list and ``allow_unsafe`` is false.
    """
    if Path(path).is_dir():
        return load_sharded_state(path, allow_unsafe=allow_unsafe, only=only)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_unsafe:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            raise pickle.UnpicklingError(
                f'{path}: weights-only loading failed; the checkpoint holds objects outside the allow-list '
                f'({unsafe}). If you trust the file, pass allow_unsafe=True (CLI: --allow-unsafe-pickle).') from err
        log.warning('%s: weights-only loading failed (%s); falling back to full unpickling because '
                    'allow_unsafe=True', path, str(err).splitlines()[-1][:200])
        return torch.load(path, map_location='cpu', weights_only=False)


def _strip_module(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if weights and all(k.startswith('module.') for k in weights):
        return {k[len('module.'):]: v for k, v in weights.items()}
    return weights


def model_weights(state: dict[str, Any], weights: str = 'auto') -> tuple[dict[str, torch.Tensor], str, bool]:
    """The model state dict to load, picking EMA or training weights.

    Args:
        state: A loaded composer checkpoint (``{'state': {...}, 'rng': ...}``).
        weights: ``'ema'`` (error if the run had no EMA), ``'training'``, or ``'auto'`` (EMA when present).

    Returns:
        ``(state_dict, chosen, has_ema)`` where ``chosen`` is ``'ema'`` or ``'training'``.
    """
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f'weights must be one of {WEIGHT_CHOICES}, got {weights!r}')
    inner = state.get('state', state)
    if 'model' not in inner:
        raise KeyError('not a composer checkpoint: no state.model entry')
    model_sd = _strip_module(dict(inner['model']))
    ema = next((sd for name, sd in inner.get('algorithms', []) if name == 'EMA'), None)
    if ema is not None and not ema.get('ema_started', True):
        ema = None  # delayed start not reached: composer's EMA copy still holds the initial weights
    if ema is None or not ema.get('ema_model'):
        if weights == 'ema':
            raise ValueError('weights=ema was asked for, but this checkpoint has no EMA weights (the `ema` '
                             'algorithm did not run); use weights=training')
        return model_sd, 'training', False
    other = _strip_module(dict(ema['ema_model']['named_parameters_dict']))
    other.update(_strip_module(dict(ema['ema_model']['named_buffers_dict'])))
    ema_in_model = bool(ema.get('ema_weights_active'))
    want_ema = weights in ('auto', 'ema')
    if want_ema == ema_in_model:
        return model_sd, 'ema' if want_ema else 'training', True
    merged = dict(model_sd)
    # The other set covers the trainable parameters and all buffers (also non-persistent ones, which the
    # model's state dict leaves out): replace only entries the model's state dict has.
    merged.update({k: v for k, v in other.items() if k in model_sd})
    return merged, 'ema' if want_ema else 'training', True


# What load_model reads of a checkpoint: the weights, the EMA algorithm's copy, and provenance.
_MODEL_ENTRIES = ('model', 'algorithms', 'timestamp', 'run_name')


def load_model(checkpoint: Union[str, Path], config: Optional[Union[str, Path]] = None, weights: str = 'auto',
               device: Union[str, torch.device] = 'cpu', allow_unsafe: bool = False,
               overrides: tuple[str, ...] = ()) -> tuple[Any, CheckpointInfo]:
    """Rebuild the trained model of a run and load its weights.

    Args:
        checkpoint: A composer checkpoint file or its save folder.
        config: The train config (default: ``config.yaml`` beside the checkpoint).
        weights: ``'auto'`` (EMA when the run has it), ``'ema'`` or ``'training'``.
        device: Where to put the model.
        allow_unsafe: See :func:`load_checkpoint_state`.
        overrides: Dotted overrides applied to the train config (e.g. a local text-encoder path).

    Returns:
        The model in eval mode and a :class:`CheckpointInfo`.
    """
    from diffusion import registry
    from diffusion.config import load_config
    from diffusion.builders import import_components

    ckpt = find_checkpoint(checkpoint)
    cfg_path = Path(config) if config is not None else ckpt.parent / 'config.yaml'
    if not cfg_path.exists():
        raise FileNotFoundError(f'train config {cfg_path} not found: training writes it beside the checkpoints; '
                                'pass the YAML the run was trained with instead')
    cfg = load_config(cfg_path, list(overrides))
    import_components()
    model = registry.build(registry.models, cfg.model, 'model')
    state = load_checkpoint_state(ckpt, allow_unsafe=allow_unsafe, only=_MODEL_ENTRIES)
    sd, chosen, has_ema = model_weights(state, weights)
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith('val_loss')]
    if missing or result.unexpected_keys:
        raise RuntimeError(f'checkpoint {ckpt} does not match the model of {cfg_path}: missing {missing[:8]}, '
                           f'unexpected {result.unexpected_keys[:8]}')
    model.to(device).eval()
    stamp = state.get('state', {}).get('timestamp', {}).get('Timestamp', {})
    info = CheckpointInfo(checkpoint=str(ckpt), config=str(cfg_path), weights=chosen, has_ema=has_ema,
                          batch=stamp.get('batch'), run_name=state.get('state', {}).get('run_name'))
    log.info('loaded %s (%s weights, batch %s) with config %s', ckpt, chosen, info.batch, cfg_path)
    return model, info
