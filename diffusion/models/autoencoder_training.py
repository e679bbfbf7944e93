"""Training the project's own image autoencoder: a diffusers ``AutoencoderKL`` as a ComposerModel.

No pretrained VAE installs offline, so the embedded default trains a small one (``yamls/autoencoder-mini.yaml``)
and exports it in the diffusers format, with its latent scaling factor measured from data
(``callbacks/export_autoencoder.py``). The losses follow the KL-regularised autoencoder of latent diffusion
(Rombach et al. 2022, appendix G; Esser et al. 2021 for the adversarial part):

    total = rec_weight * |x - x_hat|  (L1 or L2, mean per pixel)
          + kl_weight * KL(q(z|x) || N(0, I))  (summed over latent elements, divided by the pixel count, so
                                                 kl_weight means what SD's 1e-6 means with per-pixel sums)
          + perceptual_weight * LPIPS-style feature distance           (only with local VGG16 weights)
          + disc_weight * hinge generator loss  +  hinge discriminator loss   (after ``disc_start`` batches)

One optimizer, one backward: the discriminator loss sees detached reconstructions, and the generator's
adversarial term runs the discriminator with detached parameters (``torch.func.functional_call``), so each
term only moves the network it should. This fits Composer's single-loss training loop without a second
optimizer (the adaptive adversarial weight of Esser et al. is replaced by a fixed ``disc_weight``).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.image import PeakSignalNoiseRatio

from diffusion import registry

log = logging.getLogger(__name__)

__all__ = ['AutoencoderTraining', 'PatchDiscriminator', 'VGGPerceptual', 'build_autoencoder_kl_training']


# ---------------------------------------------------------------------------------------------
# Loss networks
# ---------------------------------------------------------------------------------------------
class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (Isola et al. 2017): one real/fake logit per overlapping patch.

    GroupNorm instead of the original BatchNorm: it has no running statistics, so running it with
    detached parameters for the generator term changes nothing in it.

    Args:
        in_channels: Image channels.
        channels: Width of the first layer (doubled per layer, capped at 8x).
        num_layers: Stride-2 layers; the receptive field grows with it (3 layers: 70x70 px).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers + 1):
            nxt = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(width, nxt, 4, stride, 1, bias=False), nn.GroupNorm(min(32, nxt // 4), nxt),
                       nn.LeakyReLU(0.2)]
            width = nxt
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # DCGAN initialisation, as the PatchGAN reference does
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, 1, h, w) logits


class VGGPerceptual(nn.Module):
    """LPIPS-style distance on torchvision VGG16 features (Zhang et al. 2018, the uncalibrated variant).

    Features after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 are unit-normalised over channels; the
    squared differences are averaged over space and summed over layers. LPIPS's learned per-channel weights are
    not shipped here, and neither are ImageNet VGG16 weights: pass a local file (a ``torchvision.models.vgg16``
    state dict, whole or ``features`` only). Without real weights this loss is meaningless, so nothing defaults
    to it.

    Args:
        weights: Path of the state dict.
    """

    _TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2 ... relu5_3 in vgg16().features

    def __init__(self, weights: str) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers
        self.features = make_layers(cfgs['D'])[:self._TAPS[-1] + 1]
        state = torch.load(weights, map_location='cpu', weights_only=True)
        state = {k.removeprefix('features.'): v for k, v in state.items() if not k.startswith('classifier.')}
        state = {k: v for k, v in state.items() if int(k.split('.')[0]) <= self._TAPS[-1]}
        self.features.load_state_dict(state)
        self.requires_grad_(False)
        self.eval()
        self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> 'VGGPerceptual':
        return super().train(False)

    def _taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = ((images + 1) / 2 - self.mean) / self.std  # [-1, 1] -> ImageNet normalisation
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._TAPS:
                out.append(x / (x.norm(dim=1, keepdim=True) + 1e-10))  # (B, C_l, H_l, W_l)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sum(((fa - fb)**2).sum(1).mean() for fa, fb in zip(self._taps(a), self._taps(b)))


# ---------------------------------------------------------------------------------------------
# The ComposerModel
# ---------------------------------------------------------------------------------------------
class AutoencoderTraining(ComposerModel):
    """Train an ``AutoencoderKL`` on image batches (``batch['image']`` in [-1, 1]).

    Args:
        vae: The diffusers autoencoder to train.
        rec_loss: ``'l1'`` or ``'l2'``.
        rec_weight: Weight of the reconstruction loss.
        kl_weight: Weight of the KL term (see the module docstring for its normalisation; SD: 1e-6).
        discriminator: A patch discriminator, or None for no adversarial loss.
        disc_weight: Weight of the generator's adversarial term.
        disc_start: Training batches (forward calls in training mode) before the adversarial losses switch on;
            the autoencoder first learns to reconstruct, as in latent diffusion.
        perceptual: A perceptual distance module ``(a, b) -> scalar``, or None.
        perceptual_weight: Its weight.
        image_key: Batch key of the images.
    """

    def __init__(self, vae: nn.Module, rec_loss: str = 'l1', rec_weight: float = 1.0, kl_weight: float = 1e-6,
                 discriminator: Optional[nn.Module] = None, disc_weight: float = 0.5, disc_start: int = 0,
                 perceptual: Optional[nn.Module] = None, perceptual_weight: float = 1.0,
                 image_key: str = 'image') -> None:
        super().__init__()
        if rec_loss not in ('l1', 'l2'):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        self.vae = vae
        self.discriminator = discriminator
        self.perceptual = perceptual
        self.rec_loss, self.rec_weight, self.kl_weight = rec_loss, rec_weight, kl_weight
        self.disc_weight, self.disc_start = disc_weight, disc_start
        self.perceptual_weight = perceptual_weight
        self.image_key = image_key
        self.register_buffer('train_batches', torch.zeros((), dtype=torch.long))  # checkpointed with the model
        self.val_rec = MeanMetric()
        self.val_psnr = PeakSignalNoiseRatio(data_range=2.0)

    # ------------------------------------------------------------------ helpers used by callbacks too
    def images(self, batch: Any) -> torch.Tensor:
        return batch[self.image_key] if isinstance(batch, dict) else batch

    @torch.no_grad()
    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> RAW latents (posterior mean), the same as ``Autoencoder.encode`` and stored latents."""
        return self.vae.encode(images).latent_dist.mean

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction (decode the posterior mean), in [-1, 1] unclamped."""
        return self.vae.decode(self.encode_raw(images)).sample

    @property
    def disc_active(self) -> bool:
        # train_batches counts the current batch: the first ``disc_start`` batches train without the GAN terms.
        return self.discriminator is not None and int(self.train_batches) > self.disc_start

    # ------------------------------------------------------------------ ComposerModel
    def forward(self, batch: Any) -> dict[str, Any]:
        x = self.images(batch)  # (B, 3, H, W)
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample() if self.training else posterior.mode()  # (B, C, H/f, W/f)
        if self.training:
            self.train_batches += 1
        return {'recon': self.vae.decode(z).sample, 'posterior': posterior, 'images': x}

    def loss(self, outputs: dict[str, Any], batch: Any) -> dict[str, torch.Tensor]:
        x, x_hat, posterior = outputs['images'], outputs['recon'], outputs['posterior']
        rec = (x_hat - x).abs().mean() if self.rec_loss == 'l1' else F.mse_loss(x_hat, x)
        kl = posterior.kl().mean() / x[0].numel()
        losses = {'rec': rec, 'kl': kl}
        total = self.rec_weight * rec + self.kl_weight * kl
        if self.perceptual is not None:
            losses['perceptual'] = self.perceptual(x_hat, x)
            total = total + self.perceptual_weight * losses['perceptual']
        if self.discriminator is not None:
            if self.disc_active:
                losses['disc'], losses['gen_adv'] = self._adversarial(x, x_hat)
                total = total + losses['disc'] + self.disc_weight * losses['gen_adv']
            else:  # touch every parameter so DDP sees no unused ones before the switch
                total = total + 0.0 * sum(p.sum() for p in self.discriminator.parameters())
        losses['total'] = total
        return losses

    def _adversarial(self, x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hinge losses: the discriminator's (moves only D) and the generator's (moves only the VAE)."""
        assert self.discriminator is not None
        d_real = self.discriminator(x)
        d_fake = self.discriminator(x_hat.detach())
        disc = 0.5 * (F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean())
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        gen_adv = -torch.func.functional_call(self.discriminator, frozen, (x_hat,)).mean()
        return disc, gen_adv

    def eval_forward(self, batch: Any, outputs: Optional[Any] = None) -> dict[str, Any]:
        if outputs is not None:
            return outputs
        x = self.images(batch)
        return {'recon': self.reconstruct(x), 'images': x}

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return {} if is_train else {'val_rec': self.val_rec, 'psnr': self.val_psnr}

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        x, x_hat = outputs['images'], outputs['recon'].clamp(-1, 1)
        if isinstance(metric, PeakSignalNoiseRatio):
            metric.update(x_hat, x)
        else:
            metric.update((x_hat - x).abs().mean() if self.rec_loss == 'l1' else F.mse_loss(x_hat, x))


