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
      # Shards written by other tools: column names, and whether their latents are already scaled.
      # image_key: jpg            # mosaicml/diffusion LAION and micro_diffusion image shards
      # caption_key: captions     # a list column gives one caption drawn per sample (COCO's five)
      # latents_scaled: true      # micro_diffusion's latent shards (latents_256 = VAE mean-or-sample * scale)
      # upcast: true              # fp32 latents / text states from the workers (default: the stored fp16)
      # cache_limit: 2tb          # streaming: evict shards beyond this (remote datasets at scale)
      # num_canonical_nodes: 16   # streaming: fix the shuffle's node count (resumes on other node counts)
      control_dropout: 0.1       # disentangled conditioning: the model's null control (flag control_dropped)
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from streaming import Stream, StreamingDataset
from torch.utils.data import DataLoader, default_collate

PREFIX_LOCK = Path(tempfile.gettempdir()) / 'diffusion-streaming-prefix.lock'


@contextlib.contextmanager
def shm_prefix_lock() -> Iterator[None]:
    """Hold a machine-wide file lock while a ``StreamingDataset`` is built.

    A new dataset's node-local leader looks for the first free shared-memory prefix, then creates the block that
    claims it; two processes that do this at the same moment (two runs started together on one machine, test
    workers) pick the same prefix and the second fails with ``FileExistsError``. The lock makes the look-and-claim
    of independent processes take turns. Only the node-local leader (``LOCAL_RANK`` 0, as set by composer's
    launcher) takes it: the other ranks of its job meet it at streaming's barriers inside, so they must not wait
    for it. Where ``fcntl`` is missing (Windows) this does nothing.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    if int(os.environ.get('LOCAL_RANK', '0')) != 0:
        yield
        return
    with open(PREFIX_LOCK, 'a') as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def _resize_crop(image: Image.Image, size: tuple[int, int], frac: tuple[float, float],
                 flip: bool = False) -> tuple[Image.Image, int, int]:
    """Resize ``image`` to cover ``size`` (h, w) keeping aspect, crop at fractional offset ``frac``.

    With ``flip`` (the caller mirrors the crop) the reported left offset is that of the same crop in the mirrored
    resized image, ``new_w - w - left``: SDXL flips before cropping, so its crop conditioning is in the flipped
    frame (Podell et al. 2023, Sec. 2.2).

    Returns:
        The cropped image (not mirrored) and the crop's (top, left) in the (mirrored if ``flip``) resized image.
    """
    height, width = size
    new_h, new_w = cover_size(image.height, image.width, size)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    top = int(round((new_h - height) * frac[0]))
    left = int(round((new_w - width) * frac[1]))
    crop = image.crop((left, top, left + width, top + height))
    return crop, top, (new_w - width - left) if flip else left


def cover_size(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a ``height`` x ``width`` image resized, keeping its aspect, to cover ``size`` (h, w)."""
    scale = max(size[0] / height, size[1] / width)
    return max(size[0], round(height * scale)), max(size[1], round(width * scale))


def center_crop(image: Image.Image, size: int | None = None) -> Image.Image:
    """Centre square of ``image``, resized to ``size`` x ``size`` (``None``: the square's own side).

    The one centre crop of the project: the dataset's ``crop: center``, precomputed latents, captioning and
    the evaluation reference images all cut the same square (resize to cover, then crop the middle).
    """
    image = image.convert('RGB')
    side = size or min(image.size)
    return _resize_crop(image, (side, side), (0.5, 0.5))[0]


