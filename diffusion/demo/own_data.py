"""`make demo DEMO_ARGS="--data my_folder"`: the demo's learning route on your own captioned images.

The stages are the demo's, each one of the repository's own commands, with your folder in place of the emoji
catalog (``scripts/demo.py`` runs them; a finished stage is skipped when the demo runs again, ``--force`` redoes):

 1. convert      convert/images_to_mds.py        your folder (x.jpg + x.txt), manifest, tar shards or Hugging Face
                                                  datasets folder -> 64 px MDS, 15 % held out, --license/--creator
 2. autoencoder  run.py yamls/autoencoder-mini.yaml  the project's small VAE, trained on your images
 3. latents      convert/precompute_latents.py   its latents + MiniLM text states, stored once
 4. <model>      run.py yamls/demo/<model>.yaml   the demo's model (``--models``; by default microdit-flow, the
                                                  mini MicroDiT with flow matching) on those latents; samples the
                                                  held-out captions
 5. eval-<model> run_eval.py yamls/eval/tiny-cpu.yaml  FID/KID of its images for the held-out captions against the
                                                  held-out images themselves, at the demo's sampler and guidance
 6. export-<model>  python -m diffusion.export.native (MicroDiT) or convert/export_diffusers.py (unet: a diffusers
                                                  pipeline), + a model card naming the licences and creators given
                                                  at conversion, with attribution.csv beside it

Everything goes to outputs/<name>/ and data/<name>/ (under ``--root``, default the repository), ``<name>`` the
folder's name (``--name`` to choose).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from collections import Counter
from pathlib import Path
from typing import Callable

from diffusion.demo.recipes import DESCRIPTIONS, MODELS, QUICK_OVERRIDES, export_command, export_folder, steps_key

# Held-out captions the model's sample grid shows during training.
SAMPLE_PROMPTS = 4


def own_paths(args: argparse.Namespace) -> dict[str, Path]:
    """Where the own-data route writes: ``data/<name>/{mds,latents}``, ``outputs/<name>/`` under ``--root``."""
    name = args.name or re.sub(r'[^A-Za-z0-9_.-]+', '-', Path(args.data).resolve().name).strip('-.') or 'own'
    base = Path(args.root).resolve()
    return {'name': Path(name), 'mds': base / 'data' / name / 'mds', 'latents': base / 'data' / name / 'latents',
            'root': base / 'outputs' / name, 'logs': base / 'outputs' / name / 'logs'}


def held_out_captions(mds: Path, limit: int) -> list[str]:
    """The captions of the held-out (``eval``) images in conversion order, at most ``limit`` distinct ones."""
    captions: list[str] = []
    with open(mds / 'attribution.csv', encoding='utf-8') as f:
        eval_keys = [row['key'] for row in csv.DictReader(f) if row['split'] == 'eval']
    from streaming.base.format import reader_from_json
    index = json.loads((mds / 'eval' / 'index.json').read_text())
    by_key = {}
    for info in index['shards']:
        shard = reader_from_json(str(mds / 'eval'), None, info)
        for i in range(shard.samples):
            row = shard.get_item(i)
            by_key[row['key']] = row['caption']
    for key in eval_keys:
        if by_key.get(key) and by_key[key] not in captions:
            captions.append(by_key[key])
    return captions[:limit]


def write_own_model_card(folder: Path, mds: Path, name: str, args: argparse.Namespace, model: str) -> Path:
    """``<export>/README.md``: what was trained on what, the licences and creators of the images (as given at
    conversion, or stated per image), and ``attribution.csv`` (the dataset's own) copied beside it."""
    attribution = mds / 'attribution.csv'
    with open(attribution, encoding='utf-8') as f:
        rows = list(csv.DictReader(f))
    (folder / 'attribution.csv').write_bytes(attribution.read_bytes())
    licences = Counter(row['license'] for row in rows).most_common()
    creators = Counter(row['creator'] or '(not given)' for row in rows).most_common()
    lines = [f'# {name}: a small text-to-image model trained on its own images', '',
             f'{DESCRIPTIONS[model]}, with the project\'s own small autoencoder and the all-MiniLM-L6-v2 text encoder, '
             f'trained from scratch by `make demo DEMO_ARGS="--data {args.data} --models {model}"` on {len(rows)} '
             f'images ({getattr(args, steps_key(model))} batches of 16, {args.autoencoder_steps} autoencoder batches). '
             f'Open it with `python -m diffusion.app {folder}`.',
             '', '## Training data and licences', '', 'Images per licence (train and held-out splits):', '']
    lines += [f'- {licence}: {count}' for licence, count in licences]
    lines += ['', 'Images per creator:', '']
    lines += [f'- {creator}: {count}' for creator, count in creators[:20]]
    if len(creators) > 20:
        lines.append(f'- ... {len(creators) - 20} more creators: see attribution.csv')
    lines += ['', 'The creator, licence and source file of every image are in `attribution.csv` beside this file. '
              'Licences such as CC BY and CC BY-SA require this attribution to be kept with the model.', '']
    if any(licence == 'unknown' for licence, _ in licences):
        lines += ['Some images have no stated licence (`unknown`): convert with `--license` (and `--creator`) or '
                  'state them per image in `x.json` sidecars.', '']
    card = folder / 'README.md'
    card.write_text('\n'.join(lines), encoding='utf-8')
    return card


def own_data_stages(args: argparse.Namespace, repo: Path, py: str,
                    step: Callable[..., float]) -> dict[str, float]:
    """Run the own-data route; returns the seconds per stage (0 for a stage done earlier)."""
    paths = own_paths(args)
    name, mds, latents, root, logs = (str(paths['name']), paths['mds'], paths['latents'], paths['root'],
                                      paths['logs'])
    times: dict[str, float] = {}
    convert = [py, 'convert/images_to_mds.py', '--src', str(Path(args.data).resolve()), '--out', str(mds),
               '--size', '64', '--min-size', '32', '--eval-fraction', '0.15', '--workers', '2']
    convert += ['--license', args.license] if args.license else []
    convert += ['--creator', args.creator] if args.creator else []
    times['convert'] = step('convert', convert, mds / 'report.json', args.force, logs, mds)
    ae = root / 'autoencoder'
    times['autoencoder'] = step('autoencoder', [
        py, 'run.py', 'yamls/autoencoder-mini.yaml', f'variables.data={mds}', f'variables.run_name={name}-autoencoder',
        f'max_duration={args.autoencoder_steps}ba', f'eval_interval={max(1, args.autoencoder_steps // 2)}ba',
        f'save_folder={ae}/checkpoints', f'callbacks.reconstructions.folder={ae}/reconstructions',
        f'callbacks.export_autoencoder.folder={ae}/vae', f'model.disc_start={args.autoencoder_steps + 1}'],
        ae / 'vae' / 'config.json', args.force, logs, ae)
    times['latents'] = step('latents', [
        py, 'convert/precompute_latents.py', '--src', str(mds), '--out', str(latents), '--vae', str(ae / 'vae'),
        '--text-encoder', 'minilm', '--resolutions', '64'], latents / 'latents.json', args.force, logs, latents)
    prompts = held_out_captions(mds, SAMPLE_PROMPTS)
    for model in args.models:
        recipe, sampler, guidance = MODELS[model]
        run, steps = root / model, getattr(args, steps_key(model))
        every = max(1, steps // args.checkpoints)
        # A few hundred images and steps: the UNet keeps a constant lr after warm-up, as in the quick demo.
        times[model] = step(model, [
            py, 'run.py', recipe, f'variables.data={latents}', f'variables.out={run}',
            f'variables.autoencoder={ae / "vae"}', f'run_name={name}-{model}', f'max_duration={steps}ba',
            f'save_interval={every}ba', f'eval_interval={every}ba', *QUICK_OVERRIDES[model],
            f'callbacks.sample_images.prompts={json.dumps(prompts)}',
            f'callbacks.sample_images.num_inference_steps={args.sample_steps}'],
            run / 'checkpoints' / 'summary.json', args.force, logs, run)
        evaluation = run / 'eval'
        times[f'eval-{model}'] = step(f'eval-{model}', [
            py, 'run_eval.py', 'yamls/eval/tiny-cpu.yaml', f'checkpoint={run}/checkpoints', f'reference={mds}',
            'reference_split=eval', f'out_dir={evaluation}', f'sampler={sampler}', f'guidance_scales=[{guidance}]',
            f'num_inference_steps={args.sample_steps}'], evaluation / 'results.json', args.force, logs, evaluation)
        folder = export_folder(root, model)
        cmd, done = export_command(py, model, sampler, args.sample_steps, guidance)
        times[f'export-{model}'] = step(f'export-{model}', [
            *cmd, '--checkpoint', f'{run}/checkpoints', '--out', str(folder)], folder / done, args.force, logs, folder)
        write_own_model_card(folder, mds, name, args, model)
    return times


def own_data_summary(args: argparse.Namespace, repo: Path, times: dict[str, float], total: float) -> None:
    """The end of an own-data demo: time per stage, the held-out scores, where everything is."""
    paths = own_paths(args)
    root, mds = paths['root'], paths['mds']
    report = json.loads((mds / 'report.json').read_text())
    print('\n================ own-data demo summary ================')
    print(f'total time: {total:.0f} s (per stage, s: {json.dumps({k: round(v) for k, v in times.items()})})')
    print(f'data: {mds} (kept {report["kept"]}, splits {report["splits"]}, skipped {report["skipped"]})')
    prompt = (held_out_captions(mds, 1) or ['a photo'])[0].replace("'", '').replace('"', '')  # quoted below
    for model in args.models:
        results = json.loads((root / model / 'eval' / 'results.json').read_text())
        for row in results.get('results', []):
            scores = ', '.join(f'{k} {row[k]:.4g}' for k in ('fid', 'kid_mean')
                               if isinstance(row.get(k), (int, float)))
            print(f'{model}: held-out evaluation at guidance {row.get("guidance_scale")}: {scores} '
                  f'({results["reference"]["num_images"]} held-out images: with a handful the scores only check the '
                  'machinery)')
        folder = export_folder(root, model)
        print(f'{model}: samples {root / model}/samples; model {folder} (README.md: licences, attribution.csv)')
        print(f'try prompts: python -m diffusion.app {folder}')
        if model == 'unet':
            code = (f'from diffusion.export.to_diffusers import load_pipeline; p = load_pipeline(\'{folder}\'); '
                    f'p(\'{prompt}\', height=64, width=64).images[0].save(\'x.png\')')
        else:
            _, sampler, guidance = MODELS[model]
            code = (f'from diffusion.export.native import load_native; m = load_native(\'{folder}\'); '
                    f'm.generate([\'{prompt}\'], sampler=\'{sampler}\', num_inference_steps={args.sample_steps}, '
                    f'guidance_scale={guidance}, output_type=\'pil\')[0].save(\'x.png\')')
        print(f'in Python: python -c "{code}"')
