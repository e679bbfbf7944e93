"""Flow matching (rectified flow) as a noise schedule beside ``ddpm`` and ``edm``.

The maths are small pure functions, each citing its source; :class:`FlowMatchingSchedule` (registered as
``flow_matching`` in :data:`diffusion.registry.noise_schedules`) bundles them into the interface
``LatentDiffusion`` calls (see ``diffusion/schedules.py``):

* forward process: ``x_t = (1 - t) x0 + t eps`` for ``t`` in ``[0, 1]`` (Liu et al. 2022, "Flow Straight and Fast";
  Lipman et al. 2022; in SD3's convention, ``t = 1`` is pure noise);
* target: the velocity ``v = eps - x0`` (``dx_t / dt``), so ``x0 = x_t - t v`` and ``eps = x_t + (1 - t) v``;
* training times: logit-normal ``t = sigmoid(m + s z)``, ``z ~ N(0, 1)`` (Esser et al. 2024, "Scaling Rectified
  Flow Transformers", eq. 19; ``m = 0, s = 1`` ranked first there);
* time shift: ``t' = s t / (1 + (s - 1) t)`` (Esser et al. 2024, eq. 23). It divides the signal-to-noise ratio
  ``((1 - t) / t)^2`` by ``s^2`` at every ``t``, the same move :func:`diffusion.schedules.shift_alphas_cumprod`
  makes for DDPM, so the resolution transfer uses the same ``s = resolution / base_resolution``; a configured
  base ``shift`` (SD3 uses 3 at 1024 px) multiplies it (shifts compose by multiplication);
* samplers: diffusers' ``FlowMatchEulerDiscreteScheduler`` (``euler``) and ``FlowMatchHeunDiscreteScheduler``
  (``heun``), with the shift in their config. The network's time input is ``t * num_train_timesteps``, exactly
  the ``timesteps`` those schedulers hand to the network.

Export: native only (``diffusion.export.native``). diffusers' SD/SDXL pipelines read ``scheduler.init_noise_sigma``
and call ``scheduler.scale_model_input``, which the flow-matching schedulers do not have, and diffusers' flow
pipelines (SD3, Flux) take transformers of their own architectures, not our UNet or MicroDiT.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, SchedulerMixin
from torch import Tensor

from diffusion.registry import noise_schedules
from diffusion.schedule_maths import broadcast_per_sample, min_snr_weight, offset_noise, positive_shift
from diffusion.schedules import diffusers_scheduler

__all__ = ['FlowMatchingSchedule', 'rf_interpolate', 'rf_velocity', 'x0_from_velocity', 'logit_normal_times',
           'time_shift', 'rf_snr', 'flow_sigmas', 'euler_step', 'flow_min_snr_weight']

# =============================================================================================
# Pure maths
# =============================================================================================


def rf_interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Rectified-flow path ``x_t = (1 - t) x0 + t eps`` (Liu et al. 2022, eq. 1); ``t`` is ``(n,)``."""
    tb = broadcast_per_sample(t, x0)
    return (1 - tb) * x0 + tb * noise


def rf_velocity(x0: Tensor, noise: Tensor) -> Tensor:
    """Velocity target ``v = d x_t / dt = eps - x0`` (Liu et al. 2022, eq. 1; Esser et al. 2024, eq. 3)."""
    return noise - x0


def x0_from_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """``x0 = x_t - t v`` (the straight line back to ``t = 0``)."""
    return x_t - broadcast_per_sample(t, x_t) * v


