"""Training throughput: our Composer model in a real ``composer.Trainer`` vs. a plain PyTorch loop, one run.

    python bench/step.py                          # demo photos, mini-S UNet, 64 px, batch 8, 2 threads
    python bench/step.py --data /tmp/cc_mini --steps 8 --repeats 6 --threads 2
    python bench/step.py --no-latents             # skip the precomputed-latents variant

Both sides do the same work per step, the one diffusers' ``train_text_to_image.py`` example does: encode the
images with the (frozen) VAE, encode the captions with the (frozen) text encoder, sample timesteps and noise,
``DDPMScheduler.add_noise``, UNet forward, MSE against the noise, backward, AdamW step. The model parts are those
of ``yamls/tiny-cpu.yaml`` (random tiny ``AutoencoderKL``, real all-MiniLM-L6-v2, UNet preset ``mini-s``):

* **composer**: ``LatentDiffusion`` trained by ``composer.Trainer.fit`` (fp32, CPU, ``speed_monitor`` and
  ``lr_monitor`` callbacks as in the YAMLs, no checkpoints or eval);
* **plain**: a copy of the same diffusers UNet, VAE and MiniLM called directly in a ``for`` loop.

The optional **latents** variant feeds both the same batches as precomputed VAE latents and text states (what
``convert/precompute_latents.py`` stores), so the frozen encoders drop out of the step.

Data loading is not in the step timings: the batches come from the real ``image_caption`` dataloader once, are
kept in memory, and every mode iterates the same list (the loader's own rate is printed on a separate row). The
modes run in interleaved blocks (order reversed every repeat) so machine load hits all alike; a step time is
the interval between consecutive step ends inside a block (everything the loop does per batch), taken both as
wall-clock time and as CPU time of this process (``time.process_time``: robust when other jobs share the cores,
since waiting for a core is not counted), and medians are reported. Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split('\n\n')[0])
    p.add_argument('--data', default=None, help='pixel MDS dataset with a train split (default: demo photos)')
    p.add_argument('--split', default='train')
    p.add_argument('--preset', default='mini-s', help='UNet preset')
    p.add_argument('--resolution', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--distinct-batches', type=int, default=4, help='batches built once and cycled through')
    p.add_argument('--steps', type=int, default=6, help='steps per timed block (gives steps-1 intervals)')
    p.add_argument('--repeats', type=int, default=4, help='timed blocks per mode')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per mode first')
    p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads for everything')
    p.add_argument('--no-latents', action='store_true', help='skip the precomputed-latents variant')
    args = p.parse_args()
    if args.steps < 2 or args.repeats < 1:
        p.error('--steps must be >= 2 and --repeats >= 1 (a step time is the interval between two step ends)')
    return args


# =============================================================================================
# Data: built once, shared by every mode
# =============================================================================================


def build_batches(args: argparse.Namespace, model: Any, loader_cfg: dict[str, Any]) -> tuple[list, list, float]:
    """Pixel batches from the real dataloader, their precomputed twins, and the loader's images/s."""
    from diffusion import registry
    spec = registry.build(registry.dataloaders, loader_cfg, 'train_loader', batch_size=args.batch_size)
    pixel, start = [], time.perf_counter()
    while len(pixel) < args.distinct_batches:
        for batch in spec.dataloader:
            pixel.append(batch)
            if len(pixel) == args.distinct_batches:
                break
    loader_rate = args.batch_size * len(pixel) / (time.perf_counter() - start)
    latent = []
    if not args.no_latents:
        for batch in pixel:  # raw (unscaled) VAE means + text states, as convert/precompute_latents.py stores
            latent.append({'latents': model.autoencoder.encode(batch['image']), 'caption': batch['caption'],
                           **model.encode_text(batch['caption'])})
    return pixel, latent, loader_rate


