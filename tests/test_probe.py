"""The demo's offline text-alignment figure: catalog categories, the linear probe, balanced accuracy."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from diffusion.demo.probe import (CategoryProbe, balanced_accuracy, cached_features, inception_features, load_labeled,
                                  normalize_category)

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


# ---------------------------------------------------------------------------------------------
# The demo's evaluation and report pieces
# ---------------------------------------------------------------------------------------------
def test_fid_kid_from_features_orders_near_and_far_sets():
    from diffusion.demo.evaluate import fid_kid
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 16)).astype(np.float32)
    near = rng.normal(size=(300, 16)).astype(np.float32)
    far = (rng.normal(size=(300, 16)) + 1.5).astype(np.float32)
    a, b = fid_kid(real, near, subsets=10, subset_size=100), fid_kid(real, far, subsets=10, subset_size=100)
    assert a['fid'] < 1.0 < 16 * 1.5 ** 2 * 0.8 < b['fid']  # FID of a mean shift is ~|shift|^2
    assert abs(a['kid_mean']) < 0.05 < b['kid_mean'] and b['kid_subset_size'] == 100


def test_reconstructions_through_the_autoencoder():
    """decode(encode(x)) as images of the input's size; an autoencoder that reconstructs well scores near the input."""
    from diffusion import registry
    from diffusion.demo.evaluate import _fingerprint, reconstructions
    from diffusion.builders import import_components
    import_components()
    ae = registry.build(registry.autoencoders, {'name': 'autoencoder_kl', 'config': 'tiny'})
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    out = reconstructions(ae, images, batch_size=2)
    assert len(out) == 3 and all(im.size == (32, 32) and im.mode == 'RGB' for im in out)
    assert _fingerprint(ae) == _fingerprint(ae)
    with torch.no_grad():
        next(ae.parameters()).add_(1.0)
    before = _fingerprint(ae)
    with torch.no_grad():
        next(ae.parameters()).add_(1.0)
    assert _fingerprint(ae) != before  # cached features follow retrained weights


def test_checkpoints_by_batch_orders_by_batch(tmp_path):
    from diffusion.checkpoints import checkpoints_by_batch
    for name in ('ep1-ba1000-rank0.pt', 'ep0-ba200-rank0.pt', 'latest-rank0.pt', 'ep0-ba600-rank0.pt'):
        (tmp_path / name).write_bytes(b'')
    assert [b for b, _ in checkpoints_by_batch(tmp_path)] == [200, 600, 1000]


def test_report_files_and_model_card(tmp_path):
    import json

    from diffusion.demo.report import (METRIC_KEYS, labelled_grid, licence_counts, metrics_section, model_metrics,
                                       write_model_card, write_report)
    evaluation = {'chance': 0.1, 'probe_classes': list('abcdefghij'), 'probe_accuracy_real': 0.7, 'n_reference': 500,
                  'checkpoints': {'first': {'batch': 100, 'fid': 300.0, 'kid_mean': 0.3, 'probe_accuracy': 0.12},
                                  'last': {'batch': 900, 'fid': 90.0, 'kid_mean': 0.05, 'probe_accuracy': 0.4}}}
    metrics = {'unet': model_metrics(evaluation)}
    assert set(METRIC_KEYS) <= set(metrics['unet']) and 'probe_accuracy_reconstructed' not in metrics['unet']
    plain = write_report(tmp_path / 'plain', [('Metrics', metrics_section(metrics))], metrics).read_text()
    assert '300.0 (ba 100) -> 90.0 (ba 900)' in plain  # scored without the ceiling: no empty ceiling columns
    assert 'autoencoder ceiling' not in plain and 'n/a' not in plain and 'reconstructions' not in plain
    evaluation['reconstructed'] = {'probe_accuracy': 0.45, 'fid': 110.0, 'kid_mean': 0.02}
    evaluation['probe_ae_accuracy_real'] = 0.5
    evaluation['checkpoints']['first']['probe_ae_accuracy'] = 0.15
    evaluation['checkpoints']['last']['probe_ae_accuracy'] = 0.3
    metrics = {'unet': model_metrics(evaluation)}
    assert (metrics['unet']['probe_accuracy_reconstructed'], metrics['unet']['fid_reconstructed']) == (0.45, 110.0)
    assert (metrics['unet']['fid_first'], metrics['unet']['fid_last']) == (300.0, 90.0)
    grid = labelled_grid(['grinning face', 'flag: japan'], [('real', [Image.new('RGB', (64, 64), 'red')] * 2),
                                                            ('model', [Image.new('RGB', (64, 64), 'blue')] * 2)],
                         tmp_path / 'grid.png', cell=64)
    assert Image.open(grid).size == (110 + 2 * 68, 2 * 68 + 40)
    report = write_report(tmp_path, [('Metrics', metrics_section(metrics)), ('Samples', [('image', 'grid.png', 'g')])],
                          metrics)
    text = report.read_text()
    assert '4.0x chance' in text and '300.0 (ba 100) -> 90.0 (ba 900)' in text and '![g](grid.png)' in text
    assert '0.450 / 110.0 / 0.0200' in text  # the autoencoder ceiling
    assert '0.150 -> 0.300 (3.0x chance) / 0.500' in text  # the probe fitted on reconstructions
    assert '<img src="grid.png"' in (tmp_path / 'report.html').read_text()
    assert json.loads((tmp_path / 'metrics.json').read_text())['unet']['n_reference'] == 500
    attribution = tmp_path / 'attribution.csv'
    attribution.write_text('key,license\na,CC-BY-4.0\nb,CC-BY-4.0\nc,CC0-1.0\n')
    assert licence_counts(attribution) == {'CC-BY-4.0': 2, 'CC0-1.0': 1}
    card = write_model_card(tmp_path / 'pipeline', attribution, licence_counts(attribution)).read_text()
    assert '- CC-BY-4.0: 2' in card and 'attribution.csv' in card
    assert (tmp_path / 'pipeline' / 'attribution.csv').read_text() == attribution.read_text()


