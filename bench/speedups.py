"""Training speed-ups that can act on a CPU, each measured off and on in one run, and the MFU they reach.

    python bench/speedups.py                      # mini-s UNet + microdit-mini, batch 16, 16x16x4 latents
    python bench/speedups.py --repeats 2 --steps 3 --no-compile     # a quick check

The step is the backbone's training step on a fixed batch of precomputed latents and text states (what a run on
``convert/precompute_latents.py`` output does per batch): noise at random timesteps, backbone forward, MSE,
backward, AdamW step. The frozen encoders are out of the step, as with precomputed latents.

Speed-ups measured (each against the plain configuration, and all kept ones together):

* ``sdpa``: torch's fused scaled-dot-product attention instead of diffusers' explicit matmul-softmax-matmul
  (UNet only: MicroDiT always uses SDPA);
* ``channels_last``: NHWC weights and inputs (composer's ``channels_last``; UNet only, it has convolutions);
* ``compile``: ``torch.compile`` (inductor) of the backbone (``algorithms.compile_backbone``);
* ``bf16_autocast``: CPU bf16 autocast of the backbone forward (``algorithms.cpu_bf16_autocast``);
* ``fused_adamw``: torch's AdamW with ``fused=True`` (``optimizer: {name: adamw, fused: true}``) instead of its
  default CPU path, a Python loop over the parameter tensors.

Speed-ups that cannot act on a CPU (low-precision GroupNorm/LayerNorm need GPU autocast, xformers needs CUDA,
FSDP needs NCCL) are not timed. Every configuration runs in interleaved blocks (order reversed every repeat), so
load from other processes hits all alike; images/s is the median over blocks, from wall-clock time and from this
process's CPU time (``time.process_time`` / threads: not charged for waiting on a busy core). A speed-up is kept
when its median ratio is > 1.02. ``cumulative`` is the all-kept configuration over plain, measured in the same
interleaved loop (not a product of separate ratios, which is printed beside it). MFU is the model FLOPs of the
step (counted once with ``torch.utils.flop_counter``) per second over the fp32 matmul peak measured in this run.
Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPEEDUPS = ('sdpa', 'channels_last', 'compile', 'bf16_autocast', 'fused_adamw')


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--latent-size', type=int, default=16)
    p.add_argument('--steps', type=int, default=5, help='timed steps per block')
    p.add_argument('--repeats', type=int, default=5, help='timed blocks per configuration')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per configuration first (compiles)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--no-compile', action='store_true', help='skip torch.compile (slow to compile when loaded)')
    p.add_argument('--no-microdit', action='store_true')
    return p.parse_args()


# =============================================================================================
# One configuration: a backbone with some speed-ups on, and its training step
# =============================================================================================
def build_backbone(kind: str, on: set[str], latent: int) -> torch.nn.Module:
    """A fresh backbone (same seed every time: same weights) with the speed-ups in ``on`` applied."""
    torch.manual_seed(0)
    if kind == 'unet':
        from diffusion.models.unet import build_unet
        model = build_unet('mini-s', sample_size=latent, cross_attention_dim=384,
                           attention='sdpa' if 'sdpa' in on else 'vanilla')
        if 'channels_last' in on:
            from composer.algorithms.channels_last import apply_channels_last
            apply_channels_last(model)
    else:
        from diffusion.models.microdit import build_microdit
        model = build_microdit('microdit-mini', cross_attention_dim=384, sample_size=latent, in_channels=4,
                               out_channels=4)
    if 'compile' in on:
        model.compile()
    return model.train()


def make_step(model: torch.nn.Module, on: set[str], batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """The training step of ``model`` on ``batch`` (a closure; the optimizer lives in it)."""
    # torch's default AdamW on CPU loops over the parameter tensors in Python; fused=True is one kernel
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused='fused_adamw' in on)
    x0 = batch['latents']
    if 'channels_last' in on:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    autocast = (lambda: torch.autocast('cpu', dtype=torch.bfloat16)) if 'bf16_autocast' in on \
        else contextlib.nullcontext
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
        alpha = (1 - t.float() / 1000).view(-1, 1, 1, 1)  # any fixed noising: the cost is the network's
        x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        with autocast():
            pred = model(x_t, t, text_hidden=batch['text_hidden'])
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def step_flops(kind: str, batch: dict[str, torch.Tensor], latent: int) -> int:
    """FLOPs of the plain step's forward + backward (the optimizer's few FLOPs per parameter left out)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = build_backbone(kind, {'sdpa'}, latent)
    counter = FlopCounterMode(display=False)
    x, t = batch['latents'], torch.full((batch['latents'].shape[0],), 500)
    # SDPA's math backend: the fused CPU kernels have no FLOP formula, so their attention would count as 0.
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(x, t, text_hidden=batch['text_hidden']).square().mean().backward()
    return int(counter.get_total_flops())


