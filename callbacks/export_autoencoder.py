"""Export a trained autoencoder in the diffusers format, with its latent scaling factor measured from data."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from diffusion import registry

log = logging.getLogger(__name__)

__all__ = ['ExportAutoencoder', 'measure_scaling_factor']


@torch.no_grad()
def measure_scaling_factor(model: Any, batches: Iterable[Any], num_batches: int,
                           device: torch.device) -> dict[str, float]:
    """1 / std of the RAW latents (posterior means) over ``num_batches`` batches, as SD measured its 0.18215.

    The std is over every latent element of every image (all channels pooled), gathered over ranks.

    Returns:
        ``scaling_factor``, ``latent_std``, ``latent_mean`` and ``num_images`` (over all ranks).
    """
    images_seen, count, total, total_sq = 0, 0, 0.0, 0.0
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        images = model.images(batch).to(device)
        z = model.encode_raw(images).double()  # (B, C, h, w)
        count += z.numel()
        total += float(z.sum())
        total_sq += float((z**2).sum())
        images_seen += images.shape[0]
    stats = torch.tensor([images_seen, count, total, total_sq], dtype=torch.float64, device=device)
    dist.all_reduce(stats)  # sums over ranks (a no-op on one process)
    images_seen, count, total, total_sq = (float(v) for v in stats)
    if count == 0:
        raise RuntimeError('export_autoencoder: the dataloader gave no batches to measure the latent scale on')
    mean = total / count
    std = max((total_sq / count - mean**2), 0.0)**0.5
    if std == 0:
        raise RuntimeError('export_autoencoder: latents have zero spread; cannot measure a scaling factor')
    return {'scaling_factor': 1.0 / std, 'latent_std': std, 'latent_mean': mean, 'num_images': int(images_seen)}


class ExportAutoencoder(Callback):
    """At the end of training: measure the latent scale, store it in the VAE config, ``save_pretrained``.

    The export loads with ``AutoencoderKL.from_pretrained(folder)``, so every diffusion config uses it like any
    VAE (``autoencoder: {name: autoencoder_kl, pretrained: <folder>}``) and gets the measured
    ``scaling_factor`` with it. ``scaling.json`` next to it records the measurement. Logs
    ``autoencoder/scaling_factor`` and ``autoencoder/latent_std``.

    Args:
        folder: Output folder; ``{run_name}`` is filled in.
        num_batches: Batches to measure the latent std on.
        dataloader: ``'eval'`` (the first evaluator's, default; falls back to train) or ``'train'``.
    """

    def __init__(self, folder: str = 'outputs/{run_name}/autoencoder', num_batches: int = 8,
                 dataloader: str = 'eval') -> None:
        if dataloader not in ('eval', 'train'):
            raise ValueError(f"export_autoencoder: dataloader must be 'eval' or 'train', got {dataloader!r}")
        self.folder = folder
        self.num_batches = num_batches
        self.dataloader = dataloader
        self.exported: Optional[Path] = None
        self.stats: dict[str, float] = {}

    def _batches(self, state: State) -> Iterable[Any]:
        if self.dataloader == 'eval' and state.evaluators:
            return state.evaluators[0].dataloader.dataloader
        if state.train_dataloader is None:
            raise RuntimeError('export_autoencoder: no dataloader to measure the latent scale on')
        return state.train_dataloader

    def fit_end(self, state: State, logger: Logger) -> None:
        model = state.model.module if hasattr(state.model, 'module') else state.model
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        self.stats = measure_scaling_factor(model, self._batches(state), self.num_batches, device)
        model.train(was_training)
        vae = model.vae
        vae.register_to_config(scaling_factor=self.stats['scaling_factor'])
        logger.log_metrics({'autoencoder/scaling_factor': self.stats['scaling_factor'],
                            'autoencoder/latent_std': self.stats['latent_std']})
        folder = Path(self.folder.format(run_name=state.run_name))
        if dist.get_global_rank() == 0:
            vae.save_pretrained(folder)
            (folder / 'scaling.json').write_text(json.dumps(self.stats, indent=1))
            log.info('export_autoencoder: saved %s (scaling_factor %.5f)', folder, self.stats['scaling_factor'])
        dist.barrier()
        self.exported = folder


registry.callbacks.register('export_autoencoder', func=ExportAutoencoder)
