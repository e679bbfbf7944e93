"""Training step time with precomputed latents vs. encoding online: same model, same images, one run.

CommonCanvas (Gokaslan et al. 2024) reports that computing the VAE and text-encoder latents online costs 1.4x
(SD2 UNet, SD2 VAE and OpenCLIP ViT-H on A100s). This script measures our ratio on this machine:

    python bench/latents.py                                   # demo photos, 64 px, random tiny VAE, MiniLM
    python bench/latents.py --src data/commoncatalog_mini --latents data/commoncatalog_mini_latents \\
        --vae outputs/autoencoder-mini/autoencoder --resolution 64

One ``LatentDiffusion`` (UNet backbone, autoencoder, text encoder) takes full training steps (forward, loss,
backward, AdamW step) on one batch in two forms: pixels + captions (the frozen encoders run every step) and the
same rows' precomputed columns (they do not). The two kinds of step alternate, so machine load hits both alike;
medians are reported. Data loading is excluded (it is the same in-memory batch every step). Prints a table and,
last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split('\n\n')[0])
    p.add_argument('--src', default=None, help='pixel MDS dataset (default: demo photos built in a temp dir)')
    p.add_argument('--latents', default=None, help='its precomputed copy (default: computed here from --src)')
    p.add_argument('--vae', default=None, help='diffusers VAE folder (default: a random tiny AutoencoderKL)')
    p.add_argument('--text-encoder', default='minilm')
    p.add_argument('--preset', default='mini-s', help='UNet preset of the backbone')
    p.add_argument('--resolution', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--steps', type=int, default=12, help='timed steps per mode')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per mode first')
    p.add_argument('--split', default='train')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
    return p.parse_args()


def _prepare(args: argparse.Namespace, tmp: Path) -> tuple[str, str, str]:
    """Fill in the dataset, VAE and latents the arguments leave out."""
    src, vae, latents = args.src, args.vae, args.latents
    if src is None:
        from diffusion.demo.photos import build_demo_photos
        src = str(build_demo_photos(tmp / 'demo_photos'))
    if vae is None:
        from diffusers import AutoencoderKL

        from diffusion.models.autoencoders import TINY_VAE_CONFIG
        torch.manual_seed(0)
        vae = str(tmp / 'tiny_vae')
        AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(vae)
        print('note: random tiny VAE (same cost as a trained one of that size)')
    if latents is None:
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            'precompute', Path(__file__).resolve().parents[1] / 'convert' / 'precompute_latents.py')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        latents = str(tmp / 'latents')
        module.main(['--src', src, '--out', latents, '--vae', vae, '--text-encoder', args.text_encoder,
                     '--resolutions', str(args.resolution), '--device', 'cpu', '--splits', args.split])
    return src, vae, latents


def _first_batch(local: str, args: argparse.Namespace, **kw: Any) -> dict[str, Any]:
    from diffusion.data.dataset import build_image_caption_dataloader
    loader = build_image_caption_dataloader(batch_size=args.batch_size, local=local, split=args.split,
                                            resolution=args.resolution, crop='center', random_flip=False,
                                            caption_dropout=0.0, shuffle=False, drop_last=True, **kw).dataloader
    return next(iter(loader))


def _timed_step(model: Any, opt: torch.optim.Optimizer, batch: dict[str, Any]) -> float:
    start = time.perf_counter()
    loss = model.loss(model(batch), batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusion import registry
    from diffusion.builders import import_components
    import_components()  # registers models, schedules, dataloaders
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        src, vae, latents = _prepare(args, Path(tmp))
        pixel = _first_batch(src, args)
        latent = _first_batch(latents, args, use_latents=args.resolution)
        if pixel['caption'] != latent['caption']:
            raise RuntimeError('the pixel and latent datasets do not hold the same rows in the same order')
        factor = registry.build(registry.autoencoders, {'name': 'autoencoder_kl', 'pretrained': vae}).downsample_factor
        model = registry.build(registry.models, {
            'name': 'latent_diffusion',
            'backbone': {'name': 'unet', 'preset': args.preset, 'sample_size': args.resolution // factor},
            'noise_schedule': {'name': 'ddpm'},
            'autoencoder': {'name': 'autoencoder_kl', 'pretrained': vae},
            'text_encoder': {'name': args.text_encoder},
            'use_text_mask': True,
            'empty_caption_path': str(Path(latents) / 'empty_caption.safetensors'),
        })
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times: dict[str, list[float]] = {'online': [], 'precomputed': []}
        for i in range(args.warmup + args.steps):
            for mode, batch in (('online', pixel), ('precomputed', latent)):
                seconds = _timed_step(model, opt, batch)
                if i >= args.warmup:
                    times[mode].append(seconds)
        with torch.no_grad():  # the encoders alone, to show where the difference goes
            enc = []
            for _ in range(args.steps):
                start = time.perf_counter()
                model.encode_images(pixel['image'])
                model.encode_text(pixel['caption'])
                enc.append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med['online'] / med['precomputed']
    n = args.batch_size
    backbone_m = sum(p.numel() for p in model.backbone.parameters()) / 1e6
    print(f'\nLatentDiffusion step, UNet {args.preset} ({backbone_m:.1f}M), {args.resolution}px, batch {n}, '
          f'{args.steps} steps per mode (median), CPU threads {torch.get_num_threads()}')
    print(f'{"mode":<14}{"s/step":>10}{"img/s":>10}')
    for mode in ('online', 'precomputed'):
        print(f'{mode:<14}{med[mode]:>10.4f}{n / med[mode]:>10.1f}')
    print(f'{"encoders only":<14}{statistics.median(enc):>10.4f}')
    print(f'online / precomputed step time: {ratio:.2f}x (CommonCanvas, SD2 scale on A100s: 1.4x)')
    print(json.dumps({'ratio_online_over_precomputed': round(ratio, 3),
                      'online_s_per_step': round(med['online'], 4),
                      'precomputed_s_per_step': round(med['precomputed'], 4),
                      'encoders_s_per_batch': round(statistics.median(enc), 4),
                      'online_imgs_per_s': round(n / med['online'], 2),
                      'precomputed_imgs_per_s': round(n / med['precomputed'], 2),
                      'batch_size': n, 'resolution': args.resolution}))


if __name__ == '__main__':
    main()