def test_demo_profiles_and_overrides():
    import importlib.util
    spec = importlib.util.spec_from_file_location('demo_script', REPO / 'scripts' / 'demo.py')
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    quick = demo.parse_args(['--quick'])
    assert quick.models == ['microdit-flow'] and quick.eval_images == 128
    full = demo.parse_args(['--microdit-flow-steps', '7'])
    assert full.models == ['microdit-flow'] and full.microdit_flow_steps == 7 and full.eval_images == 0
    assert (full.ceiling, full.sweep_images) == (0, 0)  # the report needs neither
    every = demo.parse_args(['--models', 'microdit-flow', 'unet', 'microdit', '--ceiling', '1'])
    assert every.models == ['microdit-flow', 'unet', 'microdit'] and every.ceiling == 1
    for args in (quick, demo.parse_args([]), every):
        for name in args.models:  # a recipe per model, a first checkpoint well before the last one
            assert (REPO / demo.MODELS[name][0]).exists() and name in demo.DESCRIPTIONS
            assert args.checkpoints >= 2 and getattr(args, demo.steps_key(name)) // args.checkpoints >= 1
    assert demo.export_folder(REPO, 'unet').name == 'pipeline'  # diffusers runs the UNet; MicroDiT: native
    assert demo.export_folder(REPO, 'microdit-flow').name == 'export'


def test_demo_eval_end_to_end(tmp_path):
    """``python -m diffusion.demo.evaluate`` on a real 2-checkpoint run and a real emoji catalog: metrics.json
    holds both checkpoints, the autoencoder ceiling and the probe fitted on reconstructions, and a second run reads
    every real feature from the cache."""
    import json

    from omegaconf import OmegaConf

    from convert import commoncatalog_mini
    from diffusion.config import load_config
    from diffusion.demo import evaluate as demo_eval
    from diffusion.training.train import build_trainer
    catalog = tmp_path / 'cc'
    commoncatalog_mini.main(['--out', str(catalog), '--cache-dir', str(CACHE), '--sources', 'openmoji', 'twemoji',
                             '--max-per-source', '18', '--size', '32', '--workers', '1', '--eval-fraction', '0.25'])
    raw = OmegaConf.to_container(OmegaConf.load(REPO / 'yamls/tiny-cpu.yaml'))
    raw['callbacks'], raw['eval_loader'], raw['algorithms'] = {}, None, {}
    run = tmp_path / 'run'
    trainer = build_trainer(load_config(base=raw, overrides=[
        f'variables.data={catalog}', f'save_folder={run}/checkpoints', 'max_duration=2ba', 'save_interval=1ba',
        'save_num_checkpoints_to_keep=-1', 'global_train_batch_size=4', 'scheduler.t_warmup=0ba',
        'log_to_console=false', 'variables.resolution=32',
        'model.backbone.sample_size=8']))
    trainer.fit()
    trainer.close()
    # 4 of the held-out captions (generated twice: first and last checkpoint); the probes keep every training image
    # (at least 10 per category), whose Inception and autoencoder passes are most of the test's time.
    argv = ['--data', str(catalog), '--run', str(run), '--features', str(tmp_path / 'features'), '--size', '32',
            '--num-reference', '4', '--probe-train', '40', '--steps', '2', '--sweep', '1', '3', '--sweep-images', '2',
            '--kid-subsets', '5']
    assert demo_eval.main(argv) == 0
    metrics = json.loads((run / 'eval' / 'metrics.json').read_text())
    first, last = metrics['checkpoints']['first'], metrics['checkpoints']['last']
    assert (first['batch'], last['batch']) == (1, 2)
    assert first['num_generated'] == last['num_generated'] == metrics['n_reference'] == 4
    for row in (first, last, metrics['reconstructed']):
        assert np.isfinite(row['fid']) and 0 <= row['probe_accuracy'] <= 1 and 0 <= row['probe_ae_accuracy'] <= 1
    assert 0 <= metrics['probe_ae_accuracy_real'] <= 1 and len(metrics['sweep']) == 2
    feature_files = sorted(p.name for p in (tmp_path / 'features').iterdir())
    assert feature_files == ['eval.npz', 'reconstructed.npz', 'train.npz', 'train_reconstructed.npz']
    # Again: every real and reconstructed feature comes from the cache, the scores are the same.
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'features').iterdir()}
    assert demo_eval.main(argv) == 0
    again = json.loads((run / 'eval' / 'metrics.json').read_text())
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'features').iterdir()} == stamps
    assert again['reconstructed'] == metrics['reconstructed']
    assert again['checkpoints']['last']['fid'] == pytest.approx(last['fid'])
    # The demo's trimmed evaluation: no autoencoder ceiling, no sweep; the same checkpoint scores.
    assert demo_eval.main([*argv, '--no-ceiling', '--sweep-images', '0']) == 0
    trimmed = json.loads((run / 'eval' / 'metrics.json').read_text())
    assert 'reconstructed' not in trimmed and 'sweep' not in trimmed and 'sweep_plot' not in trimmed
    assert 'probe_ae_accuracy' not in trimmed['checkpoints']['last']
    assert trimmed['checkpoints']['last']['fid'] == pytest.approx(last['fid'])
