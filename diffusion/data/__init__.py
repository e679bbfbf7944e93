"""Data: building datasets (catalog, conversion, captions, precomputed latents) and loading them for training.

Preparing data: ``sanitize`` (the image-sanitising function and caption checks), ``licenses`` (licence ids and
the commercial / noncommercial / all sets), ``writer`` (the shared resumable MDS writer; ``pool`` runs
converters over worker processes, ``cli`` holds their shared options), ``sources`` (per-source
fetch and parse code for the mini catalog), ``mds_rows`` (derive a dataset from another row by row, across
ranks), ``captioning`` (telephoning: synthetic captions from a pretrained captioner) and ``precompute``
(autoencoder latents and text states). The demo's photo set is :mod:`diffusion.demo.photos`.
Loading: ``dataset`` (``StreamingImageCaptionDataset`` and the ``image_caption`` dataloader builder, registered
when ``diffusion.data.dataset`` is imported).

Attributes are imported lazily so that converters do not pay for torch or composer imports they do
not need.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    'DatasetWriter': 'diffusion.data.writer',
    'run_conversion': 'diffusion.data.pool',
    'SkipSample': 'diffusion.data.sanitize',
    'sanitize_image': 'diffusion.data.sanitize',
    'StreamingImageCaptionDataset': 'diffusion.data.dataset',
    'build_image_caption_dataloader': 'diffusion.data.dataset',
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
