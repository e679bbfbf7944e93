"""Sampling: the denoising loop, classifier-free guidance and an EDM Heun scheduler.

The loop drives a diffusers scheduler exactly as diffusers' own pipelines do
(``set_timesteps`` -> ``scale_model_input`` -> network -> ``step``) and draws its initial noise
with diffusers' ``randn_tensor``, so the same seed gives the same latents here and in an exported
``StableDiffusionPipeline``.

The generator convention (what makes an image reproducible):

* per-image seeds ``[s_0, s_1, ...]`` become one CPU generator per image,
  ``torch.Generator().manual_seed(s_i)`` (:func:`image_generators`). Image ``i`` takes its starting
  noise AND the per-step noise of stochastic samplers (``euler_ancestral``, ``ddpm``, EDM with churn)
  from its own generator only, so it is the same whatever batch it is made in, and an exported diffusers
  pipeline called with ``generator=[torch.Generator().manual_seed(s) for s in seeds]`` (diffusers
  accepts one generator per image) gives the same image;
* the generators live on the CPU on every device: noise is drawn on the CPU and moved, as diffusers'
  ``randn_tensor`` does for a CPU generator, so a seed means the same noise on CPU and on CUDA;
* a single int seed is ONE generator for the whole batch (diffusers' ``generator=Generator().manual_seed(s)``):
  reproducible, but image ``i`` then depends on the batch it is in.
"""
from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable, Optional, Sequence, Union

import torch
from diffusers import EDMEulerScheduler
from diffusers.schedulers.scheduling_edm_euler import EDMEulerSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor
from tqdm.auto import tqdm

# Sampling defaults by noise schedule. EDM models (MicroDiT) sample with EDM's deterministic Heun sampler, 30 steps,
# guidance 5 (the public MicroDiT code's generate()); DDPM models (the UNets) with DDIM, 50 steps, guidance 7.5.
# DDIM is not an EDM sampler at all, so a fixed 'ddim' default fails on every EDM model.
EDM_SAMPLING = {'sampler': 'heun', 'num_inference_steps': 30, 'guidance_scale': 5.0}
DDPM_SAMPLING = {'sampler': 'ddim', 'num_inference_steps': 50, 'guidance_scale': 7.5}
# Flow-matching models sample with the Euler ODE sampler, 28 steps, guidance 7 (diffusers' SD3 pipeline defaults).
FLOW_SAMPLING = {'sampler': 'euler', 'num_inference_steps': 28, 'guidance_scale': 7.0}


def sampling_defaults(model: Any, ddpm: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Default ``sampler``, ``num_inference_steps`` and ``guidance_scale`` for ``model``'s noise schedule.

    Args:
        model: A ``LatentDiffusion`` or a noise schedule (anything with ``prediction_type``, directly or through
            ``noise_schedule``).
        ddpm: The defaults for DDPM schedules (a caller that samples cheaply, e.g. a callback, passes its own);
            default :data:`DDPM_SAMPLING`.
    """
    schedule = getattr(model, 'noise_schedule', model)
    if getattr(schedule, 'prediction_type', None) == 'edm':
        return dict(EDM_SAMPLING)
    if getattr(schedule, 'prediction_type', None) == 'flow_prediction':
        return dict(FLOW_SAMPLING)
    return dict(DDPM_SAMPLING if ddpm is None else ddpm)


def resolve_sampling(model: Any, sampler: Optional[str] = None, num_inference_steps: Optional[int] = None,
                     guidance_scale: Optional[float] = None, ddpm: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The three sampling settings with every ``None`` replaced by :func:`sampling_defaults` (a value the user
    gave is kept)."""
    given = {'sampler': sampler, 'num_inference_steps': num_inference_steps, 'guidance_scale': guidance_scale}
    defaults = sampling_defaults(model, ddpm)
    return {k: defaults[k] if v is None else v for k, v in given.items()}


DenoiseFn = Callable[[Tensor, Tensor], Tensor]
Generators = Union[torch.Generator, list[torch.Generator], None]

# Samplers that draw fresh noise at every step (the others only draw the starting noise).
STOCHASTIC_SAMPLERS = ('ddpm', 'euler_ancestral')


# =============================================================================================
# Seeds -> generators (the convention in the module docstring)
# =============================================================================================


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, ``torch.Generator().manual_seed(seed)``, in order."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def generators_for(n: int, seed: Union[int, Sequence[int], None] = None,
                   generator: Generators = None) -> Union[torch.Generator, list[torch.Generator]]:
    """The generator(s) of a call that makes ``n`` images.

    Args:
        n: Number of images.
        seed: One int (one generator for the batch) or ``n`` per-image seeds; default 0.
        generator: Given generators instead of ``seed``: one for the batch or a list of ``n``.

    Raises:
        ValueError: Both ``seed`` and ``generator`` are given, or a list's length is not ``n``.
    """
    if generator is not None and seed is not None:
        raise ValueError('give either seed(s) or generator(s), not both')
    if generator is None:
        if seed is None or isinstance(seed, numbers.Integral):
            return torch.Generator().manual_seed(0 if seed is None else int(seed))
        generator = image_generators(seed)
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f'{len(generator)} seeds / generators for {n} images: give one per image')
        return list(generator)
    return generator

