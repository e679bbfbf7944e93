"""Transfer study: continue a low-resolution model at a higher resolution, versus training there from scratch.

Stage 1 trains the mini UNet at ``--low`` px. Then, for the same number of steps at ``--high`` px, one model
continues from the stage-1 checkpoint (``load_path`` + ``load_weights_only``; with ``model.resolution`` set, the
load shifts the noise schedule by high / low by itself: DDPM SNR / shift^2, EDM P_mean + ln shift), one continues
without the shift (``model.base_resolution = high``, an ablation: its validation loss is under the same schedule
as the scratch run's, so those two losses compare like for like) and one starts from scratch. Validation loss (on
a fixed held-out subset, under each run's own schedule) and FID/KID against the held-out split at ``--high`` px
are reported for each.

With the demo's autoencoder (4x downsampling: 32 px -> 8x8 latents, 64 px -> 16x16) and precomputed latents at
both sizes (``convert/precompute_latents.py --resolutions 32 64``; training on them skips the encoder):

    python convert/precompute_latents.py --src data/demo/catalog --out data/studies/catalog-latents \\
        --vae outputs/demo/autoencoder/vae --resolutions 32 64
    OMP_NUM_THREADS=1 python scripts/transfer_study.py --data data/studies/catalog-latents --use-latents \\
        --autoencoder outputs/demo/autoencoder/vae --low 32 --high 64 --steps-low 800 --steps-high 400

Berrada et al. 2024 (arXiv:2411.03177) fine-tune 512 px models from 256 px ones; this checks the idea on our own
small runs. The last line printed is the result as JSON.
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

from diffusion.demo.studies import Reference, parse_study_args, sample, train, train_config

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger('transfer_study')


def stage(args: argparse.Namespace, name: str, resolution: int, steps: int, extra: dict[str, str]) -> tuple[Any, dict]:
    """Train one run; returns the model and a row (validation loss, shift used, seconds)."""
    start = time.time()
    overrides = {'model.resolution': str(resolution), 'model.backbone.conditioning': args.conditioning, **extra}
    cfg = train_config(args.data, resolution, steps, Path(args.out) / name, args.autoencoder, overrides,
                       args.eval_batches, args.batch_size, args.use_latents)
    model, val = train(cfg)
    row = {'steps': steps, 'val_loss': round(val, 4),
           'schedule_shift': float(model.noise_schedule.resolution_shift), 'seconds': round(time.time() - start, 1)}
    log.info('%s: %s', name, row)
    return model, row


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    ref = Reference(args.reference or args.data, args.num_eval, args.high, out / 'reference_features.pt',
                    args.inception)
    _, low_row = stage(args, 'low', args.low, args.steps_low, {})
    transfer = {'load_path': str(out / 'low' / 'checkpoints' / 'latest-rank0.pt'), 'load_weights_only': 'true'}
    arms = {'transfer': transfer, 'transfer, no shift': {**transfer, 'model.base_resolution': str(args.high)},
            'scratch': {}}
    rows, models = {f'stage 1 at {args.low} px': low_row}, {}

    def save() -> None:
        (out / 'partial.json').write_text(json.dumps(rows, indent=1))

    # Train every arm first (validation loss), then FID/KID of each.
    for name in args.arms:
        folder = name.replace(', ', '-').replace(' ', '-')
        extra = dict(arms[name])
        if (out / folder / 'checkpoints' / 'latest-rank0.pt').exists():
            extra.pop('load_path', None)  # finished before: reload it, not stage 1
        models[name], rows[f'{name} at {args.high} px'] = stage(args, folder, args.high, args.steps_high, extra)
        save()
    if args.num_eval != 0:
        for name in args.arms:
            gen = sample(models[name], ref.captions, range(len(ref)), args.high, args.sample_steps, args.guidance)
            rows[f'{name} at {args.high} px'].update(ref.score(gen))
            log.info('%s: %s', name, rows[f'{name} at {args.high} px'])
            save()
    return {'data': args.data, 'low': args.low, 'high': args.high, 'steps_low': args.steps_low,
            'steps_high': args.steps_high, 'batch_size': args.batch_size, 'autoencoder': args.autoencoder,
            'num_eval': len(ref) if args.num_eval != 0 else 0, 'sample_steps': args.sample_steps,
            'guidance': args.guidance, 'rows': rows}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', default=str(REPO / 'data/studies/catalog-latents'),
                        help='MDS dataset (train/ + eval/); with --use-latents it needs latents_<low> and '
                             'latents_<high> columns')
    parser.add_argument('--reference', default=None, help='MDS dataset of FID/KID reference images (default: --data)')
    parser.add_argument('--use-latents', action='store_true', help='train on precomputed latents (centre crops)')
    parser.add_argument('--out', default=str(REPO / 'outputs/studies/transfer'))
    parser.add_argument('--low', type=int, default=32, help='stage-1 image side (px)')
    parser.add_argument('--high', type=int, default=64, help='stage-2 image side (px)')
    parser.add_argument('--steps-low', type=int, default=800)
    parser.add_argument('--steps-high', type=int, default=400)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--arms', nargs='+', default=['transfer', 'scratch', 'transfer, no shift'],
                        choices=['transfer', 'transfer, no shift', 'scratch'])
    parser.add_argument('--conditioning', default='none', help='UNet conditioning form of all runs')
    return parse_study_args(parser, argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(f'\nbatch {result["batch_size"]}; FID/KID on {result["num_eval"]} held-out images at {result["high"]} px; '
          'validation loss under each run\'s own schedule')
    print('| run | steps | val loss | schedule shift | FID | KID | s |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for name, r in result['rows'].items():
        print(f'| {name} | {r["steps"]} | {r["val_loss"]} | {r["schedule_shift"]:g} | {r.get("fid", "-")} '
              f'| {r.get("kid", "-")} | {r["seconds"]} |')
    print(json.dumps(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
