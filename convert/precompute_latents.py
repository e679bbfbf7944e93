"""Precompute autoencoder latents and text-encoder states into a copy of an MDS dataset.

    python convert/precompute_latents.py --src data/mini --out data/mini_latents \\
        --vae outputs/autoencoder-mini/autoencoder --text-encoder minilm --resolutions 64
    composer -n 8 convert/precompute_latents.py --src ... --out ... \\
        --vae stabilityai/stable-diffusion-2-base --vae-subfolder vae \\
        --text-encoder clip --text-encoder-path stabilityai/stable-diffusion-2-base --resolutions 256 512

New columns per row: ``latents_<res>`` (C, res/f, res/f) fp16 for each resolution, ``text_hidden`` (L, D) fp16,
``text_mask`` (L,) uint8 and, for encoders with a pooled output (SDXL), ``text_pooled`` (P,) fp16. Every source
column is kept (images byte for byte). Also written once: ``empty_caption.safetensors`` (the empty caption's
states, for caption dropout at train time) and ``latents.json`` (scaling factor, shapes, encoders).

Latents are stored RAW (unscaled posterior means); the diffusion model scales them once. See diffusion/data/precompute.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from diffusion.data.convert_args import add_map_args, resolve_device

log = logging.getLogger('precompute_latents')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter,
                                allow_abbrev=False)  # --text-encoder-p must not pass for --text-encoder-path
    add_map_args(p, batch_size=16, commit_every=256)
    p.add_argument('--vae', required=True, help='diffusers AutoencoderKL folder or model name')
    p.add_argument('--vae-subfolder', default=None, help="e.g. 'vae' inside a full pipeline folder")
    p.add_argument('--scaling-factor', type=float, default=None,
                   help="override the VAE's scaling_factor (recorded in latents.json only)")
    p.add_argument('--text-encoder', default='minilm',
                   help='text encoder registry name: minilm (default, ships in a package), clip, sdxl_clip_pair, '
                        'tiny_clip')
    p.add_argument('--text-encoder-path', default=None,
                   help='folder or name of the text encoder (minilm: path; clip / sdxl_clip_pair: pretrained)')
    p.add_argument('--text-encoder-kwargs', default='{}', help='JSON of further builder arguments')
    p.add_argument('--resolutions', type=int, nargs='+', default=[256], help='square image sides (256 512)')
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'],
                   help='encoder precision (storage is fp16 regardless). float32 default: the SD2 VAE overflows '
                        'in float16')
    return p.parse_args(argv)


def build_encoder(args: argparse.Namespace, device: str) -> Any:
    """The :class:`diffusion.data.precompute.LatentEncoder` the arguments describe."""
    import torch

    import diffusion.models  # noqa: F401  (registers the autoencoder and text encoder builders)
    from diffusion import registry
    from diffusion.data.precompute import LatentEncoder
    ae = registry.build(registry.autoencoders, {'name': 'autoencoder_kl', 'pretrained': args.vae,
                                                'subfolder': args.vae_subfolder,
                                                'scaling_factor': args.scaling_factor}, '--vae')
    te_block: dict[str, Any] = {'name': args.text_encoder, **json.loads(args.text_encoder_kwargs)}
    if args.text_encoder_path:
        te_block['path' if args.text_encoder == 'minilm' else 'pretrained'] = args.text_encoder_path
    te = registry.build(registry.text_encoders, te_block, '--text-encoder')
    dtype = getattr(torch, args.dtype)
    ae.to(dtype)
    te.to(dtype)
    return LatentEncoder(ae, te, args.resolutions, device=device)


class EncodeRows:
    """The row function for :func:`diffusion.data.mds_rows.map_dataset`."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder

    def __call__(self, rows: list[dict[str, Any]]) -> list[Any]:
        import io

        from PIL import Image, UnidentifiedImageError
        good, images, results = [], [], ['image_unreadable'] * len(rows)
        for i, row in enumerate(rows):
            try:
                image = Image.open(io.BytesIO(row['image']))
                image.load()
            except (UnidentifiedImageError, OSError, ValueError) as err:
                log.warning('row %s: unreadable image, skipped (%s)', row.get('key'), err)
                continue
            good.append(i)
            images.append(image)
        if good:
            encoded = self.encoder(images, [str(rows[i].get('caption', '') or '') for i in good])
            for i, cols in zip(good, encoded):
                results[i] = cols
        return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    args = parse_args(argv)
    from diffusion.data.writer import write_json_atomic
    from diffusion.data.mds_rows import find_splits, map_dataset, rank_and_world
    splits = args.splits if args.splits else find_splits(args.src)
    rank, _ = rank_and_world()
    encoder = build_encoder(args, resolve_device(args.device))
    new_columns = encoder.columns()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        encoder.save_empty_caption(out)
    config = {k: v for k, v in vars(args).items() if k not in ('out', 'device', 'batch_size', 'splits')}
    report = map_dataset(args.src, out, EncodeRows(encoder), new_columns, config=config,
                         batch_size=args.batch_size, commit_every=args.commit_every, splits=splits,
                         desc='latents', limit=args.limit)
    if rank == 0:
        meta = encoder.metadata(vae=args.vae, vae_subfolder=args.vae_subfolder, text_encoder=args.text_encoder,
                                text_encoder_path=args.text_encoder_path, splits=report['splits'])
        write_json_atomic(out / 'latents.json', meta)
        print(json.dumps(report, indent=1, sort_keys=True))
        shapes = ', '.join(f'{k} {v.split(":", 2)[2]}' for k, v in new_columns.items())
        print(f'encoded {report["kept"]} rows ({report["skipped"]} skipped) into {out}: {shapes}; '
              f'scaling_factor {meta["scaling_factor"]:.5g} (stored latents are RAW, unscaled)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
