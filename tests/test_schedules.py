"""Noise schedules, targets, loss weights and samplers: closed-form identities against the papers
and against diffusers' own schedulers."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from diffusion import registry
from diffusion.samplers import EDMHeunScheduler, guidance, sample
from diffusion.schedules import (DDPMSchedule, EDMSchedule, add_noise, cosine_alphas_cumprod, edm_loss_weight,
                                 edm_precondition, eps_from_v, min_snr_weight, rescale_zero_terminal_snr,
                                 shift_alphas_cumprod, snr, v_target, x0_from_v)

DDPM_SAMPLERS = ['ddim', 'euler', 'euler_ancestral', 'heun', 'dpmpp_2m', 'ddpm']
EDM_SAMPLERS = ['euler', 'heun', 'dpmpp_2m']


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Schedules against diffusers and closed forms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('ours,theirs', [('scaled_linear', 'scaled_linear'), ('linear', 'linear'),
                                         ('cosine', 'squaredcos_cap_v2')])
def test_alphas_cumprod_match_diffusers(ours, theirs):
    kw = dict(beta_start=0.00085, beta_end=0.012) if ours != 'linear' else dict(beta_start=1e-4, beta_end=0.02)
    schedule = DDPMSchedule(beta_schedule=ours, **kw)
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, **kw)
    torch.testing.assert_close(schedule.alphas_cumprod, reference.alphas_cumprod, atol=2e-6, rtol=1e-4)


def test_cosine_closed_form():
    T, s = 1000, 0.008
    ac = cosine_alphas_cumprod(T, s)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2)**2  # noqa: E731
    for t in (1, 250, 500, 900):  # entry t-1 is alpha_bar(t) = f(t) / f(0) where no beta was clipped
        assert ac[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)


def test_zero_terminal_snr():
    base = DDPMSchedule().alphas_cumprod.double()
    rescaled = rescale_zero_terminal_snr(base)
    assert rescaled[-1] == 0
    assert rescaled[0].item() == pytest.approx(base[0].item(), rel=1e-12)
    assert (rescaled.diff() < 0).all()
    schedule = DDPMSchedule(zero_terminal_snr=True, prediction_type='v_prediction')
    assert schedule.alphas_cumprod[-1] == 0
    ddim = schedule.make_scheduler('ddim')  # diffusers' own rescale gives the same schedule
    torch.testing.assert_close(ddim.alphas_cumprod, schedule.alphas_cumprod, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize('shift,factor', [(2 ** 0.5, 0.5), (2.0, 0.25)])
def test_resolution_shift_divides_snr(shift, factor):
    base = DDPMSchedule().alphas_cumprod.double()
    torch.testing.assert_close(snr(shift_alphas_cumprod(base, shift)), factor * snr(base), rtol=1e-9, atol=0)
    shifted = DDPMSchedule(resolution_shift=shift)
    torch.testing.assert_close(snr(shifted.alphas_cumprod.double()), factor * snr(base), rtol=1e-4, atol=0)
    for name in ('ddim', 'euler'):  # the sampler sees the shifted schedule too
        torch.testing.assert_close(shifted.make_scheduler(name).alphas_cumprod, shifted.alphas_cumprod,
                                   rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match='positive'):
        shift_alphas_cumprod(base, 0.0)


# ---------------------------------------------------------------------------------------------
# Forward process, targets and weights
# ---------------------------------------------------------------------------------------------


def test_add_noise_variance_and_v_identities():
    alpha_bar = torch.tensor([0.9, 0.5, 0.05], dtype=torch.float64)
    x0 = torch.randn(3, 4, 64, 64, generator=_gen(0), dtype=torch.float64)
    noise = torch.randn(3, 4, 64, 64, generator=_gen(1), dtype=torch.float64)
    x_t = add_noise(x0, noise, alpha_bar)
    # Unit-variance data stays unit variance; the noise share is 1 - alpha_bar.
    big_x0 = torch.randn(3, 200_000, generator=_gen(2), dtype=torch.float64)
    big_noise = torch.randn(3, 200_000, generator=_gen(3), dtype=torch.float64)
    big_xt = add_noise(big_x0, big_noise, alpha_bar)
    torch.testing.assert_close(big_xt.var(dim=1), torch.ones(3, dtype=torch.float64), atol=0.02, rtol=0)
    torch.testing.assert_close((big_xt - alpha_bar.sqrt()[:, None] * big_x0).var(dim=1), 1 - alpha_bar,
                               atol=0.01, rtol=0)
    v = v_target(x0, noise, alpha_bar)
    torch.testing.assert_close(x0_from_v(x_t, v, alpha_bar), x0)
    torch.testing.assert_close(eps_from_v(x_t, v, alpha_bar), noise)


def test_schedule_targets_and_diffusers_agree():
    ref = DDPMScheduler(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012)
    x0, noise = torch.randn(4, 4, 8, 8, generator=_gen(0)), torch.randn(4, 4, 8, 8, generator=_gen(1))
    t = torch.tensor([0, 10, 500, 999])
    targets = {}
    for kind in ('epsilon', 'v_prediction', 'sample'):
        schedule = DDPMSchedule(prediction_type=kind)
        x_t = schedule.add_noise(x0, noise, t)
        torch.testing.assert_close(x_t, ref.add_noise(x0, noise, t))
        assert schedule.network_inputs(x_t, t)[0] is x_t
        targets[kind] = schedule.training_target(x0, noise, x_t, t)
    torch.testing.assert_close(targets['epsilon'], noise)
    torch.testing.assert_close(targets['v_prediction'], ref.get_velocity(x0, noise, t))
    torch.testing.assert_close(targets['sample'], x0)


@pytest.mark.parametrize('kind', ['epsilon', 'v_prediction', 'sample'])
def test_min_snr_weights_match_formula(kind):
    gamma = 5.0
    schedule = DDPMSchedule(prediction_type=kind, loss_weighting='min_snr', min_snr_gamma=gamma)
    t = torch.tensor([0, 100, 300, 600, 999])
    weights = schedule.loss_weight(t)
    for i, step in enumerate(t.tolist()):
        a = schedule.alphas_cumprod[step].item()
        s = a / (1 - a)
        expected = {'epsilon': min(s, gamma) / s, 'v_prediction': min(s, gamma) / (s + 1),
                    'sample': min(s, gamma)}[kind]
        assert weights[i].item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(DDPMSchedule(prediction_type=kind).loss_weight(t), torch.ones(5))


@pytest.mark.parametrize('kind', ['epsilon', 'v_prediction', 'sample'])
def test_min_snr_terminal_step_of_zero_terminal_snr_gets_weight_one(kind):
    """At snr = 0 every target takes its plain loss weight 1 (v and x0 would get 0 from the formula)."""
    gamma = 5.0
    schedule = DDPMSchedule(prediction_type=kind, loss_weighting='min_snr', min_snr_gamma=gamma,
                            zero_terminal_snr=True)
    assert schedule.alphas_cumprod[-1].item() == 0.0
    t = torch.tensor([999, 998, 500])
    weights = schedule.loss_weight(t)
    assert torch.isfinite(weights).all() and weights[0].item() == 1.0
    s = snr(schedule.alphas_cumprod[t[1:]].double())  # snr > 0: the paper's formula, unchanged
    expected = {'epsilon': s.clamp(max=gamma) / s, 'v_prediction': s.clamp(max=gamma) / (s + 1),
                'sample': s.clamp(max=gamma)}[kind]
    torch.testing.assert_close(weights[1:].double(), expected, rtol=1e-5, atol=0)
    if kind != 'epsilon':  # the step next to the terminal one is still weighted by its (tiny) snr
        assert weights[1].item() < 1e-3
    with pytest.raises(ValueError, match='prediction_type'):
        min_snr_weight(torch.tensor([0.0, 1.0]), gamma, 'flow')


def test_min_snr_v_terminal_step_is_trained():
    """Through the model's loss maths: the terminal v target is -x0 and its weighted error is not zero."""
    schedule = DDPMSchedule(prediction_type='v_prediction', loss_weighting='min_snr', zero_terminal_snr=True)
    x0, noise = torch.randn(2, 4, 4, 4, generator=_gen(1)), torch.randn(2, 4, 4, 4, generator=_gen(2))
    t = torch.tensor([999, 999])
    x_t = schedule.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, noise)
    target = schedule.training_target(x0, noise, x_t, t)
    torch.testing.assert_close(target, -x0)
    weighted = schedule.loss_weight(t) * ((torch.zeros_like(target) - target)**2).mean(dim=(1, 2, 3))
    assert (weighted > 0.5).all()


