"""Preference objectives for diffusion models, as small pure functions of tensors.

Conventions (docs/methods.md, "A training batch"): a micro-batch of B preference pairs is laid out
winners-first, so `model_pred`, `ref_pred` and `target` have 2B rows: rows 0..B-1 are winners,
B..2B-1 losers. A per-sample loss is the mean squared error over every non-batch dimension.

Every function here is dtype-agnostic: float64 in gives float64 math. With `upcast=True` (the
default) half-precision inputs are promoted to float32 first, because the logit
u = -0.5 * beta * (...) multiplies differences of MSEs by beta ~ 5000. With `upcast=False` each
operation runs in the dtype its operands promote to, as the reference implementation computes
under bf16: its reference-model losses are computed and rounded in bf16.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

METHODS = ("diffusion-dpo", "dspo", "dmpo")
SAFEGUARD_EPS = 1e-9  # the reference's epsilon in the safeguard's denominator
DSPO_SDXL_SWITCH = 0.1  # the reference's threshold on mean((model_pred - ref_pred)**2), SDXL only
DSPO_FORMS = ("sd15", "sdxl")  # DSPO's two forms in the reference, named by the model it runs them on


def _float(x: torch.Tensor) -> torch.Tensor:
    """Promote half precision to float32; leave float32 and float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _as_is(x: torch.Tensor) -> torch.Tensor:
    return x