def image_tensor(image: Image.Image, flip: bool) -> torch.Tensor:
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
        control_dropout: Probability, independent of caption dropout, that the model replaces this sample's
            control metadata by its learned null control (flagged ``control_dropped``; disentangled backbones).
        use_latents: False for pixels; True for column ``latents_<resolution>``; an int or str picks
            the column (``512`` or ``'latents_512'``).
        seed: Seed of the per-sample random choices (default: ``shuffle_seed``).
        image_key: Column of the image (encoded bytes or a decoded ``jpeg``/``png``/``pil`` column): ``image``
            here; ``jpg`` in mosaicml/diffusion's LAION and micro_diffusion's shards.
        caption_key: Column of the caption: a string, or a list of strings (``json``), of which one is drawn
            per sample and epoch (``captions`` in mosaicml/diffusion's COCO shards, five per image).
        latents_scaled: Whether the stored latents are already multiplied by the VAE scaling factor. Ours are
            RAW (``False``, the default for ``ndarray`` columns); micro_diffusion's ``latents_<res>`` fp16 bytes
            are scaled: set ``true``, and the model uses them as they are (``latents_scaled`` in the batch).
            Raw-bytes latent columns require the setting, since nothing in them says which they are.
        text_length: Tokens per caption in micro_diffusion's flat ``<caption_key>_latents`` fp16 bytes
            (77 x D), read as ``text_hidden`` with an all-ones ``text_mask``.
        upcast: Cast stored latents and text states (fp16 as convert/precompute_latents.py writes them) to fp32
            in the loader workers. Off by default: batches keep the stored dtype, so half the bytes cross to the
            device, and ``LatentDiffusion`` casts them to fp32 there (``batch_latents``, ``batch_conditioning``).
            Set it for a consumer that needs fp32 host tensors.
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
                 control_dropout: float = 0.0,
                 use_latents: bool | int | str = False,
                 seed: int | None = None,
                 image_key: str = 'image',
                 caption_key: str = 'caption',
                 latents_scaled: bool | None = None,
                 text_length: int = 77,
                 upcast: bool = False,
                 **kwargs: Any) -> None:
        if crop not in CROP_MODES:
            raise ValueError(f'crop must be one of {CROP_MODES}, got {crop!r}')
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f'caption_dropout must be in [0, 1], got {caption_dropout}')
        if not 0.0 <= control_dropout <= 1.0:
            raise ValueError(f'control_dropout must be in [0, 1], got {control_dropout}')
        self.latent_column = self._latent_column(use_latents, resolution)
        if self.latent_column and random_flip:
            raise ValueError('random_flip cannot be applied to precomputed latents; set random_flip: false '
                             'or precompute latents of flipped images')
        if self.latent_column and crop == 'aspect_buckets':
            raise ValueError('crop: aspect_buckets needs pixels; latents are stored at one fixed size')
        if streams is not None:
            streams = [s if isinstance(s, Stream) else Stream(**dict(s)) for s in streams]
        with shm_prefix_lock():
            super().__init__(streams=streams, remote=remote, local=local, split=split, **kwargs)
        self.resolution = int(resolution)
        self.crop = crop
        self.random_flip = bool(random_flip)
        self.caption_dropout = float(caption_dropout)
        self.control_dropout = float(control_dropout)
        self.seed = int(self.shuffle_seed if seed is None else seed)
        self.image_key, self.caption_key = image_key, caption_key
        self.latents_scaled, self.text_length = latents_scaled, int(text_length)
        self.upcast = bool(upcast)

    def _float_array(self, stored: Any) -> np.ndarray:
        """A writable copy of a stored floating array: its own dtype, or fp32 with ``upcast``."""
        array = np.asarray(stored)
        dtype = np.float32 if self.upcast or not np.issubdtype(array.dtype, np.floating) else array.dtype
        return np.array(array, dtype=dtype)

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
        caption = self._caption(row, sample_id)
        out: dict[str, Any] = {'caption': '' if dropped else caption,
                               'caption_dropped': torch.tensor(dropped)}
        if self.latent_column:
            out.update(self._latent_fields(row))
        else:
            out.update(self._pixel_fields(row, rng))
        if self.control_dropout > 0:  # drawn last: the sample's other random choices do not depend on it
            out['control_dropped'] = torch.tensor(bool(rng.random() < self.control_dropout))
        return out

    def _caption(self, row: dict[str, Any], sample_id: int) -> str:
        if self.caption_key not in row:
            raise KeyError(f'caption column {self.caption_key!r} not in this dataset (columns: {sorted(row)}); '
                           'set caption_key')
        caption = row[self.caption_key]
        if isinstance(caption, (list, tuple)):  # e.g. COCO's five captions: one per sample and epoch
            if not caption:
                return ''
            # A stream of its own, so the other random choices of a sample stay the same.
            epoch = max(0, self.next_epoch - 1)
            pick = np.random.default_rng([self.seed, epoch, int(sample_id), 1]).integers(len(caption))
            caption = caption[int(pick)]
        return caption.decode('utf-8') if isinstance(caption, bytes) else str(caption)

    def _latent_fields(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.latent_column not in row:
            raise KeyError(f'column {self.latent_column!r} not in this dataset (columns: {sorted(row)}); '
                           f'run convert/precompute_latents.py at this resolution or set use_latents')
        side = int(self.latent_column.rsplit('_', 1)[-1])
        stored, scaled = row[self.latent_column], self.latents_scaled
        if isinstance(stored, (bytes, bytearray)):
            if scaled is None:
                raise ValueError(f'{self.latent_column} holds raw fp16 bytes written by another tool: set '
                                 'latents_scaled (true for micro_diffusion\'s shards, whose latents are multiplied '
                                 'by the VAE scaling factor; false if they are raw)')
            # micro_diffusion's layout: C x (res/8) x (res/8) fp16, as its own loader reshapes them.
            stored = np.frombuffer(stored, dtype=np.float16).reshape(-1, side // 8, side // 8)
        out = {'latents': torch.from_numpy(self._float_array(stored)),  # (C, h, w), stored dtype
               'latents_scaled': torch.tensor(bool(scaled))}
        for name in ('text_hidden', 'text_pooled'):
            if name in row:
                out[name] = torch.from_numpy(self._float_array(row[name]))
        if 'text_mask' in row:  # 0/1 per token: fp32 as the model's attention masks take it (77 values)
            out['text_mask'] = torch.from_numpy(np.asarray(row['text_mask'], dtype=np.float32))
        flat_text = row.get(f'{self.caption_key}_latents')  # micro_diffusion: (text_length x D) fp16 bytes
        if 'text_hidden' not in out and isinstance(flat_text, (bytes, bytearray)):
            hidden = np.frombuffer(flat_text, dtype=np.float16).reshape(self.text_length, -1)  # (L, D)
            out['text_hidden'] = torch.from_numpy(self._float_array(hidden))
            out['text_mask'] = torch.ones(self.text_length, dtype=torch.float32)
        # Micro-conditioning of the centre crop that convert/precompute_latents.py encoded: the latent column's
        # resolution is the (square) target size; the crop offset is that of _resize_crop with frac (0.5, 0.5).
        height, width = int(row.get('height', 0)), int(row.get('width', 0))
        top = left = 0
        if height > 0 and width > 0:
            new_h, new_w = cover_size(height, width, (side, side))
            top, left = int(round((new_h - side) * 0.5)), int(round((new_w - side) * 0.5))
        out['original_size'] = torch.tensor([height, width], dtype=torch.long)
        out['crop_top_left'] = torch.tensor([top, left], dtype=torch.long)
        out['target_size'] = torch.tensor([side, side], dtype=torch.long)
        out['flip'] = torch.tensor(0, dtype=torch.long)
        return out

    def _pixel_fields(self, row: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if self.image_key not in row:
            raise KeyError(f'image column {self.image_key!r} not in this dataset (columns: {sorted(row)}); set '
                           'image_key, or use_latents for a dataset of precomputed latents')
        image = row[self.image_key]
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
        crop, top, left = _resize_crop(image, size, frac, flip)
        out['image'] = image_tensor(crop, flip)
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
            crop, top, left = _resize_crop(sample.pop('image'), size, sample.pop('_frac'), bool(sample['flip']))
            sample['image'] = image_tensor(crop, bool(sample['flip']))
            sample['crop_top_left'] = torch.tensor([top, left], dtype=torch.long)
            sample['target_size'] = torch.tensor(size, dtype=torch.long)
            out.append(sample)
        return out


def _num_samples(batch: dict[str, Any]) -> int:
    return len(batch['caption'])


def build_image_caption_dataloader(batch_size: int,
                                   *,
                                   streams: Sequence[dict[str, Any]] | dict[str, dict[str, Any]] | None = None,
                                   num_workers: int = 0,
                                   drop_last: bool = True,
                                   persistent_workers: bool = False,
                                   prefetch_factor: int | None = None,
                                   pin_memory: bool = False,
                                   **dataset_kwargs: Any) -> Any:
    """Build the ``image_caption`` dataloader as a Composer ``DataSpec``.

    Args:
        batch_size: Per-device batch size.
        streams: A list (or name -> dict mapping, as YAML writes it) of ``streaming.Stream`` arguments; or use
            ``remote``/``local``.
        num_workers: DataLoader worker processes.
        drop_last: Drop the last incomplete batch.
        persistent_workers: Keep workers between epochs (only with ``num_workers > 0``).
        prefetch_factor: Batches prefetched per worker (only with ``num_workers > 0``).
        pin_memory: Pin batches in page-locked memory (GPU recipes: on, for asynchronous host-to-device copies).
        **dataset_kwargs: Arguments of :class:`StreamingImageCaptionDataset` (``remote``, ``local``, ``split``,
            ``resolution``, ``crop``, ``random_flip``, ``caption_dropout``, ``control_dropout``, ``use_latents``,
            ``image_key``, ``caption_key``, ``latents_scaled``, ``text_length``, ``shuffle``, ...) and through it
            of ``StreamingDataset`` (``shuffle_seed``, ``predownload``, ``cache_limit``, ``num_canonical_nodes``,
            ...). At scale set ``cache_limit`` (e.g. ``2tb``: streaming evicts the least recently used shards
            instead of filling the node's disk) and a fixed ``num_canonical_nodes`` (the shuffle is a function of
            it, so a resume on another node count sees the same order). A name neither takes is a config error
            (``diffusion.registry.KWARGS_TARGETS``).

    Returns:
        A ``composer.core.DataSpec`` whose batches are dicts (see the module docstring of
        ``diffusion.data.dataset`` and the README, "Data").
    """
    from composer.core import DataSpec

    if isinstance(streams, dict) or hasattr(streams, 'items'):
        streams = [dict(v) for v in streams.values()]  # type: ignore[union-attr]
    dataset_kwargs.setdefault('shuffle', True)
    dataset = StreamingImageCaptionDataset(streams=streams, batch_size=batch_size, **dataset_kwargs)
    loader_kwargs: dict[str, Any] = {}
    if num_workers > 0:
        loader_kwargs['persistent_workers'] = persistent_workers
        if prefetch_factor is not None:
            loader_kwargs['prefetch_factor'] = prefetch_factor
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                        pin_memory=pin_memory, collate_fn=ImageCaptionCollate(dataset.resolution), **loader_kwargs)
    return DataSpec(loader, get_num_samples_in_batch=_num_samples)


def _register() -> None:
    from diffusion import registry

    if 'image_caption' not in registry.dataloaders.get_all():
        registry.dataloaders.register('image_caption', func=build_image_caption_dataloader)


_register()
