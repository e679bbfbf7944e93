"""`make demo`: the whole CommonCanvas pipeline, small, on real openly licensed data, on a CPU.

Steps (each is one of the repository's own commands, run as a user would; a finished step is skipped when the
demo is run again, `--force` redoes everything):

1. catalog     convert/commoncatalog_mini.py    CC images from OpenMoji, Twemoji, OpenClipart -> MDS + attribution
2. captions    convert/caption.py               needs a captioner checkpoint (BLIP-2); none installs offline, so
                                                 this step says so and is skipped unless --captioner is given
3. autoencoder run.py yamls/autoencoder-mini.yaml our own small VAE, exported in diffusers format
4. latents     convert/precompute_latents.py    VAE latents + MiniLM text states, stored once
5. diffusion   run.py yamls/mini-s-catalog.yaml  mini CommonCanvas-S UNet trained on the precomputed latents
6. generate    run_generate.py                  PNGs, manifest, contact sheet
7. evaluate    run_eval.py                      FID / KID against the held-out split, over guidance scales
8. export      convert/export_diffusers.py      a diffusers StableDiffusionPipeline folder

Everything lands in `outputs/demo-*/` and `data/`; the end prints a summary with the numbers and the files to open.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def step(name: str, cmd: list[str], done: Path, force: bool, log_dir: Path) -> float:
    """Run one step unless its output exists; its output goes to the console and to a log file."""
    if done.exists() and not force:
        print(f'== {name}: already done ({done.relative_to(REPO)}), skipped', flush=True)
        return 0.0
    print(f'== {name}: {" ".join(cmd)}', flush=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_dir / f'{name}.log', 'w') as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false'))
        for line in proc.stdout:  # type: ignore[union-attr]
            log.write(line)
            if not line.startswith(('  warnings.warn', '  import pkg_resources')) and 'Warning' not in line:
                sys.stdout.write(line)
        if proc.wait() != 0:
            raise SystemExit(f'demo step {name!r} failed (exit {proc.returncode}); see {log_dir / (name + ".log")}')
    seconds = time.time() - start
    print(f'== {name}: done in {seconds:.0f} s', flush=True)
    return seconds


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--per-source', type=int, default=200, help='images per source in the mini catalog')
    parser.add_argument('--autoencoder-steps', type=int, default=300)
    parser.add_argument('--diffusion-steps', type=int, default=300)
    parser.add_argument('--captioner', default=None, help='an image-to-text model folder to telephone captions')
    parser.add_argument('--force', action='store_true', help='redo every step')
    args = parser.parse_args()

    data, out = REPO / 'data', REPO / 'outputs'
    catalog, captioned, latents = data / 'commoncatalog_mini', data / 'commoncatalog_mini_captioned', \
        data / 'commoncatalog_mini_latents'
    vae = out / 'demo-autoencoder' / 'autoencoder'
    run = out / 'demo-mini-s'
    logs = out / 'demo-logs'
    times = {}
    start = time.time()

    times['catalog'] = step('catalog', [
        PY, 'convert/commoncatalog_mini.py', '--out', str(catalog), '--license-set', 'commercial',
        '--max-per-source', str(args.per_source), '--size', '128', '--workers', '2'], catalog / 'report.json',
        args.force, logs)

    source = catalog
    if args.captioner:
        times['captions'] = step('captions', [
            PY, 'convert/caption.py', '--src', str(catalog), '--out', str(captioned), '--model', args.captioner,
            '--only-weak'], captioned / 'eval' / 'index.json', args.force, logs)
        source = captioned
    else:
        print('== captions: skipped. Telephoning needs a pretrained captioner (CommonCanvas used '
              'Salesforce/blip2-opt-2.7b); none installs offline here. With one on disk: make demo '
              'DEMO_ARGS="--captioner /path/to/blip2". The catalog keeps its own titles/annotations as captions.')

    times['autoencoder'] = step('autoencoder', [
        PY, 'run.py', 'yamls/autoencoder-mini.yaml', f'variables.data={source}',
        'variables.run_name=demo-autoencoder', f'max_duration={args.autoencoder_steps}ba'],
        vae / 'config.json', args.force, logs)

    times['latents'] = step('latents', [
        PY, 'convert/precompute_latents.py', '--src', str(source), '--out', str(latents), '--vae', str(vae),
        '--text-encoder', 'minilm', '--resolutions', '64'], latents / 'empty_caption.safetensors', args.force, logs)

    times['diffusion'] = step('diffusion', [
        PY, 'run.py', 'yamls/mini-s-catalog.yaml', f'variables.data={latents}', 'variables.run_name=demo-mini-s',
        f'variables.autoencoder={vae}', f'max_duration={args.diffusion_steps}ba'],
        run / 'checkpoints' / 'summary.json', args.force, logs)

    times['generate'] = step('generate', [
        PY, 'run_generate.py', 'yamls/generate/tiny-cpu.yaml', f'checkpoint={run}/checkpoints',
        f'out_dir={run}/generate'], run / 'generate' / 'contact_sheet.png', args.force, logs)

    times['evaluate'] = step('evaluate', [
        PY, 'run_eval.py', 'yamls/eval/tiny-cpu.yaml', f'checkpoint={run}/checkpoints', f'reference={source}',
        f'out_dir={run}/eval'], run / 'eval' / 'results.json', args.force, logs)

    times['export'] = step('export', [
        PY, 'convert/export_diffusers.py', '--checkpoint', f'{run}/checkpoints', '--out', f'{run}/pipeline'],
        run / 'pipeline' / 'model_index.json', args.force, logs)

    report = _read_json(catalog / 'report.json')
    scaling = _read_json(vae / 'scaling.json')
    summary = _read_json(run / 'checkpoints' / 'summary.json')
    evaluation = _read_json(run / 'eval' / 'results.json')
    print('\n================ demo summary ================')
    skipped = [k for k, v in times.items() if v == 0.0]
    print(f'total time: {time.time() - start:.0f} s  (per step, s: {json.dumps({k: round(v) for k, v in times.items()})})'
          + (f'; done earlier, skipped: {skipped} (--force redoes them)' if skipped else ''))
    if report:
        print(f'catalog: kept {report.get("kept")} images {report.get("splits")}, skipped '
              f'{report.get("skipped_by_reason")} -> {catalog} (licences and creators: attribution.csv)')
    if scaling:
        print(f'autoencoder: latent scaling factor {scaling.get("scaling_factor", 0):.4f} -> {vae}')
    for key in ('metrics/eval/ValidationLoss',):
        first, last = (summary.get('first') or {}).get(key), (summary.get('last') or {}).get(key)
        if first and last:
            print(f'diffusion: validation loss {first[1]:.4f} (batch {first[0]}) -> {last[1]:.4f} (batch {last[0]})')
    for row in evaluation.get('results', []):
        clip = row.get('clip_score')
        print(f"eval: guidance {row.get('guidance_scale')}: FID {row.get('fid', float('nan')):.1f}, "
              f"KID {row.get('kid_mean', float('nan')):.4f}, CLIP score "
              f"{'unavailable (no CLIP checkpoint)' if clip is None else f'{clip:.2f}'}")
    print(f'open: {run}/samples/ (grids during training), {run}/generate/contact_sheet.png, '
          f'{run}/eval/ (JSON + curve), {out}/demo-autoencoder/reconstructions/, {run}/pipeline/ (diffusers)')


if __name__ == '__main__':
    main()
