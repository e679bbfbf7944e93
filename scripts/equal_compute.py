"""Equal-compute study: the project's compute-efficiency table. Each arm (a training recipe) gets the same CPU budget
on the demo's catalog and precomputed latents, and is scored by FID/KID on the held-out images.

    python scripts/equal_compute.py --budgets 360                  # every arm once, the 3 best with a second seed
    python scripts/equal_compute.py --budgets 360 1200             # ... and the 3 best at 1,200 CPU-s, two seeds
    python scripts/equal_compute.py --budgets 360 1200 --report    # the table of what is done, trains nothing
    python scripts/equal_compute.py --budgets 20 --arms unet-v microdit-edm --eval-images 64 --out outputs/ec-smoke

Arms (the demo's two recipes, yamls/demo/unet.yaml and yamls/demo/microdit.yaml, with one change each):

======================  ====================================================================================
``unet-eps``            the mini CommonCanvas-S UNet with SD2's own schedule: epsilon target, SNR > 0 at the end
``unet-v``              the demo's UNet: v target, zero terminal SNR, min-SNR-5 weighting
``unet-flow``           the UNet with flow matching (rectified flow, velocity target, logit-normal t)
``microdit-edm``        the mini MicroDiT (EDM), no masking
``microdit-edm-masked`` MicroDiT, 75 % of the patches masked, unmasked for the last ``--finetune-share``
``microdit-edm-tread``  MicroDiT with TREAD: half the tokens skip blocks 1-4 of 6 (``--tread-ratio``)
``microdit-flow``       MicroDiT with flow matching, no masking
``microdit-flow-tread`` MicroDiT with flow matching and TREAD
======================  ====================================================================================

Equal compute is measured, not typed in:

1. **Calibration.** In one child process (whose memory, every arm's model at once, goes back when it ends) each
   arm's model, optimizer and a real training batch are built from its config (as ``run.py`` builds them) and
   training steps (forward, loss, backward, clipping, optimizer step) are timed in interleaved rounds (order
   reversed every round) as CPU time of that process (``time.process_time``)
   with ``--threads`` threads; medians are kept (``<out>/calibration.json``, reused by later invocations;
   ``--calibration`` takes them from an earlier study instead, ``--import-runs`` its finished runs too).
2. **Budget -> steps.** A budget of B CPU seconds is ``B / t_step`` steps; the masked arm spends
   ``(1 - share) * B`` at its masked step time and ``share * B`` at the unmasked one.
3. **Training** through ``run.py`` (as a user would), ``--jobs`` runs at a time, each with ``OMP_NUM_THREADS =
   --threads``; each run's own CPU time (``resource`` usage of the child) is reported beside the calibrated budget
   (it also holds start-up, data loading, evaluation and checkpointing).
4. **Scoring** of each run's last checkpoint (EMA weights) with the demo's functions: one image per held-out caption
   at the demo's first-order samplers (DDPM: DDIM, EDM and flow: Euler), ``--steps`` steps, each ``--guidance``;
   FID (with a bootstrap interval over the images, :func:`diffusion.evaluation.metrics.fid_bootstrap`) and KID of
   their Inception features against the real held-out images'.

Runs: the first budget trains every arm (seed 0); the ``--top`` arms with the lowest FID there then get seeds
``1 .. --seeds - 1`` at that budget, and seeds ``0 .. --seeds - 1`` at every later budget. Every run keeps its folder
(``<out>/b<budget>/<arm>/s<seed>``, with ``config.yaml``, ``train.log``, ``run.json``, ``score.json``): an
interrupted study, run again, trains and scores only what is missing. Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger('equal_compute')

MASK = 0.75
UNET, MICRODIT = 'yamls/demo/unet.yaml', 'yamls/demo/microdit.yaml'
FLOW = {'name': 'flow_matching'}  # rectified flow, velocity target, logit-normal t (SD3's m=0, s=1), shift 1
SD2 = {'name': 'ddpm', 'prediction_type': 'epsilon', 'zero_terminal_snr': False, 'loss_weighting': 'uniform'}
# arm: (base YAML, noise schedule to put in place of the YAML's (None: keep it), mask, TREAD)
ARMS: dict[str, tuple[str, Optional[dict[str, Any]], bool, bool]] = {
    'unet-eps': (UNET, SD2, False, False),
    'unet-v': (UNET, None, False, False),
    'unet-flow': (UNET, FLOW, False, False),
    'microdit-edm': (MICRODIT, None, False, False),
    'microdit-edm-masked': (MICRODIT, None, True, False),
    'microdit-edm-tread': (MICRODIT, None, False, True),
    'microdit-flow': (MICRODIT, FLOW, False, False),
    'microdit-flow-tread': (MICRODIT, FLOW, False, True),
}
SAMPLERS = {'ddpm': 'ddim', 'edm': 'euler', 'flow_matching': 'euler'}  # the demo's first-order samplers


def parse_args(argv: Any = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--budgets', type=float, nargs='+', default=[360.0],
                   help='training CPU seconds per run; the first budget runs every arm')
    p.add_argument('--arms', nargs='+', choices=list(ARMS), default=list(ARMS))
    p.add_argument('--top', type=int, default=3, help='arms (best FID at the first budget) that get more seeds and '
                   'the later budgets')
    p.add_argument('--seeds', type=int, default=2, help='seeds of the top arms')
    p.add_argument('--finetune-share', type=float, default=0.2,
                   help="share of the masked arm's budget spent on the unmasked finetune")
    p.add_argument('--tread-ratio', type=float, default=0.5, help='share of the tokens TREAD routes')
    p.add_argument('--tread-range', type=int, nargs=2, default=[1, 5], metavar=('START', 'END'),
                   help='the blocks routed around (END excluded; the mini MicroDiT has 6)')
    p.add_argument('--data', default=None, help='precomputed latents (default: data/demo/latents if it exists, '
                   'else data/demo/latents-quick)')
    p.add_argument('--catalog', default='data/demo/catalog', help='the catalog with the held-out images')
    p.add_argument('--autoencoder', default=None, help="the latents' autoencoder (default: the one named in "
                   '<data>/latents.json)')
    p.add_argument('--out', default='outputs/equal-compute', help='run folders and results.json')
    p.add_argument('--features', default=None, help="cache of the real images' Inception features "
                   '(default: <out>/features)')
    p.add_argument('--threads', type=int, default=1, help='threads of the calibration and of each run')
    p.add_argument('--jobs', type=int, default=2, help='runs trained at a time')
    p.add_argument('--calibration', default=None, help='step times to reuse instead of calibrating: a '
                   "calibration.json or an earlier study's results JSON (its step_cpu_s), so that a later budget "
                   'is counted in the same CPU seconds as an earlier one')
    p.add_argument('--import-runs', default=None, help="an earlier study's results JSON: its runs (steps, CPU "
                   'time, scores) count as done where this study has no folder of its own for them, so that a later '
                   'budget extends it without training them again')
    p.add_argument('--calib-rounds', type=int, default=3, help='interleaved calibration rounds')
    p.add_argument('--calib-steps', type=int, default=4, help='timed steps per arm and round')
    p.add_argument('--eval-images', type=int, default=None, help='held-out images to score (default: all)')
    p.add_argument('--steps', type=int, default=10, help='sampling steps (the demo scores at 10)')
    p.add_argument('--guidance', type=float, nargs='+', default=[3.0], help='guidance scales to score at; the '
                   'table ranks by the first')
    p.add_argument('--resamples', type=int, default=200, help='bootstrap resamples of each FID')
    p.add_argument('--batch-size', type=int, default=32, help='generation batch size')
    p.add_argument('--eval-threads', type=int, default=2, help='threads for generation and scoring')
    p.add_argument('--kid-subsets', type=int, default=50)
    p.add_argument('--report', action='store_true', help='train and score nothing: the table of what is done')
    return p.parse_args(argv)


def _paths(args: argparse.Namespace) -> tuple[Path, Path]:
    data = Path(args.data) if args.data else next(
        (p for p in (REPO / 'data/demo/latents', REPO / 'data/demo/latents-quick') if (p / 'latents.json').exists()),
        REPO / 'data/demo/latents')
    if not (data / 'latents.json').exists():
        raise FileNotFoundError(f"{data} holds no precomputed latents (latents.json); run the demo's precompute "
                                'stage or pass --data')
    vae = Path(args.autoencoder) if args.autoencoder else Path(json.loads((data / 'latents.json').read_text())['vae'])
    if not vae.exists():
        raise FileNotFoundError(f'autoencoder {vae} not found; pass --autoencoder')
    return data, vae


# ---------------------------------------------------------------------------------------------
# Configs: the base YAML with the arm's change, written beside the run
# ---------------------------------------------------------------------------------------------
def arm_config(arm: str, args: argparse.Namespace, steps: Optional[dict[str, int]] = None) -> Any:
    """The arm's config (unresolved ``DictConfig``): its base YAML with the schedule, mask and TREAD changes, and,
    with ``steps``, the mask schedule's switch to 0 after the masked steps."""
    from omegaconf import OmegaConf

    from diffusion.config import load_yaml
    base, schedule, masked, tread = ARMS[arm]
    cfg = load_yaml(REPO / base)
    if schedule is not None:
        cfg.model.noise_schedule = OmegaConf.create(schedule)
    if base == MICRODIT:
        cfg.model.backbone.mask_ratio = MASK if masked else 0.0
        if masked and steps is not None:
            cfg.algorithms.mask_schedule.schedule = ([['0ba', MASK], [f'{steps["masked"]}ba', 0.0]]
                                                     if steps['unmasked'] else [['0ba', MASK]])
        elif not masked:
            cfg.algorithms.pop('mask_schedule')
        if tread:
            start, end = args.tread_range
            cfg.model.backbone.tread = {'ratio': args.tread_ratio, 'start': start, 'end': end}
    return cfg