def test_edm_sigma_data_defaults_to_unit_variance_latents():
    """Scaled latents have unit variance by the project's convention, so EDM's default sigma_data is 1."""
    default = EDMSchedule()
    assert default.sigma_data == 1.0 and default.diffusers_config()['sigma_data'] == 1.0
    assert EDMSchedule(sigma_data=0.9).sigma_data == 0.9  # MicroDiT's explicit setting is kept
    with pytest.raises(ValueError, match='sigma_data'):
        EDMSchedule(sigma_data=0.0)
    # With data of std sigma_data, c_in makes the network input unit variance at every sigma (Karras Table 1).
    x0 = torch.randn(20000, generator=_gen(3))  # unit-variance "latents"
    for sigma in (0.1, 1.0, 10.0):
        _, _, c_in, _ = edm_precondition(torch.tensor(sigma), default.sigma_data)
        x_t = x0 + sigma * torch.randn(20000, generator=_gen(4))
        assert (c_in * x_t).std().item() == pytest.approx(1.0, abs=0.03)


def test_offset_noise_adds_per_channel_constant():
    x0 = torch.zeros(64, 4, 16, 16)
    plain = DDPMSchedule().noise_like(x0, generator=_gen(0))
    offset = DDPMSchedule(offset_noise=0.5).noise_like(x0, generator=_gen(0))
    diff = offset - plain
    torch.testing.assert_close(diff, diff[..., :1, :1].expand_as(diff))  # one constant per (B, C)
    assert (offset - plain).std().item() == pytest.approx(0.5, rel=0.15)


