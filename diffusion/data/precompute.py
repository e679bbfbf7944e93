"""Precomputed autoencoder latents and text-encoder states (the library part of
``convert/precompute_latents.py``).

CommonCanvas precomputed both, so training never runs the frozen encoders (online encoding cost them 1.4x).

THE SCALING CONVENTION (the one place it is written down for stored data): the ``latents_<res>`` columns hold
RAW latents, the posterior mean of the autoencoder, unscaled and unshifted, exactly what ``Autoencoder.encode``
returns. The diffusion model maps them to ``(raw - shift_factor) * scaling_factor`` once (``LatentDiffusion.scale``),
as it does for latents it encodes online. ``latents.json`` next to the shards records the autoencoder's
``scaling_factor`` and ``shift_factor`` for reference; nothing applies them before training. (Latents written
already scaled by another tool, such as micro_diffusion's, are read with the dataset's ``latents_scaled: true``.)

Images are prepared exactly as the dataset's pixel mode prepares them with ``crop: center`` and no flip
(resize to cover, centre crop, [-1, 1]), so online and precomputed latents agree up to fp16 rounding. Text
states are stored per caption with the tokenizer's padding mask; caption dropout is NOT baked in: the empty
caption's states are stored once in ``empty_caption.safetensors`` and swapped in at train time.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

__all__ = ['LatentEncoder', 'prepare_image', 'latent_column']

EMPTY_CAPTION_FILE = 'empty_caption.safetensors'


def latent_column(resolution: int) -> str:
    """Name of the column holding latents of ``resolution`` x ``resolution`` images."""
    return f'latents_{resolution}'


def prepare_image(image: Image.Image | bytes, resolution: int) -> torch.Tensor:
    """An image (PIL or encoded bytes) -> (3, res, res) float32 in [-1, 1], as the dataset's centre crop does."""
    # The dataset's own transform, so the two paths cannot drift apart.
    from diffusion.data.dataset import center_crop, image_tensor
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    return image_tensor(center_crop(image, resolution), False)  # (3, res, res)


def _fp16(t: torch.Tensor) -> np.ndarray:
    if not torch.isfinite(t).all():
        raise FloatingPointError('non-finite values from an encoder (the SD2 VAE overflows in fp16: use '
                                 '--dtype float32 or bfloat16)')
    if t.abs().max() > 65504:
        raise OverflowError(f'values up to {float(t.abs().max()):.3g} do not fit in fp16 storage')
    return t.detach().to('cpu', torch.float16).numpy()


class LatentEncoder:
    """A frozen autoencoder and text encoder that turn rows into latent columns.

    Args:
        autoencoder: A :class:`diffusion.models.autoencoders.Autoencoder` (encodes to RAW latents).
        text_encoder: A :class:`diffusion.models.text_encoders.TextEncoder`.
        resolutions: Square image sides to encode (one ``latents_<res>`` column each).
        device: Where the encoders run.
    """

    def __init__(self, autoencoder: Any, text_encoder: Any, resolutions: Sequence[int],
                 device: str | torch.device = 'cpu') -> None:
        if not resolutions:
            raise ValueError('give at least one resolution')
        f = autoencoder.downsample_factor
        bad = [r for r in resolutions if r % f]
        if bad:
            raise ValueError(f'resolutions {bad} are not multiples of the autoencoder downsampling factor {f}')
        self.autoencoder = autoencoder.to(device)
        self.text_encoder = text_encoder.to(device)
        self.resolutions = list(resolutions)
        self.device = torch.device(device)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> ``text_hidden`` (B, L, D), ``text_mask`` (B, L)[, ``text_pooled`` (B, P)], on CPU."""
        out = self.text_encoder(list(captions))
        return {k: v.float().cpu() for k, v in out.items()}

    def columns(self) -> dict[str, str]:
        """MDS encodings of the new columns, with their shapes (from encoding one blank image and caption)."""
        probe_text = self.encode_text([''])
        cols = {}
        for res in self.resolutions:
            z = self.autoencoder.encode(torch.zeros(1, 3, res, res, device=self.device))  # (1, C, h, w)
            cols[latent_column(res)] = 'ndarray:float16:' + ','.join(str(s) for s in z.shape[1:])
        cols['text_hidden'] = 'ndarray:float16:' + ','.join(str(s) for s in probe_text['text_hidden'].shape[1:])
        cols['text_mask'] = f'ndarray:uint8:{probe_text["text_mask"].shape[1]}'
        if 'text_pooled' in probe_text:
            cols['text_pooled'] = f'ndarray:float16:{probe_text["text_pooled"].shape[1]}'
        return cols

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image | bytes], captions: Sequence[str]) -> list[dict[str, Any]]:
        """Encode a batch: one dict of fp16/uint8 arrays per row."""
        rows: list[dict[str, Any]] = [{} for _ in captions]
        pil = [Image.open(io.BytesIO(im)) if isinstance(im, (bytes, bytearray)) else im for im in images]
        for res in self.resolutions:
            pixels = torch.stack([prepare_image(im, res) for im in pil]).to(self.device)  # (B, 3, res, res)
            z = self.autoencoder.encode(pixels)  # (B, C, res/f, res/f), RAW (unscaled)
            for row, zi in zip(rows, _fp16(z)):
                row[latent_column(res)] = zi
        text = self.encode_text(captions)
        hidden = _fp16(text['text_hidden'])  # (B, L, D)
        mask = text['text_mask'].to(torch.uint8).numpy()  # (B, L)
        pooled = _fp16(text['text_pooled']) if 'text_pooled' in text else None  # (B, P)
        for i, row in enumerate(rows):
            row['text_hidden'], row['text_mask'] = hidden[i], mask[i]
            if pooled is not None:
                row['text_pooled'] = pooled[i]
        return rows

    def save_empty_caption(self, out: str | Path) -> Path:
        """Write the empty caption's states ONCE to ``<out>/empty_caption.safetensors``.

        Tensors: ``text_hidden`` (L, D) and ``text_pooled`` (P,) in fp16 (the precision of the columns),
        ``text_mask`` (L,) int64. ``LatentDiffusion(empty_caption_path=...)`` swaps them in for dropped captions.
        """
        from safetensors.torch import save_file
        text = self.encode_text([''])
        tensors = {k: (v[0].long() if k == 'text_mask' else torch.from_numpy(_fp16(v[0]))).contiguous()
                   for k, v in text.items()}
        path = Path(out) / EMPTY_CAPTION_FILE
        tmp = path.with_name(f'.{path.name}.tmp')
        save_file(tensors, str(tmp))
        tmp.replace(path)
        return path

    def metadata(self, **extra: Any) -> dict[str, Any]:
        """What ``latents.json`` records: the convention, the scale, column shapes and the encoders used."""
        return {
            'convention': 'latents_<res> are RAW autoencoder posterior means (unscaled); the diffusion model '
                          'multiplies them by scaling_factor once',
            'scaling_factor': float(self.autoencoder.scaling_factor),
            'shift_factor': float(getattr(self.autoencoder, 'shift_factor', 0.0)),
            'resolutions': self.resolutions,
            'columns': self.columns(),
            'text_hidden_dim': int(self.text_encoder.hidden_dim),
            'text_pooled_dim': int(self.text_encoder.pooled_dim),
            'empty_caption': EMPTY_CAPTION_FILE,
            **extra,
        }
