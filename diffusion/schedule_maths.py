"""The diffusion maths behind the noise schedules: small pure functions, each citing its source.

Beta and alpha-bar schedules, the variance-preserving forward process and its targets (eps, v, x0), min-SNR loss
weights, offset noise, EDM's preconditioning, and the noise level in ``[0, 1]`` of a network's time input. The
schedule classes of :mod:`diffusion.schedules` (and :mod:`diffusion.flow_matching`) bundle them; every name here is
also importable from :mod:`diffusion.schedules`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

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


def positive_shift(shift: float) -> float:
    """A resolution shift as a float; it must be positive (``resolution / base_resolution`` of a transfer)."""
    if shift <= 0:
        raise ValueError(f'resolution shift must be positive, got {shift}')
    return float(shift)


def broadcast_per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample ``(n,)`` tensor to broadcast over ``like`` (n, C, H, W)."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` (Ho et al. 2020, eq. 4); ``alpha_bar`` is ``(n,)``."""
    a = broadcast_per_sample(alpha_bar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """Velocity ``v = sqrt(a) eps - sqrt(1 - a) x0`` (Salimans & Ho 2022, Sec. 4)."""
    a = broadcast_per_sample(alpha_bar, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def x0_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """``x0 = sqrt(a) x_t - sqrt(1 - a) v``."""
    a = broadcast_per_sample(alpha_bar, x_t)
    return a.sqrt() * x_t - (1 - a).sqrt() * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """``eps = sqrt(1 - a) x_t + sqrt(a) v``."""
    a = broadcast_per_sample(alpha_bar, x_t)
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