def test_edm_precondition_matches_karras_table_1():
    sigma, sd = torch.tensor([0.002, 0.5, 3.0, 80.0], dtype=torch.float64), 0.5
    c_skip, c_out, c_in, c_noise = edm_precondition(sigma, sd)
    for i, s in enumerate(sigma.tolist()):
        assert c_skip[i].item() == pytest.approx(sd**2 / (s**2 + sd**2))
        assert c_out[i].item() == pytest.approx(s * sd / math.sqrt(sd**2 + s**2))
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + sd**2))
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4)
    torch.testing.assert_close(edm_loss_weight(sigma, sd), 1 / c_out**2)


def test_edm_schedule_target_recovers_x0_and_unit_weight():
    schedule = EDMSchedule(sigma_data=0.9, p_mean=-0.6, p_std=1.2)
    sigma = schedule.sample_times(20_000, generator=_gen(0))
    assert sigma.log().mean().item() == pytest.approx(-0.6, abs=0.05)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.05)
    sigma = sigma[:4].double()
    x0, noise = torch.randn(4, 4, 8, 8, dtype=torch.float64), torch.randn(4, 4, 8, 8, dtype=torch.float64)
    x_t = schedule.add_noise(x0, noise, sigma)
    x_in, c_noise = schedule.network_inputs(x_t, sigma)
    c_skip, c_out, c_in, _ = edm_precondition(sigma, 0.9)
    torch.testing.assert_close(x_in, x_t * c_in[:, None, None, None])
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    target = schedule.training_target(x0, noise, x_t, sigma)
    denoised = c_skip[:, None, None, None] * x_t + c_out[:, None, None, None] * target
    torch.testing.assert_close(denoised, x0)
    torch.testing.assert_close(schedule.loss_weight(sigma), torch.ones(4, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Guidance and sampling
# ---------------------------------------------------------------------------------------------


def test_guidance_scale_one_is_conditional_and_rescale():
    uncond, cond = torch.randn(2, 4, 8, 8, generator=_gen(0)), torch.randn(2, 4, 8, 8, generator=_gen(1))
    assert torch.equal(guidance(uncond, cond, 1.0), cond)
    assert torch.equal(guidance(uncond, cond, 1.0, rescale=0.7), cond)
    torch.testing.assert_close(guidance(uncond, cond, 7.5), uncond + 7.5 * (cond - uncond))
    full = guidance(uncond, cond, 7.5, rescale=1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    half = guidance(uncond, cond, 7.5, rescale=0.5)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * guidance(uncond, cond, 7.5))
    with pytest.raises(ValueError, match='shapes differ'):
        guidance(uncond, cond[:1], 2.0)


def _toy_denoiser(x_in, t):
    return 0.3 * x_in + 0.01 * t.float()


@pytest.mark.parametrize('name', DDPM_SAMPLERS)
def test_ddpm_samplers_run_and_are_seeded(name):
    scheduler = DDPMSchedule(prediction_type='v_prediction').make_scheduler(name)
    runs = [sample(_toy_denoiser, scheduler, (2, 4, 8, 8), num_steps=4, generator=_gen(seed), progress=False)
            for seed in (0, 0, 1)]
    assert runs[0].shape == (2, 4, 8, 8) and torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


@pytest.mark.parametrize('name', DDPM_SAMPLERS)
def test_zero_terminal_snr_samplers_stay_finite(name):
    """Euler-type samplers need sigma < inf at t = T-1: diffusers' 2**-24 floor (ours for Heun)."""
    schedule = DDPMSchedule(zero_terminal_snr=True, prediction_type='v_prediction')
    scheduler = schedule.make_scheduler(name)
    assert torch.isfinite(torch.as_tensor(scheduler.init_noise_sigma))
    out = sample(_toy_denoiser, scheduler, (1, 4, 8, 8), num_steps=4, generator=_gen(0), progress=False)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('name', EDM_SAMPLERS)
def test_edm_samplers_run_and_are_seeded(name):
    scheduler = EDMSchedule().make_scheduler(name)
    runs = [sample(_toy_denoiser, scheduler, (2, 4, 8, 8), num_steps=4, generator=_gen(seed), progress=False)
            for seed in (0, 0, 1)]
    assert torch.isfinite(runs[0]).all() and torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_unknown_sampler_errors():
    with pytest.raises(ValueError, match='unknown sampler'):
        DDPMSchedule().make_scheduler('plms')
    with pytest.raises(ValueError, match='unknown sampler'):
        EDMSchedule().make_scheduler('ddim')


@pytest.mark.parametrize('name', DDPM_SAMPLERS)
def test_exact_point_denoiser_lands_on_the_point(name):
    """Data = one fixed x0: the ideal eps-predictor is (x_t - sqrt(a) x0) / sqrt(1 - a)."""
    schedule = DDPMSchedule()
    x0 = torch.randn(1, 4, 8, 8, generator=_gen(5))
    a = schedule.alphas_cumprod

    def eps_star(x_in, t):  # x_in is the VP x_t: Euler-type schedulers divide by sqrt(sigma^2 + 1)
        ab = a[int(t.round())]
        return (x_in - ab.sqrt() * x0) / (1 - ab).sqrt()

    out = sample(eps_star, schedule.make_scheduler(name), (1, 4, 8, 8), num_steps=10, generator=_gen(0),
                 progress=False)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def _gaussian_flow_error(schedule, sampler: str, num_steps: int, mu: float = 0.7, std: float = 0.4) -> float:
    """Max error of sampling with the exact denoiser of data ~ N(mu, std^2) against the closed form.

    For Gaussian data the probability-flow ODE is linear: it maps the start x_T (mean m_T, std s_T)
    to ``mu + std (x_T - m_T) / s_T``; a deterministic sampler must converge to that, per sample.
    """
    z = torch.randn(2000, 1, 2, 2, generator=_gen(0), dtype=torch.float64)
    scheduler = schedule.make_scheduler(sampler)
    if isinstance(schedule, EDMSchedule):
        def denoise(x_in, t):  # F such that c_skip x + c_out F = E[x0 | x_t]
            sigma = (4 * t).exp()
            c_skip, c_out, c_in, _ = edm_precondition(sigma, schedule.sigma_data)
            x_t = x_in / c_in
            x0_hat = mu + std**2 / (std**2 + sigma**2) * (x_t - mu)
            return (x0_hat - c_skip * x_t) / c_out
        x_T, m_T, s_T = z * scheduler.init_noise_sigma, mu, math.sqrt(std**2 + schedule.sigma_max**2)
    else:
        a = schedule.alphas_cumprod.double()

        def denoise(x_in, t):  # x_in is the VP x_t (Euler-type schedulers undo their sigma scaling)
            ab = a[int(t.round())]
            x0_hat = mu + ab.sqrt() * std**2 / (ab * std**2 + 1 - ab) * (x_in - ab.sqrt() * mu)
            return (x_in - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
        x_T, m_T, s_T = z, a[-1].sqrt() * mu, (a[-1] * std**2 + 1 - a[-1]).sqrt()
    out = sample(denoise, scheduler, z.shape, num_steps=num_steps, init_noise=z, progress=False, dtype=torch.float64)
    return (out - (mu + std * (x_T - m_T) / s_T)).abs().max().item()


@pytest.mark.parametrize('schedule,sampler,steps,atol', [(DDPMSchedule(), 'ddim', 200, 0.08),
                                                         (DDPMSchedule(), 'dpmpp_2m', 200, 0.04),
                                                         (EDMSchedule(sigma_data=0.9), 'heun', 50, 0.03),
                                                         (EDMSchedule(sigma_data=0.9), 'dpmpp_2m', 50, 0.03)])
def test_exact_gaussian_denoiser_follows_the_probability_flow(schedule, sampler, steps, atol):
    assert _gaussian_flow_error(schedule, sampler, steps) < atol


def test_edm_heun_is_second_order():
    """Doubling the steps of Heun cuts the error about 4x (Euler only about 2x)."""
    schedule = EDMSchedule(sigma_data=0.9)
    heun = [_gaussian_flow_error(schedule, 'heun', n) for n in (25, 50)]
    euler = [_gaussian_flow_error(schedule, 'euler', n) for n in (25, 50)]
    assert heun[0] / heun[1] > 3.0
    assert euler[0] / euler[1] < 3.0
    assert heun[1] < euler[1] / 4


def test_edm_heun_uses_two_evaluations_per_step():
    scheduler = EDMSchedule().make_scheduler('heun')
    assert isinstance(scheduler, EDMHeunScheduler)
    scheduler.set_timesteps(5)
    assert len(scheduler.timesteps) == 2 * 5 - 1


def test_registry_and_diffusers_config():
    ddpm = registry.build(registry.noise_schedules, {'name': 'ddpm', 'prediction_type': 'v_prediction'})
    edm = registry.build(registry.noise_schedules, {'name': 'edm', 'sigma_data': 0.9})
    assert isinstance(ddpm, DDPMSchedule) and isinstance(edm, EDMSchedule)
    config = ddpm.diffusers_config()
    rebuilt = DDPMScheduler.from_config(config)
    torch.testing.assert_close(rebuilt.alphas_cumprod, ddpm.alphas_cumprod)
    assert rebuilt.config.prediction_type == 'v_prediction'
    assert edm.diffusers_config()['sigma_data'] == 0.9
    with pytest.raises(ValueError, match='beta_schedule'):
        DDPMSchedule(beta_schedule='sigmoid')
