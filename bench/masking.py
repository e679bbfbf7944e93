"""Token dropping: training speed and FLOPs of MicroDiT with deferred masking at ratios 0 / 0.5 / 0.75 (with and
without the patch-mixer) and with TREAD token routing at 0.5 / 0.75, in one run; optionally beside the public
code's own MicroDiT_Tiny_2.

    python bench/masking.py                                  # mini @16x16 b8, tiny-2 @32x32 b2 and @16x16 b4
    python bench/masking.py --repeats 2 --steps 3            # a quick check
    python bench/masking.py --only tiny-2 --public-code ~/micro_diffusion   # ours and the public code, side by side
    python bench/masking.py --only tiny-2-b8                 # tiny-2 @32x32 at batch 8 (~6 min, not in the default)

For each model (a preset with the patch-mixer, and the same preset without it, which is naive masking) one set of
weights is trained at each mask ratio on the same batch: ``LatentDiffusion`` with the EDM schedule on precomputed
latents and 384-d text states (77 tokens), forward, kept-patch loss, backward, AdamW step (what one Trainer step
does, without the loop around it). Ratios are timed in interleaved blocks (order reversed every repeat) so machine
load hits all alike; a step time is the interval between consecutive step ends, taken as wall-clock time and as CPU
time of this process (``time.process_time``, robust when other jobs share the cores), and medians are reported;
the CPU time of forward + backward alone (what the FLOP counter sees) is reported beside it. The optimizer is
AdamW's fused CPU kernel (``--optimizer loop``: its per-tensor loop, the earlier figures): its step is a fixed cost
of every mask ratio that the FLOP counter does not see.

``--public-code DIR`` (a checkout of https://github.com/SonyResearch/micro_diffusion) adds the public
``MicroDiT_Tiny_2`` to the tiny-2 setups, trained in the same interleaved loop as ours with the same optimizer, batch
and EDM loss (its ``edm_loss``: log-normal sigma, preconditioning, kept-patch mean), so both ratios are measured on
the same machine state. The public model imports timm only for ``PatchEmbed`` and its utilities import open_clip
for text encoders this bench does not build: when those packages are absent (they are not in this repository's
lock) a stand-in ``PatchEmbed`` (the same stride-``p`` convolution, flattened) and an empty ``open_clip`` are put in
``sys.modules`` for that import only.

``--glibc-heap`` keeps every allocation in glibc's heap (see ``use_glibc_heap``): by default the tensors a step
allocates anew (gradients, which composer sets to None every step, and activations) page-fault on fresh pages, a
cost that depends on the allocator's history and hits the two implementations differently.

TREAD rows (``method`` tread, with the mixer, mask 0): a share ``ratio`` of the tokens skips backbone blocks
``1 .. depth - 2`` (all but the first and the last; :func:`tread_range`) and rejoins before the last block. Every
token still reaches the loss, so the step saves less than masking at the same ratio: the first and last blocks,
the patch-mixer and the output layer see every token. Masking and routing are timed in the same interleaved loop.

FLOPs per image are counted with ``torch.utils.flop_counter.FlopCounterMode`` over forward + backward of one step.
``speedup_r = time(0) / time(r)`` and ``flop_ratio_r = flops(0) / flops(r)``; ``of_flops`` is their quotient, the
share of the architecture's limit that the wall clock reaches. For reference, the figures quoted for the public code
on these CPUs (fp32, 2 threads, 384-d text states, one training step) go from 2,020 to 927 ms per step at 32x32
latents, batch 2 (2.18x), and from 1,245 to 740 ms at 16x16, batch 4 (1.68x); ``--public-code`` measures it here.

Prints a table and, last, one JSON line (``speedup_075`` and ``flop_ratio_075`` are tiny-2 at 32x32 with the mixer;
``speedup_075_16`` tiny-2 at 16x16, ``speedup_075_b8`` at 32x32, batch 8; ``tread_speedup_075*`` and
``tread_flop_ratio_075*`` the same for TREAD at 0.75; ``public_speedup_075*`` when measured). Batch 8 shows what the per-step costs that do not shrink with the mask (the optimizer update of every
parameter, freeing and re-allocating the gradients) take from the speed-up at batch 2: they are a quarter as large
a share of the step.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

RATIOS = (0.0, 0.5, 0.75)
# (method, ratio) conditions: ('mask', 0.0) is the plain model, the baseline of every speed-up
MASKING = tuple(('mask', r) for r in RATIOS)
ROUTING = (('tread', 0.5), ('tread', 0.75))
# name: (preset, latent side, batch)
SETUPS = {'mini': ('microdit-mini', 16, 8), 'tiny-2': ('microdit-tiny-2', 32, 2),
          'tiny-2-16': ('microdit-tiny-2', 16, 4), 'tiny-2-b8': ('microdit-tiny-2', 32, 8)}
DEFAULT_SETUPS = ('mini', 'tiny-2', 'tiny-2-16')  # tiny-2-b8 (~6 min): the fixed per-step costs at a larger batch
EDM = {'sigma_data': 0.9, 'p_mean': -0.6, 'p_std': 1.2}  # MicroDiT's constants at 256 px


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split('\n\n')[0])
    p.add_argument('--only', choices=sorted(SETUPS), action='append',
                   help=f'run only these setups (default: {", ".join(DEFAULT_SETUPS)})')
    p.add_argument('--steps', type=int, default=4, help='steps per timed block (gives steps-1 intervals)')
    p.add_argument('--repeats', type=int, default=3, help='timed blocks per mask ratio')
    p.add_argument('--warmup', type=int, default=1, help='untimed steps per ratio first')
    p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
    p.add_argument('--text-dim', type=int, default=384, help='text state width (MiniLM: 384)')
    p.add_argument('--optimizer', choices=('fused', 'loop'), default='fused',
                   help="AdamW's fused CPU kernel (one pass over all parameters), or its per-tensor loop (the "
                   'earlier figures)')
    p.add_argument('--public-code', type=Path, metavar='DIR',
                   help='checkout of SonyResearch/micro_diffusion: train its MicroDiT_Tiny_2 beside ours (tiny-2)')
    p.add_argument('--glibc-heap', action='store_true',
                   help="serve every allocation from glibc's heap and keep freed memory (mallopt M_MMAP_MAX=0, "
                   'M_TRIM_THRESHOLD=1 GiB): tensors allocated anew each step (activations, gradients) stop '
                   'page-faulting')
    args = p.parse_args()
    if args.steps < 2 or args.repeats < 1:
        p.error('--steps must be >= 2 and --repeats >= 1 (a step time is the interval between two step ends)')
    return args


def use_glibc_heap() -> None:
    """glibc serves large allocations with fresh mmap'd pages and returns them on free, so every step's new
    gradient and activation tensors page-fault again; this keeps them in the heap (Linux with glibc only)."""
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library('c')
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, 'mallopt'):
        raise SystemExit('--glibc-heap needs glibc (Linux)')
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    if not (libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_max, 0)):
        raise SystemExit('--glibc-heap: mallopt refused the settings')


# =============================================================================================
# The two models and their training steps
# =============================================================================================
Condition = tuple[str, float]  # (method, ratio): ('mask', 0.75), ('tread', 0.5)


class Arm:
    """One model and its optimizer; ``step(cond)`` trains one step under a (method, ratio) condition and returns
    the CPU seconds of its forward + backward (the part the FLOP counter sees); ``flops(cond)`` counts them per
    image. ``conditions`` are the ones this model can run."""

    def __init__(self, model: nn.Module, optimizer: str, batch: dict[str, torch.Tensor],
                 loss: Callable[[Condition], torch.Tensor], conditions: tuple[Condition, ...] = MASKING) -> None:
        self.model, self.batch, self.loss, self.conditions = model.train(), batch, loss, conditions
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=optimizer == 'fused')

    def step(self, cond: Condition) -> float:
        self.opt.zero_grad(set_to_none=True)
        start = time.process_time()
        self.loss(cond).backward()
        forward_backward = time.process_time() - start
        self.opt.step()
        return forward_backward

    def flops(self, cond: Condition) -> float:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with sdpa_kernel(SDPBackend.MATH), counter:  # the fused CPU attention kernels have no FLOP formula (0)
            self.loss(cond).backward()
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops() / self.batch['latents'].shape[0]


def tread_range(depth: int) -> tuple[int, int]:
    """The blocks TREAD routes around here: all but the first and the last (``start, end``, end excluded)."""
    return 1, depth - 1


def build(preset: str, side: int, mixer: bool, text_dim: int, optimizer: str, batch: dict[str, torch.Tensor]
          ) -> Arm:
    """Ours: ``LatentDiffusion`` with a MicroDiT backbone and MicroDiT's EDM constants; with the mixer it also runs
    the TREAD conditions (mask 0, routing over :func:`tread_range`).

    The optimizer step costs the same at every mask ratio (it touches every parameter: 200M for tiny-2, of which
    107M in the experts) and the FLOP counter does not see it: with AdamW's per-tensor loop it was ~0.6-0.75 CPU s
    of a ~2.4 CPU s masked tiny-2 step; the fused kernel does the same update in ~0.1 s.
    """
    from diffusion.models.latent_diffusion import LatentDiffusion
    from diffusion.models.microdit import build_microdit
    from diffusion.models.token_routing import TreadConfig
    from diffusion.schedules import EDMSchedule
    torch.manual_seed(0)
    backbone = build_microdit(preset, sample_size=side, cross_attention_dim=text_dim, use_patch_mixer=mixer)
    model = LatentDiffusion(backbone, EDMSchedule(**EDM), scaling_factor=1.0)
    start, end = tread_range(len(backbone.blocks))

    def loss(cond: Condition) -> torch.Tensor:
        method, ratio = cond
        model.backbone.mask_ratio = ratio if method == 'mask' else 0.0
        model.backbone.tread = TreadConfig(ratio, start, end) if method == 'tread' else None
        return model.loss(model(batch), batch)
    return Arm(model, optimizer, batch, loss, MASKING + ROUTING if mixer else MASKING)


@contextlib.contextmanager
def _stand_ins() -> Any:
    """Stand-ins for the two imports of the public model code that this bench does not need (see the module
    docstring), present only while it is imported."""
    import diffusers  # noqa: F401  these probe installed packages by name: import them before any stand-in
    import torchmetrics  # noqa: F401
    import transformers  # noqa: F401

    class PatchEmbed(nn.Module):  # timm's PatchEmbed as the public DiT uses it: stride-p conv, flattened
        def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
            super().__init__()
            self.patch_size = (patch_size, patch_size)
            self.num_patches = (img_size // patch_size)**2
            self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)

    added = []
    for name, attrs in (('timm', {}), ('timm.models', {}), ('timm.models.vision_transformer',
                                                             {'PatchEmbed': PatchEmbed}), ('open_clip', {})):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__dict__.update(attrs)
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def build_public(code: Path, side: int, text_dim: int, optimizer: str, batch: dict[str, torch.Tensor]) -> Arm:
    """The public code's MicroDiT_Tiny_2 with its EDM loss (``LatentDiffusion.edm_loss`` and
    ``model_forward_wrapper`` of micro_diffusion/models/model.py, which also loads a VAE and a text encoder from
    the hub: only its loss is re-stated here, with this project's EDM functions, which compute the same terms)."""
    if not (code / 'micro_diffusion' / 'models' / 'dit.py').is_file():
        raise SystemExit(f'--public-code {code}: no micro_diffusion/models/dit.py there; clone '
                         'https://github.com/SonyResearch/micro_diffusion')
    sys.path.insert(0, str(code))
    with _stand_ins():
        from micro_diffusion.models.dit import MicroDiT_Tiny_2
    torch.manual_seed(0)
    model = MicroDiT_Tiny_2(caption_channels=text_dim, input_size=side)
    from diffusion.schedules import edm_loss_weight, edm_precondition, lognormal_sigmas
    x, y = batch['latents'], batch['text_hidden'].unsqueeze(1)  # the public code's captions are (N, 1, L, D)

    def loss(cond: Condition) -> torch.Tensor:
        ratio = cond[1]  # masking only
        sigma = lognormal_sigmas(x.shape[0], EDM['p_mean'], EDM['p_std'])  # (N,)
        c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in edm_precondition(sigma, EDM['sigma_data']))
        noised = x + torch.randn_like(x) * sigma.view(-1, 1, 1, 1)
        out = model(c_in * noised, c_noise.flatten(), y, mask_ratio=ratio)
        denoised = c_skip * noised + c_out * out['sample']
        err = edm_loss_weight(sigma, EDM['sigma_data']).view(-1, 1, 1, 1) * (denoised - x)**2  # (N, C, H, W)
        if ratio > 0:  # mean over kept patches
            err = F.avg_pool2d(err.mean(dim=1), model.patch_size).flatten(1)
            kept = 1 - out['mask']
            err = (err * kept).sum(dim=1) / kept.sum(dim=1)
        return err.mean()
    return Arm(model, optimizer, batch, loss)


