"""Metrics and the evaluation sweep: FID/KID sanity on real photos, CLIP score availability, run_eval end to end.

Inception runs on CPU (~1 s per image here), so the sets are tiny: FID on a handful of images is biased and
ill-conditioned, so the test checks self ~ 0 and the ordering self < other real photos < noise.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.config import load_config
from diffusion.evaluation.evaluate import EvalConfig, evaluate, load_reference
from diffusion.evaluation.metrics import ImageMetrics, clean_resize, load_clip_score
from test_export import trained_run

REPO = Path(__file__).resolve().parents[1]
N = 6


@pytest.fixture(scope='module')
def tiny_clip_dir(tmp_path_factory):
    """A randomly initialised transformers CLIPModel + CLIPProcessor saved as a local checkpoint folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from diffusion.models.text_encoders import clip_bpe_tokenizer_dir
    tok = CLIPTokenizer.from_pretrained(str(clip_bpe_tokenizer_dir()))
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)
    out = tmp_path_factory.mktemp('tiny_clip')
    CLIPModel(cfg).save_pretrained(out, safe_serialization=True)
    image_proc = CLIPImageProcessor(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32})
    CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(out)
    return out


def test_clean_resize_keeps_float_values():
    im = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))[..., None].repeat(3, -1))
    arr = clean_resize(im)
    assert arr.shape == (299, 299, 3) and arr.dtype == np.float32
    assert 0 <= arr.min() and arr.max() <= 255
    assert not np.allclose(arr, np.round(arr))  # not re-quantised to uint8 (clean-fid)


def test_fid_kid_sanity(demo_photos):
    images, _ = load_reference(demo_photos, 'train', limit=2 * N, size=64)
    a, b = images[:N], images[N:2 * N]
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(N)]
    metrics = ImageMetrics(kid_subset_size=N, kid_subsets=20, batch_size=N)
    metrics.add_reference(a)
    own, other, rand = metrics.score(a), metrics.score(b), metrics.score(noise)
    # Self-FID is 0 up to the numerical square root of a rank-deficient covariance product (N << 2048).
    assert abs(own['fid']) < 1.0, own
    assert own['fid'] + 50 < other['fid'] < rand['fid'], (own['fid'], other['fid'], rand['fid'])
    # KID's unbiased estimator of a set against ITSELF is <= 0 (its cross term keeps the self-pairs that the
    # within-set terms drop), so "~0" here means "not positive"; independent sets give positive values.
    assert own['kid_mean'] < 1e-3 and own['kid_mean'] < other['kid_mean'] < rand['kid_mean'], \
        (own['kid_mean'], other['kid_mean'], rand['kid_mean'])
    assert rand['kid_mean'] > 2 * other['kid_mean']
    assert own['clip_score'] is None and 'no CLIP checkpoint' in own['clip_score_reason']
    assert own['num_reference'] == N and own['kid_subset_size'] == N


def test_clip_score_unavailable_is_null_not_zero(tmp_path, tiny_clip_dir):
    metric, reason = load_clip_score(str(tmp_path / 'no-such-clip'))
    assert metric is None and 'no-such-clip' in reason
    metric, reason = load_clip_score(str(tiny_clip_dir))
    assert metric is not None and reason is None


def test_eval_yamls_validate():
    for path in sorted((REPO / 'yamls/eval').glob('*.yaml')):
        cfg = load_config(path, ['checkpoint=x'], schema=EvalConfig)
        assert cfg.guidance_scales


def test_run_eval_sweep(tmp_path_factory, demo_photos, tiny_clip_dir):
    run_dir = trained_run(tmp_path_factory, demo_photos)
    out = tmp_path_factory.mktemp('eval')
    cfg = load_config(REPO / 'yamls/eval/tiny-cpu.yaml',
                      [f'checkpoint={run_dir}', f'reference={demo_photos}', f'out_dir={out}', 'num_images=4',
                       'guidance_scales=[1.0,4.0]', 'num_inference_steps=2', 'height=32', 'width=32',
                       f'clip_model={tiny_clip_dir}', 'kid_subsets=10'], schema=EvalConfig)
    results = evaluate(cfg)
    saved = json.loads((out / 'results.json').read_text())
    assert saved['schema_version'] == 1 and saved['checkpoint']['weights'] == 'ema'
    assert saved['reference']['num_images'] == 4 and saved['reference']['resized_to'] == 32
    assert [r['guidance_scale'] for r in saved['results']] == [1.0, 4.0]
    for row in saved['results']:
        assert row['fid'] > 0 and np.isfinite(row['kid_mean']) and row['num_generated'] == 4
        assert isinstance(row['clip_score'], float) and row['clip_score_reason'] is None
        assert len(list(Path(row['images']).glob('images/*.png'))) == 4
    with Image.open(results['plot']) as im:
        assert im.size[0] > 100


