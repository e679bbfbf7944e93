"""Native export: a folder of safetensors weights + a JSON config that loads back with one call.

For backbones diffusers has no pipeline for (MicroDiT), and for any ``LatentDiffusion``::

    python -m diffusion.export.native --checkpoint outputs/RUN/checkpoints --out exports/RUN [--weights ema]

    from diffusion.export.native import export_native, load_native
    export_native(model, model_config, 'exports/microdit')      # model_config: the run's `model:` block
    model = load_native('exports/microdit')                     # the same model, in eval mode
    images = model.generate(prompts, **json.load(open('exports/microdit/config.json'))['generation'])

The folder holds ``model.safetensors`` (every weight of the model: backbone, autoencoder, text encoder, so the
folder is complete) and ``config.json`` with the ``model:`` block the model was built from, the generation
defaults and provenance. Loading rebuilds the model from that block through the registries (a block that names a
pretrained checkpoint by hub name needs it to build, then its weights are replaced by the folder's) and loads the
weights strictly.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from diffusion.samplers import sampling_defaults

log = logging.getLogger(__name__)

__all__ = ['FORMAT', 'export_native', 'load_native', 'export_checkpoint_native']

FORMAT = 'diffusion-native'
WEIGHTS_NAME, CONFIG_NAME = 'model.safetensors', 'config.json'


def export_native(model: Any, model_config: dict[str, Any], out_dir: Union[str, Path],
                  generation: Optional[dict[str, Any]] = None, metadata: Optional[dict[str, Any]] = None) -> Path:
    """Write ``model`` as ``out_dir/{model.safetensors, config.json}``.

    Args:
        model: A ``LatentDiffusion`` (any backbone).
        model_config: The ``model:`` block it was built from (``name: latent_diffusion`` + kwargs).
        out_dir: Output folder (created).
        generation: Default ``generate()`` arguments to record (default: ``diffusion.samplers.sampling_defaults``).
        metadata: Provenance to record (e.g. the checkpoint info).

    Returns:
        The folder.
    """
    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    from diffusion.models.frozen_state import include_frozen_parts
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    block = OmegaConf.to_container(OmegaConf.create(dict(model_config)), resolve=True)
    if generation is None:
        generation = sampling_defaults(model)
    with include_frozen_parts(model):  # the folder is complete: encoders too (checkpoints leave them out)
        save_model(model, str(out / WEIGHTS_NAME))  # handles tied/shared tensors; metrics hold no persistent state
    config = {'format': FORMAT, 'version': 1, 'model': block, 'generation': dict(generation),
              'scaling_factor': model.scaling_factor, 'backbone': type(model.backbone).__name__,
              'metadata': metadata or {}}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + '\n')
    log.info('exported %s to %s', type(model.backbone).__name__, out)
    return out


def load_native(folder: Union[str, Path], device: Union[str, torch.device] = 'cpu') -> Any:
    """Rebuild the model a native export describes, load its weights (strict) and return it in eval mode."""
    from safetensors.torch import load_model

    from diffusion import registry
    from diffusion.builders import import_components
    path = Path(folder)
    config = json.loads((path / CONFIG_NAME).read_text())
    if config.get('format') != FORMAT:
        raise ValueError(f'{path / CONFIG_NAME} is not a {FORMAT} export (format {config.get("format")!r})')
    import_components()
    model = registry.build(registry.models, config['model'], 'model')
    missing, unexpected = load_model(model, str(path / WEIGHTS_NAME), strict=False)
    missing = [k for k in missing if not k.startswith('val_loss')]
    if missing or unexpected:
        raise RuntimeError(f'{path}: weights do not match the model of its config: missing {missing[:8]}, '
                           f'unexpected {unexpected[:8]}')
    return model.to(device).eval()


def export_checkpoint_native(checkpoint: Union[str, Path], out_dir: Union[str, Path],
                             config: Optional[Union[str, Path]] = None, weights: str = 'auto',
                             generation: Optional[dict[str, Any]] = None) -> Path:
    """A composer checkpoint (EMA weights by default when the run has them) -> a native export folder.

    ``generation``: generation defaults to record in place of the schedule's (``sampler``, ``num_inference_steps``,
    ``guidance_scale``; a key left out or ``None`` keeps the schedule's default), e.g. the settings a model was
    evaluated at."""
    from diffusion.config import load_config
    from diffusion.checkpoints import load_model
    from diffusion.samplers import resolve_sampling
    model, info = load_model(checkpoint, config, weights)
    cfg = load_config(Path(info.config))
    chosen = resolve_sampling(model, **(generation or {}))
    return export_native(model, cfg.model, out_dir, generation=chosen, metadata=info.as_dict())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: a run's checkpoint -> a native export folder; prints a one-line summary (exit 2 on a bad input)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False)
    parser.add_argument('--checkpoint', required=True, help='composer checkpoint (.pt) or its save folder')
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument('--config', default=None, help='train config (default: config.yaml beside the checkpoint)')
    parser.add_argument('--weights', default='auto', choices=('auto', 'ema', 'training'))
    parser.add_argument('--sampler', default=None, help="generation default to record (default: the noise "
                        "schedule's: heun for EDM and flow matching, ddim for DDPM)")
    parser.add_argument('--steps', type=int, default=None, help='generation default: sampling steps')
    parser.add_argument('--guidance', type=float, default=None, help='generation default: guidance scale')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    try:
        out = export_checkpoint_native(args.checkpoint, args.out, args.config, args.weights,
                                       {'sampler': args.sampler, 'num_inference_steps': args.steps,
                                        'guidance_scale': args.guidance})
    except (FileNotFoundError, ValueError) as err:
        print(f'export failed: {err}', file=sys.stderr)
        return 2
    config = json.loads((out / CONFIG_NAME).read_text())
    print(f'exported {config["backbone"]} ({config["metadata"].get("weights")} weights, batch '
          f'{config["metadata"].get("batch")}) to {out}: {WEIGHTS_NAME}, {CONFIG_NAME}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