def intervals(stamps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(wall, CPU) seconds between consecutive (perf_counter, process_time) stamps."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]


def cycle(batches: list, n: int) -> list:
    """``n`` batches cycling through ``batches`` (references, no copies)."""
    return [batches[i % len(batches)] for i in range(n)]


# =============================================================================================
# The two loops
# =============================================================================================


class ComposerRunner:
    """A real ``composer.Trainer`` over ``LatentDiffusion``; each block is one ``fit(duration=...)``."""

    def __init__(self, model: Any, batches: list, total_steps: int, lr: float, batch_size: int) -> None:
        from composer import Callback, Trainer
        from composer.callbacks import LRMonitor, SpeedMonitor
        from composer.core import DataSpec

        stamps = self.stamps = []

        class StepEnd(Callback):

            def batch_end(self, state: Any, logger: Any) -> None:
                stamps.append((time.perf_counter(), time.process_time()))

        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        data = DataSpec(cycle(batches, total_steps), get_num_samples_in_batch=lambda b: len(b['caption']))
        self.trainer = Trainer(model=model, train_dataloader=data, optimizers=opt, device='cpu', precision='fp32',
                               device_train_microbatch_size=batch_size, callbacks=[SpeedMonitor(window_size=10), LRMonitor(), StepEnd()], loggers=[],
                               progress_bar=False, log_to_console=False, seed=17, python_log_level=None)

    def block(self, steps: int) -> list[tuple[float, float]]:
        self.stamps.clear()
        self.trainer.fit(duration=f'{steps}ba')
        return intervals(self.stamps)


class PlainRunner:
    """The same diffusers modules called directly, as diffusers' text-to-image training example does."""

    def __init__(self, model: Any, batches: list, total_steps: int, lr: float, precomputed: bool) -> None:
        from diffusers import DDPMScheduler
        self.unet = copy.deepcopy(model.backbone.unet).train()
        self.vae = model.autoencoder.vae
        self.text_model = model.text_encoder.encoders[0]
        self.tokenizer = model.text_encoder.tokenizers[0]
        self.max_length = model.text_encoder.max_length
        self.scaling_factor = model.scaling_factor
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule='scaled_linear')
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=lr)
        self.encode = self._from_latents if precomputed else self._from_pixels
        self.data = iter(cycle(batches, total_steps))

    @torch.no_grad()
    def _from_pixels(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.vae.encode(batch['image']).latent_dist.mean * self.scaling_factor
        tok = self.tokenizer(batch['caption'], padding='max_length', truncation=True, max_length=self.max_length,
                             return_tensors='pt')
        hidden = self.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
        return latents, hidden

    def _from_latents(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch['latents'] * self.scaling_factor, batch['text_hidden']

    def step(self) -> None:
        latents, hidden = self.encode(next(self.data))  # (B, 4, h, w), (B, 77, 384)
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = self.scheduler.add_noise(latents, noise, t)
        pred = self.unet(noisy, t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def block(self, steps: int) -> list[tuple[float, float]]:
        stamps = []
        for _ in range(steps):
            self.step()
            stamps.append((time.perf_counter(), time.process_time()))
        return intervals(stamps)


# =============================================================================================
# Driver
# =============================================================================================


def build_model_and_loader(args: argparse.Namespace, data: str) -> tuple[Any, dict[str, Any]]:
    """The model and train-loader blocks of ``yamls/tiny-cpu.yaml`` at the requested size."""
    from diffusion import registry
    from diffusion.config import load_config
    from diffusion.builders import import_components
    import_components()
    cfg = load_config(REPO / 'yamls' / 'tiny-cpu.yaml', [
        f'variables.data={data}', f'variables.resolution={args.resolution}', f'train_loader.split={args.split}',
        f'model.backbone.preset={args.preset}', f'model.backbone.sample_size={args.resolution // 4}'])
    torch.manual_seed(0)
    return registry.build(registry.models, cfg.model, 'model'), cfg.train_loader


def run_interleaved(runners: dict[str, Any], args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    """Warm up every mode, then timed blocks in alternating order; (wall, CPU) per-step intervals per mode."""
    for runner in runners.values():
        runner.block(args.warmup)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].extend(runners[name].block(args.steps))
        print(f'  repeat {r + 1}/{args.repeats}: ' + ', '.join(
            f'{n} {statistics.median(w for w, _ in times[n]):.3f} s/step' for n in names), flush=True)
    return times


def make_runners(args: argparse.Namespace, model: Any, pixel: list, latent: list) -> dict[str, Any]:
    total = args.warmup + args.repeats * args.steps
    lr = 1e-4
    runners: dict[str, Any] = {}
    for variant, batches in (('pixels', pixel), ('latents', latent)):
        if not batches:
            continue
        runners[f'composer/{variant}'] = ComposerRunner(copy.deepcopy(model), batches, total, lr,
                                                         args.batch_size)
        runners[f'plain/{variant}'] = PlainRunner(model, batches, total, lr, precomputed=variant == 'latents')
    torch.set_num_threads(args.threads)  # in case anything above changed it
    return runners


def report(args: argparse.Namespace, times: dict[str, list[tuple[float, float]]], loader_rate: float,
           params_m: float, load: tuple[float, float]) -> dict[str, Any]:
    """Print the table and the ratios; return the figures for the JSON line."""
    n = args.batch_size
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    steps = len(times['plain/pixels'])
    print(f'\nmini training step: UNet {args.preset} ({params_m:.1f}M), {args.resolution}px, batch {n}, '
          f'{torch.get_num_threads()} threads, {steps} steps per mode (medians); load avg {load[0]:.1f} -> '
          f'{load[1]:.1f} on {os.cpu_count()} cores')
    print(f'{"mode":<18}{"wall s/step":>12}{"img/s":>8}{"wall IQR":>14}{"CPU s/step":>12}')
    for name, values in times.items():
        q = statistics.quantiles([w for w, _ in values], n=4) if len(values) > 1 else None
        iqr = f'{q[0]:.3f}-{q[2]:.3f}' if q else '-'
        print(f'{name:<18}{wall[name]:>12.4f}{n / wall[name]:>8.2f}{iqr:>14}{cpu[name]:>12.4f}')
    print(f'{"dataloader only":<18}{n / loader_rate:>12.4f}{loader_rate:>8.2f}   (not in the steps above)')
    if load[0] > (os.cpu_count() or 1):
        print('note: the machine was busy (load > cores); wall times then measure the scheduler more than the '
              'code, and the CPU-time ratio (CPU seconds this process used per step) is the robust one')
    out: dict[str, Any] = {}
    for variant in ('pixels', 'latents'):
        if f'composer/{variant}' not in wall:
            continue
        ratio = wall[f'plain/{variant}'] / wall[f'composer/{variant}']  # composer img/s over plain img/s
        cpu_ratio = cpu[f'plain/{variant}'] / cpu[f'composer/{variant}']
        print(f'{variant}: composer / plain throughput = {ratio:.3f} wall, {cpu_ratio:.3f} CPU time '
              '(target >= 0.95)')
        out.update({f'{variant}_ratio': round(ratio, 3), f'{variant}_cpu_ratio': round(cpu_ratio, 3),
                    f'{variant}_composer_imgs_per_s': round(n / wall[f'composer/{variant}'], 2),
                    f'{variant}_plain_imgs_per_s': round(n / wall[f'plain/{variant}'], 2),
                    f'{variant}_composer_cpu_s_per_step': round(cpu[f'composer/{variant}'], 4),
                    f'{variant}_plain_cpu_s_per_step': round(cpu[f'plain/{variant}'], 4)})
    out.update(ratio=out['pixels_ratio'], cpu_ratio=out['pixels_cpu_ratio'], loader_imgs_per_s=round(loader_rate, 1),
               batch_size=n, resolution=args.resolution, threads=torch.get_num_threads(), steps_per_mode=steps,
               load_avg_start=round(load[0], 2), load_avg_end=round(load[1], 2))
    return out


def main() -> None:
    args = parse_args()
    if args.steps < 2 or args.repeats < 1:
        raise SystemExit('--steps must be >= 2 and --repeats >= 1')
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from diffusion.demo.photos import build_demo_photos
            data = str(build_demo_photos(Path(tmp) / 'demo_photos'))
        model, loader_cfg = build_model_and_loader(args, data)
        pixel, latent, loader_rate = build_batches(args, model, loader_cfg)
        runners = make_runners(args, model, pixel, latent)
        times = run_interleaved(runners, args)
    params_m = sum(p.numel() for p in model.backbone.parameters()) / 1e6
    figures = report(args, times, loader_rate, params_m, (load_start, os.getloadavg()[0]))
    print(json.dumps(figures))


if __name__ == '__main__':
    main()
