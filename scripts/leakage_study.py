"""Leakage study: does control metadata change *what* is drawn? Summed (SDXL) vs disentangled conditioning.

Trains the same mini UNet twice for the same steps on the same data, once with SDXL's summed micro-conditioning
(``conditioning: sdxl_summed``) and once with the disentangled form (``conditioning: disentangled``, control
dropout 0.1). Then, for fixed prompts and seeds, it samples while varying only the control metadata (target size,
crop offset, original size) and measures how far the Inception features of each variant move from the default
variant, relative to how far two different seeds of the same prompt are apart (``leakage_rel``: 0 = the control
changes nothing, 1 = as much as a new seed). FID/KID of each model against the eval split complete the table.

    python scripts/leakage_study.py --data data/demo/catalog --steps 300 --out outputs/leakage

Berrada et al. 2024 (arXiv:2411.03177) report that the summed form leaks; this measures it on our own small runs.
The default autoencoder is the tiny random one of ``yamls/tiny-cpu.yaml``: pass ``--autoencoder`` (a folder
exported by ``yamls/autoencoder-mini.yaml``) for images whose FID means something.
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
                 overrides: dict[str, str], eval_batches: int = 8) -> Any:
    """``yamls/tiny-cpu.yaml`` at ``resolution`` on ``data`` for ``steps`` batches, without sample callbacks;
    validation loss on the first ``eval_batches`` eval batches (a fixed subset: the eval loader does not shuffle)."""
    from diffusion.config import load_config
    base = OmegaConf.to_container(OmegaConf.load(REPO / 'yamls/tiny-cpu.yaml'))
    base['callbacks'] = {'speed_monitor': {'window_size': 10}}
    over = {'variables.data': data, 'variables.resolution': str(resolution),
            'variables.run_name': out.name, 'model.backbone.sample_size': str(resolution // 4),
            'save_folder': str(out / 'checkpoints'), 'max_duration': f'{steps}ba', 'eval_interval': f'{steps}ba',
            'save_interval': f'{steps}ba', 'eval_first': 'false', 'console_log_interval': f'{max(1, steps // 5)}ba',
            'eval_subset_num_batches': str(eval_batches)}
    if autoencoder:
        over['model.autoencoder'] = json.dumps({'name': 'autoencoder_kl', 'pretrained': autoencoder})
    over.update(overrides)
    return load_config(base=base, overrides=[f'{k}={v}' for k, v in over.items()])


def train(cfg: Any) -> tuple[Any, float]:
    """Fit with a composer Trainer; returns the model (eval mode) and its final validation loss."""
    from diffusion.train import build_trainer
    trainer = build_trainer(cfg)
    trainer.fit()
    val = float(trainer.state.eval_metrics['eval']['ValidationLoss'].compute())
    model = trainer.state.model.eval()
    trainer.close()
    return model, val


def reference_set(data: str, n: int, size: int) -> tuple[list, list[str]]:
    """``n`` eval images (centre-cropped to ``size``) and their captions."""
    from diffusion.evaluation.evaluate import load_reference
    images, captions = load_reference(data, 'eval', n, size)
    return images, [str(c or '') for c in captions]


def fid_kid(metrics: Any, images: Sequence[Any]) -> dict[str, float]:
    scores = metrics.score(list(images))
    return {'fid': round(scores['fid'], 2), 'kid': round(scores['kid_mean'], 4)}


def sample(model: Any, prompts: Sequence[str], seeds: Sequence[int], resolution: int, steps: int, guidance: float,
           micro: Optional[dict[str, Any]] = None, batch: int = 8) -> list:
    """PIL images, one per (prompt, seed) pair, in order."""
    out = []
    for i in range(0, len(prompts), batch):
        out += model.generate(list(prompts[i:i + batch]), height=resolution, width=resolution,
                              num_inference_steps=steps, guidance_scale=guidance, seed=list(seeds[i:i + batch]),
                              micro_conditioning=micro, output_type='pil')
    return out


# =============================================================================================
# Leakage
# =============================================================================================


def control_variants(resolution: int) -> dict[str, dict[str, Any]]:
    """Control metadata to sample with: the default (whole picture at the output size) and changes of one kind."""
    r = resolution
    return {'default': {}, 'target x2': {'original_size': (2 * r, 2 * r), 'target_size': (2 * r, 2 * r)},
            'target /2': {'original_size': (r // 2, r // 2), 'target_size': (r // 2, r // 2)},
            'crop': {'original_size': (2 * r, 2 * r), 'crop_top_left': (r // 2, r // 2)}}


def leakage(model: Any, features: Any, prompts: Sequence[str], resolution: int, steps: int, guidance: float,
            seeds: Sequence[int] = (0, 1)) -> dict[str, Any]:
    """Feature distance between control variants of one (prompt, seed), relative to the distance between seeds."""
    from diffusion.evaluation.metrics import images_to_tensor
    pairs = [(p, s) for p in prompts for s in seeds]
    feats = {}
    for name, micro in control_variants(resolution).items():
        images = sample(model, [p for p, _ in pairs], [s for _, s in pairs], resolution, steps, guidance, micro)
        feats[name] = features(images_to_tensor(images)).double().reshape(len(prompts), len(seeds), -1)
    base = feats.pop('default')  # (P, S, 2048)
    seed_gap = (base[:, 0] - base[:, 1]).norm(dim=-1).mean()  # content scale: a different seed
    per = {name: float((f - base).norm(dim=-1).mean() / seed_gap) for name, f in feats.items()}
    return {'leakage_rel': round(sum(per.values()) / len(per), 4), 'by_variant': per,
            'seed_distance': round(float(seed_gap), 3)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from diffusion.evaluation.metrics import ImageMetrics
    out = Path(args.out)
    ref_images, captions = reference_set(args.data, args.num_eval, args.resolution)
    metrics = ImageMetrics(kid_subset_size=len(ref_images), kid_subsets=20, inception=args.inception)
    metrics.add_reference(ref_images)
    prompts = captions[:args.num_prompts]
    rows = {}
    for form, overrides in FORMS.items():
        start = time.time()
        cfg = train_config(args.data, args.resolution, args.steps, out / form, args.autoencoder, overrides,
                           args.eval_batches)
        model, val = train(cfg)
        row = {'val_loss': round(val, 4)}
        row.update(leakage(model, metrics.features, prompts, args.resolution, args.sample_steps, args.guidance))
        gen = sample(model, captions, range(len(captions)), args.resolution, args.sample_steps, args.guidance)
        row.update(fid_kid(metrics, gen))
        row['seconds'] = round(time.time() - start, 1)
        rows[form] = row
        log.info('%s: %s', form, row)
    return {'steps': args.steps, 'resolution': args.resolution, 'num_eval': len(ref_images),
            'num_prompts': len(prompts), 'rows': rows}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', default=str(REPO / 'data/demo/catalog'), help='MDS dataset (train/ + eval/)')
    parser.add_argument('--out', default=str(REPO / 'outputs/leakage'))
    parser.add_argument('--resolution', type=int, default=32)
    parser.add_argument('--steps', type=int, default=300, help='training batches per model')
    parser.add_argument('--num-eval', type=int, default=64, help='eval images for FID/KID')
    parser.add_argument('--eval-batches', type=int, default=8, help='validation-loss batches (fixed subset)')
    parser.add_argument('--num-prompts', type=int, default=8, help='prompts of the leakage measurement')
    parser.add_argument('--sample-steps', type=int, default=20)
    parser.add_argument('--guidance', type=float, default=3.0)
    parser.add_argument('--autoencoder', default=None, help='diffusers AutoencoderKL folder (default: tiny random)')
    parser.add_argument('--inception', default=None, help='TorchScript Inception (default: the packaged one)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    args = parse_args(argv)
    result = run(args)
    print(f'\n| conditioning | val loss | leakage (rel. to a new seed) | FID | KID | s |')
    print('| --- | --- | --- | --- | --- | --- |')
    for form, r in result['rows'].items():
        print(f'| {form} | {r["val_loss"]} | {r["leakage_rel"]} | {r["fid"]} | {r["kid"]} | {r["seconds"]} |')
    print(json.dumps(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
