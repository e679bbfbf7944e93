"""An offline text-alignment figure: a linear probe that predicts an image's category from Inception features.

No CLIP weights install offline here, so CLIP score cannot say whether generated images follow their prompts.
The mini catalog stores each emoji's category instead (OpenMoji's ``group``, Twemoji's ``category``). A
logistic-regression probe is fitted on the 2048-d Inception pool features (the TF-FID network of
:mod:`diffusion.evaluation.metrics`) of REAL training images to predict that category; it is then applied to
images GENERATED from held-out captions, whose category is known from the caption's row. A model that draws
what its caption says gets its images classified into the caption's category; one that draws generic blobs
scores chance.

The figure is balanced accuracy (the mean per-class recall), because the classes are far from even (people &
body alone is about a third of Twemoji): a probe that always answers the largest class scores 1/K, the chance
level reported beside it. The same probe's balanced accuracy on the real held-out images is the ceiling a
perfect generator could reach.

Linear probes on frozen features: Alain & Bengio, "Understanding intermediate layers using linear classifier
probes" (2016); balanced accuracy: Brodersen et al., "The balanced accuracy and its posterior distribution"
(ICPR 2010).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

__all__ = ['normalize_category', 'balanced_accuracy', 'CategoryProbe', 'inception_features', 'cached_features',
           'load_labeled']


def normalize_category(name: Optional[str]) -> str:
    """One spelling per category across sources: ``'Smileys & Emotion'`` and ``'smileys-emotion'`` -> the latter."""
    return re.sub(r'[^a-z0-9]+', '-', (name or '').lower()).strip('-')


def balanced_accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """Mean over the classes present in ``y_true`` of the share of their samples predicted correctly."""
    if len(y_true) != len(y_pred):
        raise ValueError(f'{len(y_true)} labels but {len(y_pred)} predictions')
    if not len(y_true):
        raise ValueError('no samples to score')
    truth, pred = np.asarray(y_true), np.asarray(y_pred)
    recalls = [float(np.mean(pred[truth == c] == c)) for c in np.unique(truth)]
    return float(np.mean(recalls))


@dataclass
class ProbeScore:
    """Balanced accuracy of the probe on one image set, and how many of its images had a probe class."""
    balanced_accuracy: float
    num_scored: int
    num_skipped: int  # images whose category the probe was not trained on (rare or unseen)


class CategoryProbe:
    """Standardised features -> multinomial logistic regression (scikit-learn), fitted on real images.

    Args:
        min_per_class: Classes with fewer training images are left out (a class seen a handful of times
            cannot be learned, and its recall would dominate the balanced mean by noise).
        c: Inverse L2 regularisation strength of the logistic regression (2048 features, a few thousand images).
        max_iter: Solver iterations.
    """

    def __init__(self, min_per_class: int = 10, c: float = 0.05, max_iter: int = 300) -> None:
        self.min_per_class, self.c, self.max_iter = min_per_class, c, max_iter
        self.classes: list[str] = []
        self._model: Any = None

    @property
    def chance(self) -> float:
        """Balanced accuracy of a constant (or uniformly random) guess: 1 / number of classes."""
        if not self.classes:
            raise RuntimeError('fit the probe first')
        return 1.0 / len(self.classes)

    def fit(self, features: np.ndarray, labels: Sequence[str]) -> 'CategoryProbe':
        """Fit on real images' features (N, D) and their categories ('' = no category, ignored)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        labels = np.asarray([normalize_category(x) for x in labels])
        names, counts = np.unique(labels[labels != ''], return_counts=True)
        self.classes = sorted(str(n) for n, k in zip(names, counts) if k >= self.min_per_class)
        if len(self.classes) < 2:
            raise ValueError(f'need at least 2 categories with >= {self.min_per_class} images, got '
                             f'{dict(zip(names.tolist(), counts.tolist()))}')
        keep = np.isin(labels, self.classes)
        # class_weight='balanced': the objective matches the balanced-accuracy figure the probe is read by.
        self._model = make_pipeline(StandardScaler(), LogisticRegression(
            C=self.c, max_iter=self.max_iter, class_weight='balanced'))
        self._model.fit(np.asarray(features)[keep], labels[keep])
        log.info('probe: %d classes from %d real images (%d without a kept class)', len(self.classes),
                 int(keep.sum()), int((~keep).sum()))
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        if self._model is None:
            raise RuntimeError('fit the probe first')
        return self._model.predict(np.asarray(features))

    def score(self, features: np.ndarray, labels: Sequence[str]) -> ProbeScore:
        """Balanced accuracy over the images whose category is one of the probe's classes."""
        labels = np.asarray([normalize_category(x) for x in labels])
        keep = np.isin(labels, self.classes)
        if not keep.any():
            raise ValueError(f'none of {len(labels)} images has one of the probe classes {self.classes}')
        pred = self.predict(np.asarray(features)[keep])
        return ProbeScore(balanced_accuracy(labels[keep], pred), int(keep.sum()), int((~keep).sum()))


