"""Noise schedules, training targets and loss weights.

The maths are small pure functions (closed-form, each citing its source); two schedule classes
(``ddpm`` and ``edm``, registered in :data:`diffusion.registry.noise_schedules`) bundle them into
the interface the ``LatentDiffusion`` model calls:

    prediction_type, sample_times, noise_like, add_noise, network_inputs, training_target,
    loss_weight, make_scheduler, diffusers_config, noise_level, set_resolution_shift

Sampling always goes through a diffusers scheduler configured to match the training schedule
exactly, so that a diffusers pipeline loaded from our export reproduces our images.
"""
from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler,
                       EDMEulerScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, SchedulerMixin)
from torch import Tensor

from diffusion.registry import noise_schedules
from diffusion.samplers import EDMHeunScheduler

log = logging.getLogger(__name__)

PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')

# =============================================================================================
# Beta / alpha-bar schedules (float64 for accuracy; callers cast)
# =============================================================================================


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Linear betas of DDPM (Ho et al. 2020, Sec. 4): ``beta_t = linspace(b0, b1, T)``."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Latent-diffusion / SD "scaled linear" betas: linear in ``sqrt(beta)``, then squared."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64)**2


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021, eq. 17, with betas clipped at ``max_beta``.

    ``alpha_bar(t) = f(t) / f(0)``, ``f(t) = cos(((t/T + s) / (1 + s)) * pi/2)^2``; entry ``i`` is
    ``alpha_bar`` after step ``i + 1`` (the discretisation diffusers calls ``squaredcos_cap_v2``).
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2)**2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """``alpha_bar_t = prod_{s<=t} (1 - beta_s)`` (Ho et al. 2020, eq. 4)."""
    return torch.cumprod(1 - betas, dim=0)


def betas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """Inverse of :func:`alphas_cumprod_from_betas`."""
    prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return 1 - alphas_cumprod / prev


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules...", Algorithm 1).

    Shifts ``sqrt(alpha_bar)`` so its last value is 0 and rescales it so its first value is kept.
    """
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


def snr(alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` (Kingma et al. 2021, eq. 1)."""
    return alphas_cumprod / (1 - alphas_cumprod)


def shift_alphas_cumprod(alphas_cumprod: Tensor, shift: float) -> Tensor:
    """Resolution shift: divide the SNR at every step by ``shift**2``.

    This is simple diffusion's shifted schedule (Hoogeboom et al. 2023, Sec. 3.1: log-SNR moved by
    ``-2 log(shift)``, with ``shift = new_res / base_res``) and equals SD3's timestep shift (Esser et
    al. 2024, eq. 23) with the same ``shift``. ``shift = 2`` quarters the SNR (256 -> 512 transfer),
    ``sqrt(2)`` halves it. In alpha_bar terms: ``a' = a / (a + shift^2 (1 - a))``.
    """
    if shift <= 0:
        raise ValueError(f'resolution shift must be positive, got {shift}')
    return alphas_cumprod / (alphas_cumprod + shift**2 * (1 - alphas_cumprod))


# =============================================================================================
# Forward process and targets (variance preserving; Salimans & Ho 2022 for v)
# =============================================================================================


