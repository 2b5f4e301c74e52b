"""Noise processes behind one interface: DDPM (SD1.5, SDXL) and rectified flow (SD3/SD3.5, Wan2.1).

Both have Gaussian marginals q(x_t | x0) = N(a_t x0, s_t^2 I) on a grid of training points:
- DDPM: a = sqrt(abar_t), s = sqrt(1 - abar_t) at the integer timesteps t; the previous point of t
  is t - 1 (abar_{-1} = 1);
- rectified flow: x_t = (1 - sigma) x0 + sigma eps, so a = 1 - sigma and s = sigma, at the sigmas
  of the scheduler's training grid (FlowMatchEulerDiscreteScheduler, its shift applied); the
  previous point of sigma is the next smaller sigma of the grid (0 after the last).

A process draws grid indices, noises latents, gives the training target and the model's x0
estimate, and the posterior q(x_s | x_t, x0) between a grid point and the previous one that the
importance weight of docs/methods.md needs. The posterior is the general Gaussian one (Kingma et
al., "Variational Diffusion Models"); for DDPM it is the familiar DDPM posterior
(sdpo.timesteps.posterior_coefficients), which the tests check.

Training (train.py) draws grid indices in a range of noise levels: a level counts grid points from
the least noisy one (level 0) up, so `--timestep_range MIN MAX` keeps the same meaning (MIN cuts
the least noisy levels) for both processes. For DDPM the level, the grid index and the model's
timestep are the same integer.
"""

from __future__ import annotations

import torch


def gaussian_posterior(a_t, s_t, a_s, s_s):
    """q(x_s | x_t, x0) = N(coef_xt * x_t + coef_x0 * x0, var) for s < t of a process with
    marginals N(a x0, s^2 I): with a_ts = a_t / a_s and v_ts = s_t^2 - a_ts^2 s_s^2,
        coef_xt = a_ts s_s^2 / s_t^2,  coef_x0 = a_s v_ts / s_t^2,  var = v_ts s_s^2 / s_t^2."""
    a_ts = a_t / a_s
    v_ts = s_t**2 - a_ts**2 * s_s**2
    return a_ts * s_s**2 / s_t**2, a_s * v_ts / s_t**2, v_ts * s_s**2 / s_t**2


class GaussianProcess:
    """What the two processes share: the posterior at grid indices, its variance clamped below by
    the smallest positive one (it is 0 at the last step, where x_s = x0), and the importance
    weight's scale."""

    def marginal(self, index: torch.Tensor):  # (a, s) at grid indices, float64
        raise NotImplementedError

    def previous(self, index: torch.Tensor):  # (a, s) at the previous grid points, float64
        raise NotImplementedError

    def grid_size(self) -> int:
        raise NotImplementedError

    def index_at_level(self, level: int) -> int:
        """The grid index of a noise level (0: the least noisy grid point)."""
        return level

    def importance_terms(self, index: torch.Tensor):
        """(coef_x0, var, k) at grid indices, float64: the importance weight's posterior coefficient
        of x0, its (clamped) variance, and k with x0_hat - x0 = k (target - pred)."""
        _, coef_x0, var = self.posterior(index)
        return coef_x0, var, self.x0_error_scale(index)

    def posterior(self, index: torch.Tensor):
        """(coef_xt, coef_x0, var) of q(x_s | x_t, x0) at grid indices, float64, var clamped."""
        coef_xt, coef_x0, var = gaussian_posterior(*self.marginal(index), *self.previous(index))
        every = torch.arange(self.grid_size())
        floor = gaussian_posterior(*self.marginal(every), *self.previous(every))[2]
        return coef_xt, coef_x0, var.clamp(min=floor[floor > 0].min())


