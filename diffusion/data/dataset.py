"""The one streaming image-caption dataset (pixels or precomputed latents) and its dataloader builder.

``StreamingImageCaptionDataset`` reads the MDS datasets the ``convert/`` tools write, from local folders
or remote object stores, mixing several streams through ``streaming.Stream``. Every random choice
(crop offset, flip, caption dropout) is drawn from a generator seeded by ``(seed, epoch, sample id)``,
so a sample looks the same whichever worker or rank loads it, and Composer's sample-exact resumption
of a ``StreamingDataset`` (its ``state_dict``) reproduces an interrupted epoch exactly.

Registered as ``image_caption`` in ``diffusion.registry.dataloaders``; a YAML uses it as::

    train_loader:
      name: image_caption
      batch_size: 8              # per device
      streams: [{local: data/demo_photos, split: train}]   # or remote:/local:
      resolution: 256
      crop: random               # center | random | aspect_buckets
      random_flip: true
      caption_dropout: 0.1
"""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from streaming import Stream, StreamingDataset
from torch.utils.data import DataLoader, default_collate

CROP_MODES = ('center', 'random', 'aspect_buckets')
BUCKET_RATIOS = (0.5, 0.5625, 0.6667, 0.75, 0.8, 1.0, 1.25, 1.3333, 1.5, 1.7778, 2.0)  # h / w


def aspect_buckets(resolution: int, ratios: Sequence[float] = BUCKET_RATIOS) -> list[tuple[int, int]]:
    """(height, width) buckets of about ``resolution**2`` pixels, sides multiples of 8 (latent cells)."""
    step = 8
    buckets = []
    for ratio in ratios:
        height = max(step, round(resolution * math.sqrt(ratio) / step) * step)
        width = max(step, round(resolution / math.sqrt(ratio) / step) * step)
        buckets.append((height, width))
    return buckets


def _resize_crop(image: Image.Image, size: tuple[int, int], frac: tuple[float, float]) -> tuple[Image.Image, int, int]:
    """Resize ``image`` to cover ``size`` (h, w) keeping aspect, crop at fractional offset ``frac``.

    Returns:
        The cropped image and the crop's (top, left) in the resized image.
    """
    height, width = size
    scale = max(height / image.height, width / image.width)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    top = int(round((new_h - height) * frac[0]))
    left = int(round((new_w - width) * frac[1]))
    return image.crop((left, top, left + width, top + height)), top, left


def _to_tensor(image: Image.Image, flip: bool) -> torch.Tensor:
    """PIL RGB -> float32 (3, H, W) in [-1, 1], mirrored horizontally when ``flip``."""
    array = np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy
    if flip:
        array = array[:, ::-1]
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)  # (3, H, W)
    return tensor.float().div_(127.5).sub_(1.0)