def _sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dimension, one value per row (the reference's mean(dim=[1, 2, 3]))."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """l_i = mean over all non-batch dims of (pred_i - target_i)**2, one value per row.

    upcast=False computes in the operands' promoted dtype: bf16 against bf16 stays bf16.
    """
    cast = _float if upcast else _as_is
    return _sample_mean((cast(pred) - cast(target)).pow(2))


def check_mu(mu: float) -> float:
    """The safeguard strength mu must lie in [0, 1]; anything else is a usage error."""
    mu = float(mu)
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"winner_preserving_mu must lie in [0, 1], got {mu}")
    return mu


def winner_preserving_scale(
    model_pred: torch.Tensor, target: torch.Tensor, mu: float, per_sample: bool = False
) -> torch.Tensor:
    """The Diffusion-SDPO safeguard: a detached scale lambda for the loser branch's gradient.

    With output-space gradients gA = d(mean l_w)/d pred_w and gB = d(mean l_l)/d pred_l,
    the update direction -gA + lambda * gB must satisfy (-gA + lambda*gB) . gA <= -mu * ||gA||^2:

        lambda = clamp((1 - mu) * ||gA||^2 / (gB . gA + 1e-9), 0, 1)   if gB . gA > 0
        lambda = 1                                                       otherwise

    For an MSE, gA = 2 * (pred_w - target_w) / N_w where N_w is the number of elements the mean
    runs over (likewise gB), so the gradients are written in closed form, no autograd needed.

    Batch mode (the reference's default) returns one 0-dim lambda for the whole micro-batch: the
    dot products run over all winner and all loser elements. `per_sample=True` returns a (B,)
    tensor, one lambda per pair from that pair's own residuals (gA_i = d l_w_i / d pred_w_i).
    """
    mu = check_mu(mu)
    with torch.no_grad():
        residual = _float(model_pred).detach() - _float(target).detach()
        res_w, res_l = residual.chunk(2)
        if per_sample:
            res_w, res_l = res_w.flatten(1), res_l.flatten(1)  # one row per pair
        else:
            res_w, res_l = res_w.reshape(1, -1), res_l.reshape(1, -1)  # one row for the batch
        grad_w = 2.0 * res_w / res_w.shape[1]
        grad_l = 2.0 * res_l / res_l.shape[1]
        dot = (grad_l * grad_w).sum(dim=1)
        norm_sq = grad_w.pow(2).sum(dim=1)
        ratio = ((1.0 - mu) * norm_sq / (dot + SAFEGUARD_EPS)).clamp(0.0, 1.0)
        scale = torch.where(dot > 0, ratio, torch.ones_like(ratio))
    return scale if per_sample else scale.squeeze(0)


def scale_gradient(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Straight-through scaling: sg(x) + scale * (x - sg(x)).

    The forward value is exactly x; the gradient reaching x is multiplied by `scale`.
    """
    if isinstance(scale, (int, float)) and scale == 1.0:
        return x
    detached = x.detach()
    return detached + scale * (x - detached)


def preference_logit(
    loss_w: torch.Tensor, loss_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float
) -> torch.Tensor:
    """u = -0.5 * beta * ((l_w - l_l) - (r_w - r_l)), one value per pair (docs/methods.md, "The logit")."""
    return -0.5 * beta * ((loss_w - loss_l) - (ref_w - ref_l))


# ---- per-pair terms: each returns a (B,) tensor whose mean is the objective ------------------


def diffusion_dpo_term(u: torch.Tensor, **_) -> torch.Tensor:
    """Diffusion-DPO: -log sigmoid(u)."""
    return -F.logsigmoid(u)


def dmpo_term(u: torch.Tensor, *, dmpo_alpha: float, **_) -> torch.Tensor:
    """DMPO: KL(Bernoulli(p) || Bernoulli(q)), p = sigmoid(u), q = clamp(1 - alpha, 1e-6, 1 - 1e-6).

        p * (log p - log q) + (1 - p) * (log(1 - p) - log(1 - q)),
        log p = -softplus(-u), log(1 - p) = -softplus(u).

    Its gradient in u vanishes at u* = logit(q).
    """
    q = min(max(1.0 - float(dmpo_alpha), 1e-6), 1.0 - 1e-6)
    q = torch.tensor(q, dtype=u.dtype, device=u.device)
    p = torch.sigmoid(u)
    log_p, log_1mp = -F.softplus(-u), -F.softplus(u)
    return p * (log_p - torch.log(q)) + (1 - p) * (log_1mp - torch.log1p(-q))


def dspo_term(
    u: torch.Tensor,
    *,
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    beta: float,
    dspo_form: str,
    upcast: bool = True,
    **_,
) -> torch.Tensor:
    """DSPO in the reference's two forms. With r = pred_w - target_w, d = pred_w - ref_w and
    s = 1 - sigmoid(u) (broadcast over C, H, W; gradients flow through s, r and d):

    - "sd15": mean_CHW((r - beta * s * d)**2)
    - "sdxl": mean_CHW((s * d)**2) if mean_i(mean_CHW(d_i**2)) >= 0.1, else s**2

    The two forms differ in the reference; both are kept as it has them. The SDXL switch tests the
    mean of the per-sample means, as the reference does, and is a torch.where (no host sync, and
    graph-safe under torch.compile): both forms are computed, the other one gets no gradient.
    """
    cast = _float if upcast else _as_is
    B = u.shape[0]
    pred_w = cast(model_pred[:B])
    drift = pred_w - cast(ref_pred[:B]).detach()
    s = (1 - torch.sigmoid(u)).view(B, *([1] * (drift.ndim - 1)))
    if dspo_form not in DSPO_FORMS:
        raise ValueError(f"unknown DSPO form {dspo_form!r}; choose one of {', '.join(DSPO_FORMS)}")
    if dspo_form == "sd15":
        residual = pred_w - cast(target[:B])
        return _sample_mean((residual - beta * s * drift).pow(2))
    large_drift = _sample_mean(drift.pow(2)).mean() >= DSPO_SDXL_SWITCH
    return torch.where(large_drift, _sample_mean((s * drift).pow(2)), _sample_mean(s.pow(2)))


OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {
    "diffusion-dpo": diffusion_dpo_term,
    "dspo": dspo_term,
    "dmpo": dmpo_term,
}


def weighted_mean(terms: torch.Tensor, pair_weights: torch.Tensor | None) -> torch.Tensor:
    """mean(terms), or with weights sum(w_i * term_i) / #{w_i > 0}: a weight of 0 masks a pair.

    If every pair is masked the result is 0 and every gradient is 0.
    """
    if pair_weights is None:
        return terms.mean()
    pair_weights = pair_weights.detach().to(terms.dtype)
    kept = (pair_weights > 0).sum().clamp(min=1)
    # where() keeps a non-finite term of a masked pair out of the sum and its gradient.
    weighted = torch.where(pair_weights > 0, pair_weights * terms, torch.zeros_like(terms))
    return weighted.sum() / kept


def preference_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    method: str,
    beta: float,
    dmpo_alpha: float = 0.0,
    dspo_form: str | None = None,
    sdxl: bool = False,
    loser_scale: torch.Tensor | float = 1.0,
    pair_weights: torch.Tensor | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A preference objective on a winners-first batch of 2B predictions.

    l = per_sample_mse(model_pred, target), r = per_sample_mse(ref_pred, target), split into
    (l_w, l_l) and (r_w, r_l). The loser loss passes through the safeguard straight-through:
    L_l = sg(l_l) + loser_scale * (l_l - sg(l_l)), so forward values never change. Then
    u = -0.5 * beta * ((l_w - L_l) - (r_w - r_l)) and the loss is the (weighted) mean over pairs
    of the objective's per-pair term (see OBJECTIVES). `ref_pred` is treated as constant.
    dspo_form: DSPO's form (DSPO_FORMS, the family's); `sdxl=True` is the older spelling of "sdxl".

    upcast=True computes everything in at least float32. upcast=False reproduces the reference's
    bf16 numerics: each per-sample MSE, and r_w - r_l, is computed in the dtype its operands
    promote to, so a bf16 `ref_pred` against a bf16 `target` gives bf16 reference losses (an fp32
    `model_pred` against the same target gives fp32 policy losses, as under autocast).

    Returns (loss, stats); stats are detached 0-dim tensors: implicit_acc (fraction of u > 0),
    logit (mean u), model_mse, ref_mse, winner_minus_ref (mean l_w - r_w), loser_minus_ref (mean l_l - r_l),
    loser_scale (its mean).
    """
    if method not in OBJECTIVES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if model_pred.shape[0] % 2:
        raise ValueError(f"a winners-first batch needs an even number of rows, got {model_pred.shape[0]}")
    ref_pred = ref_pred.detach()
    model_losses = per_sample_mse(model_pred, target, upcast)
    ref_losses = per_sample_mse(ref_pred, target, upcast)
    loss_w, loss_l = model_losses.chunk(2)
    ref_w, ref_l = ref_losses.chunk(2)
    if isinstance(loser_scale, torch.Tensor):
        loser_scale = loser_scale.detach().to(loss_l.dtype)
    if dspo_form is None:
        dspo_form = "sdxl" if sdxl else "sd15"
    elif sdxl and dspo_form != "sdxl":
        raise ValueError(f"sdxl=True asks for DSPO's sdxl form, dspo_form={dspo_form!r} for another")
    u = preference_logit(loss_w, scale_gradient(loss_l, loser_scale), ref_w, ref_l, beta)
    terms = OBJECTIVES[method](
        u, model_pred=model_pred, ref_pred=ref_pred, target=target, beta=beta,
        dspo_form=dspo_form, dmpo_alpha=dmpo_alpha,
        upcast=upcast,
    )
    loss = weighted_mean(terms, pair_weights)
    with torch.no_grad():
        stats = {
            "implicit_acc": (u > 0).to(u.dtype).mean(),
            "logit": u.mean(),
            "model_mse": model_losses.mean(),
            "ref_mse": ref_losses.mean(),
            "winner_minus_ref": (loss_w - ref_w).mean(),
            "loser_minus_ref": (loss_l - ref_l).mean(),
            "loser_scale": torch.as_tensor(loser_scale, dtype=u.dtype, device=u.device).mean(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def sft_loss(
    model_pred: torch.Tensor, target: torch.Tensor, pair_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supervised fine-tuning on winners only: mean over samples of per-sample MSE.

    Unweighted, this equals the reference's F.mse_loss(pred, target) (all samples are the same size).
    """
    losses = per_sample_mse(model_pred, target)
    loss = weighted_mean(losses, pair_weights)
    return loss, {"model_mse": losses.detach().mean()}
