"""``LatentDiffusion``: one ComposerModel for every backbone.

A frozen autoencoder maps images to latents, a frozen text encoder maps captions to per-token states, and a
trainable backbone (a diffusers UNet, or a transformer) learns to denoise. The noise schedule object owns all
the diffusion maths (noising, targets, loss weights, samplers; see ``diffusion/schedules.py``); this class only
moves tensors between the parts. Batches come from ``diffusion/data/dataset.py`` in one of two modes:

* pixels: ``image`` (B,3,H,W) in [-1,1] and ``caption`` (list of str) -> encoded here, online;
* precomputed: ``latents`` (RAW, unscaled VAE means), ``text_hidden``, ``text_mask`` [, ``text_pooled``].

Latent scaling is applied in exactly one place (:meth:`LatentDiffusion.scale`): raw latents minus ``shift_factor``
(SD3/Flux-style VAEs; 0 otherwise), times ``scaling_factor``, before noising; inverted before decoding. Batches
whose latents another tool stored already scaled carry ``latents_scaled`` and are used as they are.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from torch import nn
from torchmetrics import MeanMetric, Metric

from diffusion import registry
from diffusion.models.conditioning import (adapt_position_entries, batch_controls, generation_controls,
                                           noisy_replicate_padding)
from diffusion.models.frozen_state import fill_in_frozen_parts, leave_out_frozen_parts
from diffusion.models.generation import GenerationMixin

log = logging.getLogger(__name__)

__all__ = ['LatentDiffusion', 'build_latent_diffusion']

TEXT_KEYS = ('text_hidden', 'text_mask', 'text_pooled')


class LatentDiffusion(GenerationMixin, ComposerModel):
    """Latent diffusion for text-to-image (``generate``: ``diffusion/models/generation.py``).

    Args:
        backbone: Denoiser with ``forward(x, t, *, text_hidden, text_mask=None, text_pooled=None,
            time_ids=None)`` (see ``diffusion/models/unet.py``).
        noise_schedule: A schedule from ``diffusion.registry.noise_schedules``.
        autoencoder: Frozen :class:`~diffusion.models.autoencoders.Autoencoder`; optional when training only on
            precomputed latents (then ``generate`` cannot decode).
        text_encoder: Frozen :class:`~diffusion.models.text_encoders.TextEncoder`; optional with precomputed
            text states (then ``empty_caption_path`` is needed for caption dropout, and ``generate`` needs it).
        scaling_factor: Latent scale; defaults to the autoencoder's.
        shift_factor: Latent shift, subtracted before scaling; defaults to the autoencoder's (0 without one).
        use_text_mask: Pass the padding mask to cross-attention (right for BERT-style encoders; SD's CLIP
            encoders are used without one).
        use_time_ids: Pass SDXL micro-conditioning (original size, crop, target size) to the backbone.
        empty_caption_path: ``empty_caption.safetensors`` written by ``convert/precompute_latents.py``: the
            text states of the empty caption, used for rows the dataloader dropped (classifier-free guidance).
        eval_seed: Seed of the fixed noise and timesteps used for validation loss, so evaluations compare.
        text_padding: ``encoder`` (the encoder's own padding states) or ``noisy_replicate`` (padding positions
            filled with copies of the real token states, plus noise in training; see
            ``diffusion.models.conditioning.noisy_replicate_padding``), applied after the encoder and to
            precomputed text states at load time, never stored.
        text_padding_noise: Noise of ``noisy_replicate`` padding, relative to the token-state std.
        resolution: Training image side in pixels. When set, the model records it (and ``base_resolution``) in
            its state, and loading a checkpoint recorded at another resolution adapts by itself: the noise
            schedule is shifted by ``resolution / base_resolution`` and position tables are resampled or rebuilt.
        base_resolution: Resolution the noise schedule is designed for (default: a loaded checkpoint's base, else
            ``resolution``); the schedule's shift is ``resolution / base_resolution``.
    """

    def __init__(self, backbone: nn.Module, noise_schedule: Any, autoencoder: Optional[nn.Module] = None,
                 text_encoder: Optional[nn.Module] = None, scaling_factor: Optional[float] = None,
                 use_text_mask: bool = False, use_time_ids: bool = False,
                 empty_caption_path: Optional[str] = None, eval_seed: int = 1234, text_padding: str = 'encoder',
                 text_padding_noise: float = 0.0, resolution: Optional[int] = None,
                 base_resolution: Optional[int] = None, shift_factor: Optional[float] = None) -> None:
        super().__init__()
        if text_padding not in ('encoder', 'noisy_replicate'):
            raise ValueError(f"text_padding must be 'encoder' or 'noisy_replicate', got {text_padding!r}")
        self.text_padding, self.text_padding_noise = text_padding, float(text_padding_noise)
        self.backbone = backbone
        self.autoencoder = autoencoder
        self.text_encoder = text_encoder
        self.noise_schedule = noise_schedule
        # Composer's FSDP wraps each child of a ComposerModel unless it is marked `_fsdp_wrap = False`: the frozen
        # encoders stay whole (replicated) on every rank and only the trainable backbone is sharded, per block
        # (the backbone's `fsdp_wrap_fn`).
        for frozen in (autoencoder, text_encoder):
            if frozen is not None:
                frozen._fsdp_wrap = False
        if scaling_factor is None:
            if autoencoder is None:
                raise ValueError('scaling_factor is required when no autoencoder is given')
            scaling_factor = autoencoder.scaling_factor
        self.scaling_factor = float(scaling_factor)
        if shift_factor is None:
            shift_factor = getattr(autoencoder, 'shift_factor', 0.0) if autoencoder is not None else 0.0
        self.shift_factor = float(shift_factor)
        self.use_text_mask = use_text_mask
        self.use_time_ids = use_time_ids
        self.eval_seed = eval_seed
        self._empty_text: Optional[dict[str, torch.Tensor]] = None
        self._empty_text_on: dict[torch.device, dict[str, torch.Tensor]] = {}  # a copy per device, made once
        if empty_caption_path is not None:
            from safetensors.torch import load_file
            self._empty_text = load_file(str(Path(empty_caption_path)))
        self.val_loss = MeanMetric()
        self.resolution, self._base_resolution_arg = resolution, base_resolution
        if resolution is not None:
            base = base_resolution or resolution
            self.register_buffer('resolution_record', torch.tensor([base, resolution]))  # saved in checkpoints
            self._shift_schedule(base)
            self.register_load_state_dict_pre_hook(self._adapt_resolution)
        # The frozen encoders stay out of checkpoints and are rebuilt from the config (models/frozen_state.py).
        self.register_state_dict_post_hook(leave_out_frozen_parts)
        self.register_load_state_dict_pre_hook(fill_in_frozen_parts)

    # ------------------------------------------------------------------ resolution transfer
    def _shift_schedule(self, base: int) -> str:
        """Shift the noise schedule by ``resolution / base`` (DDPM: SNR / s^2; EDM: P_mean + ln s) and let the
        backbone adapt (e.g. MicroDiT rebuilds its sin-cos table with interpolation scale ``resolution / base``)."""
        shift = self.resolution / base
        adapt = getattr(self.backbone, 'adapt_resolution', None)
        if shift != 1.0:
            self.noise_schedule.set_resolution_shift(shift)
            if adapt is not None:
                adapt(shift)
        return f'noise schedule shift {self.noise_schedule.resolution_shift:g} ({type(self.noise_schedule).__name__})' \
            + (f', position interpolation scale {shift:g}' if adapt is not None else '')

    def _adapt_resolution(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Load hook: adapt to a checkpoint recorded at another resolution (schedule shift, position tables)."""
        key = prefix + 'resolution_record'
        if key not in state_dict:  # an older checkpoint: nothing to compare (set base_resolution to shift)
            state_dict[key] = self.resolution_record.clone()
            log.info('resolution transfer: the checkpoint records no resolution; the model keeps %s',
                     self.resolution_record.tolist())
            return
        ckpt_base, ckpt_res = (int(v) for v in state_dict[key].tolist())
        base = self._base_resolution_arg or ckpt_base
        if (base, self.resolution) == tuple(int(v) for v in self.resolution_record.tolist()) \
                and ckpt_res == self.resolution:
            return
        shifted = self._shift_schedule(base)  # before matching tables: the backbone's own are rebuilt first
        changes = adapt_position_entries(self.backbone, state_dict, prefix + 'backbone.')
        state_dict[key] = torch.tensor([base, self.resolution])
        self.resolution_record.copy_(state_dict[key])
        log.info('resolution transfer: checkpoint trained at %d px (schedule base %d px), model at %d px: %s; %s',
                 ckpt_res, ckpt_base, self.resolution, shifted,
                 '; '.join(changes) if changes else 'no position tables to adapt')

    # ------------------------------------------------------------------ parts of a step
    def scale(self, raw_latents: torch.Tensor) -> torch.Tensor:
        """Raw autoencoder latents -> diffusion space, ``(raw - shift) * scale`` (the only place it is applied)."""
        return (raw_latents - self.shift_factor) * self.scaling_factor

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion space -> raw autoencoder latents, ``latents / scale + shift``."""
        return latents / self.scaling_factor + self.shift_factor

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1,1] -> scaled latents."""
        if self.autoencoder is None:
            raise RuntimeError('this model has no autoencoder: feed precomputed `latents`')
        return self.scale(self.autoencoder.encode(images))

    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> text conditioning dict (``text_hidden``, ``text_mask``[, ``text_pooled``])."""
        if self.text_encoder is None:
            raise RuntimeError('this model has no text encoder: feed precomputed `text_hidden`')
        return self.text_encoder(list(captions))

    def has_empty_text(self) -> bool:
        """Whether the empty caption's text states are available (loaded from a file, or a text encoder)."""
        return self._empty_text is not None or self.text_encoder is not None

    def empty_text(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Text conditioning of the empty caption, repeated ``batch_size`` times. It is encoded (or loaded) once
        and kept on each device it is asked for, so training steps copy nothing from the host."""
        device = torch.device(device)
        if device not in self._empty_text_on:
            if self._empty_text is None:
                if self.text_encoder is None:
                    raise RuntimeError('caption dropout on precomputed text needs `empty_caption_path` '
                                       '(written by convert/precompute_latents.py) or a text encoder')
                self._empty_text = {k: v[0] for k, v in self.encode_text(['']).items()}
            self._empty_text_on[device] = {k: v.to(device) for k, v in self._empty_text.items()}
        return {k: v.unsqueeze(0).expand(batch_size, *v.shape) for k, v in self._empty_text_on[device].items()}

    def batch_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        if 'latents' in batch:
            latents, scaled = batch['latents'].float(), batch.get('latents_scaled')
            if scaled is None:
                return self.scale(latents)
            # Latents another tool stored already scaled (micro_diffusion's) are used as they are.
            return torch.where(scaled.bool().view(-1, *([1] * (latents.dim() - 1))), latents, self.scale(latents))
        return self.encode_images(batch['image'])

    def batch_conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Text (+ micro-conditioning) for the backbone, with dropped captions replaced by the empty one."""
        if 'text_hidden' in batch:
            cond = {k: batch[k].float() if k != 'text_mask' else batch[k] for k in TEXT_KEYS if k in batch}
            dropped = batch.get('caption_dropped')
            # Rows are swapped with torch.where whether any was dropped or not: a branch on the flags would read
            # them on the host (a device sync every step). Only a model without an empty caption reads them, to
            # refuse a batch with a dropped row.
            if dropped is not None and self.has_empty_text():
                empty = self.empty_text(len(dropped), cond['text_hidden'].device)
                keep = ~dropped.bool()
                for key in cond:
                    shape = (-1,) + (1,) * (cond[key].dim() - 1)
                    cond[key] = torch.where(keep.view(shape), cond[key], empty[key].to(cond[key].dtype))
            elif dropped is not None and bool(dropped.any()):
                self.empty_text(len(dropped), cond['text_hidden'].device)  # raises, naming what is missing
        else:
            cond = self.encode_text(batch['caption'])
        return self._backbone_kwargs(self.pad_text(cond), batch)

    def pad_text(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Apply the ``text_padding`` option to encoder output or precomputed text states."""
        if self.text_padding == 'encoder':
            return cond
        noise = self.text_padding_noise if self.training else 0.0  # sampling replicates without noise
        return {**cond, 'text_hidden': noisy_replicate_padding(cond['text_hidden'], cond['text_mask'], noise)}

    def _backbone_kwargs(self, cond: dict[str, torch.Tensor], batch: Optional[dict[str, Any]] = None,
                         size: Optional[tuple[int, int]] = None,
                         controls: Optional[dict[str, Any]] = None) -> dict[str, torch.Tensor]:
        kwargs = {'text_hidden': cond['text_hidden']}
        if getattr(self.backbone, 'uses_controls', False):
            kwargs.update(self._control_kwargs(cond['text_hidden'], batch, size, controls))
        if self.use_text_mask:
            kwargs['text_mask'] = cond['text_mask']
        if 'text_pooled' in cond:
            kwargs['text_pooled'] = cond['text_pooled']
        if self.use_time_ids:
            n = cond['text_hidden'].shape[0]
            if batch is not None and 'original_size' in batch:
                time_ids = torch.cat([batch['original_size'], batch['crop_top_left'], batch['target_size']], dim=1)
            else:  # generation: the image is the whole, uncropped picture at the target size
                h, w = size if size is not None else (0, 0)
                time_ids = generation_controls(n, h, w, controls)[:, :6]  # (B, 6)
            kwargs['time_ids'] = time_ids.to(cond['text_hidden'].device, torch.float32)  # (B, 6)
        return kwargs

    @staticmethod
    def _control_kwargs(text_hidden: torch.Tensor, batch: Optional[dict[str, Any]], size: Optional[tuple[int, int]],
                        controls: Optional[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """``controls`` (B, 8) and ``control_dropped`` (B,) for a disentangled backbone."""
        n, device = text_hidden.shape[0], text_hidden.device
        values = batch_controls(batch) if batch is not None else None
        if values is None:  # generation: by default the whole, uncropped picture at the output size
            h, w = size if size is not None else (0, 0)
            values = generation_controls(n, h, w, controls)
        dropped = batch.get('control_dropped') if batch is not None else None
        dropped = torch.zeros(n, dtype=torch.bool, device=device) if dropped is None else dropped.bool()
        return {'controls': values.to(device, torch.float32), 'control_dropped': dropped.to(device)}

    def call_backbone(self, x_in: torch.Tensor, t_in: torch.Tensor, cond: dict[str, torch.Tensor],
                      **extra: Any) -> Any:
        """The backbone on network inputs; a backbone with controls also gets the noise level (its gate)."""
        if getattr(self.backbone, 'uses_controls', False):
            cond = {**cond, 'noise_level': self.noise_schedule.noise_level(t_in)}
        return self.backbone(x_in, t_in, **cond, **extra)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], **extra: Any) -> Any:
        """Raw backbone output for noisy latents ``x_t`` at times ``t`` (``extra``: backbone options)."""
        x_in, t_in = self.noise_schedule.network_inputs(x_t, t)
        return self.call_backbone(x_in, t_in, cond, **extra)

    # ------------------------------------------------------------------ composer interface
    def _diffusion_step(self, batch: dict[str, Any], generator: Optional[torch.Generator] = None):
        latents = self.batch_latents(batch)  # (B, C, h, w), scaled
        cond = self.batch_conditioning(batch)
        sched = self.noise_schedule
        t = sched.sample_times(latents.shape[0], device=latents.device, generator=generator)
        noise = sched.noise_like(latents, generator=generator)
        x_t = sched.add_noise(latents, noise, t)
        # A masking backbone (MicroDiT) trains on a random subset of patches and returns which it removed.
        masking = self.training and getattr(self.backbone, 'mask_ratio', 0) > 0
        pred, mask = self.denoise(x_t, t, cond, return_mask=True) if masking else (self.denoise(x_t, t, cond), None)
        target = sched.training_target(latents, noise, x_t, t)
        weight = sched.loss_weight(t).to(pred.dtype)
        return (pred, target, weight) if mask is None else (pred, target, weight, mask)

    def forward(self, batch: dict[str, Any]):
        return self._diffusion_step(batch)

    def param_groups(self, optimizer_cfg: dict[str, Any]) -> list[Any]:
        """Trainable parameters for the optimizer (``diffusion/builders.py`` calls this with the optimizer block).

        A backbone with mixture-of-experts layers (``moe_parameters()``, selected by module type) and a
        ``moe_lr_scale`` other than 1 gets its experts and routers in a second group at ``lr * moe_lr_scale``
        (MicroDiT's paper trains them at half the rate).
        """
        trainable = [p for p in self.parameters() if p.requires_grad]
        scale = float(getattr(self.backbone, 'moe_lr_scale', 1.0))
        moe = [p for p in self.backbone.moe_parameters() if p.requires_grad] \
            if hasattr(self.backbone, 'moe_parameters') else []
        if not moe or scale == 1.0:
            return trainable
        moe_ids = {id(p) for p in moe}
        return [{'params': [p for p in trainable if id(p) not in moe_ids]},
                {'params': moe, 'lr': float(optimizer_cfg['lr']) * scale}]

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        pred, target, weight = outputs[:3]
        squared = F.mse_loss(pred.float(), target.float(), reduction='none')  # (B, C, h, w)
        if len(outputs) > 3:  # mask (B, h, w), 1 = removed patch: mean over kept patches only (as MicroDiT)
            keep = 1 - outputs[3].float()
            per_sample = (squared.mean(dim=1) * keep).sum(dim=(1, 2)) / keep.sum(dim=(1, 2))
        else:
            per_sample = squared.mean(dim=(1, 2, 3))  # (B,)
        return (per_sample * weight.float()).mean()

    def eval_forward(self, batch: dict[str, Any], outputs: Optional[Any] = None) -> Any:
        # Validation loss on fixed noise and timesteps: the same batch always gives the same number.
        device = next(self.backbone.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.eval_seed)
        with torch.no_grad():
            return self._diffusion_step(batch, generator=generator)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return {} if is_train else {'ValidationLoss': self.val_loss}

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        metric.update(self.loss(outputs, batch))


@registry.models.register('latent_diffusion')
def build_latent_diffusion(backbone: dict[str, Any], noise_schedule: dict[str, Any],
                           autoencoder: Optional[dict[str, Any]] = None,
                           text_encoder: Optional[dict[str, Any]] = None, **kwargs: Any) -> LatentDiffusion:
    """Build a :class:`LatentDiffusion` from YAML blocks.

    The backbone's ``cross_attention_dim`` (and the SDXL pooled width) default to the text encoder's widths,
    and its ``in_channels``/``out_channels`` to the autoencoder's latent channels, so a config names each
    part once.
    """
    ae = registry.build(registry.autoencoders, autoencoder, 'model.autoencoder') if autoencoder else None
    te = registry.build(registry.text_encoders, text_encoder, 'model.text_encoder') if text_encoder else None
    backbone = dict(backbone)
    # Backbone builders take these widths by the same names (diffusers' UNet names).
    if te is not None:
        backbone.setdefault('cross_attention_dim', te.hidden_dim)
        if te.pooled_dim:
            backbone.setdefault('pooled_text_dim', te.pooled_dim)
    if ae is not None:
        backbone.setdefault('in_channels', ae.latent_channels)
        backbone.setdefault('out_channels', ae.latent_channels)
    net = registry.build(registry.backbones, backbone, 'model.backbone')
    schedule = registry.build(registry.noise_schedules, noise_schedule, 'model.noise_schedule')
    return LatentDiffusion(net, schedule, autoencoder=ae, text_encoder=te, **kwargs)
