"""Text-to-image generation of :class:`~diffusion.models.latent_diffusion.LatentDiffusion`.

``generate`` encodes the prompts, builds the guidance branches (unconditional, text, controls), and samples with the
diffusers scheduler the noise schedule makes for the chosen sampler (``diffusion/samplers.py``), then decodes.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from diffusion.samplers import (STOCHASTIC_SAMPLERS, Generators, compositional_guidance, generators_for, guidance,
                                sample)

__all__ = ['GenerationMixin']


class GenerationMixin:
    """``generate`` for ``LatentDiffusion``, which supplies the parts it uses: ``backbone``, ``noise_schedule``,
    ``autoencoder``, ``encode_text``, ``empty_text``, ``pad_text``, ``_backbone_kwargs``, ``call_backbone`` and
    ``unscale``."""

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]] = None,
                 height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 guidance_rescale: float = 0.0, sampler: Optional[str] = None,
                 seed: Union[int, Sequence[int], None] = None, generator: Generators = None,
                 latents: Optional[torch.Tensor] = None, output_type: str = 'pt',
                 progress_bar: bool = False, control_guidance_scale: Optional[float] = None,
                 micro_conditioning: Optional[dict[str, Any]] = None) -> Union[torch.Tensor, list]:
        """Text-to-image with classifier-free guidance.

        Args:
            prompts: One prompt per image.
            negative_prompts: Replace the empty caption as the unconditional branch.
            height: Image height in pixels (default: the backbone's sample size times the VAE factor).
            width: Image width in pixels.
            num_inference_steps: Sampler steps (None: the schedule's default, see ``sampler``).
            guidance_scale: CFG scale; 1 disables the unconditional branch (None: the schedule's default).
            guidance_rescale: Guidance rescale (Lin et al. 2023), 0 disables.
            sampler: A sampler name the noise schedule knows (``ddim``, ``euler``, ``heun``, ``dpmpp_2m``...).
                None takes the defaults of the noise schedule
                (:func:`diffusion.samplers.sampling_defaults`): EDM Heun, 30 steps, guidance 5 for EDM
                models (MicroDiT), DDIM, 50 steps, guidance 7.5 for DDPM ones; each given value is kept.
            seed: Per-image seeds (one per prompt: image ``i`` is the same whatever its batch), or one int
                seeding a single generator for the whole batch; default 0. See ``diffusion/samplers.py`` for
                the convention an exported diffusers pipeline reproduces.
            generator: Instead of ``seed``: one CPU generator per image, or one for the batch.
            latents: Initial noise (B, C, h, w) instead of the first draw; stochastic samplers (``ddpm``,
                ``euler_ancestral``) still draw their per-step noise from ``seed`` / ``generator``, which
                must then be given.
            output_type: ``'pt'`` for a (B,3,H,W) tensor in [0,1], ``'pil'`` for PIL images, ``'latent'``.
            progress_bar: Show a tqdm bar over steps.
            control_guidance_scale: A separate guidance scale for the control metadata (disentangled backbones
                trained with control dropout): three branches per step, see
                :func:`~diffusion.samplers.compositional_guidance`. None: text-only guidance, the control kept
                in both branches.
            micro_conditioning: Control metadata to ask for instead of the output's own (``original_size``,
                ``crop_top_left``, ``target_size``, ``flip``); used by SDXL time ids and disentangled controls.
        """
        if self.autoencoder is None and output_type != 'latent':
            raise RuntimeError('generate() needs the autoencoder to decode images')
        from diffusion.samplers import resolve_sampling
        chosen = resolve_sampling(self, sampler, num_inference_steps, guidance_scale)
        sampler, num_inference_steps, guidance_scale = (chosen['sampler'], chosen['num_inference_steps'],
                                                        chosen['guidance_scale'])
        device = next(self.backbone.parameters()).device
        n = len(prompts)
        factor = self.autoencoder.downsample_factor if self.autoencoder is not None else 8
        channels = self.autoencoder.latent_channels if self.autoencoder is not None else 4
        default = int(getattr(self.backbone, 'sample_size', 32)) * factor  # backbone's latent size
        height, width = height or default, width or default
        if latents is not None and seed is None and generator is None and sampler in STOCHASTIC_SAMPLERS:
            raise ValueError(f'sampler {sampler!r} draws noise at every step: give seed(s) with `latents`')
        generator = generators_for(n, seed, generator)  # CPU generators, on every device
        branches = self._guidance_branches(prompts, negative_prompts, (height, width), guidance_scale,
                                           control_guidance_scale, micro_conditioning)
        k = len(branches)
        cond = {key: torch.cat([b[key] for b in branches]) for key in branches[0]}

        def denoise_fn(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = self.call_backbone(torch.cat([x_in] * k), t.expand(k * x_in.shape[0]).to(device), cond)
            outs = out.chunk(k)
            if k == 1:
                return outs[0]
            if k == 2:
                return guidance(outs[0], outs[1], guidance_scale, guidance_rescale)
            return compositional_guidance(*outs, guidance_scale, control_guidance_scale, guidance_rescale)

        scheduler = self.noise_schedule.make_scheduler(sampler)
        shape = (n, channels, height // factor, width // factor)
        out = sample(denoise_fn, scheduler, shape, num_steps=num_inference_steps, generator=generator,
                     device=device, dtype=torch.float32, init_noise=latents, progress=progress_bar)
        if output_type == 'latent':
            return out
        images = ((self.autoencoder.decode(self.unscale(out)).float() + 1) / 2).clamp(0, 1)  # (B, 3, H, W)
        if output_type == 'pil':
            from PIL import Image
            arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype('uint8')
            return [Image.fromarray(a) for a in arr]
        return images

    def _guidance_branches(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]],
                           size: tuple[int, int], text_scale: float, control_scale: Optional[float],
                           controls: Optional[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """Backbone kwargs of each guidance branch: [full], [uncond, full] or [uncond, text only, full]."""
        n = len(prompts)
        device = next(self.backbone.parameters()).device
        full = self._backbone_kwargs(self.pad_text(self.encode_text(prompts)), size=size, controls=controls)
        if text_scale == 1.0 and control_scale is None:
            return [full]
        uncond_text = self.encode_text(negative_prompts) if negative_prompts is not None \
            else self.empty_text(n, device)
        uncond = self._backbone_kwargs(self.pad_text(uncond_text), size=size, controls=controls)
        if control_scale is None:  # two branches: the control stays in both, only the text is guided
            return [uncond, full]
        if 'control_dropped' not in full:
            raise ValueError('control_guidance_scale needs a backbone with disentangled conditioning (trained with '
                             'control dropout); this one has no null control')
        null = torch.ones_like(full['control_dropped'])
        return [{**uncond, 'control_dropped': null}, {**full, 'control_dropped': null}, full]