class _GivenFeatures(torch.nn.Module):
    """A torchmetrics feature extractor that hands back the features it is given."""
    num_features = 16

    def forward(self, x):
        return x.double()


def test_fid_kid_of_given_features_through_torchmetrics_public_metrics():
    """``fid_kid`` (FID and KID of feature sets, no private torchmetrics helper): FID is the closed-form Frechet
    distance, KID the public KernelInceptionDistance at the same seed, and ImageMetrics reads KID's feature
    lists through the public ``metric_state`` (a rename fails here)."""
    from scipy import linalg
    from torchmetrics.image.kid import KernelInceptionDistance

    from diffusion.evaluation.metrics import fid_kid
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 16, generator=g, dtype=torch.float64)
    fake = 0.8 * torch.randn(150, 16, generator=g, dtype=torch.float64) + 0.3
    ours = fid_kid(real, fake, kid_subsets=5, kid_subset_size=50, seed=3)
    s1, s2 = np.cov(real.numpy().T), np.cov(fake.numpy().T)
    closed = float(((real.mean(0) - fake.mean(0)) ** 2).sum()) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert ours['fid'] == pytest.approx(closed, rel=1e-6) and ours['fid'] > 1.0
    assert abs(fid_kid(real, real)['fid']) < 1e-6
    kid = KernelInceptionDistance(feature=_GivenFeatures(), subsets=5, subset_size=50)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    torch.manual_seed(3)
    mean, std = kid.compute()
    assert (ours['kid_mean'], ours['kid_std'], ours['kid_subset_size']) == (float(mean), float(std), 50)
    assert fid_kid(real, fake, kid_subsets=5, kid_subset_size=50, seed=4)['kid_mean'] != ours['kid_mean']
    assert torch.equal(torch.cat(kid.metric_state['real_features']), real)


def test_sample_space_fid_equals_torchmetrics_and_its_bootstrap_interval_covers_it():
    """``frechet_distance`` (nuclear norm of an N x M matrix) gives ``fid_kid``'s torchmetrics FID, also when the
    feature width exceeds the sample count (Inception's 2,048 vs 529 held-out images); the bootstrap interval holds
    the full-set figure, is reproducible by seed, and is wider for fewer images."""
    from diffusion.evaluation.metrics import fid_bootstrap, fid_kid, frechet_distance
    g = torch.Generator().manual_seed(1)
    for n, m, d in ((200, 150, 16), (60, 60, 100)):
        real = torch.randn(n, d, generator=g, dtype=torch.float64)
        fake = 0.8 * torch.randn(m, d, generator=g, dtype=torch.float64) + 0.3
        assert frechet_distance(real.numpy(), fake.numpy()) == pytest.approx(fid_kid(real, fake)['fid'], rel=1e-6)
    real = torch.randn(400, 16, generator=g, dtype=torch.float64).numpy()
    fake = 0.9 * torch.randn(400, 16, generator=g, dtype=torch.float64).numpy() + 0.2
    boot = fid_bootstrap(real, fake, resamples=100, seed=5)
    assert boot['fid_low'] < boot['fid'] < boot['fid_high'] and boot['fid_boot_bias'] > 0, boot
    assert fid_bootstrap(real, fake, resamples=100, seed=5) == boot
    small = fid_bootstrap(real[:100], fake[:100], resamples=100, seed=5)
    assert small['fid_high'] - small['fid_low'] > boot['fid_high'] - boot['fid_low']


def test_eval_of_a_run_folder_uses_its_own_images_and_says_the_set_is_tiny(tmp_path_factory, demo_photos, tmp_path,
                                                                            capsys):
    from diffusion.evaluation.evaluate import main
    run_dir = trained_run(tmp_path_factory, demo_photos)
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'checkpoints').symlink_to(run_dir)
    assert main([str(REPO / 'yamls/eval/tiny-cpu.yaml'), f'checkpoint={tmp_path / "run"}', 'num_images=3',
                 'guidance_scales=[2.0]', 'num_inference_steps=2', 'height=32', 'width=32', 'kid_subsets=2']) == 0
    out = capsys.readouterr().out
    assert f"reference: the run's held-out set, {demo_photos}" in out  # the data it was trained with, not a default
    assert out.count('using ') == 1 and '(ema weights, batch 2)' in out
    assert 'note: FID and KID from 3 images only check the machinery' in out
    saved = json.loads((tmp_path / 'run' / 'eval' / 'results.json').read_text())
    assert saved['note'].startswith('note: FID and KID from 3 images')