# =============================================================================================
# Timing
# =============================================================================================
def time_block(step: Callable[[], None], steps: int) -> tuple[float, float]:
    """Seconds per step over ``steps`` steps: (wall clock, process CPU time / threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    n = max(1, torch.get_num_threads())
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps / n


def measure(configs: dict[str, tuple[str, set[str]]], batch: dict[str, torch.Tensor], args: argparse.Namespace
            ) -> dict[str, dict[str, float]]:
    """Images/s (median over interleaved blocks) of each named configuration."""
    steps = {}
    for name, (kind, on) in configs.items():
        model = build_backbone(kind, on, args.latent_size)
        steps[name] = make_step(model, on, batch)
        start = time.perf_counter()
        for _ in range(args.warmup):
            steps[name]()
        print(f'  built {name}: warm-up {time.perf_counter() - start:.1f} s', flush=True)
    walls: dict[str, list[float]] = {n: [] for n in configs}
    cpus: dict[str, list[float]] = {n: [] for n in configs}
    order = list(configs)
    for r in range(args.repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            wall, cpu = time_block(steps[name], args.steps)
            walls[name].append(wall)
            cpus[name].append(cpu)
    bs = args.batch_size
    return {n: {'img_s': bs / statistics.median(walls[n]), 'img_s_cpu': bs / statistics.median(cpus[n]),
                'step_s': statistics.median(walls[n])} for n in configs}


# =============================================================================================
# Main
# =============================================================================================
def bench_backbone(kind: str, candidates: list[str], batch: dict[str, torch.Tensor], args: argparse.Namespace,
                   peak: float) -> dict[str, Any]:
    """Each candidate alone against plain, then all kept together against plain (a second interleaved loop)."""
    print(f'{kind}: each speed-up off and on', flush=True)
    single = measure({'plain': (kind, set()), **{s: (kind, {s}) for s in candidates}}, batch, args)
    plain = single['plain']['img_s']
    ratios = {s: single[s]['img_s'] / plain for s in candidates}
    kept = [s for s in candidates if ratios[s] > 1.02]
    print(f'{kind}: all kept ({", ".join(kept) or "none"}) against plain', flush=True)
    both = measure({'plain': (kind, set()), 'kept': (kind, set(kept))}, batch, args)
    flops = step_flops(kind, batch, args.latent_size)
    product = 1.0
    for s in kept:
        product *= ratios[s]
    return {'single': single, 'ratios': ratios, 'kept': kept, 'both': both, 'flops_per_step': flops,
            'cumulative': both['kept']['img_s'] / both['plain']['img_s'], 'product_of_kept': product,
            'mfu_plain': flops / both['plain']['step_s'] / peak, 'mfu_kept': flops / both['kept']['step_s'] / peak}


def print_table(kind: str, res: dict[str, Any]) -> None:
    print(f'\n{kind}: {res["flops_per_step"] / 1e9:.2f} GFLOP per step (forward + backward)')
    print(f'{"configuration":<16} {"img/s":>8} {"img/s cpu":>10} {"x plain":>8}  kept')
    for name, row in res['single'].items():
        ratio = row['img_s'] / res['single']['plain']['img_s']
        kept = 'yes' if name in res['kept'] else ('' if name == 'plain' else 'no')
        print(f'{name:<16} {row["img_s"]:8.2f} {row["img_s_cpu"]:10.2f} {ratio:8.2f}  {kept}')
    both = res['both']
    print(f'{"plain (again)":<16} {both["plain"]["img_s"]:8.2f} {both["plain"]["img_s_cpu"]:10.2f} {1.0:8.2f}')
    print(f'{"all kept":<16} {both["kept"]["img_s"]:8.2f} {both["kept"]["img_s_cpu"]:10.2f} '
          f'{res["cumulative"]:8.2f}  (product of single ratios {res["product_of_kept"]:.2f})')
    print(f'MFU vs measured fp32 matmul peak: plain {res["mfu_plain"]:.1%}, all kept {res["mfu_kept"]:.1%}')


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from diffusion.callbacks.mfu_monitor import measure_matmul_peak
    gen = torch.Generator().manual_seed(0)
    batch = {'latents': torch.randn(args.batch_size, 4, args.latent_size, args.latent_size, generator=gen),
             'text_hidden': torch.randn(args.batch_size, 77, 384, generator=gen)}
    peak = measure_matmul_peak(1.0)
    print(f'fp32 matmul peak (1024x1024, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s', flush=True)
    compile_ = [] if args.no_compile else ['compile']
    results = {'unet': bench_backbone('unet', ['sdpa', 'channels_last', *compile_, 'bf16_autocast', 'fused_adamw'],
                                      batch, args,
                                      peak)}
    if not args.no_microdit:
        results['microdit'] = bench_backbone('microdit', [*compile_, 'bf16_autocast', 'fused_adamw'], batch, args, peak)
    peak_end = measure_matmul_peak(1.0)
    for kind, res in results.items():
        print_table(kind, res)
    print(f'\nfp32 matmul peak at the end: {peak_end / 1e9:.1f} GFLOP/s (start {peak / 1e9:.1f}); '
          f'targets: cumulative >= 2x, mini UNet MFU >= 60 %')
    unet = results['unet']
    summary = {'cumulative': round(unet['cumulative'], 3), 'mfu': round(unet['mfu_kept'], 3),
               'mfu_plain': round(unet['mfu_plain'], 3), 'peak_gflops': round(peak / 1e9, 1),
               'kept': unet['kept'], 'ratios': {k: round(v, 3) for k, v in unet['ratios'].items()}}
    if 'microdit' in results:
        md = results['microdit']
        summary['microdit'] = {'cumulative': round(md['cumulative'], 3), 'mfu': round(md['mfu_kept'], 3),
                               'kept': md['kept'], 'ratios': {k: round(v, 3) for k, v in md['ratios'].items()}}
    print(json.dumps(summary))


if __name__ == '__main__':
    main()
