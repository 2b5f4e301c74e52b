"""Timestep weighting against a direct implementation of its definition and diffusers' DDPM."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from sdpo.timesteps import (
    log_importance_weights,
    pair_log_weights,
    pair_weights,
    posterior_coefficients,
    timestep_range,
)

D64 = torch.float64


def scheduler(prediction_type="epsilon"):
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type=prediction_type)


def test_posterior_matches_diffusers_ddpm():
    s = scheduler()
    t = torch.tensor([1, 10, 500, 999])
    c0, ct, var = posterior_coefficients(s.alphas_cumprod, t)
    # Ours derives beta_t from the float32 alphas_cumprod that add_noise uses; diffusers keeps
    # float32 betas: the two agree to float32 rounding (relative 2e-5 at t = 1).
    for i, ti in enumerate(t.tolist()):
        abar, abar_prev = float(s.alphas_cumprod[ti]), float(s.alphas_cumprod[ti - 1])
        beta = float(s.betas[ti])
        assert c0[i].item() == pytest.approx(math.sqrt(abar_prev) * beta / (1 - abar), rel=1e-4)
        assert ct[i].item() == pytest.approx(math.sqrt(float(s.alphas[ti])) * (1 - abar_prev) / (1 - abar), rel=1e-4)
        assert var[i].item() == pytest.approx(float(s._get_variance(ti)), rel=1e-4)
    # t = 0: the variance is 0 and is clamped to its value at t = 1
    _, _, var0 = posterior_coefficients(s.alphas_cumprod, torch.tensor([0]))
    assert var0.item() == pytest.approx(var[0].item())


def float64_scheduler(prediction_type):
    """The scheduler with its schedule in float64, from its own betas: alpha_t = 1 - beta_t and
    abar_t = prod_{s<=t} alpha_s (DDPM's definitions), so that add_noise, get_velocity, ours and the
    oracle below all use one schedule, with no float32 rounding between them."""
    s = scheduler(prediction_type)
    s.betas = s.betas.to(D64)
    s.alphas = 1 - s.betas
    s.alphas_cumprod = torch.cumprod(s.alphas, 0)
    return s


def direct_log_weight(x0, x_t, pred, t, s, z, prediction_type):
    """The definition written out: both Gaussian means, the draw, the log-ratio over D. The DDPM
    posterior q(x_{t-1} | x_t, x0) comes from the scheduler's betas and alphas (Ho et al., eq. 7),
    independently of posterior_coefficients."""
    beta, alpha, abar = float(s.betas[t]), float(s.alphas[t]), float(s.alphas_cumprod[t])
    abar_prev = float(s.alphas_cumprod[t - 1]) if t > 0 else 1.0
    c0 = math.sqrt(abar_prev) * beta / (1 - abar)
    ct = math.sqrt(alpha) * (1 - abar_prev) / (1 - abar)
    var = (1 - abar_prev) / (1 - abar) * beta
    if prediction_type == "epsilon":
        x0_hat = (x_t - math.sqrt(1 - abar) * pred) / math.sqrt(abar)
    else:
        x0_hat = math.sqrt(abar) * x_t - math.sqrt(1 - abar) * pred
    mu_q = c0 * x0 + ct * x_t
    mu_p = c0 * x0_hat + ct * x_t
    x_prev = mu_q + math.sqrt(var) * z
    D = x0.numel()
    return float(((x_prev - mu_q).pow(2).sum() - (x_prev - mu_p).pow(2).sum()) / (2 * var * D))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_log_weight_equals_direct_definition(prediction_type):
    s = float64_scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, eps, z = (torch.randn(4, 4, 4, generator=g, dtype=D64) for _ in range(3))
    for t in [1, 3, 250, 900]:
        tt = torch.tensor([t])
        x_t = s.add_noise(x0[None], eps[None], tt)[0]
        target = eps if prediction_type == "epsilon" else s.get_velocity(x0[None], eps[None], tt)[0]
        pred = target + 0.3 * torch.randn(4, 4, 4, generator=g, dtype=D64)
        ours = log_importance_weights(pred[None], target[None], tt, s.alphas_cumprod, prediction_type, z[None])
        assert ours.item() == pytest.approx(direct_log_weight(x0, x_t, pred, t, s, z, prediction_type), rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_weight_is_exactly_one_for_a_perfect_prediction(prediction_type):
    s = scheduler(prediction_type)
    target = torch.randn(6, 4, 8, 8)
    log_w = log_importance_weights(target.clone(), target, torch.tensor([0, 1, 50, 400, 800, 999]),
                                   s.alphas_cumprod, prediction_type, torch.randn(6, 4, 8, 8))
    assert torch.equal(log_w.exp(), torch.ones(6))


def test_modes_mask_and_clip():
    w = torch.tensor([0.5, 0.89, 0.95, 1.1, 1.5], dtype=D64)
    log_w = w.log()
    assert pair_weights(log_w, "none") is None
    assert pair_weights(log_w, "clip-mask", 0.9).tolist() == [0, 0, 1, 1, 1]
    got = pair_weights(log_w, "importance", 0.9, 0.2).tolist()
    assert got == pytest.approx([0, 0, 0.95, 1.1, 1.2])
    with pytest.raises(ValueError, match="unknown timestep weighting 'bogus'"):
        pair_weights(log_w, "bogus")


def test_pair_weight_is_geometric_mean():
    log_w = torch.tensor([math.log(0.8), math.log(1.0), math.log(1.25), math.log(0.81)], dtype=D64)
    assert pair_log_weights(log_w).exp().tolist() == pytest.approx([math.sqrt(0.8 * 1.25), math.sqrt(0.81)])


def test_timestep_ranges():
    assert timestep_range("none", None, 1000) == (0, 1000)
    assert timestep_range("clip-mask", None, 1000) == (100, 1000)
    assert timestep_range("importance", (200, 600), 1000) == (200, 600)
    assert timestep_range("clip-mask", None, 500) == (100, 500)  # the default is cut to a shorter schedule
    for bad in [(600, 200), (5, 5), (-1, 10), (0, 1001)]:
        with pytest.raises(ValueError, match=r"0 <= MIN < MAX <= 1000"):
            timestep_range("importance", bad, 1000)
