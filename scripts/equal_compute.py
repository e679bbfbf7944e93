"""Equal-compute study: the same CPU budget spent by MicroDiT unmasked, MicroDiT masked (0.75) + a short unmasked
finetune, and the UNet mini-S, scored by FID/KID on the held-out images (issue 14, "Equal-compute study").

    python scripts/equal_compute.py --budget 360                       # ~6 CPU-minutes of training per arm
    python scripts/equal_compute.py --budget 20 --eval-images 64 --out outputs/equal-compute-smoke   # smoke test

Arms (the demo's recipes on its precomputed 64 px Twemoji latents, 16x16x4):

* ``microdit-unmasked``: ``yamls/demo/microdit.yaml`` with the mask ratio 0 throughout;
* ``microdit-masked``: the same with 75 % of the patches masked, then unmasked for the last ``--finetune-share`` of
  the budget (``algorithms.mask_schedule``: ``[[0ba, 0.75], [<N>ba, 0.0]]``, MicroDiT's recipe in one run);
* ``unet``: ``yamls/demo/unet.yaml`` (the mini CommonCanvas-S UNet, DDPM).

Equal compute is measured, not typed in:

1. **Calibration.** In this process, each arm's model, optimizer and a real training batch are built from its YAML
   (as ``run.py`` builds them) and training steps (forward, loss, backward, gradient clipping as configured,
   optimizer step) are timed in interleaved rounds (the order reversed every round) as CPU time of this process
   (``time.process_time``, robust when other jobs share the cores) with ``--threads`` threads; medians are kept.
   The masked arm is timed at mask 0.75 and at 0.
2. **Budget -> steps.** ``--budget`` CPU seconds per arm become step counts: ``budget / t_step``; for the masked
   arm ``(1 - share) * budget / t_masked`` masked steps then ``share * budget / t_unmasked`` unmasked ones.
3. **Training** through ``run.py`` (as a user would), the arms side by side (``--sequential`` for one at a time),
   each with ``OMP_NUM_THREADS=--threads``; each run's own CPU time is measured (``resource`` of the child) and
   reported beside the calibrated budget (the run's figure also holds start-up, data loading and checkpointing).
4. **Scoring** of each run's last checkpoint (EMA weights when present) with the demo's evaluation functions
   (:mod:`diffusion.demo.evaluate`): one image per held-out caption, at each model's default sampler
   (``diffusion.samplers.sampling_defaults``; MicroDiT: EDM Heun, 30 steps, guidance 5; the UNet: the
   demo's DDIM, 20 steps, guidance 3) unless ``--sampler/--steps/--guidance`` are given, then FID and KID of their
   Inception features against the real held-out images' (cached in ``--features``).

Prints a table and, last, one JSON line with every figure.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

MASK = 0.75
ARMS = ('microdit-unmasked', 'microdit-masked', 'unet')
YAMLS = {'microdit-unmasked': 'yamls/demo/microdit.yaml', 'microdit-masked': 'yamls/demo/microdit.yaml',
         'unet': 'yamls/demo/unet.yaml'}


def parse_args(argv: Any = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--budget', type=float, default=360.0, help='training CPU seconds per arm')
    p.add_argument('--finetune-share', type=float, default=0.2,
                   help='share of the masked arm\'s budget spent on the unmasked finetune')
    p.add_argument('--data', default=None, help='precomputed latents (default: data/demo/latents if it exists, '
                   'else data/demo/latents-quick)')
    p.add_argument('--catalog', default='data/demo/catalog', help='the catalog with the held-out images')
    p.add_argument('--autoencoder', default=None, help='the latents\' autoencoder (default: the one named in '
                   '<data>/latents.json)')
    p.add_argument('--out', default='outputs/equal-compute', help='run folders, images and results.json')
    p.add_argument('--features', default=None, help='cache of the real images\' Inception features '
                   '(default: <out>/features)')
    p.add_argument('--threads', type=int, default=1, help='threads of the calibration and of each run')
    p.add_argument('--calib-rounds', type=int, default=3, help='interleaved calibration rounds')
    p.add_argument('--calib-steps', type=int, default=4, help='timed steps per arm and round')
    p.add_argument('--sequential', action='store_true', help='train the arms one after the other')
    p.add_argument('--eval-images', type=int, default=None, help='held-out images to score (default: all)')
    p.add_argument('--sampler', default=None, help='sampler for every arm (default: each model\'s)')
    p.add_argument('--steps', type=int, default=None, help='sampling steps for every arm (default: each model\'s)')
    p.add_argument('--guidance', type=float, default=None, help='guidance for every arm (default: each model\'s)')
    p.add_argument('--batch-size', type=int, default=32, help='generation batch size')
    p.add_argument('--eval-threads', type=int, default=2, help='threads for generation and scoring')
    p.add_argument('--kid-subsets', type=int, default=50)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--skip-train', action='store_true', help='score the runs already in --out')
    return p.parse_args(argv)


def _paths(args: argparse.Namespace) -> tuple[Path, Path]:
    data = Path(args.data) if args.data else next(
        (p for p in (REPO / 'data/demo/latents', REPO / 'data/demo/latents-quick') if (p / 'latents.json').exists()),
        REPO / 'data/demo/latents')
    if not (data / 'latents.json').exists():
        raise FileNotFoundError(f'{data} holds no precomputed latents (latents.json); run the demo\'s precompute '
                                'stage or pass --data')
    vae = Path(args.autoencoder) if args.autoencoder else Path(json.loads((data / 'latents.json').read_text())['vae'])
    if not vae.exists():
        raise FileNotFoundError(f'autoencoder {vae} not found; pass --autoencoder')
    return data, vae


def overrides(arm: str, data: Path, vae: Path, out: Path, steps: dict[str, int]) -> list[str]:
    """``run.py`` overrides of one arm: folders, length, and the mask schedule of the MicroDiT arms."""
    total = sum(steps.values())
    over = [f'variables.data={data}', f'variables.autoencoder={vae}', f'variables.out={out / arm}',
            f'run_name=equal-compute-{arm}', f'max_duration={total}ba', f'save_interval={total}ba',
            f'eval_interval={total}ba', 'eval_first=false', 'save_num_checkpoints_to_keep=1']
    if arm == 'microdit-unmasked':
        over.append('algorithms.mask_schedule.schedule=[[0ba, 0.0]]')
    elif arm == 'microdit-masked':
        over.append(f'algorithms.mask_schedule.schedule=[[0ba, {MASK}], [{steps["masked"]}ba, 0.0]]'
                    if steps['unmasked'] else f'algorithms.mask_schedule.schedule=[[0ba, {MASK}]]')
    return over


# ---------------------------------------------------------------------------------------------
# 1. Calibration: CPU seconds per training step, interleaved
# ---------------------------------------------------------------------------------------------
def calibrate(args: argparse.Namespace, data: Path, vae: Path) -> dict[str, float]:
    """Median CPU seconds per training step: ``microdit-unmasked``, ``microdit-masked`` (at 0.75), ``unet``."""
    import torch

    from diffusion.config import load_config
    from diffusion.builders import build_components
    torch.set_num_threads(args.threads)
    setups = {}
    for name, arm in (('microdit-unmasked', 'microdit-unmasked'), ('microdit-masked', 'microdit-masked'),
                      ('unet', 'unet')):
        cfg = load_config(REPO / YAMLS[arm], overrides(arm, data, vae, Path(args.out), {'masked': 1, 'unmasked': 1}))
        torch.manual_seed(0)
        parts = build_components(cfg, cfg.global_train_batch_size)
        loader = parts['train_dataloader']
        batch = next(iter(getattr(loader, 'dataloader', loader)))
        clip = (cfg.algorithms.get('gradient_clipping') or {}).get('clipping_threshold')
        model = parts['model'].train()
        if name != 'unet':
            model.backbone.mask_ratio = MASK if name == 'microdit-masked' else 0.0
        setups[name] = (model, parts['optimizers'], batch, clip)

    def step(model: Any, opt: Any, batch: dict[str, Any], clip: Any) -> None:
        opt.zero_grad(set_to_none=True)
        model.loss(model(batch), batch).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()

    for setup in setups.values():  # warm-up: allocator, first-call costs
        for _ in range(2):
            step(*setup)
    samples: dict[str, list[float]] = {k: [] for k in setups}
    order = list(setups)
    for rnd in range(args.calib_rounds):
        for name in (order if rnd % 2 == 0 else order[::-1]):
            for _ in range(args.calib_steps):
                t0 = time.process_time()
                step(*setups[name])
                samples[name].append(time.process_time() - t0)
    times = {k: statistics.median(v) for k, v in samples.items()}
    # the masked arm's unmasked finetune steps cost what the unmasked arm's do (same model, mask 0)
    times['microdit-masked-finetune'] = times['microdit-unmasked']
    return times


def budget_steps(budget: float, share: float, times: dict[str, float]) -> dict[str, dict[str, int]]:
    """Steps per arm (and phase) that spend ``budget`` CPU seconds at the calibrated step times."""
    return {
        'microdit-unmasked': {'masked': 0, 'unmasked': max(1, int(budget / times['microdit-unmasked']))},
        'microdit-masked': {'masked': max(1, int((1 - share) * budget / times['microdit-masked'])),
                            'unmasked': int(share * budget / times['microdit-masked-finetune'])},
        'unet': {'masked': 0, 'unmasked': max(1, int(budget / times['unet']))},
    }


# ---------------------------------------------------------------------------------------------
# 3. Training through run.py
# ---------------------------------------------------------------------------------------------
def train(args: argparse.Namespace, data: Path, vae: Path, steps: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Run each arm's ``run.py``; returns per arm the CPU seconds its process used, wall seconds and exit code."""
    out = Path(args.out)
    env = {**os.environ, 'OMP_NUM_THREADS': str(args.threads), 'MKL_NUM_THREADS': str(args.threads)}
    procs = {}
    runs: dict[str, Any] = {}
    for arm in ARMS:
        (out / arm).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, 'run.py', YAMLS[arm], *overrides(arm, data, vae, out, steps[arm])]
        log_file = (out / arm / 'train.log').open('w')
        logging.info('training %s: %s', arm, ' '.join(cmd))
        procs[arm] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT),
                      time.perf_counter(), log_file)
        if args.sequential:
            runs[arm] = _wait(arm, *procs.pop(arm))
    for arm, proc in procs.items():
        runs[arm] = _wait(arm, *proc)
    return runs


