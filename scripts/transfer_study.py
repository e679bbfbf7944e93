"""Transfer study: continue a low-resolution model at a higher resolution, versus training there from scratch.

Stage 1 trains the mini UNet at ``--low`` px. Then, for the same number of steps at ``--high`` px, one model
continues from the stage-1 checkpoint (``load_path`` + ``load_weights_only``; with ``model.resolution`` set, the
load shifts the noise schedule by high / low by itself: DDPM SNR / shift^2, EDM P_mean + ln shift) and one starts
from scratch. Validation loss and FID/KID (against the eval split at ``--high`` px) of both are reported; with
``--no-shift`` the transferred model keeps the unshifted schedule (``model.base_resolution = high``), an ablation.

    python scripts/transfer_study.py --data data/demo/catalog --low 32 --high 64 --steps-low 300 --steps-high 300

Berrada et al. 2024 (arXiv:2411.03177) fine-tune 512 px models from 256 px ones; this checks the idea on our own
small runs. With the tiny autoencoder (4x downsampling) ``--low 128 --high 256`` is 32 -> 64 px latents.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from leakage_study import REPO, fid_kid, reference_set, sample, train, train_config

log = logging.getLogger('transfer_study')


def stage(args: argparse.Namespace, name: str, resolution: int, steps: int, extra: dict[str, str]) -> tuple[Any, dict]:
    """Train one run; returns the model and a row (validation loss, shift used, seconds)."""
    start = time.time()
    overrides = {'model.resolution': str(resolution), 'model.backbone.conditioning': args.conditioning, **extra}
    cfg = train_config(args.data, resolution, steps, Path(args.out) / name, args.autoencoder, overrides,
                       args.eval_batches)
    model, val = train(cfg)
    row = {'val_loss': round(val, 4), 'schedule_shift': model.noise_schedule.resolution_shift,
           'seconds': round(time.time() - start, 1)}
    log.info('%s: %s', name, row)
    return model, row


def run(args: argparse.Namespace) -> dict[str, Any]:
    from diffusion.evaluation.metrics import ImageMetrics
    out = Path(args.out)
    ref_images, captions = reference_set(args.data, args.num_eval, args.high)
    metrics = ImageMetrics(kid_subset_size=len(ref_images), kid_subsets=20, inception=args.inception)
    metrics.add_reference(ref_images)
    _, low_row = stage(args, 'low', args.low, args.steps_low, {})
    transfer = {'load_path': str(out / 'low' / 'checkpoints' / 'latest-rank0.pt'), 'load_weights_only': 'true'}
    if args.no_shift:
        transfer['model.base_resolution'] = str(args.high)
    rows = {f'stage 1 at {args.low} px': low_row}
    for name, extra in (('transfer', transfer), ('scratch', {})):
        model, row = stage(args, name, args.high, args.steps_high, extra)
        gen = sample(model, captions, range(len(captions)), args.high, args.sample_steps, args.guidance)
        row.update(fid_kid(metrics, gen))
        rows[f'{name} at {args.high} px'] = row
    return {'low': args.low, 'high': args.high, 'steps_low': args.steps_low, 'steps_high': args.steps_high,
            'num_eval': len(ref_images), 'rows': rows}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', default=str(REPO / 'data/demo/catalog'), help='MDS dataset (train/ + eval/)')
    parser.add_argument('--out', default=str(REPO / 'outputs/transfer'))
    parser.add_argument('--low', type=int, default=32, help='stage-1 image side (px)')
    parser.add_argument('--high', type=int, default=64, help='stage-2 image side (px)')
    parser.add_argument('--steps-low', type=int, default=300)
    parser.add_argument('--steps-high', type=int, default=300)
    parser.add_argument('--conditioning', default='none', help='UNet conditioning form of all runs')
    parser.add_argument('--no-shift', action='store_true', help='transfer without the noise-schedule shift')
    parser.add_argument('--num-eval', type=int, default=64)
    parser.add_argument('--eval-batches', type=int, default=8, help='validation-loss batches (fixed subset)')
    parser.add_argument('--sample-steps', type=int, default=20)
    parser.add_argument('--guidance', type=float, default=3.0)
    parser.add_argument('--autoencoder', default=None, help='diffusers AutoencoderKL folder (default: tiny random)')
    parser.add_argument('--inception', default=None)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    args = parse_args(argv)
    result = run(args)
    print('\n| run | val loss | schedule shift | FID | KID | s |')
    print('| --- | --- | --- | --- | --- | --- |')
    for name, r in result['rows'].items():
        print(f'| {name} | {r["val_loss"]} | {r["schedule_shift"]:g} | {r.get("fid", "-")} | {r.get("kid", "-")} '
              f'| {r["seconds"]} |')
    print(json.dumps(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
