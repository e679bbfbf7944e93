"""Save generated sample images as PNG files during training."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from diffusion import registry

log = logging.getLogger(__name__)


class SampleImages(Callback):
    """Generate images for fixed prompts and seed after every evaluation and at the end of training.

    Each time it writes one grid (one image per prompt, same seed every time) to
    ``<folder>/ba<batch>.png`` and logs the images to every logger under the key ``samples``.

    Args:
        prompts: The prompts, one image each.
        folder: Output folder; ``{run_name}`` is filled in.
        guidance_scale: Classifier-free guidance scale.
        num_inference_steps: Sampler steps.
        sampler: Sampler name understood by the model's noise schedule.
        seed: Seed of the initial noise (the same every time, so grids compare across steps).
        height: Image height (default: the model's).
        width: Image width (default: the model's).
    """

    def __init__(self, prompts: Sequence[str], folder: str = 'outputs/{run_name}/samples',
                 guidance_scale: float = 3.0, num_inference_steps: int = 25, sampler: str = 'ddim',
                 seed: int = 0, height: Optional[int] = None, width: Optional[int] = None) -> None:
        if not prompts:
            raise ValueError('sample_images: give at least one prompt')
        self.prompts = list(prompts)
        self.folder = folder
        self.kwargs = dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                           sampler=sampler, seed=seed, height=height, width=width)
        self.saved: list[Path] = []

    def _sample(self, state: State, logger: Logger) -> None:
        model = state.model.module if hasattr(state.model, 'module') else state.model
        was_training = model.training
        model.eval()
        images = model.generate(self.prompts, **self.kwargs)  # (N, 3, H, W) in [0, 1]
        model.train(was_training)
        if dist.get_global_rank() != 0:
            return
        from torchvision.utils import save_image
        folder = Path(self.folder.format(run_name=state.run_name))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f'ba{int(state.timestamp.batch)}.png'
        save_image(images.float().cpu(), path, nrow=min(len(self.prompts), 8), padding=2)
        self.saved.append(path)
        logger.log_images(images.float().cpu(), name='samples', channels_last=False)
        log.info('sample_images: wrote %s', path)

    def eval_end(self, state: State, logger: Logger) -> None:
        self._sample(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._sample(state, logger)


registry.callbacks.register('sample_images', func=SampleImages)