# =============================================================================================
# Classifier-free guidance
# =============================================================================================


def guidance(pred_uncond: Tensor, pred_cond: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) with optional guidance rescale.

    ``pred = uncond + scale (cond - uncond)``; with ``rescale > 0`` the result's per-sample standard
    deviation is pulled back towards that of ``pred_cond`` (Lin et al. 2023, Sec. 3.4, eq. 15-16):
    ``pred = rescale * pred * std(cond) / std(pred) + (1 - rescale) * pred``.

    Args:
        pred_uncond: Network output for the empty / negative prompt, ``(B, ...)``.
        pred_cond: Network output for the prompt, same shape.
        scale: Guidance scale; 1 returns ``pred_cond`` itself (bit-exact).
        rescale: Guidance-rescale factor phi in ``[0, 1]``.

    Returns:
        The guided prediction, same shape as the inputs.
    """
    if pred_uncond.shape != pred_cond.shape:
        raise ValueError(f'guidance: shapes differ, uncond {tuple(pred_uncond.shape)} vs cond {tuple(pred_cond.shape)}')
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f'guidance rescale must be in [0, 1], got {rescale}')
    if scale == 1.0:
        return pred_cond
    pred = pred_uncond + scale * (pred_cond - pred_uncond)
    return _rescale(pred, pred_cond, rescale) if rescale > 0 else pred


def compositional_guidance(pred_uncond: Tensor, pred_text: Tensor, pred_full: Tensor, text_scale: float,
                           control_scale: float, rescale: float = 0.0) -> Tensor:
    """Separate guidance scales for text and control (the compositional form of InstructPix2Pix, Brooks et al.
    2023, eq. 3, with text in place of the instruction and control metadata in place of the image):

    ``pred = e(0, 0) + w_s (e(s, 0) - e(0, 0)) + w_c (e(s, c) - e(s, 0))``.

    Args:
        pred_uncond: Output with neither text nor control (null control), ``(B, ...)``.
        pred_text: Output with the text and the null control.
        pred_full: Output with the text and the control.
        text_scale: ``w_s``.
        control_scale: ``w_c``; with ``w_s = w_c = 1`` the result is ``pred_full`` (up to rounding).
        rescale: Guidance rescale towards ``std(pred_full)``, as in :func:`guidance`.
    """
    if not pred_uncond.shape == pred_text.shape == pred_full.shape:
        raise ValueError('compositional_guidance: the three predictions must have one shape')
    pred = pred_uncond + text_scale * (pred_text - pred_uncond) + control_scale * (pred_full - pred_text)
    return _rescale(pred, pred_full, rescale) if rescale > 0 else pred


def _rescale(pred: Tensor, reference: Tensor, rescale: float) -> Tensor:
    """Pull ``pred``'s per-sample std towards ``reference``'s (Lin et al. 2023, eq. 15-16)."""
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f'guidance rescale must be in [0, 1], got {rescale}')
    dims = tuple(range(1, pred.ndim))
    rescaled = pred * reference.std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True)
    return rescale * rescaled + (1 - rescale) * pred


# =============================================================================================
# The sampling loop
# =============================================================================================


def sample(denoise_fn: DenoiseFn, scheduler, shape: tuple[int, ...], *, num_steps: int,
           generator: Generators = None, device: torch.device | str = 'cpu',
           dtype: torch.dtype = torch.float32, init_noise: Tensor | None = None,
           progress: bool = True) -> Tensor:
    """Run a diffusers scheduler from noise to latents.

    Args:
        denoise_fn: ``denoise_fn(x_in, t) -> raw network output`` (already guided), where ``x_in`` is
            the scheduler-scaled latent batch and ``t`` the scheduler's 0-d timestep tensor (an integer
            timestep for DDPM schedules, ``c_noise`` for EDM); expand it to the batch yourself.
        scheduler: A diffusers ``SchedulerMixin`` (e.g. from ``schedule.make_scheduler(name)``).
        shape: Latent shape ``(B, C, H, W)``.
        num_steps: Number of inference steps.
        generator: Draws the initial noise and the noise of stochastic steps; a list holds one generator
            per image (see the module docstring), so each image's randomness is its own.
        device: Device of the latents.
        dtype: Dtype of the latents.
        init_noise: Optional unit-variance starting noise of ``shape`` (scaled by
            ``scheduler.init_noise_sigma`` like diffusers pipelines do).
        progress: Show a tqdm bar.

    Returns:
        The final latents ``(B, C, H, W)``.
    """
    if num_steps < 1:
        raise ValueError(f'num_steps must be >= 1, got {num_steps}')
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(f'{len(generator)} generators for a batch of {shape[0]}: give one per image')
    scheduler.set_timesteps(num_steps, device=device)
    if init_noise is None:
        latents = randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=dtype)
    else:
        if tuple(init_noise.shape) != tuple(shape):
            raise ValueError(f'init_noise has shape {tuple(init_noise.shape)}, expected {tuple(shape)}')
        latents = init_noise.to(device=device, dtype=dtype)
    # diffusers' flow-matching schedulers start at unit noise and take x_t as it is: no init sigma, no input scaling
    latents = latents * getattr(scheduler, 'init_noise_sigma', 1.0)
    scale_input = getattr(scheduler, 'scale_model_input', lambda x, t: x)
    step_kwargs = {'generator': generator} if 'generator' in inspect.signature(scheduler.step).parameters else {}
    for t in tqdm(scheduler.timesteps, desc='sampling', disable=not progress, leave=False):
        x_in = scale_input(latents, t)
        output = denoise_fn(x_in, t)
        latents = scheduler.step(output, t, latents, return_dict=False, **step_kwargs)[0]
    return latents


# =============================================================================================
# EDM Heun (Karras et al. 2022, Algorithm 1, deterministic); diffusers has only EDM Euler / DPM++
# =============================================================================================


class EDMHeunScheduler(EDMEulerScheduler):
    """EDM's 2nd-order Heun sampler with diffusers' scheduler API and EDM preconditioning.

    Each step from ``sigma_i`` to ``sigma_{i+1}`` takes two network evaluations (an Euler
    predictor, then a trapezoidal corrector); the last step to ``sigma = 0`` is a plain Euler step.
    ``timesteps`` therefore lists ``2 n - 1`` evaluations, in the order the loop must call them.
    Config and preconditioning are those of :class:`diffusers.EDMEulerScheduler`.
    """

    order = 2

    def set_timesteps(self, num_inference_steps: int = None, device=None, sigmas=None) -> None:
        """Set the ``n + 1`` step sigmas (Karras schedule) and the evaluation sequence."""
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas)
        step_sigmas = self.sigmas  # (n + 1,), last is 0
        evals, eval_sigmas = [], []
        for i in range(len(step_sigmas) - 1):
            evals.append((i, False))
            eval_sigmas.append(step_sigmas[i])
            if step_sigmas[i + 1] > 0:
                evals.append((i, True))
                eval_sigmas.append(step_sigmas[i + 1])
        self._evals = evals
        self._eval_sigmas = torch.stack(eval_sigmas)
        self.timesteps = self.precondition_noise(self._eval_sigmas).to(device)
        self._eval_index = 0
        self._first_order = None  # (sample at sigma_i, derivative at sigma_i)

    def scale_model_input(self, sample: Tensor, timestep) -> Tensor:
        """``c_in * sample`` at the sigma of the current evaluation."""
        self.is_scale_input_called = True
        return self.precondition_inputs(sample, self._eval_sigmas[self._eval_index])

    def step(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True,
             **_unused) -> EDMEulerSchedulerOutput | tuple[Tensor, Tensor]:
        """Advance one evaluation: Euler predictor, or the Heun correction of the previous predictor."""
        if self._eval_index >= len(self._evals):
            raise RuntimeError('EDMHeunScheduler.step called more often than there are timesteps')
        i, is_correction = self._evals[self._eval_index]
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        sample32 = sample.to(torch.float32)
        if not is_correction:
            denoised = self.precondition_outputs(sample32, model_output, sigma)
            derivative = (sample32 - denoised) / sigma
            prev = sample32 + derivative * (sigma_next - sigma)
            self._first_order = (sample32, derivative)
        else:
            start, derivative0 = self._first_order
            denoised = self.precondition_outputs(sample32, model_output, sigma_next)
            derivative1 = (sample32 - denoised) / sigma_next
            prev = start + (derivative0 + derivative1) / 2 * (sigma_next - sigma)
            self._first_order = None
        self._eval_index += 1
        prev = prev.to(model_output.dtype)
        if not return_dict:
            return prev, denoised
        return EDMEulerSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)
