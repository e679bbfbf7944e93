"""Export a trained autoencoder in the diffusers format, with its latent scaling factor measured from data."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from diffusion import registry
from diffusion.models.wrapping import unwrap

log = logging.getLogger(__name__)

__all__ = ['ExportAutoencoder', 'center_latent_channels', 'measure_scaling_factor']


@torch.no_grad()
def measure_scaling_factor(model: Any, batches: Iterable[Any], num_batches: int,
                           device: torch.device, center_channels: bool = False) -> dict[str, Any]:
    """1 / std of the RAW latents (posterior means) over ``num_batches`` batches, as SD measured its 0.18215.

    The std is over every latent element of every image (all channels pooled), gathered over ranks. With
    ``center_channels`` it is the spread around each channel's own mean (the latents :func:`center_latent_channels`
    leaves), else around the mean of all elements.

    Returns:
        ``scaling_factor``, ``latent_std``, ``latent_mean``, ``channel_means`` (per latent channel) and
        ``num_images`` (over all ranks).
    """
    images_seen, sums, sums_sq, per_channel = 0, None, None, 0
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        images = model.images(batch).to(device)
        z = model.encode_raw(images).double()  # (B, C, h, w)
        s, sq = z.sum((0, 2, 3)), (z**2).sum((0, 2, 3))
        sums, sums_sq = (s, sq) if sums is None else (sums + s, sums_sq + sq)
        per_channel += z.numel() // z.shape[1]
        images_seen += images.shape[0]
    if sums is None:
        raise RuntimeError('export_autoencoder: the dataloader gave no batches to measure the latent scale on')
    stats = torch.cat([torch.tensor([images_seen, per_channel], dtype=torch.float64, device=device), sums, sums_sq])
    dist.all_reduce(stats)  # sums over ranks (a no-op on one process)
    images_seen, per_channel = int(stats[0]), float(stats[1])
    channels = (len(stats) - 2) // 2
    means = stats[2:2 + channels] / per_channel
    mean_sq = stats[2 + channels:] / per_channel
    mean = float(means.mean())
    var = float((mean_sq - means**2).mean()) if center_channels else float(mean_sq.mean()) - mean**2
    std = max(var, 0.0)**0.5
    if std == 0:
        raise RuntimeError('export_autoencoder: latents have zero spread; cannot measure a scaling factor')
    return {'scaling_factor': 1.0 / std, 'latent_std': std, 'latent_mean': mean,
            'channel_means': [float(m) for m in means], 'num_images': images_seen}


@torch.no_grad()
def center_latent_channels(vae: Any, channel_means: Sequence[float]) -> None:
    """Re-parameterise a diffusers ``AutoencoderKL`` in place so its latents have zero mean per channel.

    The encoder's last 1x1 convolution (``quant_conv``, which outputs the posterior's means and log-variances)
    subtracts ``channel_means`` from the means; the decoder's first one (``post_quant_conv``) adds them back
    (its bias grows by ``W @ channel_means``). Decoding an encoding is unchanged; only the latent space moves.

    Why: diffusion noise is zero-mean, so latents far from zero mean per channel (our demo autoencoder's raw
    latents average about -2.5 in one channel, the white emoji background) leave a channel offset that the
    schedule must carry from noise to data. Centring removes that offset; it did not by itself remove the demo's
    colour casts, which came from the noise schedule's non-zero terminal SNR (see the README's demo results).
    """
    if getattr(vae, 'quant_conv', None) is None or getattr(vae, 'post_quant_conv', None) is None:
        raise ValueError('center_latent_channels needs an AutoencoderKL with quant_conv and post_quant_conv '
                         '(use_quant_conv / use_post_quant_conv)')
    m = torch.as_tensor(list(channel_means), dtype=vae.quant_conv.bias.dtype, device=vae.quant_conv.bias.device)
    c = vae.post_quant_conv.in_channels
    if m.numel() != c or vae.quant_conv.kernel_size != (1, 1) or vae.post_quant_conv.kernel_size != (1, 1):
        raise ValueError(f'{m.numel()} channel means for {c} latent channels (1x1 quant convs expected)')
    vae.quant_conv.bias[:c] -= m
    vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ m


class ExportAutoencoder(Callback):
    """At the end of training: measure the latent scale, store it in the VAE config, ``save_pretrained``.

    With ``center_channels`` (default) the exported VAE is first re-parameterised so that its latents have zero
    mean per channel (:func:`center_latent_channels`; reconstructions unchanged), and the scale is measured
    around those means. The training model itself is left as it was (the export is a copy).

    The export loads with ``AutoencoderKL.from_pretrained(folder)``, so every diffusion config uses it like any
    VAE (``autoencoder: {name: autoencoder_kl, pretrained: <folder>}``) and gets the measured
    ``scaling_factor`` with it. ``scaling.json`` next to it records the measurement. Logs
    ``autoencoder/scaling_factor`` and ``autoencoder/latent_std``.

    Args:
        folder: Output folder; ``{run_name}`` is filled in.
        num_batches: Batches to measure the latent std on.
        dataloader: ``'eval'`` (the first evaluator's, default; falls back to train) or ``'train'``.
        center_channels: Centre the latent channels of the export (see above).
    """

    def __init__(self, folder: str = 'outputs/{run_name}/autoencoder', num_batches: int = 8,
                 dataloader: str = 'eval', center_channels: bool = True) -> None:
        if dataloader not in ('eval', 'train'):
            raise ValueError(f"export_autoencoder: dataloader must be 'eval' or 'train', got {dataloader!r}")
        self.folder = folder
        self.num_batches = num_batches
        self.dataloader = dataloader
        self.center_channels = center_channels
        self.exported: Optional[Path] = None
        self.stats: dict[str, Any] = {}

    def _batches(self, state: State) -> Iterable[Any]:
        if self.dataloader == 'eval' and state.evaluators:
            return state.evaluators[0].dataloader.dataloader
        if state.train_dataloader is None:
            raise RuntimeError('export_autoencoder: no dataloader to measure the latent scale on')
        return state.train_dataloader

    def fit_end(self, state: State, logger: Logger) -> None:
        model = unwrap(state.model)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        self.stats = measure_scaling_factor(model, self._batches(state), self.num_batches, device,
                                            center_channels=self.center_channels)
        model.train(was_training)
        vae = copy.deepcopy(model.vae)
        if self.center_channels:
            center_latent_channels(vae, self.stats['channel_means'])
        self.stats['centered'] = self.center_channels
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
