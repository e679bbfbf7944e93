"""Noise schedules, training targets and loss weights.

The maths are small pure functions (closed-form, each citing its source) in :mod:`diffusion.schedule_maths`,
every one importable from here too; two schedule classes (``ddpm`` and ``edm``, registered in
:data:`diffusion.registry.noise_schedules`) bundle them into the interface the ``LatentDiffusion`` model calls:

    prediction_type, sample_times, noise_like, add_noise, network_inputs, training_target,
    loss_weight, make_scheduler, diffusers_config, noise_level, set_resolution_shift

Sampling always goes through a diffusers scheduler configured to match the training schedule
exactly, so that a diffusers pipeline loaded from our export reproduces our images.
"""
from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Mapping

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler,
                       EDMEulerScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, SchedulerMixin)
from torch import Tensor

from diffusion.registry import noise_schedules
from diffusion.samplers import EDMHeunScheduler
from diffusion.schedule_maths import (PREDICTION_TYPES, add_noise, alphas_cumprod_from_betas,
                                      betas_from_alphas_cumprod, broadcast_per_sample, cosine_alphas_cumprod,
                                      ddpm_noise_level, edm_loss_weight, edm_noise_level, edm_precondition, eps_from_v,
                                      linear_betas, lognormal_sigmas, min_snr_weight, offset_noise, positive_shift,
                                      rescale_zero_terminal_snr, scaled_linear_betas, shift_alphas_cumprod, snr,
                                      v_target, x0_from_v)

__all__ = ['DDPMSchedule', 'EDMSchedule', 'diffusers_scheduler', 'PREDICTION_TYPES', 'add_noise',
           'alphas_cumprod_from_betas', 'betas_from_alphas_cumprod', 'broadcast_per_sample', 'cosine_alphas_cumprod',
           'ddpm_noise_level', 'edm_loss_weight', 'edm_noise_level', 'edm_precondition', 'eps_from_v', 'linear_betas',
           'lognormal_sigmas', 'min_snr_weight', 'offset_noise', 'rescale_zero_terminal_snr', 'scaled_linear_betas',
           'shift_alphas_cumprod', 'snr', 'v_target', 'x0_from_v']

log = logging.getLogger(__name__)

# =============================================================================================
# Schedule classes
# =============================================================================================


def diffusers_scheduler(schedule: Any, sampler: str, samplers: Mapping[str, type[SchedulerMixin]],
                        schedule_name: str, *, drop_unaccepted: bool = False) -> SchedulerMixin:
    """The diffusers scheduler ``samplers[sampler]`` built from ``schedule.diffusers_config(sampler)``.

    ``schedule_name`` names the schedule in the error for an unknown sampler. With ``drop_unaccepted``, config keys
    the scheduler class's ``__init__`` does not take are left out (one config serving several scheduler classes).
    """
    if sampler not in samplers:
        raise ValueError(f'unknown sampler {sampler!r} for the {schedule_name} schedule; expected one of '
                         f'{sorted(samplers)}')
    cls = samplers[sampler]
    config = schedule.diffusers_config(sampler)
    if drop_unaccepted:
        accepted = inspect.signature(cls.__init__).parameters
        config = {k: v for k, v in config.items() if k in accepted}
    return cls(**config)


_DDPM_SAMPLERS: dict[str, type[SchedulerMixin]] = {
    'ddim': DDIMScheduler,
    'euler': EulerDiscreteScheduler,
    'euler_ancestral': EulerAncestralDiscreteScheduler,
    'heun': HeunDiscreteScheduler,
    'dpmpp_2m': DPMSolverMultistepScheduler,
    'ddpm': DDPMScheduler,
}
# Schedulers whose sigma parametrisation needs alpha_bar > 0; diffusers uses 2**-24 for a zero
# terminal SNR in Euler / DPM-Solver, and we do the same for Heun (which has no such option).
_ZERO_SNR_FLOOR = 2.0**-24
_DIFFUSERS_BETA_NAMES = {'linear': 'linear', 'scaled_linear': 'scaled_linear', 'cosine': 'squaredcos_cap_v2'}


