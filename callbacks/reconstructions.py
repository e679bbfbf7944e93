"""Save autoencoder input/reconstruction grids as PNG files during training."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from diffusion import registry
from diffusion.models.wrapping import unwrap

log = logging.getLogger(__name__)

__all__ = ['Reconstructions']


class Reconstructions(Callback):
    """Reconstruct a fixed set of images after every evaluation and at the end of training.

    The images are the first ``num_images`` of the first evaluation batch (or, without evaluation, of the first
    training batch), kept for the whole run so grids compare across steps. Each time it writes one grid, inputs
    on the top row and reconstructions below, to ``<folder>/ba<batch>.png`` and logs the same grid to every
    logger under the key ``reconstructions``; it also logs ``reconstructions/l1`` (mean absolute error in
    [-1, 1] units on those images).

    Works with any model that has ``reconstruct(images) -> images`` and ``images(batch) -> tensor``
    (``autoencoder_kl_training``).

    Args:
        folder: Output folder; ``{run_name}`` is filled in.
        num_images: Images per grid.
    """

    def __init__(self, folder: str = 'outputs/{run_name}/reconstructions', num_images: int = 8) -> None:
        if num_images < 1:
            raise ValueError('reconstructions: num_images must be at least 1')
        self.folder = folder
        self.num_images = num_images
        self.images: Optional[torch.Tensor] = None
        self._from_eval = False
        self.saved: list[Path] = []

    def _capture(self, state: State, from_eval: bool) -> None:
        if self.images is not None and (self._from_eval or not from_eval):
            return
        images = unwrap(state.model).images(state.batch)
        self.images = images[:self.num_images].detach().float().cpu().clone()
        self._from_eval = from_eval

    def batch_end(self, state: State, logger: Logger) -> None:
        self._capture(state, from_eval=False)

    def eval_batch_end(self, state: State, logger: Logger) -> None:
        self._capture(state, from_eval=True)

    def _write(self, state: State, logger: Logger) -> None:
        if self.images is None:
            return
        model = unwrap(state.model)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        recon = model.reconstruct(self.images.to(device)).float().cpu()  # (N, 3, H, W)
        model.train(was_training)
        l1 = float((recon.clamp(-1, 1) - self.images).abs().mean())
        logger.log_metrics({'reconstructions/l1': l1})
        if dist.get_global_rank() != 0:
            return
        from torchvision.utils import make_grid, save_image
        grid = make_grid(torch.cat([self.images, recon]).add(1).div(2).clamp(0, 1), nrow=len(self.images),
                         padding=2)  # (3, H', W'): inputs on top, reconstructions below
        folder = Path(self.folder.format(run_name=state.run_name))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f'ba{int(state.timestamp.batch)}.png'
        save_image(grid, path)
        self.saved.append(path)
        logger.log_images(grid, name='reconstructions', channels_last=False)
        log.info('reconstructions: wrote %s (l1 %.4f)', path, l1)

    def eval_end(self, state: State, logger: Logger) -> None:
        self._write(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._write(state, logger)


registry.callbacks.register('reconstructions', func=Reconstructions)