class DDPM(GaussianProcess):
    """The DDPM process of a DDPMScheduler: epsilon or v prediction."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.abar = scheduler.alphas_cumprod.to(torch.float64)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def grid_size(self) -> int:
        return len(self.abar)

    def draw(self, batch: int, lo: int, hi: int, device=None) -> torch.Tensor:
        """Integer timesteps, uniform on [lo, hi): they are both the grid index and the model's timestep."""
        return torch.randint(lo, hi, (batch,), device=device)

    def model_timesteps(self, index):
        return index

    def importance_terms(self, index):
        """The DDPM posterior of sdpo.timesteps (the general one equals it, see the tests), so that
        SD1.5 and SDXL weights stay bitwise those of the closed forms."""
        from sdpo.timesteps import posterior_coefficients, x0_error_scale

        c0, _, var = posterior_coefficients(self.abar, index)
        return c0, var, x0_error_scale(self.abar, index, self.prediction_type)

    def marginal(self, index):
        abar = self.abar.to(index.device)[index.long()]
        return abar.sqrt(), (1 - abar).sqrt()

    def previous(self, index):
        abar = torch.cat([self.abar.new_ones(1), self.abar]).to(index.device)[index.long()]  # abar_{t-1}
        return abar.sqrt(), (1 - abar).sqrt()

    def add_noise(self, x0, eps, index):
        return self.scheduler.add_noise(x0, eps, index)

    def target(self, x0, eps, index):
        return eps if self.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, eps, index)

    def x0_error_scale(self, index):
        """k with x0_hat - x0 = k (target - pred): epsilon s/a, v s."""
        a, s = self.marginal(index)
        return s / a if self.prediction_type == "epsilon" else s


class RectifiedFlow(GaussianProcess):
    """The rectified flow of a FlowMatchEulerDiscreteScheduler (its training grid of sigmas, with
    its shift). Sigmas are drawn as diffusers' SD3 training examples draw them: u from a density
    (`uniform`, `logit_normal` with mean and std, or `mode` with a scale), then the grid index
    floor(u * num_train_timesteps). The model's timestep is the grid's sigma * num_train_timesteps."""

    WEIGHTINGS = ("uniform", "logit_normal", "mode")

    def __init__(self, scheduler, weighting: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29):
        if weighting not in self.WEIGHTINGS:
            raise ValueError(f"unknown sigma weighting {weighting!r}; choose one of {', '.join(self.WEIGHTINGS)}")
        self.scheduler = scheduler
        self.sigmas = scheduler.sigmas.to(torch.float64)  # descending, from about 1
        self.timesteps = scheduler.timesteps
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.weighting, self.logit_mean, self.logit_std, self.mode_scale = weighting, logit_mean, logit_std, mode_scale

    def grid_size(self) -> int:
        return len(self.sigmas)

    def draw(self, batch: int, lo: int = 0, hi: int | None = None, device=None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Grid indices, drawn on the CPU (as diffusers' examples draw them), then moved to `device`.
        u in [0, 1) gives the index floor(u * N) over the whole grid; within noise levels [lo, hi)
        the density is stretched over the range: index N - hi + floor(u * (hi - lo))."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        n = self.grid_size()
        hi = n if hi is None else hi
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting, batch_size=batch, logit_mean=self.logit_mean, logit_std=self.logit_std,
            mode_scale=self.mode_scale, generator=generator)
        index = (n - hi) + (u * (hi - lo)).long().clamp(max=hi - lo - 1)
        return index if device is None else index.to(device)

    def index_at_level(self, level: int) -> int:
        return self.grid_size() - 1 - level

    def model_timesteps(self, index):
        return self.timesteps.to(index.device)[index.long()]

    def sigma(self, index):
        return self.sigmas.to(index.device)[index.long()]

    def marginal(self, index):
        sigma = self.sigma(index)
        return 1 - sigma, sigma

    def previous(self, index):
        sigma = torch.cat([self.sigmas, self.sigmas.new_zeros(1)]).to(index.device)[index.long() + 1]
        return 1 - sigma, sigma

    def _view(self, values, like):
        return values.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0, eps, index):
        sigma = self._view(self.sigma(index), x0)
        return (1 - sigma) * x0 + sigma * eps

    def target(self, x0, eps, index):
        return eps - x0

    def x0_estimate(self, pred, x_t, index):
        return x_t - self._view(self.sigma(index), x_t) * pred

    def x0_error_scale(self, index):
        """k with x0_hat - x0 = k (target - pred): sigma."""
        return self.sigma(index)
