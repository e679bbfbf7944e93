"""Leakage study: does control metadata change *what* is drawn? Summed (SDXL) vs disentangled conditioning.

Trains the same mini UNet twice for the same steps on the same pixels (random crops and flips, so the crop and
flip controls vary), once with SDXL's summed micro-conditioning (``conditioning: sdxl_summed``: six size / crop
time ids and the pooled text added to the time embedding) and once with the disentangled form (``conditioning:
disentangled``: eight controls, noise-level gate, text through cross-attention only, control dropout 0.1). Then,
for fixed prompts and seeds, it samples while varying only the control metadata (original size, crop offset,
flip, target size) and measures how far the Inception features of each variant move from the default variant,
relative to how far two seeds of the same prompt are apart (0 = the control changes nothing, 1 = as much as a
new seed). Validation loss and FID/KID of each model against the held-out split complete the table.

The data must have controls that vary: a catalog of several sources of different sizes and aspect ratios, e.g.

    python convert/commoncatalog_mini.py --sources openclipart openmoji twemoji --max-per-source 1100 --size 96 \
        --eval-fraction 0.2 --out data/studies/catalog-mixed
    OMP_NUM_THREADS=1 python scripts/leakage_study.py --data data/studies/catalog-mixed \
        --autoencoder outputs/demo/autoencoder/vae --steps 600 --out outputs/studies/leakage

(the demo catalog, Twemoji only, has one size and square images: its controls carry no signal). Berrada et al.
2024 (arXiv:2411.03177) report that the summed form leaks; this measures it on our own small runs. Without
``--autoencoder`` the tiny random autoencoder of ``yamls/tiny-cpu.yaml`` is used (a smoke run only).
The last line printed is the result as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger('leakage_study')

FORMS = {
    'sdxl_summed': {'model.backbone.conditioning': 'sdxl_summed', 'model.use_time_ids': 'true'},
    'disentangled': {'model.backbone.conditioning': 'disentangled', 'train_loader.control_dropout': '0.1'},
}


# =============================================================================================
# Shared by scripts/transfer_study.py: train from the tiny config, sample, score
# =============================================================================================


def train_config(data: str, resolution: int, steps: int, out: Path, autoencoder: Optional[str],
                 overrides: dict[str, str], eval_batches: int = 8, batch_size: int = 16,
                 use_latents: bool = False, lr: float = 1e-3) -> Any:
    """``yamls/tiny-cpu.yaml`` at ``resolution`` on ``data`` for ``steps`` batches of ``batch_size``, without
    sample callbacks, with a cosine learning-rate decay to 0.1x (so the last weights are not a noisy constant-LR
    iterate); validation loss on the first ``eval_batches`` eval batches of 32 (a fixed subset: the eval loader
    does not shuffle). ``use_latents``: train on the dataset's precomputed ``latents_<resolution>`` column
    (centre crops) instead of encoding randomly cropped / flipped pixels at every step."""
    from diffusion.config import load_config
    base = OmegaConf.to_container(OmegaConf.load(REPO / 'yamls/tiny-cpu.yaml'))
    base['callbacks'] = {'speed_monitor': {'window_size': 10}}
    base['scheduler'] = {'name': 'cosine_with_warmup', 't_warmup': f'{min(20, max(1, steps // 10))}ba', 'alpha_f': 0.1}
    base['optimizer']['lr'] = lr
    over = {'variables.data': data, 'variables.resolution': str(resolution),
            'variables.run_name': out.name, 'model.backbone.sample_size': str(resolution // 4),
            'save_folder': str(out / 'checkpoints'), 'max_duration': f'{steps}ba', 'eval_interval': f'{steps}ba',
            'save_interval': f'{steps}ba', 'eval_first': 'false', 'console_log_interval': f'{max(1, steps // 10)}ba',
            'eval_subset_num_batches': str(eval_batches), 'global_train_batch_size': str(batch_size),
            'device_eval_batch_size': '32'}
    if use_latents:
        over.update({'train_loader.use_latents': 'true', 'eval_loader.use_latents': 'true',
                     'train_loader.random_flip': 'false', 'train_loader.crop': 'center'})
    if autoencoder:  # replaces the whole block (an override would merge `pretrained` into the tiny `config`)
        base['model']['autoencoder'] = {'name': 'autoencoder_kl', 'pretrained': str(autoencoder)}
    over.update(overrides)
    return load_config(base=base, overrides=[f'{k}={v}' for k, v in over.items()])


def train(cfg: Any) -> tuple[Any, float]:
    """Fit with a composer Trainer; returns the model (eval mode) and its final validation loss.

    A run whose last checkpoint (``save_folder/latest-rank0.pt``) is already at ``max_duration`` is not trained
    again: its full state is loaded and only the validation loss is computed.
    """
    from diffusion.training.train import build_trainer
    ckpt = Path(cfg.save_folder) / 'latest-rank0.pt'
    resumed = ckpt.exists() and not cfg.load_path
    if resumed:
        log.info('%s exists: loading it instead of training', ckpt)
        cfg.load_path, cfg.load_weights_only = str(ckpt), False
    trainer = build_trainer(cfg)  # loads load_path
    if resumed:
        trainer.eval()  # nothing left to fit (composer refuses a fit at max_duration)
    else:
        trainer.fit()
    val = float(trainer.state.eval_metrics['eval']['ValidationLoss'].compute())
    model = trainer.state.model.eval()
    trainer.close()
    return model, val


class Reference:
    """FID/KID reference of ``n`` held-out images at ``size`` px, Inception features computed on first use and
    cached in ``cache`` (so a rerun does not pay for them again)."""

    def __init__(self, data: str, n: Optional[int], size: int, cache: Path, inception: Optional[str] = None):
        from diffusion.evaluation.metrics import ImageMetrics
        self.data, self.size, self.cache = data, size, cache
        images, self.captions = reference_set(data, n, size)
        self.images = images
        self.metrics = ImageMetrics(kid_subset_size=min(len(images), 1000), kid_subsets=50, inception=inception)
        self._ready = False

    def __len__(self) -> int:
        return len(self.images)

    def score(self, generated: Sequence[Any]) -> dict[str, float]:
        if not self._ready:
            key = {'data': str(Path(self.data).resolve()), 'n': len(self.images), 'size': self.size}
            if self.cache.exists() and torch.load(self.cache)['key'] == key:
                self.metrics.kid.metric_state['real_features'].append(torch.load(self.cache)['features'])
            else:
                self.metrics.add_reference(self.images)
                feats = torch.cat(self.metrics.kid.metric_state['real_features'])
                self.cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save({'key': key, 'features': feats}, self.cache)
            self._ready = True
        return fid_kid(self.metrics, generated)


def reference_set(data: str, n: int, size: int) -> tuple[list, list[str]]:
    """``n`` eval images (centre-cropped to ``size``) and their captions."""
    from diffusion.evaluation.evaluate import load_reference
    images, captions = load_reference(data, 'eval', n, size)
    return images, [str(c or '') for c in captions]


def fid_kid(metrics: Any, images: Sequence[Any]) -> dict[str, float]:
    scores = metrics.score(list(images))
    return {'fid': round(scores['fid'], 2), 'kid': round(scores['kid_mean'], 4)}


def sample(model: Any, prompts: Sequence[str], seeds: Sequence[int], resolution: int, steps: int, guidance: float,
           micro: Optional[dict[str, Any]] = None, batch: int = 16) -> list:
    """PIL images, one per (prompt, seed) pair, in order (DDIM, text guidance only: the control is the same in
    both branches)."""
    out = []
    seeds = list(seeds)
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            out += model.generate(list(prompts[i:i + batch]), height=resolution, width=resolution, sampler='ddim',
                                  num_inference_steps=steps, guidance_scale=guidance, seed=seeds[i:i + batch],
                                  micro_conditioning=micro, output_type='pil')
    return out


def spread(items: Sequence[Any], n: int) -> list:
    """``n`` items evenly spaced over ``items`` (the eval split is in source order: take from every source)."""
    if n >= len(items):
        return list(items)
    return [items[round(i * len(items) / n)] for i in range(n)]


# =============================================================================================
# Leakage
# =============================================================================================


def control_variants(resolution: int) -> dict[str, dict[str, Any]]:
    """Control metadata to sample with: the default (a whole ``r x r`` picture at the output size) and changes of
    one kind. All but ``target 2r`` are values a multi-source catalog shows in training (square sources of
    another size; wide sources cropped at the left or the right, in the resized image; a mirrored sample);
    ``target 2r`` asks for a size never trained at (as SDXL's size conditioning would be asked)."""
    r = resolution
    return {'default': {},
            'original 1.5r': {'original_size': (3 * r // 2, 3 * r // 2)},
            'wide, left crop': {'original_size': (r, 2 * r), 'crop_top_left': (0, 0)},
            'wide, right crop': {'original_size': (r, 2 * r), 'crop_top_left': (0, r)},
            'flip': {'flip': 1},
            'target 2r': {'original_size': (2 * r, 2 * r), 'target_size': (2 * r, 2 * r)}}


def leakage(model: Any, features: Any, prompts: Sequence[str], resolution: int, steps: int, guidance: float,
            seeds: Sequence[int] = (0, 1)) -> dict[str, Any]:
    """Inception-feature distance between each control variant and the default one for the same (prompt, seed),
    relative to the mean distance between two seeds of the same prompt under the default controls
    (0: the control changes nothing; 1: it changes the picture as much as a new seed)."""
    from diffusion.evaluation.metrics import images_to_tensor
    pairs = [(p, s) for p in prompts for s in seeds]
    feats = {}
    for name, micro in control_variants(resolution).items():
        images = sample(model, [p for p, _ in pairs], [s for _, s in pairs], resolution, steps, guidance, micro)
        feats[name] = features(images_to_tensor(images)).double().reshape(len(prompts), len(seeds), -1)
    base = feats.pop('default')  # (P, S, 2048)
    seed_gap = (base[:, 0] - base[:, 1]).norm(dim=-1).mean()  # content scale: a different seed
    per = {name: round(float((f - base).norm(dim=-1).mean() / seed_gap), 4) for name, f in feats.items()}
    # The mean leaves out `flip`: SDXL's six time ids (the summed baseline) carry no flip, so only the
    # disentangled form sees it.
    shared = [v for k, v in per.items() if k != 'flip']
    return {'leakage_rel': round(sum(shared) / len(shared), 4), 'by_variant': per,
            'seed_distance': round(float(seed_gap), 3)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    ref = Reference(args.reference or args.data, args.num_eval, args.resolution, out / 'reference_features.pt',
                    args.inception)
    prompts = spread(ref.captions, args.num_prompts)
    rows, models = {}, {}

    def save() -> None:
        (out / 'partial.json').write_text(json.dumps(rows, indent=1))

    # Train every form first (cheap to compare by validation loss), then the leakage samples, then FID/KID.
    for form in args.forms:
        start = time.time()
        cfg = train_config(args.data, args.resolution, args.steps, out / form, args.autoencoder, FORMS[form],
                           args.eval_batches, args.batch_size)
        models[form], val = train(cfg)
        rows[form] = {'val_loss': round(val, 4), 'train_seconds': round(time.time() - start, 1)}
        save()
    for form in args.forms:
        rows[form].update(leakage(models[form], ref.metrics.features, prompts, args.resolution, args.sample_steps,
                                  args.guidance))
        log.info('%s: %s', form, rows[form])
        save()
    if args.num_eval != 0:
        for form in args.forms:
            start = time.time()
            gen = sample(models[form], ref.captions, range(len(ref)), args.resolution, args.sample_steps,
                         args.guidance)
            rows[form].update(ref.score(gen))
            rows[form]['fid_seconds'] = round(time.time() - start, 1)
            log.info('%s: %s', form, rows[form])
            save()
    return {'data': args.data, 'steps': args.steps, 'batch_size': args.batch_size, 'resolution': args.resolution,
            'autoencoder': args.autoencoder, 'num_eval': len(ref) if args.num_eval != 0 else 0,
            'num_prompts': len(prompts), 'sample_steps': args.sample_steps, 'guidance': args.guidance, 'rows': rows}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', default=str(REPO / 'data/studies/catalog-mixed'),
                        help='MDS dataset of images (train/ + eval/) whose sizes vary (several sources)')
    parser.add_argument('--reference', default=None, help='MDS dataset of FID/KID reference images (default: --data)')
    parser.add_argument('--out', default=str(REPO / 'outputs/studies/leakage'))
    parser.add_argument('--forms', nargs='+', default=list(FORMS), choices=list(FORMS))
    parser.add_argument('--resolution', type=int, default=64)
    parser.add_argument('--steps', type=int, default=600, help='training batches per model')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--num-eval', type=int, default=None,
                        help='held-out images for FID/KID (default: all; 0: no FID/KID)')
    parser.add_argument('--eval-batches', type=int, default=8, help='validation-loss batches of 32 (fixed subset)')
    parser.add_argument('--num-prompts', type=int, default=16, help='prompts of the leakage measurement')
    parser.add_argument('--sample-steps', type=int, default=20)
    parser.add_argument('--guidance', type=float, default=3.0)
    parser.add_argument('--autoencoder', default=None, help='diffusers AutoencoderKL folder (default: tiny random)')
    parser.add_argument('--inception', default=None, help='TorchScript Inception (default: the packaged one)')
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    args = parse_args(argv)
    result = run(args)
    variants = list(next(iter(result['rows'].values()))['by_variant'])
    print(f'\n{result["steps"]} steps x batch {result["batch_size"]} at {result["resolution"]} px; FID/KID on '
          f'{result["num_eval"]} held-out images; leakage: {result["num_prompts"]} prompts x 2 seeds, relative to a '
          'new seed')
    print('| conditioning | val loss | leakage, mean (no flip) | ' + ' | '.join(variants) + ' | FID | KID | train s |')
    print('| --- ' * (len(variants) + 6) + '|')
    for form, r in result['rows'].items():
        cells = ' | '.join(f'{r["by_variant"][v]:.3f}' for v in variants)
        print(f'| {form} | {r["val_loss"]} | {r["leakage_rel"]:.3f} | {cells} | {r.get("fid", "-")} '
              f'| {r.get("kid", "-")} | {r["train_seconds"]} |')
    print(json.dumps(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
