"""The demo's evaluation of one trained model: FID/KID at its first and last checkpoint, the category probe, a sweep.

``python -m diffusion.demo.evaluate --data DATA --run outputs/demo/microdit-flow --features outputs/demo/features``

Prompts are the captions of the held-out (``eval``) split of the catalog, one image each, so FID/KID compare
the model's images for those captions with the real images that carry them (>= 500 in the demo). Every
image goes through the TF-FID Inception once; its pool features serve FID, KID and the linear category probe
(:mod:`diffusion.demo.probe`) alike, and the real images' features are cached (``--features``) for
every model of the demo. Generation is resumable (:func:`diffusion.evaluation.generate.generate_to_folder`).

Writes ``<run>/eval/metrics.json``: per checkpoint (first, last) FID, KID, probe balanced accuracy; the probe's
balanced accuracy on real held-out images and chance. Unless ``--no-ceiling``, also the same figures for the
held-out images passed through the model's own autoencoder (``decode(encode(x))``: what a latent generator that
reproduced the data's latents exactly would score, the ceiling the autoencoder leaves the diffusion model) and a
second probe's balanced accuracy (``probe_ae_accuracy``), fitted on the same real training images passed through
that autoencoder, so that it judges generated images (always decoder outputs) in the decoder's domain rather than
penalising its blur. With ``--sweep-images`` > 0, the guidance sweep (FID/KID per guidance scale, last
checkpoint) and its plot ``<run>/eval/guidance.png``.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from diffusion.demo.probe import CategoryProbe, cached_features, inception_features, load_labeled

log = logging.getLogger(__name__)

__all__ = ['fid_kid', 'generate', 'num_samples', 'reconstructions', 'main']

# Defaults for DDPM models (the demo's UNet); EDM models (MicroDiT) take the project's: heun, 30 steps, guidance 5.
DEMO_DDPM_SAMPLING = {'sampler': 'ddim', 'num_inference_steps': 20, 'guidance_scale': 3.0}


def fid_kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000,
            seed: int = 0) -> dict[str, float]:
    """FID and KID of two feature sets (:func:`diffusion.evaluation.metrics.fid_kid`, KID in float64); the demo
    reports KID's spread over the subsets as the sample standard deviation (``kid_std``)."""
    from diffusion.evaluation.metrics import fid_kid as metrics_fid_kid
    scores = metrics_fid_kid(real, fake, subsets, subset_size, seed)
    # torchmetrics gives the population standard deviation over the subsets: n / (n - 1) in the variance
    scores['kid_std'] = scores['kid_std'] * math.sqrt(subsets / (subsets - 1)) if subsets > 1 else float('nan')
    return scores