def logit_normal_times(n: int, mean: float = 0.0, std: float = 1.0, *, device: torch.device | str | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
    """Training times ``t = sigmoid(mean + std z)``, ``z ~ N(0, 1)`` (Esser et al. 2024, eq. 19), shape ``(n,)``."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def time_shift(t: Tensor, shift: float) -> Tensor:
    """SD3's timestep shift ``t' = s t / (1 + (s - 1) t)`` (Esser et al. 2024, eq. 23).

    In SNR terms ``((1 - t') / t')^2 = ((1 - t) / t)^2 / s^2``: the SNR divided by ``s^2`` at every step, as
    simple diffusion's shift (Hoogeboom et al. 2023) does; ``time_shift(time_shift(t, a), b) = time_shift(t, a b)``.
    """
    if shift <= 0:
        raise ValueError(f'time shift must be positive, got {shift}')
    return shift * t / (1 + (shift - 1) * t)


def rf_snr(t: Tensor) -> Tensor:
    """Signal-to-noise ratio of the rectified-flow path: ``((1 - t) / t)^2`` (inf at ``t = 0``, 0 at ``t = 1``)."""
    return ((1 - t) / t)**2


def flow_sigmas(num_inference_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """Inference times of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps``, with the final 0.

    ``n`` points evenly spaced from 1 to ``time_shift(1 / T, shift)``, each shifted, then 0 (float32, as
    diffusers). diffusers shifts the last point twice (its training table's smallest time is already shifted
    before ``set_timesteps`` shifts again); it is kept here so that the two agree to the last bit that matters.
    """
    t_min = float(time_shift(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64), shift))
    base = torch.linspace(1.0, t_min, num_inference_steps, dtype=torch.float64)
    return torch.cat([time_shift(base, shift), base.new_zeros(1)]).to(torch.float32)


def euler_step(x_t: Tensor, v: Tensor, t: float | Tensor, t_next: float | Tensor) -> Tensor:
    """One Euler step of the flow ODE ``dx/dt = v``: ``x_{t_next} = x_t + (t_next - t) v``."""
    return x_t + (t_next - t) * v


def flow_min_snr_weight(t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma (Hang et al. 2023, eq. 9) for the velocity MSE of a rectified flow: ``min(snr, gamma) t^2``.

    Min-SNR weights the x0-space error by ``min(snr, gamma)``. With ``x0 = x_t - t v`` the x0 error is ``t`` times
    the velocity error, so in velocity space the weight is ``min(snr, gamma) t^2``; equivalently
    ``min(1, gamma / snr)`` on the eps error, since ``eps = x_t + (1 - t) v``. It is
    :func:`diffusion.schedules.min_snr_weight`'s x0 weight times ``t^2``, so the project's rule at ``snr = 0``
    (weight 1, see there) holds at ``t = 1``. Every weight is below 1 and it falls like ``(1 - t)^2`` towards pure
    noise, where the first sampling steps are taken: SD3 (Esser et al. 2024, Table 1) found the plain velocity
    loss with logit-normal times better, which is why the schedule's default is ``uniform``.
    """
    return min_snr_weight(rf_snr(t), gamma, 'sample') * t**2


def flow_noise_level(t_in: Tensor, num_train_timesteps: int) -> Tensor:
    """``u = t_in / T``: the network's time input back in ``[0, 1]`` (1 = pure noise)."""
    return (t_in.float() / num_train_timesteps).clamp(0.0, 1.0)


# =============================================================================================
# Schedule class
# =============================================================================================

_FLOW_SAMPLERS: dict[str, type[SchedulerMixin]] = {
    'euler': FlowMatchEulerDiscreteScheduler,
    'heun': FlowMatchHeunDiscreteScheduler,
}
TIME_SAMPLINGS = ('logit_normal', 'uniform')


class FlowMatchingSchedule:
    """Rectified-flow schedule with a velocity target (see the module docstring).

    Args:
        num_train_timesteps: Scale of the network's time input (``t * T``, diffusers' flow-matching convention).
        shift: Base time shift ``s`` (1: none; SD3 3.0 at 1024 px), multiplied by the resolution shift.
        time_sampling: ``'logit_normal'`` (SD3) or ``'uniform'`` training times (before the shift).
        logit_mean: ``m`` of the logit-normal times.
        logit_std: ``s`` of the logit-normal times.
        loss_weighting: ``'uniform'`` (the plain velocity MSE) or ``'min_snr'`` (:func:`flow_min_snr_weight`).
        min_snr_gamma: Gamma of min-SNR weighting.
        offset_noise: Scale of per-channel offset noise (0 disables it).
        resolution_shift: ``resolution / base_resolution``; ``LatentDiffusion`` sets it on resolution transfer.
    """

    prediction_type = 'flow_prediction'  # diffusers' name for a velocity ``eps - x0`` output

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, time_sampling: str = 'logit_normal',
                 logit_mean: float = 0.0, logit_std: float = 1.0, loss_weighting: str = 'uniform',
                 min_snr_gamma: float = 5.0, offset_noise: float = 0.0, resolution_shift: float = 1.0):
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f'unknown time_sampling {time_sampling!r}; expected one of {TIME_SAMPLINGS}')
        if loss_weighting not in ('uniform', 'min_snr'):
            raise ValueError(f"unknown loss_weighting {loss_weighting!r}; expected 'uniform' or 'min_snr'")
        if shift <= 0 or logit_std <= 0:
            raise ValueError(f'shift and logit_std must be positive, got {shift}, {logit_std}')
        self.num_train_timesteps = num_train_timesteps
        self.base_shift, self.time_sampling = float(shift), time_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.loss_weighting, self.min_snr_gamma = loss_weighting, min_snr_gamma
        self.offset_noise = offset_noise
        self.set_resolution_shift(resolution_shift)

    def set_resolution_shift(self, shift: float) -> None:
        """The time shift becomes ``base shift * shift`` (training times and sampling times alike)."""
        self.resolution_shift = positive_shift(shift)
        self.shift = self.base_shift * self.resolution_shift

    def noise_level(self, t_in: Tensor) -> Tensor:
        """Noise level in ``[0, 1]`` of the network's time input ``t * T``: ``t`` itself."""
        return flow_noise_level(t_in, self.num_train_timesteps)

    def sample_times(self, n: int, *, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
        """Training times in ``(0, 1)``, shape ``(n,)``: logit-normal (or uniform), then shifted."""
        if self.time_sampling == 'logit_normal':
            t = logit_normal_times(n, self.logit_mean, self.logit_std, device=device, generator=generator)
        else:
            t = torch.rand(n, device=device, generator=generator)
        return time_shift(t, self.shift) if self.shift != 1.0 else t

    def noise_like(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Unit Gaussian noise for ``x0`` (with offset noise if configured)."""
        return offset_noise(x0, self.offset_noise, generator)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = (1 - t) x0 + t eps``."""
        return rf_interpolate(x0, noise, t)

    def network_inputs(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_t, t * T)``: the time input the diffusers flow-matching schedulers give at sampling."""
        return x_t, t * self.num_train_timesteps

    def training_target(self, x0: Tensor, noise: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The velocity ``eps - x0``."""
        return rf_velocity(x0, noise)

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample loss weights ``(n,)``: ones, or :func:`flow_min_snr_weight`."""
        if self.loss_weighting == 'uniform':
            return torch.ones(t.shape[0], device=t.device)
        return flow_min_snr_weight(t.float(), self.min_snr_gamma)

    def diffusers_config(self, sampler: str = 'euler') -> dict[str, Any]:
        """Config of diffusers' flow-matching schedulers reproducing this schedule's sampling times."""
        del sampler  # both samplers take the same two settings
        return {'num_train_timesteps': self.num_train_timesteps, 'shift': self.shift}

    def make_scheduler(self, sampler: str = 'euler') -> SchedulerMixin:
        """A diffusers scheduler for ``sampler`` in ``{euler, heun}``."""
        return diffusers_scheduler(self, sampler, _FLOW_SAMPLERS, 'flow_matching')


noise_schedules.register('flow_matching', func=FlowMatchingSchedule)
