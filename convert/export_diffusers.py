"""Export a trained checkpoint as a diffusers pipeline folder (safetensors only).

    python convert/export_diffusers.py --checkpoint outputs/RUN/checkpoints --out exports/RUN [--weights ema]

UNet models without added conditioning become a ``StableDiffusionPipeline``, SDXL-style ones a
``StableDiffusionXLPipeline``; load the folder with ``diffusers.DiffusionPipeline.from_pretrained(OUT)`` (with a
MiniLM text encoder diffusers logs that the stock SD pipeline expects CLIP: harmless, the images match;
``diffusion.export.to_diffusers.load_pipeline(OUT)`` loads without that notice).
See ``diffusion/export/to_diffusers.py`` for what is matched so the pipeline reproduces ``LatentDiffusion.generate``.
"""
from __future__ import annotations

import argparse
import logging
import sys

from diffusion.checkpoints import WEIGHT_CHOICES, load_model
from diffusion.export.to_diffusers import ExportError, export_pipeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument('--checkpoint', required=True, help='composer checkpoint (.pt) or its save folder')
    parser.add_argument('--out', required=True, help='output folder of the diffusers pipeline')
    parser.add_argument('--config', default=None, help='train config (default: config.yaml beside the checkpoint)')
    parser.add_argument('--weights', default='auto', choices=WEIGHT_CHOICES,
                        help='auto = EMA weights when the run has them (default), else training weights')
    parser.add_argument('--sampler', default='ddim', help='scheduler saved with the pipeline (a sampler name of '
                        "the model's noise schedule)")
    parser.add_argument('--allow-unsafe-pickle', action='store_true',
                        help='fall back to full unpickling if weights-only loading fails (trusted files only)')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    try:
        model, info = load_model(args.checkpoint, args.config, args.weights, allow_unsafe=args.allow_unsafe_pickle)
        out = export_pipeline(model, args.out, sampler=args.sampler, metadata={**info.as_dict()})
    except (ExportError, FileNotFoundError, ValueError) as err:
        print(f'export failed: {err}', file=sys.stderr)
        return 2
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob('*.safetensors'))
    print(f'exported {info.checkpoint} ({info.weights} weights, batch {info.batch}) to {out}: {", ".join(files)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
