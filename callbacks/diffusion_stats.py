"""Gradient-norm and latent statistics of a diffusion run."""
from __future__ import annotations

import logging

import torch
from composer.core import Callback, State
from composer.loggers import Logger

from diffusion import registry
from diffusion.models.wrapping import unwrap

log = logging.getLogger(__name__)

__all__ = ['DiffusionStats']


class DiffusionStats(Callback):
    """Log the global gradient norm and statistics of the (scaled) latents every ``interval`` batches.

    The latent statistics check the autoencoder's ``scaling_factor``: scaled latents should have a standard
    deviation near 1, or the noise schedule's signal-to-noise ratios are off. They are computed from the current
    batch through the model's own :meth:`batch_latents` (a cheap scale for precomputed latents, one autoencoder
    encode in pixel mode), only on logged batches.

    Logs: ``grad_norm/global`` (L2 norm over all trainable parameters, after the batch's backward passes),
    ``latents/mean``, ``latents/std``, ``latents/abs_max``.

    Args:
        interval: Log every this many batches.
    """

    def __init__(self, interval: int = 10) -> None:
        if interval < 1:
            raise ValueError(f'diffusion_stats.interval must be >= 1, got {interval}')
        self.interval = interval

    def _due(self, state: State) -> bool:
        return int(state.timestamp.batch) % self.interval == 0  # the 0-based index of the batch being trained

    def after_train_batch(self, state: State, logger: Logger) -> None:
        # AFTER_TRAIN_BATCH: the gradients of every microbatch are accumulated, the optimizer has not stepped.
        if not self._due(state):
            return
        grads = [p.grad.detach().float().norm() for p in state.model.parameters()
                 if p.requires_grad and p.grad is not None]
        if grads:
            logger.log_metrics({'grad_norm/global': torch.stack(grads).norm().item()})
        model = unwrap(state.model)
        if hasattr(model, 'batch_latents'):
            with torch.no_grad():
                latents = model.batch_latents(state.batch).float()  # (B, C, h, w)
            logger.log_metrics({'latents/mean': latents.mean().item(), 'latents/std': latents.std().item(),
                                'latents/abs_max': latents.abs().max().item()})


registry.callbacks.register('diffusion_stats', func=DiffusionStats)