def _wait(arm: str, proc: subprocess.Popen, start: float, log_file: Any) -> dict[str, Any]:
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log_file.close()
    result = {'cpu_s': usage.ru_utime + usage.ru_stime, 'wall_s': time.perf_counter() - start,
              'returncode': proc.returncode}
    if proc.returncode:
        raise RuntimeError(f'{arm}: run.py exited with {proc.returncode}; see its train.log')
    logging.info('%s trained: %.0f CPU s, %.0f s wall', arm, result['cpu_s'], result['wall_s'])
    return result


# ---------------------------------------------------------------------------------------------
# 4. Scoring with the demo's evaluation functions
# ---------------------------------------------------------------------------------------------
def score(args: argparse.Namespace) -> dict[str, Any]:
    """FID/KID of each arm's last checkpoint on the held-out captions, against the real held-out images."""
    import torch

    from diffusion.checkpoints import checkpoints_by_batch
    from diffusion.demo.evaluate import fid_kid, generate, num_samples
    from diffusion.demo.probe import cached_features, inception_features, load_labeled
    from diffusion.evaluation.metrics import InceptionFeatures
    torch.set_num_threads(args.eval_threads)
    out = Path(args.out)
    catalog = str(REPO / args.catalog) if not Path(args.catalog).is_absolute() else args.catalog
    n_eval = num_samples(catalog, 'eval')
    held = load_labeled(catalog, 'eval', limit=args.eval_images, size=64,
                        stride=max(1, n_eval // (args.eval_images or n_eval)))
    extractor = InceptionFeatures()
    real = cached_features(Path(args.features or out / 'features') / 'eval.npz', held['keys'],
                           lambda: held['images'], extractor)
    scores = {}
    for arm in ARMS:
        ckpts = checkpoints_by_batch(out / arm / 'checkpoints')
        if not ckpts:
            raise FileNotFoundError(f'{out / arm}/checkpoints holds no checkpoint')
        batch, path = ckpts[-1]
        images, chosen = generate(path, held['captions'], out / arm / 'eval' / f'ba{batch}', args.sampler,
                                  args.steps, args.guidance, args.seed, args.batch_size)
        feats = inception_features(images, extractor=extractor)
        scores[arm] = {**fid_kid(real, feats, args.kid_subsets, seed=args.seed), 'batch': batch,
                       'num_generated': len(images), 'sampler': chosen['sampler'],
                       'sampling_steps': chosen['num_inference_steps'],
                       'guidance_scale': args.guidance if args.guidance is not None else chosen['guidance_scale']}
        logging.info('%s: FID %.2f KID %.4f', arm, scores[arm]['fid'], scores[arm]['kid_mean'])
    return {'n_reference': len(held['keys']), 'scores': scores}


def main(argv: Any = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    args = parse_args(argv)
    if not 0 <= args.finetune_share < 1:
        print('error: --finetune-share must be in [0, 1)', file=sys.stderr)
        return 2
    try:
        data, vae = _paths(args)
    except FileNotFoundError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / 'training.json'
    if args.skip_train:
        training = json.loads(state_file.read_text())
    else:
        times = calibrate(args, data, vae)
        steps = budget_steps(args.budget, args.finetune_share, times)
        logging.info('calibrated CPU s/step %s -> steps %s', {k: round(v, 4) for k, v in times.items()}, steps)
        runs = train(args, data, vae, steps)
        training = {'budget_cpu_s': args.budget, 'finetune_share': args.finetune_share, 'threads': args.threads,
                    'data': str(data), 'autoencoder': str(vae), 'step_cpu_s': times, 'steps': steps, 'runs': runs}
        state_file.write_text(json.dumps(training, indent=1) + '\n')
    result = {**training, **score(args)}
    times, steps = training['step_cpu_s'], training['steps']
    head = (f'{"arm":<18} {"steps (masked+unmasked)":>24} {"CPU s/step":>18} {"budget CPU s":>12} '
            f'{"run CPU s":>9} {"FID":>7} {"KID x1e3":>12}')
    print(head)
    print('-' * len(head))
    for arm in ARMS:
        s, sc, run = steps[arm], result['scores'][arm], training['runs'][arm]
        per = (f'{times["microdit-masked"]:.3f}/{times["microdit-masked-finetune"]:.3f}' if arm == 'microdit-masked'
               else f'{times[arm]:.3f}')
        spent = (s['masked'] * times['microdit-masked'] + s['unmasked'] * times['microdit-masked-finetune']
                 if arm == 'microdit-masked' else s['unmasked'] * times[arm])
        result['scores'][arm]['calibrated_cpu_s'] = spent
        count = f'{s["masked"]}+{s["unmasked"]}'
        print(f'{arm:<18} {count:>24} {per:>18} {spent:>12.0f} {run["cpu_s"]:>9.0f} '
              f'{sc["fid"]:>7.2f} {1e3 * sc["kid_mean"]:>6.2f} ± {1e3 * sc["kid_std"]:<4.2f}')
    print(f'FID/KID on {result["n_reference"]} held-out images; budget {training["budget_cpu_s"]:.0f} CPU s per arm '
          f'at {training["threads"]} thread(s)')
    (out / 'results.json').write_text(json.dumps(result, indent=1) + '\n')
    print(json.dumps(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