# ---------------------------------------------------------------------------------------------
# Registered builder
# ---------------------------------------------------------------------------------------------
@registry.models.register('autoencoder_kl_training')
def build_autoencoder_kl_training(config: Optional[dict[str, Any] | str] = None, pretrained: Optional[str] = None,
                                  subfolder: Optional[str] = None, discriminator: Optional[dict[str, Any]] = None,
                                  perceptual: Optional[dict[str, Any]] = None, seed: int = 0,
                                  **loss_kwargs: Any) -> AutoencoderTraining:
    """Build the autoencoder trainer from a ``model:`` block.

    Args:
        config: ``AutoencoderKL`` config for a new model (``'tiny'``: ``TINY_VAE_CONFIG``, 4x downsampling).
        pretrained: Or a diffusers folder/name to fine-tune.
        subfolder: Subfolder of ``pretrained``.
        discriminator: ``PatchDiscriminator`` kwargs (``channels``, ``num_layers``), or None for no GAN loss.
        perceptual: ``{weights: <local vgg16 state dict>}``, or None (LPIPS/VGG weights are not shipped here).
        seed: Seed of the random initialisation.
        **loss_kwargs: :class:`AutoencoderTraining` loss settings (``rec_loss``, ``kl_weight``, ``disc_start``...).
    """
    from diffusers import AutoencoderKL

    from diffusion.models.autoencoders import TINY_VAE_CONFIG
    if (config is None) == (pretrained is None):
        raise ValueError('autoencoder_kl_training: give exactly one of `config` (new model) or `pretrained`')
    from omegaconf import OmegaConf
    if OmegaConf.is_config(config):  # lists must be plain for save_pretrained's JSON
        config = OmegaConf.to_container(config, resolve=True)  # type: ignore[assignment]
    torch.manual_seed(seed)
    if pretrained is not None:
        vae = AutoencoderKL.from_pretrained(pretrained, **({'subfolder': subfolder} if subfolder else {}))
    else:
        vae = AutoencoderKL(**dict(TINY_VAE_CONFIG if config == 'tiny' else config))  # type: ignore[arg-type]
    disc = PatchDiscriminator(in_channels=vae.config.in_channels, **discriminator) if discriminator else None
    perc = VGGPerceptual(**perceptual) if perceptual else None
    log.info('autoencoder_kl_training: %.2fM VAE params%s', sum(p.numel() for p in vae.parameters()) / 1e6,
             f', {sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M discriminator params' if disc else '')
    return AutoencoderTraining(vae, discriminator=disc, perceptual=perc, **loss_kwargs)
