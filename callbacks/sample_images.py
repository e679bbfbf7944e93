"""Render fixed prompts and seeds into one labelled image grid during training."""
from __future__ import annotations

import contextlib
import logging
import textwrap
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from composer.core import Callback, State
from composer.core import precision as composer_precision
from composer.loggers import Logger
from composer.utils import dist
from PIL import Image, ImageDraw, ImageFont

from diffusion import registry
from diffusion.models.wrapping import unwrap

log = logging.getLogger(__name__)

__all__ = ['SampleImages', 'labelled_grid', 'ema_weights']

# The grid's defaults for DDPM models (quick); EDM models take the project's (heun, 30, 5.0).
QUICK_DDPM_SAMPLING = {'sampler': 'ddim', 'num_inference_steps': 25, 'guidance_scale': 3.0}


@contextlib.contextmanager
def ema_weights(state: State) -> Iterator[str]:
    """Put composer's EMA weights into ``state.model`` for the duration of the block.

    Composer's ``EMA`` swaps the averaged weights in only around evaluation and checkpointing, and swaps them out
    again (at ``EVAL_END`` / ``BATCH_START``) before callbacks see the model, so a callback that samples at those
    events would see the training weights. The swap is its own inverse, so the algorithm's bookkeeping
    (``ema_weights_active``) stays true.

    Yields:
        ``'ema'`` if the model holds the EMA weights inside the block, else ``'training'`` (no EMA, or EMA not
        started yet).
    """
    from composer.algorithms import EMA
    ema = next((a for a in state.algorithms if isinstance(a, EMA)), None)
    if ema is None or not ema.ema_started or ema.ema_model is None:
        yield 'training'
        return
    if ema.ema_weights_active:  # e.g. right after a checkpoint: the EMA weights are in the model already
        yield 'ema'
        return
    ema.ema_model.swap_params(state.model)
    try:
        yield 'ema'
    finally:
        ema.ema_model.swap_params(state.model)


