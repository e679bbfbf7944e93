"""`make demo`: the whole CommonCanvas pipeline, small, on real openly licensed data, on a CPU, with a report.

Stages (each is one of the repository's own commands, run as a user would; a stage whose output is complete
is skipped when the demo runs again, `--force` redoes everything):

 1. catalog      convert/commoncatalog_mini.py   all of Twemoji (3.7k CC-BY emoji, 64 px) -> MDS + attribution,
                                                  with each emoji's category; 15 % held out
 2. captions     convert/caption.py              needs a captioner checkpoint (none installs offline): skipped
                                                  unless --captioner is given; the catalog's own names are captions
 3. autoencoder  run.py yamls/autoencoder-mini.yaml  the project's own small VAE (64 px -> 16x16x4)
 4. latents      convert/precompute_latents.py   VAE latents + MiniLM text states, stored once
 5. <model>      run.py yamls/demo/<model>.yaml   the model on the latents, every checkpoint kept; by default
                                                  microdit-flow (mini MicroDiT, flow matching: the recipe the
                                                  equal-compute study ranks first); with --models also unet
                                                  (mini CommonCanvas-S UNet) and microdit (EDM, deferred masking)
 6. eval-<model> python -m diffusion.demo.evaluate   FID/KID on the held-out images at the first and last
                                                  checkpoint, the category probe (--ceiling 1 adds the
                                                  autoencoder's own scores, --sweep-images N a guidance sweep)
 7. export       python -m diffusion.export.native (microdit-flow, microdit) or convert/export_diffusers.py
                                                  (unet): a model folder + model card (licences, attribution)
 8. report       diffusion/demo/report.py        outputs/demo/report.md + report.html + metrics.json

`--quick` runs the same stages with fewer steps and 128 held-out images, into outputs/demo-quick/ (and
data/demo/latents-quick).

`--data my_folder` runs the learning route on your own captioned images instead (x.jpg + x.txt; also a manifest,
tar shards or a Hugging Face datasets folder): convert (with `--license`/`--creator`), autoencoder, latents, the
`--models` (default microdit-flow), held-out evaluation, export with a model card; see diffusion/demo/own_data.py
and docs/own-data.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from diffusion.demo.recipes import (DEFAULT_MODELS, DESCRIPTIONS, MODELS, QUICK_OVERRIDES,
                                    export_command, export_folder, steps_key)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# What each variant spends its budget on (steps are batches of 16 images; every run keeps `checkpoints`
# evenly spaced checkpoints, the demo scores the first and the last). `ceiling` 1 also scores the held-out images
# through the autoencoder (its FID and probe: what a perfect latent generator would reach), `sweep_images` N > 0
# adds a guidance sweep on N captions; both are off by default (the report does not need them).
PROFILES = {
    'full': {'autoencoder_steps': 400, 'microdit_flow_steps': 1080, 'unet_steps': 1400, 'microdit_steps': 1200,
             'checkpoints': 6, 'eval_images': 0, 'probe_train': 300, 'ceiling': 0, 'sweep_images': 0,
             'sample_steps': 10},
    'quick': {'autoencoder_steps': 120, 'microdit_flow_steps': 240, 'unet_steps': 440, 'microdit_steps': 440,
              'checkpoints': 4, 'eval_images': 128, 'probe_train': 150, 'ceiling': 0, 'sweep_images': 0,
              'sample_steps': 10},
}
def step(name: str, cmd: list[str], done: Path, force: bool, log_dir: Path, clear: Path | None = None) -> float:
    """Run one stage unless its output exists; its output goes to the console and to a log file. ``force`` runs it
    again and first removes ``clear``, the folder the stage writes (so nothing of an earlier run, e.g. one of
    another profile, is resumed or mixed in: a converter would resume, a training run would keep its later
    checkpoints)."""
    if done.exists() and not force:
        print(f'== {name}: already done ({os.path.relpath(done, REPO)}), skipped', flush=True)
        return 0.0
    if force and clear is not None and clear.exists():
        shutil.rmtree(clear)
    print(f'== {name}: {" ".join(cmd)}', flush=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_dir / f'{name}.log', 'w') as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false',
                                         PYTHONUNBUFFERED='1'))  # progress shows as it happens
        for line in proc.stdout:  # type: ignore[union-attr]
            log.write(line)
            if not line.startswith(('  warnings.warn', '  import pkg_resources')) and 'Warning' not in line:
                sys.stdout.write(line)
        if proc.wait() != 0:
            raise SystemExit(f'demo stage {name!r} failed (exit {proc.returncode}); see {log_dir / (name + ".log")}')
    seconds = time.time() - start
    print(f'== {name}: done in {seconds:.0f} s', flush=True)
    return seconds


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument('--quick', action='store_true', help='fewer steps and images (under 6 min on 2 idle cores)')
    parser.add_argument('--models', nargs='+', choices=list(MODELS), default=None,
                        help=f'default: {" ".join(DEFAULT_MODELS)}')
    parser.add_argument('--captioner', default=None, help='an image-to-text model folder to telephone captions')
    parser.add_argument('--force', action='store_true', help='redo every stage')
    own = parser.add_argument_group('your own images (instead of the emoji catalog)')
    own.add_argument('--data', default=None, help='folder of captioned images (x.jpg + x.txt), manifest, tar shards '
                     'or Hugging Face datasets folder: runs convert, autoencoder, latents, the --models, eval, export '
                     'on it')
    own.add_argument('--root', type=Path, default=REPO, help='folder of its data/ and outputs/ (default: the repo)')
    own.add_argument('--name', default=None, help='name of its data/<name>/ and outputs/<name>/ (default: folder name)')
    own.add_argument('--license', default=None, help='licence of your images (e.g. CC-BY-4.0), for the model card')
    own.add_argument('--creator', default=None, help='creator of your images, for the model card and attribution')
    for key, value in PROFILES['full'].items():
        parser.add_argument(f'--{key.replace("_", "-")}', type=int, default=None,
                            help=f'override the profile (full: {value}, quick: {PROFILES["quick"][key]})')
    args = parser.parse_args(argv)
    for key, value in PROFILES['quick' if args.quick else 'full'].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.models is None:
        args.models = list(DEFAULT_MODELS)
    if args.data is None and (args.license or args.creator or args.name):
        parser.error('--license, --creator and --name go with --data (your own images)')
    if args.data is not None and not Path(args.data).exists():
        parser.error(f'--data {args.data} does not exist')
    return args


def train_stages(args: argparse.Namespace, paths: dict[str, Path], times: dict[str, float]) -> Path:
    """catalog -> (captions) -> autoencoder -> latents; returns the dataset the models train on."""
    catalog, root, logs = paths['catalog'], paths['root'], paths['logs']
    times['catalog'] = step('catalog', [
        PY, 'convert/commoncatalog_mini.py', '--out', str(catalog), '--sources', 'twemoji', '--license-set',
        'commercial', '--size', '64', '--eval-fraction', '0.15', '--workers', '2'], catalog / 'report.json',
        args.force, logs, catalog)
    source = catalog
    if args.captioner:
        captioned = catalog.with_name('catalog-captioned')
        times['captions'] = step('captions', [
            PY, 'convert/caption.py', '--src', str(catalog), '--out', str(captioned), '--model', args.captioner,
            '--only-weak'], captioned / 'eval' / 'index.json', args.force, logs, captioned)
        source = captioned
    else:
        print('== captions: skipped. Telephoning needs a pretrained captioner (CommonCanvas used '
              'Salesforce/blip2-opt-2.7b); none installs offline here. With one on disk: make demo '
              'DEMO_ARGS="--captioner /path/to/blip2". The catalog keeps its own emoji names as captions.')
    ae = root / 'autoencoder'
    times['autoencoder'] = step('autoencoder', [
        PY, 'run.py', 'yamls/autoencoder-mini.yaml', f'variables.data={source}', 'variables.run_name=demo-autoencoder',
        f'max_duration={args.autoencoder_steps}ba', f'eval_interval={args.autoencoder_steps // 2}ba',
        f'save_folder={ae}/checkpoints', f'callbacks.reconstructions.folder={ae}/reconstructions',
        f'callbacks.export_autoencoder.folder={ae}/vae',
        # a short run gains more from reconstruction steps than from the adversarial term: it stays off
        f'model.disc_start={args.autoencoder_steps + 1}'],
        ae / 'vae' / 'config.json', args.force, logs, ae)
    times['latents'] = step('latents', [
        PY, 'convert/precompute_latents.py', '--src', str(source), '--out', str(paths['latents']), '--vae',
        str(ae / 'vae'), '--text-encoder', 'minilm', '--resolutions', '64'],
        paths['latents'] / 'latents.json', args.force, logs,  # written last: an interrupted run is redone
        paths['latents'])
    for name in args.models:
        yaml, steps = MODELS[name][0], getattr(args, steps_key(name))
        every = max(1, steps // args.checkpoints)
        times[name] = step(name, [
            PY, 'run.py', yaml, f'variables.data={paths["latents"]}', f'variables.out={root / name}',
            f'variables.autoencoder={ae / "vae"}', f'max_duration={steps}ba',
            f'save_interval={every}ba', f'eval_interval={every}ba', *(QUICK_OVERRIDES[name] if args.quick else [])],
            root / name / 'checkpoints' / 'summary.json', args.force, logs, root / name)
    return source


def eval_stages(args: argparse.Namespace, paths: dict[str, Path], times: dict[str, float]) -> None:
    """Per model: FID/KID first vs last checkpoint and the probe (optionally the autoencoder ceiling and a guidance
    sweep); then its export with a model card."""
    root, logs = paths['root'], paths['logs']
    for name in args.models:
        cmd = [PY, '-m', 'diffusion.demo.evaluate', '--data', str(paths['catalog']), '--run', str(root / name),
               '--features', str(root / 'features'), '--sampler', MODELS[name][1], '--steps', str(args.sample_steps),
               '--guidance', str(MODELS[name][2]), '--probe-train', str(args.probe_train),
               '--sweep-images', str(args.sweep_images)]
        if args.eval_images:
            cmd += ['--num-reference', str(args.eval_images)]
        if not args.ceiling:
            cmd += ['--no-ceiling']
        times[f'eval-{name}'] = step(f'eval-{name}', cmd, root / name / 'eval' / 'metrics.json', args.force, logs,
                                     root / name / 'eval')
    from diffusion.demo.report import licence_counts, write_model_card
    attribution = paths['catalog'] / 'attribution.csv'
    for name in args.models:
        folder = export_folder(root, name)
        scored = _read_json(root / name / 'eval' / 'metrics.json')['settings']  # its page opens at them
        cmd, done = export_command(PY, name, scored['sampler'], scored['steps'], scored['guidance_scale'])
        times[f'export-{name}'] = step(f'export-{name}', [
            *cmd, '--checkpoint', f'{root}/{name}/checkpoints', '--out', str(folder)], folder / done, args.force, logs,
            folder)
        write_model_card(folder, attribution, licence_counts(attribution),
                         f'{DESCRIPTIONS[name]} from scratch on a CPU by `make demo` on 64 px Twemoji, with the '
                         "project's own small autoencoder and the all-MiniLM-L6-v2 text encoder. Open it with "
                         f'`python -m diffusion.app {os.path.relpath(folder, REPO)}`.')


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.data is not None:
        from diffusion.demo.own_data import own_data_stages, own_data_summary
        start = time.time()
        times = own_data_stages(args, REPO, PY, step)
        own_data_summary(args, REPO, times, time.time() - start)
        return
    variant = 'demo-quick' if args.quick else 'demo'
    root = REPO / 'outputs' / variant
    paths = {'root': root, 'logs': root / 'logs', 'catalog': REPO / 'data' / 'demo' / 'catalog',
             'latents': REPO / 'data' / 'demo' / ('latents-quick' if args.quick else 'latents')}
    times: dict[str, float] = {}
    start = time.time()
    train_stages(args, paths, times)
    eval_stages(args, paths, times)
    # Timings of earlier runs are kept for the stages this run skipped.
    earlier = _read_json(root / 'timings.json')
    merged = {k: (v if v > 0 or k not in earlier else earlier[k]) for k, v in times.items()}
    (root / 'timings.json').write_text(json.dumps(merged, indent=1))
    from diffusion.demo.report import build_report
    report = build_report(root, paths['catalog'], args.models, merged, variant)
    total = time.time() - start
    print('\n================ demo summary ================')
    skipped = [k for k, v in times.items() if v == 0.0]
    print(f'total time: {total:.0f} s (per stage, s: {json.dumps({k: round(v) for k, v in merged.items()})})'
          + (f'; done earlier, skipped now: {skipped} (--force redoes them)' if skipped else ''))
    for name, m in _read_json(root / 'metrics.json').items():
        print(f'{name}: FID {m["fid_first"]:.1f} -> {m["fid_last"]:.1f}, KID {m["kid_first"]:.4f} -> '
              f'{m["kid_last"]:.4f} ({m["n_reference"]} held-out images); probe balanced accuracy on generated '
              f'{m["probe_accuracy_generated"]:.3f} = {m["probe_accuracy_generated"] / m["chance"]:.1f}x chance '
              f'{m["chance"]:.3f} (real held-out: {m["probe_accuracy_real"]:.3f}'
              + (f'; through the autoencoder: probe {m["probe_accuracy_reconstructed"]:.3f}, FID '
                 f'{m["fid_reconstructed"]:.1f}' if 'probe_accuracy_reconstructed' in m else '') + ')'
              + (f'; probe fitted on reconstructions: generated {m["probe_ae_accuracy_generated"]:.3f}, real '
                 f'{m["probe_ae_accuracy_real"]:.3f}' if 'probe_ae_accuracy_generated' in m else ''))
    folder = os.path.relpath(export_folder(root, args.models[0]), REPO)
    print(f'open: {report} (or report.html beside it); model: {folder} (README.md: licences); try it: '
          f'python -m diffusion.app {folder}')


if __name__ == '__main__':
    main()
