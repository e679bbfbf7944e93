"""Frozen image autoencoders (diffusers ``AutoencoderKL``) behind one small interface.

Latent scaling convention (one place, applied once): ``Autoencoder.encode`` returns RAW latents (the posterior
mean, or a sample), exactly what ``convert/precompute_latents.py`` stores. The diffusion model maps them to
``(raw - shift_factor) * scaling_factor`` right before noising and back right before ``decode``
(``LatentDiffusion.scale`` / ``unscale``). ``scaling_factor`` is SD's 0.18215 for its VAE, ours is measured from
data when the autoencoder is trained; ``shift_factor`` is 0 for SD/SDXL VAEs and set by SD3/Flux-style VAEs
(their ``config.shift_factor``, e.g. 0.0609 for SD3), which centre the latents before scaling them. Nothing else
scales latents.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from diffusion import registry
from diffusion.models.text_encoders import load_pretrained

log = logging.getLogger(__name__)

__all__ = ['Autoencoder', 'TINY_VAE_CONFIG']

# A ~1M-parameter AutoencoderKL with 4x downsampling: random weights, for tests and until the project's own
# small autoencoder is trained (yamls/autoencoder-mini.yaml).
TINY_VAE_CONFIG: dict[str, Any] = {
    'in_channels': 3,
    'out_channels': 3,
    'down_block_types': ['DownEncoderBlock2D'] * 3,
    'up_block_types': ['UpDecoderBlock2D'] * 3,
    'block_out_channels': [32, 64, 64],
    'layers_per_block': 1,
    'latent_channels': 4,
    'norm_num_groups': 16,
    'sample_size': 64,
}


class Autoencoder(nn.Module):
    """A frozen ``AutoencoderKL`` with the project's scaling convention.

    Args:
        vae: The diffusers autoencoder.
        scaling_factor: Multiplies raw latents before diffusion; defaults to ``vae.config.scaling_factor``.
        shift_factor: Subtracted from raw latents before scaling; defaults to ``vae.config.shift_factor``
            (absent or ``None`` -> 0).
        sample_posterior: Encode to a posterior sample instead of its mean (the mean is deterministic and is
            what precomputed latents store).
    """

    def __init__(self, vae: nn.Module, scaling_factor: Optional[float] = None, sample_posterior: bool = False,
                 shift_factor: Optional[float] = None) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)
        if shift_factor is None:
            shift_factor = getattr(vae.config, 'shift_factor', None)
        self.shift_factor = float(shift_factor or 0.0)
        self.sample_posterior = sample_posterior
        self.requires_grad_(False)
        self.eval()
        self._fsdp_wrap = False  # frozen: never sharded

    def train(self, mode: bool = True) -> 'Autoencoder':
        return super().train(False)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample_factor(self) -> int:
        return 2**(len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> raw (unscaled) latents (B, C, H/f, W/f)."""
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return dist.sample(generator) if self.sample_posterior else dist.mean

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw (unscaled) latents -> images in [-1, 1] (not clamped)."""
        return self.vae.decode(latents.to(self.vae.dtype)).sample


@registry.autoencoders.register('autoencoder_kl')
def build_autoencoder_kl(pretrained: Optional[str] = None, subfolder: Optional[str] = None,
                         config: Optional[dict[str, Any]] = None, scaling_factor: Optional[float] = None,
                         sample_posterior: bool = False, seed: int = 0,
                         shift_factor: Optional[float] = None) -> Autoencoder:
    """Build the frozen autoencoder.

    Args:
        pretrained: A diffusers model name or folder (e.g. ``stabilityai/stable-diffusion-2-base`` with
            ``subfolder: vae``, or the folder ``yamls/autoencoder-mini.yaml`` exports).
        subfolder: Subfolder inside ``pretrained``.
        config: Without ``pretrained``: an ``AutoencoderKL`` config for a randomly initialised model
            (``'tiny'`` presets to :data:`TINY_VAE_CONFIG`).
        scaling_factor: Overrides the checkpoint's ``scaling_factor``.
        shift_factor: Overrides the checkpoint's ``shift_factor`` (SD3/Flux-style VAEs; 0 for SD's).
        sample_posterior: See :class:`Autoencoder`.
        seed: Seed for random initialisation.
    """
    from diffusers import AutoencoderKL
    if pretrained is not None and config is not None:
        raise ValueError('autoencoder: give either `pretrained` or `config`, not both')
    if pretrained is not None:
        kw = {'subfolder': subfolder} if subfolder else {}
        vae = load_pretrained(AutoencoderKL, pretrained, 'autoencoder', **kw)
    else:
        cfg = dict(TINY_VAE_CONFIG if config in (None, 'tiny') else config)
        torch.manual_seed(seed)
        vae = AutoencoderKL(**cfg)
        log.info('autoencoder: randomly initialised AutoencoderKL (%s params)', sum(p.numel() for p in vae.parameters()))
    return Autoencoder(vae, scaling_factor=scaling_factor, sample_posterior=sample_posterior,
                       shift_factor=shift_factor)
