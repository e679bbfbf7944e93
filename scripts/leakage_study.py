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

from diffusion.demo.studies import Reference, parse_study_args, sample, train, train_config

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger('leakage_study')

FORMS = {
    'sdxl_summed': {'model.backbone.conditioning': 'sdxl_summed', 'model.use_time_ids': 'true'},
    'disentangled': {'model.backbone.conditioning': 'disentangled', 'train_loader.control_dropout': '0.1'},
}


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
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', default=str(REPO / 'data/studies/catalog-mixed'),
                        help='MDS dataset of images (train/ + eval/) whose sizes vary (several sources)')
    parser.add_argument('--reference', default=None, help='MDS dataset of FID/KID reference images (default: --data)')
    parser.add_argument('--out', default=str(REPO / 'outputs/studies/leakage'))
    parser.add_argument('--forms', nargs='+', default=list(FORMS), choices=list(FORMS))
    parser.add_argument('--resolution', type=int, default=64)
    parser.add_argument('--steps', type=int, default=600, help='training batches per model')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--num-prompts', type=int, default=16, help='prompts of the leakage measurement')
    return parse_study_args(parser, argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
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
