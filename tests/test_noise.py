"""The noise processes (sdpo/noise.py): DDPM's general Gaussian posterior is the DDPM posterior
of section 5; rectified flow noises and targets as FlowMatchEulerDiscreteScheduler does, draws
sigmas as diffusers' SD3 examples do, and its posterior is a consistent Gaussian posterior."""

import pytest
import torch

from sdpo.noise import DDPM, RectifiedFlow, gaussian_posterior
from sdpo.timesteps import posterior_coefficients, x0_error_scale


def ddpm(prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    return DDPM(DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type=prediction_type))


def flow(shift=3.0, **kwargs):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return RectifiedFlow(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift), **kwargs)


def test_the_general_posterior_of_ddpm_is_the_ddpm_posterior():
    process = ddpm()
    t = torch.arange(1000)
    coef_xt, coef_x0, var = process.posterior(t)
    c0, ct, var_ddpm = posterior_coefficients(process.scheduler.alphas_cumprod, t)
    torch.testing.assert_close(coef_x0, c0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(coef_xt, ct, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, var_ddpm, rtol=1e-10, atol=1e-15)  # the clamp at t = 0 included
    assert var[0] == var[1] and coef_x0[0] == 1.0 and coef_xt[0] == 0.0  # at t = 0, x_{-1} = x0
    for kind in ("epsilon", "v_prediction"):
        torch.testing.assert_close(ddpm(kind).x0_error_scale(t), x0_error_scale(process.scheduler.alphas_cumprod, t,
                                                                                 kind), rtol=1e-12, atol=0)


@pytest.mark.parametrize("make", [ddpm, flow], ids=["ddpm", "flow"])
def test_the_posterior_is_consistent_with_the_marginals(make):
    """Averaging q(x_s | x_t, x0) over q(x_t | x0) gives q(x_s | x0): the means and variances agree."""
    process = make()
    index = torch.arange(process.grid_size())
    (a_t, s_t), (a_s, s_s) = process.marginal(index), process.previous(index)
    coef_xt, coef_x0, var = gaussian_posterior(a_t, s_t, a_s, s_s)
    torch.testing.assert_close(coef_xt * a_t + coef_x0, a_s, rtol=0, atol=1e-12)
    torch.testing.assert_close(coef_xt**2 * s_t**2 + var, s_s**2, rtol=0, atol=1e-12)
    assert (var >= 0).all() and (process.posterior(index)[2] > 0).all()


def test_rectified_flow_noises_and_targets_as_the_scheduler():
    """x_t equals the scheduler's scale_noise at the model's timestep, and one Euler step of the
    scheduler with the target velocity eps - x0 lands exactly on the next grid point's x_t."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    process = flow()
    g = torch.Generator().manual_seed(0)
    index = process.draw(6, generator=g)
    x0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    x_t = process.add_noise(x0, eps, index)
    assert torch.equal(x_t, process.scheduler.scale_noise(x0, process.model_timesteps(index), eps))
    target = process.target(x0, eps, index)
    assert torch.equal(target, eps - x0)
    # The x0 estimate from a prediction, and k of the importance weight: x0_hat - x0 = k (target - pred).
    pred = torch.randn(6, 4, 8, 8, generator=g)
    k = process.x0_error_scale(index).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(process.x0_estimate(pred, x_t, index) - x0, k * (target - pred), rtol=1e-5, atol=1e-5)
    assert torch.allclose(process.x0_estimate(target, x_t, index), x0, atol=1e-5)
    # Sampling with the same scheduler: from sigma_i to sigma_{i+1} along the target velocity.
    sampler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sampler.set_timesteps(1000)
    i = 400
    x = x0[:1] * (1 - sampler.sigmas[i]) + eps[:1] * sampler.sigmas[i]
    stepped = sampler.step(eps[:1] - x0[:1], sampler.timesteps[i], x).prev_sample
    expected = x0[:1] * (1 - sampler.sigmas[i + 1]) + eps[:1] * sampler.sigmas[i + 1]
    torch.testing.assert_close(stepped, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weighting", ["uniform", "logit_normal", "mode"])
def test_sigmas_are_drawn_as_diffusers_sd3_examples_draw_them(weighting):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    process = flow(weighting=weighting, logit_mean=0.5, logit_std=0.8)
    index = process.draw(4096, generator=torch.Generator().manual_seed(3))
    u = compute_density_for_timestep_sampling(weighting_scheme=weighting, batch_size=4096, logit_mean=0.5,
                                              logit_std=0.8, mode_scale=1.29, generator=torch.Generator().manual_seed(3))
    assert torch.equal(index, (u * 1000).long())
    assert torch.equal(process.model_timesteps(index), process.scheduler.timesteps[index])
    # The shift moves the mass toward high noise: shifted sigmas are larger than the unshifted ones.
    assert process.sigma(index).mean() > flow(shift=1.0, weighting=weighting, logit_mean=0.5,
                                              logit_std=0.8).sigma(index).mean()


def test_an_unknown_weighting_is_refused():
    with pytest.raises(ValueError, match="choose one of uniform, logit_normal, mode"):
        flow(weighting="cosmap")