def labelled_grid(images: torch.Tensor, labels: Sequence[str], ncols: int = 4, label_lines: int = 3) -> Image.Image:
    """Tile ``(N, 3, H, W)`` images in [0, 1] into one picture with each label written under its image.

    Args:
        images: The images.
        labels: One caption per image (wrapped to the cell width, at most ``label_lines`` lines).
        ncols: Images per row.
        label_lines: Text lines reserved under each image.
    """
    n, _, h, w = images.shape
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    font = ImageFont.load_default()
    line_h = 11
    pad = 2
    cell_w, cell_h = w + 2 * pad, h + 2 * pad + label_lines * line_h
    grid = Image.new('RGB', (ncols * cell_w, nrows * cell_h), 'white')
    draw = ImageDraw.Draw(grid)
    arr = (images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    chars = max(4, cell_w // 6)  # the default bitmap font is ~6 px per character
    for i, (img, label) in enumerate(zip(arr, labels)):
        x, y = (i % ncols) * cell_w + pad, (i // ncols) * cell_h + pad
        grid.paste(Image.fromarray(img), (x, y))
        lines = textwrap.wrap(label, chars)[:label_lines] or ['']
        for j, line in enumerate(lines):
            draw.text((x, y + h + j * line_h), line, fill='black', font=font)
    return grid


class SampleImages(Callback):
    """Sample fixed prompts with fixed seeds every ``every_n_batches`` batches and at the end of training.

    Each time it writes ONE grid, the prompt printed under each image, to ``<folder>/ba<batch>.png`` and logs it
    to every logger under the key ``samples``. Prompt ``i`` always starts from the noise of seed ``seed + i``, so
    grids compare across steps. When composer's ``EMA`` has started, the grid is drawn with the EMA weights (see
    :func:`ema_weights`). With ``every_n_batches=0`` it samples after every evaluation instead.

    Sampling runs eagerly (``torch.compiler.set_stance('force_eager')``) so a backbone compiled for training
    is not recompiled for the sampler's batch shapes.

    Logs: ``samples`` (image). Attributes ``saved`` (paths), ``weights_used`` (``'ema'``/``'training'`` per grid)
    and ``last_images`` (the last grid's images, ``(N, 3, H, W)``).

    Args:
        prompts: The prompts, one image each.
        folder: Output folder; ``{run_name}`` is filled in.
        every_n_batches: Sampling interval in batches (0: after each evaluation).
        guidance_scale: Classifier-free guidance scale.
        num_inference_steps: Sampler steps.
        sampler: Sampler name understood by the model's noise schedule. Each of these three left unset follows
            the model's noise schedule: EDM Heun, 30 steps, guidance 5 (MicroDiT); DDIM, 25 steps, guidance 3
            for DDPM models (:data:`QUICK_DDPM_SAMPLING`, a quick grid).
        seed: Seed of the first prompt's initial noise.
        height: Image height (default: the model's).
        width: Image width (default: the model's).
        ncols: Images per grid row.
    """

    def __init__(self, prompts: Sequence[str], folder: str = 'outputs/{run_name}/samples', every_n_batches: int = 0,
                 guidance_scale: Optional[float] = None, num_inference_steps: Optional[int] = None,
                 sampler: Optional[str] = None,
                 seed: int = 0, height: Optional[int] = None, width: Optional[int] = None, ncols: int = 4) -> None:
        if not prompts:
            raise ValueError('sample_images: give at least one prompt')
        if every_n_batches < 0:
            raise ValueError(f'sample_images.every_n_batches must be >= 0, got {every_n_batches}')
        self.prompts = list(prompts)
        self.folder = folder
        self.every_n_batches = every_n_batches
        self.seed = seed
        self.ncols = ncols
        self.kwargs = dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                           sampler=sampler, height=height, width=width)
        self.saved: list[Path] = []
        self.weights_used: list[str] = []
        self.last_images: Optional[torch.Tensor] = None
        self._last_batch = -1

    def generate(self, model: Any) -> torch.Tensor:
        """The grid's images from ``model`` (a ``LatentDiffusion``): prompt ``i`` with seed ``seed + i``."""
        from diffusion.samplers import resolve_sampling
        kwargs = {**self.kwargs, **resolve_sampling(model, self.kwargs['sampler'], self.kwargs['num_inference_steps'],
                                                    self.kwargs['guidance_scale'], ddpm=QUICK_DDPM_SAMPLING)}
        images = []
        for i, prompt in enumerate(self.prompts):
            images.append(model.generate([prompt], seed=self.seed + i, **kwargs))  # (1, 3, H, W)
        return torch.cat(images)

    def _sample(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        if batch == self._last_batch:  # e.g. an evaluation and fit end at the same batch
            return
        self._last_batch = batch
        model = unwrap(state.model)
        was_training = model.training
        model.eval()
        # The run's precision: under FSDP mixed precision the backbone holds bf16 parameters and fp32 buffers,
        # which only autocast reconciles (as in training).
        with ema_weights(state) as weights, torch.compiler.set_stance('force_eager'), \
                composer_precision.get_precision_context(state.precision):
            images = self.generate(model).float().cpu()
        model.train(was_training)
        self.last_images = images
        self.weights_used.append(weights)
        if dist.get_global_rank() != 0:
            return
        grid = labelled_grid(images, self.prompts, self.ncols)
        folder = Path(self.folder.format(run_name=state.run_name))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f'ba{batch}.png'
        grid.save(path)
        self.saved.append(path)
        logger.log_images(np.asarray(grid), name='samples', channels_last=True, step=batch)
        log.info('sample_images: wrote %s (%s weights)', path, weights)

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.every_n_batches and int(state.timestamp.batch) % self.every_n_batches == 0:
            self._sample(state, logger)

    def eval_end(self, state: State, logger: Logger) -> None:
        if not self.every_n_batches:
            self._sample(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._sample(state, logger)


registry.callbacks.register('sample_images', func=SampleImages)