# ---------------------------------------------------------------------------------------------
# Features and labelled image sets
# ---------------------------------------------------------------------------------------------
def inception_features(images: Iterable[Image.Image], batch_size: int = 32, extractor: Any = None) -> np.ndarray:
    """(N, 2048) float32 Inception pool features, with clean-fid resizing (as FID/KID see the images)."""
    from diffusion.evaluation.metrics import InceptionFeatures, images_to_tensor
    extractor = extractor or InceptionFeatures()
    out, batch = [], []
    for im in images:
        batch.append(im)
        if len(batch) == batch_size:
            out.append(extractor(images_to_tensor(batch)).numpy())
            batch = []
    if batch:
        out.append(extractor(images_to_tensor(batch)).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 2048), np.float32)


def cached_features(path: str | Path, keys: Sequence[str], images: Any, extractor: Any = None) -> np.ndarray:
    """Features of ``images`` (a callable returning them, so nothing is decoded on a hit), cached in ``path``.

    The cache is used only when it holds exactly ``keys`` in order, so a changed image set recomputes.
    """
    path = Path(path)
    if path.exists():
        with np.load(path, allow_pickle=False) as cached:
            if cached['keys'].tolist() == list(keys):
                return cached['features']
    feats = inception_features(images(), extractor=extractor)
    if len(feats) != len(keys):
        raise ValueError(f'{len(keys)} keys but {len(feats)} images')
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.stem}.tmp.npz')
    np.savez(tmp, keys=np.asarray(list(keys), dtype=str), features=feats)
    tmp.replace(path)
    return feats


def load_labeled(path: str | Path, split: str, limit: Optional[int] = None, stride: int = 1,
                 size: Optional[int] = None) -> dict[str, list]:
    """Rows of an MDS split (``category`` column required): keys, captions, categories and square images.

    Args:
        path: The dataset folder (a catalog or its precomputed-latents copy: both keep ``category``).
        split: ``train`` or ``eval``.
        limit: At most this many rows (after ``stride``).
        stride: Take every ``stride``-th row (an even spread over a key-ordered split, cheaper than all rows).
        size: Side to resize the centre crop to (None keeps it).
    """
    from streaming import StreamingDataset

    from diffusion.data.dataset import center_crop, shm_prefix_lock
    with shm_prefix_lock():
        ds = StreamingDataset(local=str(path), split=split, shuffle=False, batch_size=1)
    index = list(range(0, ds.num_samples, max(1, stride)))[:limit]
    rows = [ds[i] for i in index]
    if rows and 'category' not in rows[0]:
        raise ValueError(f'{path}/{split} has no category column: rebuild it with convert/commoncatalog_mini.py')
    return {'keys': [str(r['key']) for r in rows], 'captions': [str(r['caption']) for r in rows],
            'categories': [normalize_category(r['category']) for r in rows],
            'images': [center_crop(r['image'], size) for r in rows]}