def reconstructions(autoencoder: Any, images: Sequence[Any], batch_size: int = 32) -> list[Any]:
    """``decode(encode(x))`` of RGB PIL images through a frozen :class:`~diffusion.models.autoencoders.Autoencoder`
    (posterior means), as RGB PIL images of the same size."""
    from PIL import Image

    from diffusion.data.dataset import image_tensor
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.stack([image_tensor(im, flip=False) for im in images[i:i + batch_size]])  # (B, 3, H, W)
            y = autoencoder.decode(autoencoder.encode(x)).clamp(-1, 1)
            pixels = ((y.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()  # (B, H, W, 3)
            out.extend(Image.fromarray(a) for a in pixels)
    return out


def _fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's weights (so cached features of its outputs follow a retrained module)."""
    import hashlib
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=2)
def _load(ckpt: Path) -> tuple[Any, Any]:
    """``load_model`` (EMA weights when present), once per checkpoint: the last one serves the autoencoder
    ceiling, its own images and every guidance of the sweep."""
    from diffusion.checkpoints import load_model
    return load_model(ckpt, weights='auto')


def generate(ckpt: Path, prompts: Sequence[str], out: Path, sampler: Optional[str] = None,
             steps: Optional[int] = None, guidance: Optional[float] = None, seed: int = 0,
             batch_size: int = 32) -> tuple[list[Any], dict[str, Any]]:
    """Images for ``prompts`` from one checkpoint (resumable folder ``out``), one each, at seed ``seed``.

    ``sampler``, ``steps`` and ``guidance`` left ``None`` take the model's defaults (DDPM models: the demo's,
    :data:`DEMO_DDPM_SAMPLING`). Returns the RGB PIL images in prompt order and the settings used
    (``sampler``, ``num_inference_steps``, ``guidance_scale``).
    """
    from PIL import Image

    from diffusion.evaluation.generate import default_size, generate_to_folder
    from diffusion.samplers import resolve_sampling
    model, info = _load(ckpt)
    size = default_size(model)
    chosen = resolve_sampling(model, sampler, steps, guidance, ddpm=DEMO_DDPM_SAMPLING)
    settings = {'checkpoint': info.checkpoint, 'weights': info.weights, 'seed': seed,
                'guidance_scale': float(chosen['guidance_scale']), 'guidance_rescale': 0.0, 'negative_prompt': None,
                'num_inference_steps': chosen['num_inference_steps'], 'sampler': chosen['sampler'],
                'height': size, 'width': size}
    with torch.inference_mode():
        entries = generate_to_folder(model, prompts, out, settings, batch_size)
    images = []
    for e in entries:
        with Image.open(out / e['file']) as im:
            images.append(im.convert('RGB'))
    return images, chosen


def _score(name: str, images: list[Any], real: np.ndarray, labels: Sequence[str], probe: CategoryProbe,
           extractor: Any, args: argparse.Namespace, probe_ae: Optional[CategoryProbe] = None) -> dict[str, Any]:
    feats = inception_features(images, extractor=extractor)
    row = {**fid_kid(real, feats, args.kid_subsets, seed=args.seed), 'num_generated': len(images)}
    if labels:
        score = probe.score(feats, labels)
        row['probe_accuracy'] = score.balanced_accuracy
        if probe_ae is not None:
            row['probe_ae_accuracy'] = probe_ae.score(feats, labels).balanced_accuracy
    log.info('%s: %s', name, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return row


def evaluate_run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything ``metrics.json`` holds for one run (see the module docstring)."""
    from diffusion.checkpoints import checkpoints_by_batch
    from diffusion.evaluation.metrics import InceptionFeatures
    run, out = Path(args.run), Path(args.run) / 'eval'
    ckpts = checkpoints_by_batch(run / 'checkpoints')
    if len(ckpts) < 2:
        raise FileNotFoundError(f'{run}/checkpoints holds {len(ckpts)} checkpoint(s); the demo compares the first '
                                'and the last (set save_interval below max_duration, keep all checkpoints)')
    extractor = InceptionFeatures()
    # Strided subsets: the splits are in key (code point) order, so the first N rows would be mostly one category.
    n_eval = num_samples(args.data, 'eval')
    held = load_labeled(args.data, 'eval', limit=args.num_reference, size=args.size,
                        stride=max(1, n_eval // (args.num_reference or n_eval)))
    train = load_labeled(args.data, 'train', limit=args.probe_train,
                         stride=max(1, num_samples(args.data, 'train') // args.probe_train), size=args.size)
    real = cached_features(Path(args.features) / 'eval.npz', held['keys'], lambda: held['images'], extractor)
    train_feats = cached_features(Path(args.features) / 'train.npz', train['keys'], lambda: train['images'],
                                  extractor)
    probe = CategoryProbe().fit(train_feats, train['categories'])
    real_score = probe.score(real, held['categories'])
    result: dict[str, Any] = {
        'chance': probe.chance, 'probe_classes': probe.classes, 'probe_accuracy_real': real_score.balanced_accuracy,
        'probe_train_images': len(train['keys']), 'probe_scored_images': real_score.num_scored,
        'n_reference': len(held['keys']), 'prompts': 'captions of the held-out split',
        'reference_keys': held['keys'],
        'settings': {'sampler': args.sampler, 'steps': args.steps, 'guidance_scale': args.guidance,
                     'seed': args.seed, 'size': args.size}, 'checkpoints': {}}
    # The ceiling the autoencoder leaves: the held-out images through decode(encode(x)), scored like generated ones.
    # And a second probe fitted on the same training images through the autoencoder: generated images can only be
    # decoder outputs, so this probe compares them with real images in the decoder's own (blurred) domain.
    autoencoder = _load(ckpts[-1][1])[0].autoencoder if args.ceiling else None
    probe_ae = None
    if autoencoder is not None:
        weights = _fingerprint(autoencoder)
        rec = cached_features(Path(args.features) / 'reconstructed.npz', [f'{k}@{weights}' for k in held['keys']],
                              lambda: reconstructions(autoencoder, held['images']), extractor)
        train_rec = cached_features(Path(args.features) / 'train_reconstructed.npz',
                                    [f'{k}@{weights}' for k in train['keys']],
                                    lambda: reconstructions(autoencoder, train['images']), extractor)
        probe_ae = CategoryProbe().fit(train_rec, train['categories'])
        result['reconstructed'] = {**fid_kid(real, rec, args.kid_subsets, seed=args.seed),
                                   'probe_accuracy': probe.score(rec, held['categories']).balanced_accuracy,
                                   'probe_ae_accuracy': probe_ae.score(rec, held['categories']).balanced_accuracy}
        result['probe_ae_accuracy_real'] = probe_ae.score(real, held['categories']).balanced_accuracy
        log.info('autoencoder reconstructions of the held-out images: %s', result['reconstructed'])
    prompts = held['captions']

    def images_of(ckpt: Path, chosen_prompts: Sequence[str], folder: Path, guidance: Optional[float]) -> list[Any]:
        images, chosen = generate(ckpt, chosen_prompts, folder, args.sampler, args.steps, guidance, args.seed,
                                  args.batch_size)
        args.sampler, args.steps = chosen['sampler'], chosen['num_inference_steps']  # recorded in metrics.json
        if args.guidance is None and guidance is None:  # the checkpoints' guidance: the model's default
            args.guidance = chosen['guidance_scale']
        return images

    for tag, (batch, path) in (('first', ckpts[0]), ('last', ckpts[-1])):
        images = images_of(path, prompts, out / f'ba{batch}', args.guidance)
        result['checkpoints'][tag] = {'batch': batch, 'images': str(out / f'ba{batch}'),
                                      **_score(f'batch {batch}', images, real, held['categories'], probe,
                                               extractor, args, probe_ae)}
    result['settings'].update(sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance)  # resolved
    if not args.sweep or args.sweep_images <= 0:
        return result
    sweep = []
    pick = list(range(0, len(prompts), max(1, len(prompts) // args.sweep_images)))[:args.sweep_images]
    for g in args.sweep:
        images = images_of(ckpts[-1][1], [prompts[i] for i in pick], out / f'sweep-g{g:g}', g)
        sweep.append({'guidance_scale': g, **_score(f'guidance {g:g}', images, real,
                                                    [held['categories'][i] for i in pick], probe, extractor, args)})
    result['sweep'] = sweep
    result['sweep_plot'] = str(_plot_sweep(sweep, out / 'guidance.png'))
    return result


def num_samples(data: str | Path, split: str) -> int:
    """Rows of one split of an MDS dataset (from its ``index.json``)."""
    return int(sum(s['samples'] for s in json.loads((Path(data) / split / 'index.json').read_text())['shards']))


def _plot_sweep(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """FID and probe accuracy against guidance scale (two axes), as PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    g = [r['guidance_scale'] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.plot(g, [r['fid'] for r in rows], 'o-', color='tab:blue')
    ax.set_xlabel('guidance scale')
    ax.set_ylabel('FID (lower is better)', color='tab:blue')
    if all('probe_accuracy' in r for r in rows):
        ax2 = ax.twinx()
        ax2.plot(g, [r['probe_accuracy'] for r in rows], 's--', color='tab:orange')
        ax2.set_ylabel('probe balanced accuracy', color='tab:orange')
    ax.set_title(f'guidance sweep, last checkpoint (n={rows[0]["num_generated"]})')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', required=True, help='the catalog (MDS with train/eval splits and a category column)')
    p.add_argument('--run', required=True, help='a training run folder holding checkpoints/ (all kept)')
    p.add_argument('--features', required=True, help='cache folder of real images\' Inception features')
    p.add_argument('--num-reference', type=int, default=None, help='held-out images/prompts (default: all)')
    p.add_argument('--probe-train', type=int, default=1600, help='real training images the probe is fitted on')
    p.add_argument('--size', type=int, default=64, help='side of real images (match the generated ones)')
    p.add_argument('--sampler', default=None, help='default: by noise schedule (EDM heun, DDPM ddim)')
    p.add_argument('--steps', type=int, default=None, help='default: by noise schedule (EDM 30, DDPM 20)')
    p.add_argument('--guidance', type=float, default=None, help='default: by noise schedule (EDM 5, DDPM 3)')
    p.add_argument('--sweep', type=float, nargs='*', default=[1.0, 3.0, 6.0])
    p.add_argument('--sweep-images', type=int, default=128, help='captions of the guidance sweep (0: no sweep)')
    p.add_argument('--no-ceiling', dest='ceiling', action='store_false',
                   help="skip the autoencoder's own scores (the held-out images through decode(encode(x)))")
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--kid-subsets', type=int, default=50)
    p.add_argument('--seed', type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    args = parse_args(argv)
    try:
        result = evaluate_run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    path = Path(args.run) / 'eval' / 'metrics.json'
    tmp = path.with_name(f'.metrics.json.tmp{os.getpid()}')
    tmp.write_text(json.dumps(result, indent=1) + '\n', encoding='utf-8')
    os.replace(tmp, path)
    first, last = result['checkpoints']['first'], result['checkpoints']['last']
    print(f'{args.run}: FID {first["fid"]:.1f} (batch {first["batch"]}) -> {last["fid"]:.1f} (batch {last["batch"]}), '
          f'KID {first["kid_mean"]:.4f} -> {last["kid_mean"]:.4f} on {result["n_reference"]} held-out images; '
          f'probe balanced accuracy generated {first["probe_accuracy"]:.3f} -> {last["probe_accuracy"]:.3f}, '
          f'real {result["probe_accuracy_real"]:.3f}, chance {result["chance"]:.3f} -> {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