def run_overrides(data: Path, vae: Path, folder: Path, arm: str, seed: int, total: int) -> list[str]:
    """``run.py`` overrides of one run: folders, seed, length, one checkpoint at the end."""
    return [f'variables.data={data}', f'variables.autoencoder={vae}', f'variables.out={folder}',
            f'run_name=ec-{arm}-s{seed}', f'seed={17 + seed}', f'max_duration={total}ba', f'save_interval={total}ba',
            f'eval_interval={total}ba', 'eval_first=false', 'save_num_checkpoints_to_keep=1']


# ---------------------------------------------------------------------------------------------
# 1. Calibration: CPU seconds per training step, interleaved
# ---------------------------------------------------------------------------------------------
def calibrate(args: argparse.Namespace, data: Path, vae: Path, arms: list[str]) -> dict[str, float]:
    """Median CPU seconds per training step of each arm (the masked arm at 0.75 as ``<arm>``, at 0 as
    ``<arm>:finetune``)."""
    from diffusion.config import load_config
    configs = {arm: load_config(base=arm_config(arm, args), overrides=run_overrides(
        data, vae, Path(args.out) / 'calib', arm, 0, 1)) for arm in arms}  # a bad one fails before any model is built
    import torch

    from diffusion.builders import build_components
    torch.set_num_threads(args.threads)
    setups = {}
    for arm, cfg in configs.items():
        torch.manual_seed(0)
        parts = build_components(cfg, cfg.global_train_batch_size)
        loader = parts['train_dataloader']
        batch = next(iter(getattr(loader, 'dataloader', loader)))
        clip = (cfg.algorithms.get('gradient_clipping') or {}).get('clipping_threshold')
        model = parts['model'].train()
        setups[arm] = (model, parts['optimizers'], batch, clip)
        if ARMS[arm][2]:  # the masked arm's finetune: the same model at mask 0
            setups[f'{arm}:finetune'] = setups[arm]

    def step(name: str) -> None:
        model, opt, batch, clip = setups[name]
        if ARMS[name.split(':')[0]][2]:
            model.backbone.mask_ratio = 0.0 if name.endswith(':finetune') else MASK
        opt.zero_grad(set_to_none=True)
        model.loss(model(batch), batch).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()

    for name in setups:  # warm-up: allocator, first-call costs
        for _ in range(2):
            step(name)
    samples: dict[str, list[float]] = {k: [] for k in setups}
    order = list(setups)
    for rnd in range(args.calib_rounds):
        for name in (order if rnd % 2 == 0 else order[::-1]):
            for _ in range(args.calib_steps):
                t0 = time.process_time()
                step(name)
                samples[name].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def calibrate_apart(args: argparse.Namespace, data: Path, vae: Path, arms: list[str]) -> dict[str, float]:
    """:func:`calibrate` in a spawned child process: the models it builds (several GB for all arms) leave with it
    instead of staying in this process's heap while the runs train and the scoring loads Inception."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:  # a failed child raises
        return pool.submit(calibrate, args, data, vae, arms).result()


def budget_steps(arm: str, budget: float, share: float, times: dict[str, float]) -> dict[str, int]:
    """Masked and unmasked steps that spend ``budget`` CPU seconds at the calibrated step times."""
    if ARMS[arm][2]:
        return {'masked': max(1, int((1 - share) * budget / times[arm])),
                'unmasked': int(share * budget / times[f'{arm}:finetune'])}
    return {'masked': 0, 'unmasked': max(1, int(budget / times[arm]))}


# ---------------------------------------------------------------------------------------------
# 2-3. Runs: planned, trained (resumable), scored
# ---------------------------------------------------------------------------------------------
def run_folder(args: argparse.Namespace, budget: float, arm: str, seed: int) -> Path:
    return Path(args.out) / f'b{budget:g}' / arm / f's{seed}'


def start_run(args: argparse.Namespace, data: Path, vae: Path, times: dict[str, float], budget: float, arm: str,
              seed: int) -> tuple[subprocess.Popen, dict[str, Any]]:
    from omegaconf import OmegaConf
    folder = run_folder(args, budget, arm, seed)
    folder.mkdir(parents=True, exist_ok=True)
    steps = budget_steps(arm, budget, args.finetune_share, times)
    OmegaConf.save(arm_config(arm, args, steps), folder / 'config.yaml')
    cmd = [sys.executable, 'run.py', str(folder / 'config.yaml'),
           *run_overrides(data, vae, folder, arm, seed, sum(steps.values()))]
    env = {**os.environ, 'OMP_NUM_THREADS': str(args.threads), 'MKL_NUM_THREADS': str(args.threads)}
    log.info('training %s seed %d at %g CPU s (%s steps)', arm, seed, budget, steps)
    with (folder / 'train.log').open('w') as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    calibrated = (steps['masked'] * times[arm] + steps['unmasked'] * times[f'{arm}:finetune'] if ARMS[arm][2]
                  else steps['unmasked'] * times[arm])
    return proc, {'arm': arm, 'seed': seed, 'budget_cpu_s': budget, 'steps': steps, 'calibrated_cpu_s': calibrated,
                  'start': time.perf_counter(), 'folder': str(folder)}


def import_runs(args: argparse.Namespace, path: Path) -> int:
    """Write ``run.json`` and ``score.json`` of every run recorded in an earlier study's results JSON whose folder
    holds neither (its record says ``imported_from``); returns how many."""
    count = 0
    for run in json.loads(path.read_text())['runs']:
        folder = run_folder(args, run['budget_cpu_s'], run['arm'], run['seed'])
        if (folder / 'run.json').exists() or (folder / 'score.json').exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        info = {k: v for k, v in run.items() if k != 'score'} | {'folder': str(folder), 'imported_from': str(path)}
        (folder / 'run.json').write_text(json.dumps(info, indent=1) + '\n')
        (folder / 'score.json').write_text(json.dumps(run['score'], indent=1) + '\n')
        count += 1
    return count


def train_all(args: argparse.Namespace, data: Path, vae: Path, times: dict[str, float],
              runs: list[tuple[float, str, int]]) -> None:
    """Train the runs not trained yet, ``--jobs`` at a time; each writes ``run.json`` when it ends well."""
    todo = [r for r in runs if not (run_folder(args, *r) / 'run.json').exists()]
    active: dict[int, tuple[subprocess.Popen, dict[str, Any]]] = {}
    while todo or active:
        while todo and len(active) < args.jobs:
            proc, info = start_run(args, data, vae, times, *todo.pop(0))
            active[proc.pid] = (proc, info)
        pid, status, usage = os.wait4(-1, 0)
        if pid not in active:
            continue
        proc, info = active.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        info.update(cpu_s=usage.ru_utime + usage.ru_stime, wall_s=time.perf_counter() - info.pop('start'),
                    returncode=code)
        if code:
            raise RuntimeError(f'{info["arm"]} seed {info["seed"]}: run.py exited with {code}; see '
                               f'{info["folder"]}/train.log')
        (Path(info['folder']) / 'run.json').write_text(json.dumps(info, indent=1) + '\n')
        log.info('%s seed %d trained: %.0f CPU s, %.0f s wall', info['arm'], info['seed'], info['cpu_s'],
                 info['wall_s'])


class Scorer:
    """The held-out images, their Inception features (cached) and the extractor, loaded once."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from diffusion.demo.evaluate import num_samples
        from diffusion.demo.probe import cached_features, load_labeled
        from diffusion.evaluation.metrics import InceptionFeatures
        torch.set_num_threads(args.eval_threads)
        self.args = args
        catalog = args.catalog if Path(args.catalog).is_absolute() else str(REPO / args.catalog)
        n_eval = num_samples(catalog, 'eval')
        self.held = load_labeled(catalog, 'eval', limit=args.eval_images, size=64,
                                 stride=max(1, n_eval // (args.eval_images or n_eval)))
        self.extractor = InceptionFeatures()
        self.real = cached_features(Path(args.features or Path(args.out) / 'features') / 'eval.npz',
                                    self.held['keys'], lambda: self.held['images'], self.extractor)

    def score(self, folder: Path) -> dict[str, Any]:
        """FID (with its bootstrap interval) and KID of the run's last checkpoint at each guidance scale."""
        from omegaconf import OmegaConf

        from diffusion.checkpoints import checkpoints_by_batch
        from diffusion.demo.evaluate import generate
        from diffusion.demo.probe import inception_features
        from diffusion.evaluation.metrics import fid_bootstrap, fid_kid
        args = self.args
        ckpts = checkpoints_by_batch(folder / 'checkpoints')
        if not ckpts:
            raise FileNotFoundError(f'{folder}/checkpoints holds no checkpoint')
        batch, path = ckpts[-1]
        sampler = SAMPLERS[OmegaConf.load(folder / 'config.yaml').model.noise_schedule.name]
        result: dict[str, Any] = {'batch': batch, 'sampler': sampler, 'sampling_steps': args.steps, 'guidance': {}}
        for g in args.guidance:
            images, _ = generate(path, self.held['captions'], folder / 'eval' / f'g{g:g}', sampler, args.steps, g,
                                 0, args.batch_size)
            feats = inception_features(images, extractor=self.extractor)
            result['guidance'][f'{g:g}'] = {**fid_kid(self.real, feats, args.kid_subsets, seed=0),
                                            **fid_bootstrap(self.real, feats, args.resamples, seed=0),
                                            'num_generated': len(images)}
        return result


def score_all(args: argparse.Namespace, runs: list[tuple[float, str, int]], scorer: list[Optional[Scorer]]) -> None:
    for run in runs:
        folder = run_folder(args, *run)
        if (folder / 'run.json').exists() and not (folder / 'score.json').exists():
            if scorer[0] is None:
                scorer[0] = Scorer(args)
            result = scorer[0].score(folder)
            (folder / 'score.json').write_text(json.dumps(result, indent=1) + '\n')
            first = result['guidance'][f'{args.guidance[0]:g}']
            log.info('%s seed %d at %g CPU s: FID %.1f [%.1f, %.1f] KID %.4f', run[1], run[2], run[0], first['fid'],
                     first['fid_low'], first['fid_high'], first['kid_mean'])


# ---------------------------------------------------------------------------------------------
# 4. The table
# ---------------------------------------------------------------------------------------------
def collect(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every finished and scored run under ``--out`` for the chosen budgets and arms."""
    rows = []
    for budget in args.budgets:
        for arm in args.arms:
            for seed in range(max(args.seeds, 1)):
                folder = run_folder(args, budget, arm, seed)
                if (folder / 'score.json').exists():
                    rows.append({**json.loads((folder / 'run.json').read_text()),
                                 'score': json.loads((folder / 'score.json').read_text())})
    return rows


def ranking(args: argparse.Namespace, rows: list[dict[str, Any]], budget: float) -> list[str]:
    """Arms at ``budget``, best first, by seed 0's FID at the first guidance scale."""
    g = f'{args.guidance[0]:g}'
    first = {r['arm']: r['score']['guidance'][g]['fid'] for r in rows if r['budget_cpu_s'] == budget
             and r['seed'] == 0}
    return sorted(first, key=first.get)


def table(args: argparse.Namespace, rows: list[dict[str, Any]], times: dict[str, float]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for budget in args.budgets:
        head = (f'{"arm":<20} {"seed":>4} {"steps":>11} {"CPU s/step":>13} {"budget":>7} {"run CPU s":>9} '
                + ' '.join(f'{"FID g" + g:>22} {"KIDx1e3":>8}' for g in (f'{x:g}' for x in args.guidance)))
        print(f'\nbudget {budget:g} CPU s per run, {args.threads} thread(s); FID [95 % bootstrap interval]')
        print(head)
        print('-' * len(head))
        order = ranking(args, rows, budget)
        for arm in order + [a for a in args.arms if a not in order]:
            for r in sorted((r for r in rows if r['arm'] == arm and r['budget_cpu_s'] == budget),
                            key=lambda r: r['seed']):
                per = (f'{times[arm]:.3f}/{times[arm + ":finetune"]:.3f}' if ARMS[arm][2] else f'{times[arm]:.3f}')
                steps = f'{r["steps"]["masked"]}+{r["steps"]["unmasked"]}' if ARMS[arm][2] else \
                    str(r['steps']['unmasked'])
                cells = ' '.join(f'{s["fid"]:>7.1f} [{s["fid_low"]:>5.1f},{s["fid_high"]:>6.1f}] '
                                 f'{1e3 * s["kid_mean"]:>8.1f}' for s in r['score']['guidance'].values())
                print(f'{arm:<20} {r["seed"]:>4} {steps:>11} {per:>13} {r["calibrated_cpu_s"]:>7.0f} '
                      f'{r["cpu_s"]:>9.0f} {cells}')
        g = f'{args.guidance[0]:g}'
        per_arm = {}
        for arm in order:
            fids = [r['score']['guidance'][g]['fid'] for r in rows if r['arm'] == arm and r['budget_cpu_s'] == budget]
            per_arm[arm] = {'fid_mean': statistics.fmean(fids), 'seeds': len(fids),
                            'fid_spread': max(fids) - min(fids)}
        summary[f'{budget:g}'] = {'ranking': order, 'by_arm': per_arm}
        if order:
            print(f'ranking at {budget:g} CPU s (seed 0, guidance {g}): {" < ".join(order)}')
            print('FID over seeds: ' + '; '.join(f'{a} {v["fid_mean"]:.1f} ({v["seeds"]} seed(s), spread '
                                                 f'{v["fid_spread"]:.1f})' for a, v in per_arm.items()))
    return summary


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
    calib_file = out / 'calibration.json'
    times = json.loads(calib_file.read_text()) if calib_file.exists() else {}
    if args.calibration:
        given = json.loads(Path(args.calibration).read_text())
        times.update(given.get('step_cpu_s', given))
        calib_file.write_text(json.dumps(times, indent=1) + '\n')
    if args.import_runs:
        log.info('imported %d run(s) of %s', import_runs(args, Path(args.import_runs)), args.import_runs)
    missing = [a for a in args.arms if a not in times]
    if missing and not args.report:
        times.update(calibrate_apart(args, data, vae, missing))
        calib_file.write_text(json.dumps(times, indent=1) + '\n')
        log.info('calibrated CPU s per step: %s', {k: round(v, 4) for k, v in times.items()})
    scorer: list[Optional[Scorer]] = [None]
    first = [(args.budgets[0], arm, 0) for arm in args.arms]
    if not args.report:
        train_all(args, data, vae, times, first)
        score_all(args, first, scorer)
    top = ranking(args, collect(args), args.budgets[0])[:args.top]
    more = sorted([(args.budgets[0], arm, s) for arm in top for s in range(1, args.seeds)]
                  + [(b, arm, s) for b in args.budgets[1:] for arm in top for s in range(args.seeds)],
                  key=lambda r: (r[2], r[0]))  # seed 0 of every budget first
    if not args.report:
        train_all(args, data, vae, times, more)
        score_all(args, more, scorer)
    rows = collect(args)
    summary = table(args, rows, times)
    result = {'budgets': args.budgets, 'threads': args.threads, 'jobs': args.jobs, 'data': str(data),
              'autoencoder': str(vae), 'finetune_share': args.finetune_share,
              'tread': {'ratio': args.tread_ratio, 'range': args.tread_range}, 'sampling_steps': args.steps,
              'guidance': args.guidance, 'step_cpu_s': times, 'summary': summary,
              'runs': [{k: r[k] for k in ('arm', 'seed', 'budget_cpu_s', 'steps', 'calibrated_cpu_s', 'cpu_s',
                                          'wall_s')} | {'score': r['score']} for r in rows]}
    (out / 'results.json').write_text(json.dumps(result, indent=1) + '\n')
    print(json.dumps(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