def _bcast(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample ``(n,)`` tensor to broadcast over ``like`` (n, C, H, W)."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` (Ho et al. 2020, eq. 4); ``alpha_bar`` is ``(n,)``."""
    a = _bcast(alpha_bar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """Velocity ``v = sqrt(a) eps - sqrt(1 - a) x0`` (Salimans & Ho 2022, Sec. 4)."""
    a = _bcast(alpha_bar, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def x0_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """``x0 = sqrt(a) x_t - sqrt(1 - a) v``."""
    a = _bcast(alpha_bar, x_t)
    return a.sqrt() * x_t - (1 - a).sqrt() * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """``eps = sqrt(1 - a) x_t + sqrt(a) v``."""
    a = _bcast(alpha_bar, x_t)
    return (1 - a).sqrt() * x_t + a.sqrt() * v


def min_snr_weight(snr_values: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 9 and Sec. 3.4) for the raw-target MSE.

    The x0-space weight ``min(snr, gamma)`` becomes ``min(snr, gamma) / snr`` for an eps target,
    ``min(snr, gamma) / (snr + 1)`` for a v target and ``min(snr, gamma)`` for an x0 target.

    At ``snr = 0`` (only the terminal step of a zero-terminal-SNR schedule) every target gets weight 1, its
    plain, unweighted loss. The formulas' own limits would be 1 for eps but 0 for v and x0, and 0 is wrong:
    in v terms the min-SNR weight equals the eps loss (``|eps_err|^2 = snr / (snr + 1) |v_err|^2``), which is
    degenerate at ``snr = 0`` because there ``x_t`` IS the noise. That degeneracy is exactly why Lin et al.
    2023 (Sec. 3.2) move to v prediction for zero terminal SNR: at ``t = T`` the v target is ``-x0``, the one
    step that learns the data mean from pure noise, and the first step a trailing-spacing sampler evaluates.
    Weight 0 would leave that output untrained; weight 1 trains it as Lin et al.'s unweighted v loss does.
    The eps form is written ``min(1, gamma / snr)`` so that it also gives 1 there instead of 0/0.
    """
    if prediction_type == 'epsilon':
        return (gamma / snr_values).clamp(max=1.0)
    if prediction_type == 'v_prediction':
        weight = snr_values.clamp(max=gamma) / (snr_values + 1)
    elif prediction_type == 'sample':
        weight = snr_values.clamp(max=gamma)
    else:
        raise ValueError(f'unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}')
    return torch.where(snr_values == 0, torch.ones_like(weight), weight)


def offset_noise(x0: Tensor, offset: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise like ``x0`` plus ``offset * randn(B, C, 1, 1)`` (Guttenberg 2023, "offset noise")."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if offset:
        shape = (*x0.shape[:2], *([1] * (x0.ndim - 2)))
        noise = noise + offset * torch.randn(shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return noise


# =============================================================================================
# EDM (Karras et al. 2022, Table 1 and Sec. 5)
# =============================================================================================


def edm_precondition(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM preconditioning (Karras et al. 2022, Table 1): returns ``(c_skip, c_out, c_in, c_noise)``.

    ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` with ``c_skip = sd^2 / (s^2 + sd^2)``,
    ``c_out = s sd / sqrt(s^2 + sd^2)``, ``c_in = 1 / sqrt(s^2 + sd^2)``, ``c_noise = ln(s) / 4``.
    """
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4


def edm_loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM's denoiser-space weight ``lambda = (s^2 + sd^2) / (s sd)^2 = 1 / c_out^2`` (Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data)**2


def lognormal_sigmas(n: int, p_mean: float, p_std: float, *, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
    """Training noise levels ``ln(sigma) ~ N(p_mean, p_std^2)`` (Karras et al. 2022, Table 1)."""
    return (p_mean + p_std * torch.randn(n, generator=generator, device=device)).exp()


# =============================================================================================
# Noise level in [0, 1] of the network's time input (gates control conditioning)
# =============================================================================================


def ddpm_noise_level(t: Tensor, num_train_timesteps: int) -> Tensor:
    """``u = t / (T - 1)`` for integer DDPM timesteps (``T - 1`` is the noisiest step)."""
    return (t.float() / (num_train_timesteps - 1)).clamp(0.0, 1.0)


def edm_noise_level(c_noise: Tensor, sigma_min: float, sigma_max: float) -> Tensor:
    """``u = (ln sigma - ln sigma_min) / (ln sigma_max - ln sigma_min)``, clipped, from EDM's
    ``c_noise = ln(sigma) / 4`` (Karras et al. 2022, Table 1), which is what the network receives."""
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return ((4.0 * c_noise.float() - lo) / (hi - lo)).clamp(0.0, 1.0)


# =============================================================================================
# Schedule classes
# =============================================================================================

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
        if sampler not in _DDPM_SAMPLERS:
            raise ValueError(f'unknown sampler {sampler!r} for the ddpm schedule; expected one of '
                             f'{sorted(_DDPM_SAMPLERS)}')
        cls = _DDPM_SAMPLERS[sampler]
        config = self.diffusers_config(sampler)
        accepted = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in config.items() if k in accepted})


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
        if shift <= 0:
            raise ValueError(f'resolution shift must be positive, got {shift}')
        self.resolution_shift = float(shift)
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
        return x0 + _bcast(t, x0) * noise

    def network_inputs(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(c_in x_t, c_noise)``: what F receives."""
        _, _, c_in, c_noise = edm_precondition(t, self.sigma_data)
        return _bcast(c_in, x_t) * x_t, c_noise

    def training_target(self, x0: Tensor, noise: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """F-target ``(x0 - c_skip x_t) / c_out`` (Karras et al. 2022, eq. 8)."""
        c_skip, c_out, _, _ = edm_precondition(t, self.sigma_data)
        return (x0 - _bcast(c_skip, x_t) * x_t) / _bcast(c_out, x_t)

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
        if sampler not in _EDM_SAMPLERS:
            raise ValueError(f'unknown sampler {sampler!r} for the edm schedule; expected one of '
                             f'{sorted(_EDM_SAMPLERS)}')
        return _EDM_SAMPLERS[sampler](**self.diffusers_config(sampler))


noise_schedules.register('ddpm', func=DDPMSchedule)
noise_schedules.register('edm', func=EDMSchedule)