class DDPMSchedule:
    """Discrete variance-preserving schedule (DDPM / SD2) with eps, v or x0 targets.

    Args:
        num_train_timesteps: Number of discrete training steps ``T``.
        beta_schedule: ``'scaled_linear'`` (SD), ``'linear'`` (DDPM) or ``'cosine'`` (Nichol & Dhariwal).
        beta_start: First beta (linear schedules).
        beta_end: Last beta (linear schedules).
        prediction_type: ``'epsilon'``, ``'v_prediction'`` or ``'sample'``.
        loss_weighting: ``'uniform'`` or ``'min_snr'``.
        min_snr_gamma: Gamma of min-SNR weighting.
        zero_terminal_snr: Rescale to zero terminal SNR (applied after the resolution shift).
        offset_noise: Scale of per-channel offset noise added to training noise (0 disables it).
        resolution_shift: Divide the SNR by ``resolution_shift**2`` (see :func:`shift_alphas_cumprod`).
        timestep_spacing: diffusers' inference timestep spacing; ``'trailing'`` starts sampling at
            ``t = T - 1`` (Lin et al. 2023, Sec. 3.3).
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = 'scaled_linear',
                 beta_start: float = 0.00085, beta_end: float = 0.012, prediction_type: str = 'epsilon',
                 loss_weighting: str = 'uniform', min_snr_gamma: float = 5.0, zero_terminal_snr: bool = False,
                 offset_noise: float = 0.0, resolution_shift: float = 1.0, timestep_spacing: str = 'trailing'):
        if beta_schedule not in _DIFFUSERS_BETA_NAMES:
            raise ValueError(f'unknown beta_schedule {beta_schedule!r}; expected one of {list(_DIFFUSERS_BETA_NAMES)}')
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f'unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}')
        if loss_weighting not in ('uniform', 'min_snr'):
            raise ValueError(f"unknown loss_weighting {loss_weighting!r}; expected 'uniform' or 'min_snr'")
        if zero_terminal_snr and prediction_type == 'epsilon':
            log.warning('zero_terminal_snr with an epsilon target is ill-posed at t = T-1 (Lin et al. 2023 '
                        'use v_prediction)')
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule, self.beta_start, self.beta_end = beta_schedule, beta_start, beta_end
        self.prediction_type = prediction_type
        self.loss_weighting, self.min_snr_gamma = loss_weighting, min_snr_gamma
        self.zero_terminal_snr, self.offset_noise = zero_terminal_snr, offset_noise
        self.timestep_spacing = timestep_spacing
        self._base = self._base_alphas_cumprod()
        self.set_resolution_shift(resolution_shift)

    def set_resolution_shift(self, shift: float) -> None:
        """(Re)build ``alphas_cumprod`` with the SNR divided by ``shift**2`` (resolution transfer)."""
        self.resolution_shift = float(shift)
        shifted = shift_alphas_cumprod(self._base, shift) if shift != 1.0 else self._base
        self._shifted = shifted
        final = rescale_zero_terminal_snr(shifted) if self.zero_terminal_snr else shifted
        self.alphas_cumprod = final.to(torch.float32)  # (T,)
        self._alphas_cumprod_on: dict[torch.device, Tensor] = {}

    def noise_level(self, t_in: Tensor) -> Tensor:
        """Noise level in ``[0, 1]`` (1 = pure noise) of the network's time input: ``t / (T - 1)``."""
        return ddpm_noise_level(t_in, self.num_train_timesteps)

    def _base_alphas_cumprod(self) -> Tensor:
        T = self.num_train_timesteps
        if self.beta_schedule == 'cosine':
            return cosine_alphas_cumprod(T)
        betas_fn = scaled_linear_betas if self.beta_schedule == 'scaled_linear' else linear_betas
        return alphas_cumprod_from_betas(betas_fn(T, self.beta_start, self.beta_end))

    def _alpha_bar(self, t: Tensor) -> Tensor:
        if t.device not in self._alphas_cumprod_on:  # the table is copied to each device once, not every step
            self._alphas_cumprod_on[t.device] = self.alphas_cumprod.to(t.device)
        return self._alphas_cumprod_on[t.device][t.long()]

    def sample_times(self, n: int, *, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
        """Uniform integer timesteps in ``[0, T)``, shape ``(n,)``."""
        return torch.randint(0, self.num_train_timesteps, (n,), device=device, generator=generator)

    def noise_like(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Training noise for ``x0`` (with offset noise if configured)."""
        return offset_noise(x0, self.offset_noise, generator)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Noised latents ``x_t`` at integer timesteps ``t``."""
        return add_noise(x0, noise, self._alpha_bar(t))

    def network_inputs(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The backbone sees ``(x_t, t)`` unchanged."""
        return x_t, t

    def training_target(self, x0: Tensor, noise: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Target of the raw network output: eps, v or x0."""
        if self.prediction_type == 'epsilon':
            return noise
        if self.prediction_type == 'v_prediction':
            return v_target(x0, noise, self._alpha_bar(t))
        return x0

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample loss weights ``(n,)``: ones, or min-SNR-gamma for the configured target."""
        if self.loss_weighting == 'uniform':
            return torch.ones(t.shape[0], device=t.device)
        return min_snr_weight(snr(self._alpha_bar(t)), self.min_snr_gamma, self.prediction_type)

    def diffusers_config(self, sampler: str = 'ddim') -> dict[str, Any]:
        """A diffusers scheduler config reproducing this schedule (for ``sampler``'s class)."""
        config: dict[str, Any] = {
            'num_train_timesteps': self.num_train_timesteps, 'beta_start': self.beta_start,
            'beta_end': self.beta_end, 'beta_schedule': _DIFFUSERS_BETA_NAMES[self.beta_schedule],
            'prediction_type': self.prediction_type, 'timestep_spacing': self.timestep_spacing,
            'steps_offset': 0, 'clip_sample': False, 'set_alpha_to_one': True,
            'rescale_betas_zero_snr': self.zero_terminal_snr,
        }
        if sampler == 'dpmpp_2m':
            config.update(algorithm_type='dpmsolver++', solver_order=2)
        if self.resolution_shift != 1.0:
            config['trained_betas'] = betas_from_alphas_cumprod(self._shifted).tolist()
        if sampler == 'heun' and self.zero_terminal_snr:  # Heun has no zero-SNR option: floor it
            floored = self.alphas_cumprod.double().clamp(min=_ZERO_SNR_FLOOR)
            config.update(trained_betas=betas_from_alphas_cumprod(floored).tolist(), rescale_betas_zero_snr=False)
        return config

    def make_scheduler(self, sampler: str = 'ddim') -> SchedulerMixin:
        """A diffusers scheduler for ``sampler`` in ``{ddim, euler, euler_ancestral, heun, dpmpp_2m, ddpm}``."""
        return diffusers_scheduler(self, sampler, _DDPM_SAMPLERS, 'ddpm', drop_unaccepted=True)


_EDM_SAMPLERS: dict[str, type[SchedulerMixin]] = {
    'euler': EDMEulerScheduler,
    'heun': EDMHeunScheduler,
    'dpmpp_2m': EDMDPMSolverMultistepScheduler,
}


class EDMSchedule:
    """Continuous-sigma EDM schedule (Karras et al. 2022) with F-prediction and log-normal sigmas.

    The network ``F`` receives ``(c_in x_t, c_noise)`` and is trained towards
    ``(x0 - c_skip x_t) / c_out``; with EDM's ``lambda = 1 / c_out^2`` the loss weight in F-space is 1.

    Args:
        sigma_data: Standard deviation of the training data, here the SCALED latents. The default 1.0 follows
            the project's convention: ``LatentDiffusion.scale`` multiplies raw latents by ``scaling_factor``,
            chosen (SD's 0.18215, or measured from data for our own autoencoder) so that scaled latents have
            unit variance. EDM's 0.5 is for pixels in [-1, 1]; MicroDiT sets 0.9 for its latents (set it in
            YAML when your latents' std is not 1).
        p_mean: Mean of ``ln(sigma)`` during training.
        p_std: Standard deviation of ``ln(sigma)`` during training.
        sigma_min: Smallest sampling sigma.
        sigma_max: Largest sampling sigma.
        rho: Exponent of the Karras sampling-time discretisation.
        offset_noise: Scale of per-channel offset noise.
        resolution_shift: Resolution transfer: training ``ln(sigma)`` moves up by ``ln(resolution_shift)``
            (``sigma' = shift * sigma``, the variance-exploding form of simple diffusion's SNR / shift^2).
    """

    prediction_type = 'edm'

    def __init__(self, sigma_data: float = 1.0, p_mean: float = -1.2, p_std: float = 1.2,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, offset_noise: float = 0.0,
                 resolution_shift: float = 1.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f'need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}')
        if sigma_data <= 0:
            raise ValueError(f'sigma_data must be positive, got {sigma_data}')
        self.sigma_data, self.base_p_mean, self.p_std = sigma_data, p_mean, p_std
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.offset_noise = offset_noise
        self.set_resolution_shift(resolution_shift)

    def set_resolution_shift(self, shift: float) -> None:
        """Training ``P_mean = base P_mean + ln(shift)`` (resolution transfer)."""
        self.resolution_shift = positive_shift(shift)
        self.p_mean = self.base_p_mean + math.log(shift)

    def noise_level(self, t_in: Tensor) -> Tensor:
        """Noise level in ``[0, 1]`` of the network's time input ``c_noise``, over ``[sigma_min, sigma_max]``."""
        return edm_noise_level(t_in, self.sigma_min, self.sigma_max)

    def sample_times(self, n: int, *, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
        """Log-normal training sigmas, shape ``(n,)``."""
        return lognormal_sigmas(n, self.p_mean, self.p_std, device=device, generator=generator)

    def noise_like(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Unit Gaussian noise for ``x0`` (with offset noise if configured)."""
        return offset_noise(x0, self.offset_noise, generator)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = x0 + sigma * noise`` (variance exploding)."""
        return x0 + broadcast_per_sample(t, x0) * noise

    def network_inputs(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(c_in x_t, c_noise)``: what F receives."""
        _, _, c_in, c_noise = edm_precondition(t, self.sigma_data)
        return broadcast_per_sample(c_in, x_t) * x_t, c_noise

    def training_target(self, x0: Tensor, noise: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """F-target ``(x0 - c_skip x_t) / c_out`` (Karras et al. 2022, eq. 8)."""
        c_skip, c_out, _, _ = edm_precondition(t, self.sigma_data)
        return (x0 - broadcast_per_sample(c_skip, x_t) * x_t) / broadcast_per_sample(c_out, x_t)

    def loss_weight(self, t: Tensor) -> Tensor:
        """EDM weight in F-space: ``lambda(sigma) * c_out^2`` (identically 1)."""
        _, c_out, _, _ = edm_precondition(t, self.sigma_data)
        return edm_loss_weight(t, self.sigma_data) * c_out**2

    def diffusers_config(self, sampler: str = 'euler') -> dict[str, Any]:
        """Config for diffusers' EDM schedulers (their ``'epsilon'`` is EDM's F-prediction)."""
        config: dict[str, Any] = {
            'sigma_min': self.sigma_min, 'sigma_max': self.sigma_max, 'sigma_data': self.sigma_data,
            'sigma_schedule': 'karras', 'rho': self.rho, 'prediction_type': 'epsilon', 'final_sigmas_type': 'zero',
        }
        if sampler == 'dpmpp_2m':
            config.update(algorithm_type='dpmsolver++', solver_order=2)
        return config

    def make_scheduler(self, sampler: str = 'euler') -> SchedulerMixin:
        """A diffusers-API scheduler for ``sampler`` in ``{euler, heun, dpmpp_2m}``."""
        return diffusers_scheduler(self, sampler, _EDM_SAMPLERS, 'edm')


noise_schedules.register('ddpm', func=DDPMSchedule)
noise_schedules.register('edm', func=EDMSchedule)
