"""Deferred masking: training speed and FLOPs of MicroDiT at mask ratios 0 / 0.5 / 0.75, with and without the
patch-mixer, in one run.

    python bench/masking.py                                  # mini @ 16x16 (batch 8) and tiny-2 @ 32x32 (batch 2)
    python bench/masking.py --repeats 2 --steps 3            # a quick check
    python bench/masking.py --only mini

For each model (a preset with the patch-mixer, and the same preset without it, which is naive masking) one set of
weights is trained at each mask ratio on the same batch: ``LatentDiffusion`` with the EDM schedule on precomputed
latents and 384-d text states (77 tokens), forward, kept-patch loss, backward, AdamW step (what one Trainer step
does, without the loop around it). Ratios are timed in interleaved blocks (order reversed every repeat) so machine
load hits all alike; a step time is the interval between consecutive step ends, taken as wall-clock time and as CPU
time of this process (``time.process_time``, robust when other jobs share the cores), and medians are reported;
the CPU time of forward + backward alone (what the FLOP counter sees) is reported beside it. The optimizer is
AdamW's fused CPU kernel (``--optimizer loop``: its per-tensor loop, the earlier figures): its step is a fixed cost
of every mask ratio that the FLOP counter does not see.

FLOPs per image are counted with ``torch.utils.flop_counter.FlopCounterMode`` over forward + backward of one step.
``speedup_r = time(0) / time(r)`` and ``flop_ratio_r = flops(0) / flops(r)``; ``of_flops`` is their quotient, the
share of the architecture's limit that the wall clock reaches. For reference, the public code's own MicroDiT_Tiny_2
on these CPUs (fp32, 2 threads, 384-d text states, one training step) goes from 2,020 to 927 ms per step at 32x32
latents, batch 2 (2.18x), and from 1,245 to 740 ms at 16x16, batch 4 (1.68x).

Prints a table and, last, one JSON line (``speedup_075`` and ``flop_ratio_075`` are tiny-2 at 32x32 with the mixer).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from typing import Any

import torch

RATIOS = (0.0, 0.5, 0.75)
SETUPS = {'mini': ('microdit-mini', 16, 8), 'tiny-2': ('microdit-tiny-2', 32, 2)}  # preset, latent side, batch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--only', choices=sorted(SETUPS), action='append', help='run only these setups')
    p.add_argument('--steps', type=int, default=4, help='steps per timed block (gives steps-1 intervals)')
    p.add_argument('--repeats', type=int, default=3, help='timed blocks per mask ratio')
    p.add_argument('--warmup', type=int, default=1, help='untimed steps per ratio first')
    p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
    p.add_argument('--text-dim', type=int, default=384, help='text state width (MiniLM: 384)')
    p.add_argument('--optimizer', choices=('fused', 'loop'), default='fused',
                   help="AdamW's fused CPU kernel (one pass over all parameters), or its per-tensor loop (the "
                   'earlier figures)')
    return p.parse_args()


def build(preset: str, side: int, mixer: bool, text_dim: int, optimizer: str = 'fused') -> Any:
    """``LatentDiffusion`` with a MicroDiT backbone and MicroDiT's EDM constants, plus its AdamW.

    The optimizer step costs the same at every mask ratio (it touches every parameter: 200M for tiny-2, of which
    107M in the experts) and the FLOP counter does not see it: with AdamW's per-tensor loop it was ~0.6-0.75 CPU s
    of a ~2.4 CPU s masked tiny-2 step; the fused kernel does the same update in ~0.1 s.
    """
    from diffusion.models.latent_diffusion import LatentDiffusion
    from diffusion.models.microdit import build_microdit
    from diffusion.schedules import EDMSchedule
    torch.manual_seed(0)
    backbone = build_microdit(preset, sample_size=side, cross_attention_dim=text_dim, use_patch_mixer=mixer)
    model = LatentDiffusion(backbone, EDMSchedule(sigma_data=0.9, p_mean=-0.6, p_std=1.2), scaling_factor=1.0)
    return model.train(), torch.optim.AdamW(model.parameters(), lr=1e-4, fused=optimizer == 'fused')


def train_step(model: Any, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    """One step; returns the CPU seconds of its forward + backward (the part the FLOP counter sees)."""
    opt.zero_grad(set_to_none=True)
    start = time.process_time()
    model.loss(model(batch), batch).backward()
    forward_backward = time.process_time() - start
    opt.step()
    return forward_backward


def flops_per_image(model: Any, batch: dict[str, torch.Tensor]) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:  # the fused CPU attention kernels have no FLOP formula (count 0)
        model.loss(model(batch), batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch['latents'].shape[0]


def time_ratios(model: Any, opt: Any, batch: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[float, Any]:
    """Median (wall, CPU, forward+backward CPU) seconds per step at each mask ratio, timed in interleaved blocks."""
    for ratio in RATIOS:
        model.backbone.mask_ratio = ratio
        for _ in range(args.warmup):
            train_step(model, opt, batch)
    samples: dict[float, list[tuple[float, float, float]]] = {r: [] for r in RATIOS}
    for rep in range(args.repeats):
        for ratio in (RATIOS if rep % 2 == 0 else RATIOS[::-1]):
            model.backbone.mask_ratio = ratio
            stamps = []
            for _ in range(args.steps):
                fb = train_step(model, opt, batch)
                stamps.append((time.perf_counter(), time.process_time(), fb))
            samples[ratio] += [(b[0] - a[0], b[1] - a[1], b[2]) for a, b in zip(stamps, stamps[1:])]
    return {r: tuple(statistics.median(x[i] for x in s) for i in range(3)) for r, s in samples.items()}


def measure(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    preset, side, batch_size = SETUPS[name]
    g = torch.Generator().manual_seed(0)
    batch = {'latents': torch.randn(batch_size, 4, side, side, generator=g),
             'text_hidden': torch.randn(batch_size, 77, args.text_dim, generator=g)}
    rows = []
    for mixer in (True, False):
        model, opt = build(preset, side, mixer, args.text_dim, args.optimizer)
        flops = {}
        for ratio in RATIOS:
            model.backbone.mask_ratio = ratio
            flops[ratio] = flops_per_image(model, batch)
        times = time_ratios(model, opt, batch, args)
        for ratio in RATIOS:
            wall, cpu, fb = times[ratio]
            speedup, flop_ratio = times[0.0][0] / wall, flops[0.0] / flops[ratio]
            cpu_speedup = times[0.0][1] / cpu
            rows.append({'setup': f'{name} @{side}x{side} b{batch_size}', 'mixer': mixer, 'mask': ratio,
                         'ms_step': 1e3 * wall, 'cpu_ms_step': 1e3 * cpu, 'fb_cpu_ms': 1e3 * fb,
                         'img_s': batch_size / wall, 'gflop_img': flops[ratio] / 1e9, 'speedup': speedup,
                         'cpu_speedup': cpu_speedup, 'fb_cpu_speedup': times[0.0][2] / fb, 'flop_ratio': flop_ratio,
                         'of_flops': speedup / flop_ratio, 'cpu_of_flops': cpu_speedup / flop_ratio})
        del model, opt
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    rows = [row for name in (args.only or list(SETUPS)) for row in measure(name, args)]
    head = (f'{"setup":<20} {"mixer":>5} {"mask":>5} {"ms/step":>9} {"cpu ms":>9} {"f+b cpu":>8} {"img/s":>7} '
            f'{"GFLOP/img":>10} {"speedup":>8} {"cpu spd":>8} {"f+b spd":>8} {"FLOP x":>7} {"of FLOPs":>8} '
            f'{"cpu of F":>8}')
    print(head)
    print('-' * len(head))
    for r in rows:
        print(f'{r["setup"]:<20} {str(r["mixer"]):>5} {r["mask"]:>5.2f} {r["ms_step"]:>9.1f} {r["cpu_ms_step"]:>9.1f} '
              f'{r["fb_cpu_ms"]:>8.1f} {r["img_s"]:>7.2f} {r["gflop_img"]:>10.3f} {r["speedup"]:>8.2f} '
              f'{r["cpu_speedup"]:>8.2f} {r["fb_cpu_speedup"]:>8.2f} {r["flop_ratio"]:>7.2f} {r["of_flops"]:>8.2f} '
              f'{r["cpu_of_flops"]:>8.2f}')
    figures: dict[str, Any] = {'threads': args.threads, 'repeats': args.repeats, 'steps': args.steps,
                               'optimizer': args.optimizer}
    for r in rows:
        key = f'{r["setup"].split()[0]}_{"mixer" if r["mixer"] else "naive"}_{int(r["mask"] * 100):03d}'
        figures[key] = {k: round(r[k], 4) for k in ('ms_step', 'cpu_ms_step', 'fb_cpu_ms', 'img_s', 'gflop_img',
                                                    'speedup', 'cpu_speedup', 'fb_cpu_speedup', 'flop_ratio')}
    headline = [r for r in rows if r['setup'].startswith('tiny-2') and r['mixer'] and r['mask'] == 0.75]
    if headline:
        figures.update(speedup_075=round(headline[0]['speedup'], 4),
                       flop_ratio_075=round(headline[0]['flop_ratio'], 4),
                       of_flops_075=round(headline[0]['of_flops'], 4),
                       cpu_speedup_075=round(headline[0]['cpu_speedup'], 4),
                       cpu_of_flops_075=round(headline[0]['cpu_of_flops'], 4))
    print(json.dumps(figures))


if __name__ == '__main__':
    main()
