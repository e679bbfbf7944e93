"""The demo's offline text-alignment figure: catalog categories, the linear probe, balanced accuracy."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from diffusion.evaluation.probe import (CategoryProbe, balanced_accuracy, cached_features, inception_features,
                                        load_labeled, normalize_category)

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / 'data' / 'cache'


def test_normalize_category_merges_source_spellings():
    assert normalize_category('Smileys & Emotion') == normalize_category('smileys-emotion') == 'smileys-emotion'
    assert normalize_category('People & Body') == 'people-body'
    assert normalize_category(None) == normalize_category('') == ''


def test_balanced_accuracy_is_mean_per_class_recall():
    truth = ['a'] * 8 + ['b'] * 2
    always_a = ['a'] * 10
    assert balanced_accuracy(truth, always_a) == pytest.approx(0.5)  # plain accuracy would say 0.8
    pred = ['a'] * 6 + ['b'] * 2 + ['b', 'a']  # a: 6/8, b: 1/2
    assert balanced_accuracy(truth, pred) == pytest.approx((6 / 8 + 1 / 2) / 2)
    with pytest.raises(ValueError):
        balanced_accuracy(['a'], ['a', 'b'])


def _blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(classes, dim)) * 3.0
    x = np.concatenate([centres[c] + spread * rng.normal(size=(n_per_class, dim)) for c in range(classes)])
    return x, [f'class {c}' for c in range(classes) for _ in range(n_per_class)]


def test_probe_separates_separable_features_and_ignores_rare_or_unlabelled():
    x, y = _blobs(30, 4, 64, 1.0, seed=1)
    rare_x, _ = _blobs(3, 1, 64, 1.0, seed=2)
    probe = CategoryProbe(min_per_class=10).fit(np.concatenate([x, rare_x, x[:5]]),
                                                 y + ['Rare'] * 3 + [''] * 5)
    assert probe.classes == ['class-0', 'class-1', 'class-2', 'class-3']
    assert probe.chance == pytest.approx(0.25)
    test_x, test_y = _blobs(20, 4, 64, 1.0, seed=3)
    score = probe.score(np.concatenate([test_x, rare_x]), test_y + ['rare'] * 3)
    assert score.balanced_accuracy > 0.9
    assert (score.num_scored, score.num_skipped) == (80, 3)


def test_probe_is_at_chance_on_features_unrelated_to_the_label():
    x, y = _blobs(40, 4, 64, 1.0, seed=1)
    probe = CategoryProbe().fit(x, y)
    noise = np.random.default_rng(5).normal(size=(400, 64)) * 3.0
    labels = [f'class {i % 4}' for i in range(400)]
    assert abs(probe.score(noise, labels).balanced_accuracy - probe.chance) < 0.12


def _shape(kind: str, colour: tuple[int, int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.new('RGB', (64, 64), 'white')
    x0, y0 = rng.integers(4, 20, size=2)
    box = (int(x0), int(y0), int(x0) + 36, int(y0) + 36)
    (ImageDraw.Draw(im).ellipse if kind == 'circle' else ImageDraw.Draw(im).rectangle)(box, fill=colour)
    return im


def test_probe_on_real_inception_features(tmp_path):
    """The real TF-FID Inception: a probe fitted on real images of two kinds tells held-out ones apart."""
    kinds = [('circle', (220, 30, 30)), ('square', (30, 60, 220))]
    train = [_shape(k, c, s) for s in range(6) for k, c in kinds]
    held_out = [_shape(k, c, 100 + s) for s in range(3) for k, c in kinds]
    labels = [k for _ in range(6) for k, _ in kinds]
    from diffusion.evaluation.metrics import InceptionFeatures
    extractor = InceptionFeatures()
    feats = inception_features(train, batch_size=8, extractor=extractor)
    assert feats.shape == (12, 2048)
    probe = CategoryProbe(min_per_class=5).fit(feats, labels)
    held_feats = cached_features(tmp_path / 'f.npz', [str(i) for i in range(6)], lambda: held_out, extractor)
    assert probe.score(held_feats, labels[:6]).balanced_accuracy == 1.0
    # a cache hit returns the stored features without computing (the callable would fail)
    again = cached_features(tmp_path / 'f.npz', [str(i) for i in range(6)], lambda: 1 / 0)
    assert np.array_equal(again, held_feats)


def test_catalog_stores_each_emoji_category(tmp_path):
    """Real OpenMoji and Twemoji packages (cached): the `category` column carries group/category."""
    from convert import commoncatalog_mini
    out = tmp_path / 'cc'
    commoncatalog_mini.main(['--out', str(out), '--cache-dir', str(CACHE), '--sources', 'openmoji', 'twemoji',
                             '--max-per-source', '6', '--size', '32', '--workers', '1', '--eval-fraction', '0.3'])
    rows = {}
    for split in ('train', 'eval'):
        labeled = load_labeled(out, split)
        rows.update(zip(labeled['keys'], labeled['categories']))
    assert len(rows) == 12
    # the first OpenMoji (key order) are smileys (group smileys-emotion); the first Twemoji are symbols
    assert {c for k, c in rows.items() if k.startswith('openmoji/')} == {'smileys-emotion'}
    assert {c for k, c in rows.items() if k.startswith('twemoji/')} == {'symbols'}
