"""Load a trained ``LatentDiffusion`` from a composer checkpoint and the ``config.yaml`` beside it.

Training writes ``<save_folder>/config.yaml`` (the resolved train config) next to composer's checkpoints
``<save_folder>/ep*-ba*-rank0.pt`` and ``latest-rank0.pt``. Generation, evaluation and export rebuild the model
from that config and copy the weights in.

Unpickling: the checkpoint is read with ``torch.load(weights_only=True)``. Composer checkpoints hold a few
plain-data objects besides tensors (``datetime.timedelta`` in the timestamp, numpy arrays and dtypes in the RNG
state, ``torch.torch_version.TorchVersion``); exactly these classes are allow-listed with
``torch.serialization.safe_globals``. A checkpoint that needs anything else is refused unless
``allow_unsafe=True``, which falls back to full unpickling with a logged warning (only for files you trust).

EMA: when composer's ``EMA`` algorithm ran, a checkpoint holds two sets of weights. At checkpoint time composer
swaps the EMA weights into the model, so ``state.model`` holds the EMA weights and the algorithm's
``ema_model.named_parameters_dict`` the training weights when ``ema_weights_active`` is true (and the
reverse when it is false). :func:`model_weights` untangles this.
"""
from __future__ import annotations

import datetime
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ['CheckpointInfo', 'SAFE_GLOBALS', 'find_checkpoint', 'load_checkpoint_state', 'model_weights',
           'load_model']

WEIGHT_CHOICES = ('auto', 'ema', 'training')


def _safe_globals() -> list[Any]:
    from numpy._core.multiarray import _reconstruct
    from torch.torch_version import TorchVersion
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith('DType')]
    return [datetime.timedelta, TorchVersion, np.ndarray, np.dtype, _reconstruct, *dtypes]


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


def find_checkpoint(path: Union[str, Path]) -> Path:
    """A checkpoint file, or a save folder (then its ``latest-rank0.pt``, else the newest ``*.pt``)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        latest = path / 'latest-rank0.pt'
        if latest.exists():
            return latest.resolve()
        found = sorted(path.glob('*.pt'), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
        raise FileNotFoundError(f'no composer checkpoint (*.pt) in folder {path}')
    raise FileNotFoundError(f'checkpoint {path} does not exist')


def load_checkpoint_state(path: Union[str, Path], allow_unsafe: bool = False) -> dict[str, Any]:
    """``torch.load`` a composer checkpoint with weights-only unpickling (see the module docstring).

    Args:
        path: The ``.pt`` file.
        allow_unsafe: If weights-only loading fails, fall back to full unpickling (logged warning).

    Raises:
        pickle.UnpicklingError: The file needs classes outside the allow-list and ``allow_unsafe`` is false.
    """
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
    state = load_checkpoint_state(ckpt, allow_unsafe=allow_unsafe)
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