class StreamingImageCaptionDataset(StreamingDataset):
    """Image-caption samples from MDS shards, as pixels or as precomputed latents.

    Args:
        streams: ``streaming.Stream`` objects or dicts of their arguments (``remote``, ``local``,
            ``proportion``, ``repeat``, ``choose``, ``split``, ...). Alternative to ``remote``/``local``.
        remote: Remote path (s3://, gs://, oci://, ...) or None to read ``local`` directly.
        local: Local folder (cache for ``remote``, or the dataset itself).
        split: Sub-folder to read (``train``/``eval``).
        resolution: Side of the square output (pixel mode), or the bucket area (``aspect_buckets``).
        crop: ``center``, ``random`` or ``aspect_buckets`` (the batch's collate picks one bucket).
        random_flip: Mirror images horizontally with probability 0.5 (pixel mode only).
        caption_dropout: Probability of replacing the caption by "" (flagged ``caption_dropped``).
        use_latents: False for pixels; True for column ``latents_<resolution>``; an int or str picks
            the column (``512`` or ``'latents_512'``).
        seed: Seed of the per-sample random choices (default: ``shuffle_seed``).
        **kwargs: Passed to ``streaming.StreamingDataset`` (``shuffle``, ``shuffle_seed``,
            ``batch_size``, ``predownload``, ``cache_limit``, ...).
    """

    def __init__(self,
                 *,
                 streams: Sequence[Stream | dict[str, Any]] | None = None,
                 remote: str | None = None,
                 local: str | None = None,
                 split: str | None = None,
                 resolution: int = 256,
                 crop: str = 'center',
                 random_flip: bool = False,
                 caption_dropout: float = 0.0,
                 use_latents: bool | int | str = False,
                 seed: int | None = None,
                 **kwargs: Any) -> None:
        if crop not in CROP_MODES:
            raise ValueError(f'crop must be one of {CROP_MODES}, got {crop!r}')
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f'caption_dropout must be in [0, 1], got {caption_dropout}')
        self.latent_column = self._latent_column(use_latents, resolution)
        if self.latent_column and random_flip:
            raise ValueError('random_flip cannot be applied to precomputed latents; set random_flip: false '
                             'or precompute latents of flipped images')
        if self.latent_column and crop == 'aspect_buckets':
            raise ValueError('crop: aspect_buckets needs pixels; latents are stored at one fixed size')
        if streams is not None:
            streams = [s if isinstance(s, Stream) else Stream(**dict(s)) for s in streams]
        super().__init__(streams=streams, remote=remote, local=local, split=split, **kwargs)
        self.resolution = int(resolution)
        self.crop = crop
        self.random_flip = bool(random_flip)
        self.caption_dropout = float(caption_dropout)
        self.seed = int(self.shuffle_seed if seed is None else seed)

    @staticmethod
    def _latent_column(use_latents: bool | int | str, resolution: int) -> str | None:
        if use_latents is False or use_latents is None:
            return None
        if use_latents is True:
            return f'latents_{resolution}'
        text = str(use_latents)
        return text if text.startswith('latents_') else f'latents_{text}'

    def _rng(self, sample_id: int) -> np.random.Generator:
        epoch = max(0, self.next_epoch - 1)  # the epoch being iterated (0 outside iteration)
        return np.random.default_rng([self.seed, epoch, int(sample_id)])

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        """Load row ``sample_id`` and turn it into a training sample (see the module docstring)."""
        row = super().get_item(sample_id, retry=retry)
        rng = self._rng(sample_id)
        dropped = bool(rng.random() < self.caption_dropout)
        caption = row.get('caption', '')
        out: dict[str, Any] = {'caption': '' if dropped else caption,
                               'caption_dropped': torch.tensor(dropped)}
        if self.latent_column:
            out.update(self._latent_fields(row))
        else:
            out.update(self._pixel_fields(row, rng))
        return out

    def _latent_fields(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.latent_column not in row:
            raise KeyError(f'column {self.latent_column!r} not in this dataset (columns: {sorted(row)}); '
                           f'run convert/precompute_latents.py at this resolution or set use_latents')
        latents = torch.from_numpy(np.asarray(row[self.latent_column], dtype=np.float32))  # (C, h, w)
        out = {'latents': latents}
        for name in ('text_hidden', 'text_mask', 'text_pooled'):
            if name in row:
                out[name] = torch.from_numpy(np.asarray(row[name], dtype=np.float32))
        # Micro-conditioning of the centre crop that convert/precompute_latents.py encoded: the latent column's
        # resolution is the (square) target size; the crop offset follows from the original size as in
        # _resize_crop with frac (0.5, 0.5).
        side = int(self.latent_column.rsplit('_', 1)[-1])
        height, width = int(row.get('height', 0)), int(row.get('width', 0))
        top = left = 0
        if height > 0 and width > 0:
            scale = side / min(height, width)
            top = int(round((max(side, round(height * scale)) - side) * 0.5))
            left = int(round((max(side, round(width * scale)) - side) * 0.5))
        out['original_size'] = torch.tensor([height, width], dtype=torch.long)
        out['crop_top_left'] = torch.tensor([top, left], dtype=torch.long)
        out['target_size'] = torch.tensor([side, side], dtype=torch.long)
        out['flip'] = torch.tensor(0, dtype=torch.long)
        return out

    def _pixel_fields(self, row: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = row['image']
        if isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        image = image.convert('RGB')
        original = (int(row.get('height') or image.height), int(row.get('width') or image.width))
        flip = self.random_flip and bool(rng.random() < 0.5)
        frac = (0.5, 0.5) if self.crop != 'random' else (float(rng.random()), float(rng.random()))
        out = {'original_size': torch.tensor(original, dtype=torch.long),
               'flip': torch.tensor(int(flip), dtype=torch.long)}
        if self.crop == 'aspect_buckets':  # the collate function crops, once the batch's bucket is known
            out.update(image=image, _frac=frac)
            return out
        size = (self.resolution, self.resolution)
        crop, top, left = _resize_crop(image, size, frac)
        out['image'] = _to_tensor(crop, flip)
        out['crop_top_left'] = torch.tensor([top, left], dtype=torch.long)
        out['target_size'] = torch.tensor(size, dtype=torch.long)
        return out


class ImageCaptionCollate:
    """Collate samples into a batch dict; with ``aspect_buckets`` first crop all to one bucket.

    The bucket is the one nearest (in log aspect ratio) to the median aspect ratio of the batch.
    """

    def __init__(self, resolution: int) -> None:
        self.buckets = aspect_buckets(resolution)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if samples and isinstance(samples[0].get('image'), Image.Image):
            samples = self._bucket(samples)
        return default_collate(samples)

    def _bucket(self, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ratio = float(np.median([math.log(s['image'].height / s['image'].width) for s in samples]))
        size = min(self.buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))
        out = []
        for sample in samples:
            sample = dict(sample)
            crop, top, left = _resize_crop(sample.pop('image'), size, sample.pop('_frac'))
            sample['image'] = _to_tensor(crop, bool(sample['flip']))
            sample['crop_top_left'] = torch.tensor([top, left], dtype=torch.long)
            sample['target_size'] = torch.tensor(size, dtype=torch.long)
            out.append(sample)
        return out


def _num_samples(batch: dict[str, Any]) -> int:
    return len(batch['caption'])


def build_image_caption_dataloader(batch_size: int,
                                   *,
                                   streams: Sequence[dict[str, Any]] | dict[str, dict[str, Any]] | None = None,
                                   remote: str | None = None,
                                   local: str | None = None,
                                   split: str | None = None,
                                   resolution: int = 256,
                                   crop: str = 'center',
                                   random_flip: bool = False,
                                   caption_dropout: float = 0.0,
                                   use_latents: bool | int | str = False,
                                   shuffle: bool = True,
                                   num_workers: int = 0,
                                   drop_last: bool = True,
                                   persistent_workers: bool = False,
                                   prefetch_factor: int | None = None,
                                   pin_memory: bool = False,
                                   **streaming_kwargs: Any) -> Any:
    """Build the ``image_caption`` dataloader as a Composer ``DataSpec``.

    Args:
        batch_size: Per-device batch size.
        streams: A list (or name -> dict mapping) of ``streaming.Stream`` arguments; or use
            ``remote``/``local``.
        remote: Remote dataset path, or None for a local dataset.
        local: Local folder (cache for ``remote``, or the dataset).
        split: Split folder (``train``/``eval``).
        resolution: Output side in pixels (or bucket area with ``aspect_buckets``).
        crop: ``center``, ``random`` or ``aspect_buckets``.
        random_flip: Horizontal flip with probability 0.5 (pixel mode only).
        caption_dropout: Probability of an empty caption, applied at load time.
        use_latents: Read precomputed latent columns instead of pixels (see the dataset).
        shuffle: Shuffle (streaming's deterministic, seeded shuffle).
        num_workers: DataLoader worker processes.
        drop_last: Drop the last incomplete batch.
        persistent_workers: Keep workers between epochs (only with ``num_workers > 0``).
        prefetch_factor: Batches prefetched per worker (only with ``num_workers > 0``).
        pin_memory: Pin batches in page-locked memory.
        **streaming_kwargs: Other ``StreamingDataset`` arguments (``shuffle_seed``, ``predownload``,
            ``cache_limit``, ``shuffle_algo``, ``seed`` for the transforms, ...).

    Returns:
        A ``composer.core.DataSpec`` whose batches are dicts (see the module docstring of
        ``diffusion.data.dataset`` and the README, "Data").
    """
    from composer.core import DataSpec

    if isinstance(streams, dict) or hasattr(streams, 'items'):
        streams = [dict(v) for v in streams.values()]  # type: ignore[union-attr]
    dataset = StreamingImageCaptionDataset(
        streams=streams, remote=remote, local=local, split=split, resolution=resolution, crop=crop,
        random_flip=random_flip, caption_dropout=caption_dropout, use_latents=use_latents,
        shuffle=shuffle, batch_size=batch_size, **streaming_kwargs)
    loader_kwargs: dict[str, Any] = {}
    if num_workers > 0:
        loader_kwargs['persistent_workers'] = persistent_workers
        if prefetch_factor is not None:
            loader_kwargs['prefetch_factor'] = prefetch_factor
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                        pin_memory=pin_memory, collate_fn=ImageCaptionCollate(resolution), **loader_kwargs)
    return DataSpec(loader, get_num_samples_in_batch=_num_samples)


def _register() -> None:
    from diffusion import registry

    if 'image_caption' not in registry.dataloaders.get_all():
        registry.dataloaders.register('image_caption', func=build_image_caption_dataloader)


_register()
