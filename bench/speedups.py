"""Training speed-ups that can act on a CPU, each measured off and on in one run, and the MFU they reach.

    python bench/speedups.py                      # mini-s UNet + microdit-mini, batch 16, 16x16x4 latents
    python bench/speedups.py --repeats 2 --steps 3 --no-compile     # a quick check

The step is the training step of a latent diffusion model on one fixed batch of 64 px images and their captions:
the frozen autoencoder (the architecture of ``yamls/autoencoder-mini.yaml``, which ``make demo`` trains; 64 px ->
16x16x4) and the frozen all-MiniLM-L6-v2 text encoder (77 tokens per caption) encode them, then noise at random
timesteps, backbone forward, MSE, backward, AdamW step. The plain configuration is that whole step with every
speed-up off.

Speed-ups measured (each against the plain configuration, then together):

* ``precomputed_latents``: the batch's VAE latents and text states are read as stored by
  ``convert/precompute_latents.py`` instead of computed in the step (``train_loader.use_latents``; CommonCanvas'
  first speed-up), so the frozen encoders leave the step;
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
process's CPU time (``time.process_time`` / threads: not charged for waiting on a busy core).

Which speed-ups are kept is decided by measurement, in three interleaved loops: (1) each alone against plain, a
speed-up is a candidate when its median ratio is > 1.02; (2) all candidates together, and the same set less each
one of them in turn: a candidate whose removal makes the set faster by > 2 % is in the others' way and dropped;
(3) the final set against plain once more. ``cumulative`` is the final set over plain from loop 3 (from loop 2
when nothing was dropped), so the set was chosen on other measurements than the figure reported for it; the
product of the single ratios is printed beside it. MFU is the backbone's FLOPs per step (forward + backward,
counted once with ``torch.utils.flop_counter``) per second over the fp32 matmul peak measured in this run, for
the backbone-only step (precomputed latents, nothing else) and for the final set.
Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]

SPEEDUPS = ('precomputed_latents', 'sdpa', 'channels_last', 'compile', 'bf16_autocast', 'fused_adamw')


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split('\n\n')[0])
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


def build_encoders() -> tuple[Any, Any]:
    """The frozen autoencoder (``yamls/autoencoder-mini.yaml``'s architecture, random weights: the cost is the
    same as trained) and the real all-MiniLM-L6-v2 text encoder, as a model encoding online uses them."""
    from diffusion import registry
    from diffusion.config import load_config
    from diffusion.builders import import_components
    import_components()
    config = load_config(REPO / 'yamls' / 'autoencoder-mini.yaml', []).model['config']
    autoencoder = registry.build(registry.autoencoders, {'name': 'autoencoder_kl', 'config': dict(config)})
    text_encoder = registry.build(registry.text_encoders, {'name': 'minilm'})
    return autoencoder.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


def make_step(model: torch.nn.Module, on: set[str], batch: dict[str, Any], encoders: tuple[Any, Any]
              ) -> Callable[[], None]:
    """The training step of ``model`` on ``batch`` (a closure; the optimizer lives in it)."""
    # torch's default AdamW on CPU loops over the parameter tensors in Python; fused=True is one kernel
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused='fused_adamw' in on)
    autocast = (lambda: torch.autocast('cpu', dtype=torch.bfloat16)) if 'bf16_autocast' in on \
        else contextlib.nullcontext
    gen = torch.Generator().manual_seed(0)
    autoencoder, text_encoder = encoders

    def inputs() -> tuple[torch.Tensor, torch.Tensor]:
        if 'precomputed_latents' in on:
            x0, text = batch['latents'], batch['text_hidden']
        else:  # what a step on pixels and captions does first (LatentDiffusion.encode_images / encode_text)
            with torch.no_grad():
                x0 = autoencoder.encode(batch['images']) * autoencoder.scaling_factor
                text = text_encoder(batch['captions'])['text_hidden']
        if 'channels_last' in on:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        return x0, text

    def step() -> None:
        x0, text = inputs()
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
        alpha = (1 - t.float() / 1000).view(-1, 1, 1, 1)  # any fixed noising: the cost is the network's
        x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        with autocast():
            pred = model(x_t, t, text_hidden=text)
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


def measure(configs: dict[str, tuple[str, set[str]]], batch: dict[str, Any], args: argparse.Namespace,
            encoders: tuple[Any, Any]) -> dict[str, dict[str, float]]:
    """Images/s (median over interleaved blocks) of each named configuration."""
    steps = {}
    for name, (kind, on) in configs.items():
        model = build_backbone(kind, on, args.latent_size)
        steps[name] = make_step(model, on, batch, encoders)
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
def bench_backbone(kind: str, candidates: list[str], batch: dict[str, Any], args: argparse.Namespace,
                   peak: float, encoders: tuple[Any, Any]) -> dict[str, Any]:
    """Loop 1: each candidate alone against plain; loop 2: the candidates together and less each one; loop 3 (when
    loop 2 dropped one): the final set against plain."""
    print(f'{kind}: each speed-up off and on', flush=True)
    single = measure({'plain': (kind, set()), **{s: (kind, {s}) for s in candidates}}, batch, args, encoders)
    plain = single['plain']['img_s']
    ratios = {s: single[s]['img_s'] / plain for s in candidates}
    chosen = [s for s in candidates if ratios[s] > 1.02]
    print(f'{kind}: the candidates together ({", ".join(chosen) or "none"}), and less each one', flush=True)
    configs = {'plain': (kind, set()), 'latents only': (kind, {'precomputed_latents'}), 'together': (kind, set(chosen))}
    if len(chosen) > 1:
        configs |= {f'less {s}': (kind, set(chosen) - {s}) for s in chosen}
    together = measure(configs, batch, args, encoders)
    drop = [s for s in chosen if len(chosen) > 1
            and together[f'less {s}']['img_s'] > 1.02 * together['together']['img_s']]
    kept = [s for s in chosen if s not in drop]
    final = together
    if drop:
        print(f'{kind}: dropped {", ".join(drop)} (the set is faster without); final set against plain', flush=True)
        final = measure({'plain': (kind, set()), 'latents only': (kind, {'precomputed_latents'}),
                         'together': (kind, set(kept))}, batch, args, encoders)
    flops = step_flops(kind, batch, args.latent_size)
    product = 1.0
    for s in kept:
        product *= ratios[s]
    backbone_only = final['latents only']['step_s']
    return {'single': single, 'ratios': ratios, 'chosen': chosen, 'together': together, 'dropped': drop,
            'kept': kept, 'final': final, 'flops_per_step': flops,
            'cumulative': final['together']['img_s'] / final['plain']['img_s'], 'product_of_kept': product,
            'mfu_plain': flops / backbone_only / peak, 'mfu_kept': flops / final['together']['step_s'] / peak}


def print_table(kind: str, res: dict[str, Any]) -> None:
    print(f'\n{kind}: backbone {res["flops_per_step"] / 1e9:.2f} GFLOP per step (forward + backward)')
    print(f'{"configuration":<58} {"img/s":>8} {"img/s cpu":>10} {"x plain":>8}  kept')
    loops = [('loop 1', res['single']), ('loop 2', res['together'])]
    if res['dropped']:
        loops.append(('loop 3', res['final']))
    for loop, rows in loops:
        for name, row in rows.items():
            ratio = row['img_s'] / rows['plain']['img_s']
            kept = ('yes' if name in res['kept'] else 'no') if name in res['ratios'] else ''
            if name == 'together':
                members = res['kept'] if rows is res['final'] else res['chosen']
                name = '+'.join(members) or 'none'
            print(f'{loop + ": " + name:<58} {row["img_s"]:8.2f} {row["img_s_cpu"]:10.2f} {ratio:8.2f}  {kept}')
    print(f'cumulative (final set over plain): {res["cumulative"]:.2f}x (product of its single ratios '
          f'{res["product_of_kept"]:.2f}); dropped in loop 2: {", ".join(res["dropped"]) or "none"}')
    print(f'MFU vs measured fp32 matmul peak: backbone-only plain step {res["mfu_plain"]:.1%}, final set '
          f'{res["mfu_kept"]:.1%}')


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from diffusion.callbacks.mfu_monitor import measure_matmul_peak
    gen = torch.Generator().manual_seed(0)
    encoders = build_encoders()
    side = args.latent_size * encoders[0].downsample_factor
    words = ['grinning face', 'red apple', 'flag: japan', 'cat face', 'keycap: 0', 'droplet', 'man with white cane',
             'evergreen tree']
    batch = {'images': torch.rand(args.batch_size, 3, side, side, generator=gen) * 2 - 1,
             'captions': [words[i % len(words)] for i in range(args.batch_size)],
             'latents': torch.randn(args.batch_size, 4, args.latent_size, args.latent_size, generator=gen),
             'text_hidden': torch.randn(args.batch_size, 77, 384, generator=gen)}
    peak = measure_matmul_peak(1.0)
    print(f'fp32 matmul peak (1024x1024, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s', flush=True)
    compile_ = [] if args.no_compile else ['compile']
    results = {'unet': bench_backbone('unet', ['precomputed_latents', 'sdpa', 'channels_last', *compile_,
                                               'bf16_autocast', 'fused_adamw'], batch, args, peak, encoders)}
    if not args.no_microdit:
        results['microdit'] = bench_backbone('microdit', ['precomputed_latents', *compile_, 'bf16_autocast',
                                                          'fused_adamw'], batch, args, peak, encoders)
    peak_end = measure_matmul_peak(1.0)
    for kind, res in results.items():
        print_table(kind, res)
    print(f'\nfp32 matmul peak at the end: {peak_end / 1e9:.1f} GFLOP/s (start {peak / 1e9:.1f}); '
          f'targets: cumulative >= 2x, mini UNet MFU >= 60 %')
    unet = results['unet']
    summary = {'cumulative': round(unet['cumulative'], 3), 'mfu': round(unet['mfu_kept'], 3),
               'mfu_plain': round(unet['mfu_plain'], 3), 'peak_gflops': round(peak / 1e9, 1),
               'kept': unet['kept'], 'dropped': unet['dropped'],
               'ratios': {k: round(v, 3) for k, v in unet['ratios'].items()}}
    if 'microdit' in results:
        md = results['microdit']
        summary['microdit'] = {'cumulative': round(md['cumulative'], 3), 'mfu': round(md['mfu_kept'], 3),
                               'kept': md['kept'], 'dropped': md['dropped'], 'ratios': {k: round(v, 3) for k, v in md['ratios'].items()}}
    print(json.dumps(summary))


if __name__ == '__main__':
    main()
