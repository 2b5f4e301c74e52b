"""Timestep clipping, masking and importance weighting (the importance-sampled DPO paper).

The paper defines a per-step importance weight w_t = p_theta(x_{t-1} | x_t) / q(x_{t-1} | x_t, x0)
but does not pin down every numerical detail. Our definition (docs/methods.md, "Timestep weighting"):

- q(x_{t-1} | x_t, x0) = N(mu_q, var_t), mu_q = c0_t * x0 + ct_t * x_t (DDPM posterior);
  p_theta(x_{t-1} | x_t) = N(mu_p, var_t), the same with x0 replaced by the model's (detached)
  x0-estimate. var_t is the posterior variance, clamped below by its value at t = 1.
- x_{t-1} = mu_q + sqrt(var_t) * z with fresh noise z, and
  log w = (||x_{t-1} - mu_q||^2 - ||x_{t-1} - mu_p||^2) / (2 * var_t * D), averaged over the D
  latent elements rather than summed (a sum makes w vanish in high dimension).
- A pair's weight is the geometric mean of its winner's and loser's weights.

Modes: `none`; `clip-mask` (timesteps drawn from a range, pairs with w < threshold masked);
`importance` (as clip-mask, and kept pairs weighted by clamp(w, 1 - eps, 1 + eps)).
"""

from __future__ import annotations

import torch

MODES = ("none", "clip-mask", "importance")
DEFAULT_RANGE = (100, 1000)  # the timestep range of clip-mask and importance unless given


def timestep_range(mode: str, requested: tuple[int, int] | None, num_train_timesteps: int) -> tuple[int, int]:
    """[lo, hi) to draw timesteps from: the request, else DEFAULT_RANGE for the weighting modes
    (cut to the scheduler's length). A request must lie within [0, num_train_timesteps]."""
    if requested is None:
        lo, hi = (0, num_train_timesteps) if mode == "none" else DEFAULT_RANGE
        return lo, min(hi, num_train_timesteps)
    lo, hi = int(requested[0]), int(requested[1])
    if not 0 <= lo < hi <= num_train_timesteps:
        raise ValueError(f"[{lo}, {hi}) must satisfy 0 <= MIN < MAX <= {num_train_timesteps} "
                         f"(the scheduler's number of training timesteps)")
    return lo, hi


def posterior_coefficients(alphas_cumprod: torch.Tensor, t: torch.Tensor):
    """DDPM posterior q(x_{t-1} | x_t, x0) coefficients at integer timesteps t.

    With abar_t = prod_{s<=t} alpha_s, abar_{-1} = 1 and beta_t = 1 - abar_t / abar_{t-1}:
        c0_t  = beta_t * sqrt(abar_{t-1}) / (1 - abar_t)
        ct_t  = (1 - abar_{t-1}) * sqrt(alpha_t) / (1 - abar_t)
        var_t = beta_t * (1 - abar_{t-1}) / (1 - abar_t), clamped below by var_1.
    Returns (c0, ct, var), each shaped like t.
    """
    abar = alphas_cumprod.to(t.device, torch.float64)  # indexed where t lives: no host sync
    abar_prev_all = torch.cat([abar.new_ones(1), abar[:-1]])
    beta_all = 1 - abar / abar_prev_all
    var_all = beta_all * (1 - abar_prev_all) / (1 - abar)
    t = t.long()
    abar_t, abar_prev, beta_t = abar[t], abar_prev_all[t], beta_all[t]
    c0 = beta_t * abar_prev.sqrt() / (1 - abar_t)
    ct = (1 - abar_prev) * (1 - beta_t).sqrt() / (1 - abar_t)
    var = var_all[t].clamp(min=var_all[1])
    return c0, ct, var


def x0_error_scale(alphas_cumprod: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """k_t with x0_hat - x0 = k_t * (target - model_pred), exactly, for either parametrisation.

    epsilon: x0_hat = (x_t - sqrt(1 - abar) * eps_hat) / sqrt(abar)  =>  k = sqrt((1 - abar) / abar)
    v:       x0_hat = sqrt(abar) * x_t - sqrt(1 - abar) * v_hat        =>  k = sqrt(1 - abar)
    """
    abar = alphas_cumprod.to(t.device, torch.float64)[t.long()]
    if prediction_type == "epsilon":
        return ((1 - abar) / abar).sqrt()
    if prediction_type == "v_prediction":
        return (1 - abar).sqrt()
    raise ValueError(f"timestep weighting supports epsilon and v_prediction, not {prediction_type!r}")


def log_importance_weights(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    noise: torch.Tensor,
) -> torch.Tensor:
    """log w_t per sample for DDPM at integer timesteps t (see log_weights)."""
    c0, _, var = posterior_coefficients(alphas_cumprod, t)
    return log_weights(model_pred, target, c0, var, x0_error_scale(alphas_cumprod, t, prediction_type), noise)


def log_weights(model_pred: torch.Tensor, target: torch.Tensor, c0: torch.Tensor, var: torch.Tensor, k: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
    """log w per sample, detached: the Gaussian log-ratio of p_theta over q at a posterior draw, for
    any Gaussian noise process (sdpo.noise gives c0, var and k at the sampled grid points).

    mu_p - mu_q = c0 * (x0_hat - x0) = c0 * k * (target - model_pred) =: delta, and with
    x_s - mu_q = sqrt(var) * z this gives, exactly as the definition but without cancelling
    large terms,
        log w = (2 * sqrt(var) * z . delta - ||delta||^2) / (2 * var * D)
    which is 0 (w = 1) when the model predicts its target exactly. `noise` is z, shaped like
    model_pred.
    """
    with torch.no_grad():
        dtype = torch.float64 if model_pred.dtype == torch.float64 else torch.float32
        shape = (-1,) + (1,) * (model_pred.ndim - 1)
        delta = (c0 * k).to(model_pred.device, dtype).view(shape) * (target.to(dtype) - model_pred.to(dtype))
        var = var.to(model_pred.device, dtype)
        cross = (noise.to(dtype) * delta).flatten(1).sum(1)
        num = 2 * var.sqrt() * cross - delta.pow(2).flatten(1).sum(1)
        return num / (2 * var * delta[0].numel())


def pair_log_weights(log_w: torch.Tensor) -> torch.Tensor:
    """A pair's log weight: the mean of its winner's and loser's (a geometric mean of weights)."""
    log_w_w, log_w_l = log_w.chunk(2)
    return 0.5 * (log_w_w + log_w_l)


def pair_weights(
    log_w: torch.Tensor, mode: str, mask_threshold: float = 0.9, clip_eps: float = 0.2
) -> torch.Tensor | None:
    """Per-pair loss weights for a mode, from per-pair log importance weights (detached).

    none:       None (no weighting)
    clip-mask:  1 where w >= mask_threshold, else 0
    importance: clamp(w, 1 - clip_eps, 1 + clip_eps) where w >= mask_threshold, else 0
    """
    if mode == "none":
        return None
    w = log_w.detach().exp()
    kept = (w >= mask_threshold).to(w.dtype)
    if mode == "clip-mask":
        return kept
    if mode == "importance":
        return kept * w.clamp(1 - clip_eps, 1 + clip_eps)
    raise ValueError(f"unknown timestep weighting {mode!r}; choose one of {', '.join(MODES)}")