# =============================================================================================
# Timing
# =============================================================================================
def time_arms(arms: dict[str, Arm], args: argparse.Namespace
              ) -> dict[tuple[str, Condition], tuple[float, ...]]:
    """Median (wall, CPU, forward+backward CPU) seconds per step of every (arm, condition), timed in interleaved
    blocks (order reversed every repeat)."""
    keys = [(name, cond) for name in arms for cond in arms[name].conditions]
    for name, cond in keys:
        for _ in range(args.warmup):
            arms[name].step(cond)
    samples: dict[tuple[str, Condition], list[tuple[float, float, float]]] = {k: [] for k in keys}
    for rep in range(args.repeats):
        for name, cond in (keys if rep % 2 == 0 else keys[::-1]):
            stamps = []
            for _ in range(args.steps):
                fb = arms[name].step(cond)
                stamps.append((time.perf_counter(), time.process_time(), fb))
            samples[name, cond] += [(b[0] - a[0], b[1] - a[1], b[2]) for a, b in zip(stamps, stamps[1:])]
    return {k: tuple(statistics.median(x[i] for x in s) for i in range(3)) for k, s in samples.items()}


def measure(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows of one setup: ours with the mixer (and the public model, when given) timed in one interleaved loop,
    then ours without the mixer (the naive-masking ablation) in another."""
    preset, side, batch_size = SETUPS[name]
    g = torch.Generator().manual_seed(0)
    batch = {'latents': torch.randn(batch_size, 4, side, side, generator=g),
             'text_hidden': torch.randn(batch_size, 77, args.text_dim, generator=g)}
    groups: list[dict[str, Callable[[], Arm]]] = [
        {'ours': lambda: build(preset, side, True, args.text_dim, args.optimizer, batch)},
        {'ours-naive': lambda: build(preset, side, False, args.text_dim, args.optimizer, batch)}]
    if args.public_code is not None and preset == 'microdit-tiny-2':
        groups[0]['public'] = lambda: build_public(args.public_code, side, args.text_dim, args.optimizer, batch)
    rows = []
    for group in groups:
        arms = {model: make() for model, make in group.items()}
        flops = {(model, c): arm.flops(c) for model, arm in arms.items() for c in arm.conditions}
        times = time_arms(arms, args)
        for model, arm in arms.items():
            base = ('mask', 0.0)
            wall0, cpu0, fb0 = times[model, base]
            for cond in arm.conditions:
                wall, cpu, fb = times[model, cond]
                speedup, flop_ratio = wall0 / wall, flops[model, base] / flops[model, cond]
                rows.append({'name': name, 'setup': f'{preset.split("microdit-")[1]} @{side}x{side} b{batch_size}',
                             'model': model, 'method': cond[0], 'ratio': cond[1], 'ms_step': 1e3 * wall,
                             'cpu_ms_step': 1e3 * cpu, 'fb_cpu_ms': 1e3 * fb, 'img_s': batch_size / wall,
                             'gflop_img': flops[model, cond] / 1e9, 'speedup': speedup,
                             'cpu_speedup': cpu0 / cpu, 'fb_cpu_speedup': fb0 / fb, 'flop_ratio': flop_ratio,
                             'of_flops': speedup / flop_ratio, 'cpu_of_flops': cpu0 / cpu / flop_ratio})
        del arms
    return rows


def main() -> None:
    args = parse_args()
    if args.glibc_heap:
        use_glibc_heap()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    rows = [row for name in (args.only or DEFAULT_SETUPS) for row in measure(name, args)]
    head = (f'{"setup":<18} {"model":>10} {"method":>6} {"ratio":>5} {"ms/step":>9} {"cpu ms":>9} {"f+b cpu":>8} {"img/s":>7} '
            f'{"GFLOP/img":>10} {"speedup":>8} {"cpu spd":>8} {"f+b spd":>8} {"FLOP x":>7} {"of FLOPs":>8} '
            f'{"cpu of F":>8}')
    print(head)
    print('-' * len(head))
    for r in rows:
        print(f'{r["setup"]:<18} {r["model"]:>10} {r["method"]:>6} {r["ratio"]:>5.2f} {r["ms_step"]:>9.1f} {r["cpu_ms_step"]:>9.1f} '
              f'{r["fb_cpu_ms"]:>8.1f} {r["img_s"]:>7.2f} {r["gflop_img"]:>10.3f} {r["speedup"]:>8.2f} '
              f'{r["cpu_speedup"]:>8.2f} {r["fb_cpu_speedup"]:>8.2f} {r["flop_ratio"]:>7.2f} {r["of_flops"]:>8.2f} '
              f'{r["cpu_of_flops"]:>8.2f}')
    figures: dict[str, Any] = {'threads': args.threads, 'repeats': args.repeats, 'steps': args.steps,
                               'optimizer': args.optimizer, 'glibc_heap': args.glibc_heap}
    for r in rows:
        model = {'ours': 'mixer', 'ours-naive': 'naive'}.get(r['model'], r['model'])
        model = 'tread' if r['method'] == 'tread' else model
        key = f'{r["name"]}_{model}_{int(r["ratio"] * 100):03d}'
        figures[key] = {k: round(r[k], 4) for k in ('ms_step', 'cpu_ms_step', 'fb_cpu_ms', 'img_s', 'gflop_img',
                                                    'speedup', 'cpu_speedup', 'fb_cpu_speedup', 'flop_ratio')}
    for model, method, prefix in (('ours', 'mask', ''), ('ours', 'tread', 'tread_'), ('public', 'mask', 'public_')):
        for name, suffix in (('tiny-2', ''), ('tiny-2-16', '_16'), ('tiny-2-b8', '_b8'), ('mini', '_mini')):
            at = [r for r in rows if r['name'] == name and r['model'] == model and r['method'] == method
                  and r['ratio'] == 0.75]
            if at:
                figures.update({f'{prefix}{k}_075{suffix}': round(at[0][k], 4)
                                for k in ('speedup', 'flop_ratio', 'of_flops', 'cpu_speedup', 'cpu_of_flops')})
    print(json.dumps(figures))


if __name__ == '__main__':
    main()
