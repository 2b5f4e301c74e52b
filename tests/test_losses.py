"""The objectives and the safeguard against hand-computed values and their defining properties."""

import math

import pytest
import torch

from sdpo.losses import (
    dmpo_term,
    preference_logit,
    per_sample_mse,
    preference_loss,
    scale_gradient,
    sft_loss,
    weighted_mean,
    winner_preserving_scale,
)

D64 = torch.float64


def batch(B=3, shape=(2, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.randn(2 * B, *shape, generator=g, dtype=D64)
    ref = torch.randn(2 * B, *shape, generator=g, dtype=D64)
    target = torch.randn(2 * B, *shape, generator=g, dtype=D64)
    return model, ref, target


def hand_losses(model, ref, target):
    """Per-sample MSEs written out with explicit loops, as a second implementation."""
    def mse(a, b):
        return torch.tensor([float(((a[i] - b[i]) ** 2).sum()) / a[i].numel() for i in range(a.shape[0])], dtype=D64)

    l, r = mse(model, target), mse(ref, target)
    B = model.shape[0] // 2
    return l[:B], l[B:], r[:B], r[B:]


@pytest.mark.parametrize("beta", [1.0, 50.0])
def test_diffusion_dpo_matches_hand_computation(beta):
    model, ref, target = batch()
    lw, ll, rw, rl = hand_losses(model, ref, target)
    expected = 0.0
    for i in range(3):
        u = -0.5 * beta * ((lw[i] - ll[i]) - (rw[i] - rl[i]))
        expected += math.log(1 + math.exp(-float(u))) / 3
    loss, stats = preference_loss(model, ref, target, method="diffusion-dpo", beta=beta)
    assert loss.dtype == D64
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    u = -0.5 * beta * ((lw - ll) - (rw - rl))
    assert stats["implicit_acc"].item() == pytest.approx(float((u > 0).double().mean()))
    assert stats["winner_minus_ref"].item() == pytest.approx(float((lw - rw).mean()), rel=1e-12)
    assert stats["loser_minus_ref"].item() == pytest.approx(float((ll - rl).mean()), rel=1e-12)
    assert stats["model_mse"].item() == pytest.approx(float(torch.cat([lw, ll]).mean()), rel=1e-12)
    assert stats["ref_mse"].item() == pytest.approx(float(torch.cat([rw, rl]).mean()), rel=1e-12)


def test_dmpo_matches_hand_computation_and_vanishes_at_target():
    model, ref, target = batch(seed=1)
    lw, ll, rw, rl = hand_losses(model, ref, target)
    beta, alpha = 20.0, 0.1
    q = 1 - alpha
    expected = 0.0
    for i in range(3):
        u = float(-0.5 * beta * ((lw[i] - ll[i]) - (rw[i] - rl[i])))
        p = 1 / (1 + math.exp(-u))
        expected += (p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))) / 3
    loss, _ = preference_loss(model, ref, target, method="dmpo", beta=beta, dmpo_alpha=alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-10)

    # d/du KL(sigmoid(u) || q) = 0 at u* = logit(q), and the KL is 0 there.
    u_star = torch.tensor([math.log(q / (1 - q))], dtype=D64, requires_grad=True)
    value = dmpo_term(u_star, dmpo_alpha=alpha)
    value.sum().backward()
    assert abs(u_star.grad.item()) < 1e-12 and abs(value.item()) < 1e-12
    u_off = torch.tensor([math.log(q / (1 - q)) + 0.5], dtype=D64, requires_grad=True)
    dmpo_term(u_off, dmpo_alpha=alpha).sum().backward()
    assert u_off.grad.item() > 1e-3  # above u* the loss pushes u back down


def test_dspo_sd15_form_matches_hand_computation():
    model, ref, target = batch(seed=2)
    lw, ll, rw, rl = hand_losses(model, ref, target)
    beta = 0.5
    expected = 0.0
    for i in range(3):
        u = float(-0.5 * beta * ((lw[i] - ll[i]) - (rw[i] - rl[i])))
        s = 1 - 1 / (1 + math.exp(-u))
        expected += float(((model[i] - target[i]) - beta * s * (model[i] - ref[i])).pow(2).mean()) / 3
    loss, _ = preference_loss(model, ref, target, method="dspo", beta=beta, sdxl=False)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("drift_scale", [1.0, 0.01])  # mean(d**2) about 2 (>= 0.1) and about 2e-4 (< 0.1)
def test_dspo_sdxl_form_switches_at_0_1(drift_scale):
    model, ref, target = batch(seed=3)
    ref = model + drift_scale * (ref - model)  # controls the size of d = pred_w - ref_w
    lw, ll, rw, rl = hand_losses(model, ref, target)
    beta = 3.0
    d = model[:3] - ref[:3]
    big = float(d.pow(2).mean()) >= 0.1
    assert big == (drift_scale == 1.0)
    expected = 0.0
    for i in range(3):
        u = float(-0.5 * beta * ((lw[i] - ll[i]) - (rw[i] - rl[i])))
        s = 1 - 1 / (1 + math.exp(-u))
        expected += (float((s * d[i]).pow(2).mean()) if big else s**2) / 3
    loss, _ = preference_loss(model, ref, target, method="dspo", beta=beta, sdxl=True)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_sft_is_plain_mse_on_winners():
    model, _, target = batch(seed=4)
    loss, _ = sft_loss(model, target)
    assert loss.item() == pytest.approx(float(torch.nn.functional.mse_loss(model, target)), rel=1e-12)


# ---- straight-through scaling ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["diffusion-dpo", "dspo", "dmpo"])
@pytest.mark.parametrize("per_pair", [False, True])
def test_loser_scale_changes_only_the_loser_gradient(method, per_pair):
    model, ref, target = batch(seed=5)
    scale = torch.tensor([0.3, 0.0, 0.7], dtype=D64) if per_pair else torch.tensor(0.3, dtype=D64)
    kwargs = dict(method=method, beta=2.0, dmpo_alpha=0.05, sdxl=False)

    plain = model.clone().requires_grad_(True)
    loss_plain, stats_plain = preference_loss(plain, ref, target, **kwargs)
    loss_plain.backward()
    scaled = model.clone().requires_grad_(True)
    loss_scaled, stats_scaled = preference_loss(scaled, ref, target, loser_scale=scale, **kwargs)
    loss_scaled.backward()

    assert loss_scaled.item() == loss_plain.item()  # forward value unchanged, bitwise
    assert stats_scaled["implicit_acc"] == stats_plain["implicit_acc"]
    factor = scale.view(-1, 1, 1, 1) if per_pair else scale
    # Winner rows reach the loss through l_w (and, in DSPO, r and d), never through L_l.
    torch.testing.assert_close(scaled.grad[:3], plain.grad[:3], rtol=0, atol=0)
    torch.testing.assert_close(scaled.grad[3:], plain.grad[3:] * factor, rtol=1e-12, atol=1e-15)
    assert plain.grad[3:].abs().sum() > 0


def test_scale_gradient_is_straight_through():
    x = torch.tensor([1.5, -2.0], dtype=D64, requires_grad=True)
    y = scale_gradient(x, 0.25)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([1.0, 3.0], dtype=D64)).sum().backward()
    assert x.grad.tolist() == [0.25, 0.75]


# ---- the safeguard -----------------------------------------------------------------------------


def grads(model, target):
    """Output-space gradients of mean winner and mean loser MSE, by autograd (a second implementation)."""
    pred = model.clone().requires_grad_(True)
    B = pred.shape[0] // 2
    a = (pred[:B] - target[:B]).pow(2).mean()
    b = (pred[B:] - target[B:]).pow(2).mean()
    ga = torch.autograd.grad(a, pred)[0][:B]
    gb = torch.autograd.grad(b, pred)[0][B:]
    return ga, gb


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("mu", [0.0, 0.3, 0.9, 1.0])
def test_safeguard_inequality_batch_mode(seed, mu):
    model, _, target = batch(B=4, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    model[4:] = model[:4] * torch.rand(1, generator=g, dtype=D64) + 0.5 * torch.randn(4, 2, 3, 3, generator=g, dtype=D64)
    target[4:] = target[:4]  # correlated residuals, so the directions often agree
    lam = winner_preserving_scale(model, target, mu)
    assert lam.ndim == 0 and 0.0 <= lam.item() <= 1.0
    ga, gb = grads(model, target)
    dot, norm = float((ga * gb).sum()), float(ga.pow(2).sum())
    lhs = float(((-ga + lam * gb) * ga).sum())
    assert lhs <= -mu * norm + 1e-12 * norm
    expected = 1.0 if dot <= 0 else min(max((1 - mu) * norm / (dot + 1e-9), 0.0), 1.0)
    assert lam.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_safeguard_inequality_per_sample(seed):
    model, _, target = batch(B=5, seed=seed)
    model[5:] = model[:5] + torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=D64)
    target[5:] = target[:5]
    mu = 0.4
    lam = winner_preserving_scale(model, target, mu, per_sample=True)
    assert lam.shape == (5,)
    for i in range(5):
        pair = torch.stack([model[i], model[5 + i]])
        tgt = torch.stack([target[i], target[5 + i]])
        ga, gb = grads(pair, tgt)
        # Each pair's scale is the closed form on its own output-space gradients.
        dot, norm = float((ga * gb).sum()), float(ga.pow(2).sum())
        expected = 1.0 if dot <= 0 else min(max((1 - mu) * norm / (dot + 1e-9), 0.0), 1.0)
        assert lam[i].item() == pytest.approx(expected, rel=1e-9)
        lhs = float(((-ga + lam[i] * gb) * ga).sum())
        assert lhs <= -mu * float(ga.pow(2).sum()) * (1 - 1e-12)


def test_safeguard_limits():
    target = torch.zeros(2, 4, dtype=D64)
    agree = torch.tensor([[1.0, 2.0, 0.0, 1.0], [1.0, 1.0, 0.5, 1.0]], dtype=D64)
    disagree = torch.tensor([[1.0, 2.0, 0.0, 1.0], [-1.0, -1.0, 0.5, -1.0]], dtype=D64)
    assert winner_preserving_scale(disagree, target, 0.9).item() == 1.0
    assert winner_preserving_scale(agree, target, 1.0).item() == 0.0
    # mu = 0: lambda = ||r_w||^2 / (r_l . r_w) = 6 / 4.0 -> clamped to 1
    assert winner_preserving_scale(agree, target, 0.0).item() == 1.0
    # mu = 0.5: 0.5 * 6 / 4 = 0.75
    assert winner_preserving_scale(agree, target, 0.5).item() == pytest.approx(0.75, rel=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        winner_preserving_scale(agree, target, 1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        winner_preserving_scale(agree, target, -0.1)


def test_safeguard_is_detached_and_dtype_agnostic():
    model, _, target = batch(seed=7)
    lam = winner_preserving_scale(model.requires_grad_(True), target, 0.5, per_sample=True)
    assert not lam.requires_grad and lam.dtype == D64
    lam32 = winner_preserving_scale(model.detach().float(), target.float(), 0.5, per_sample=True)
    assert lam32.dtype == torch.float32
    torch.testing.assert_close(lam32.double(), lam, rtol=1e-5, atol=1e-6)


# ---- pair weights ------------------------------------------------------------------------------


def test_weighted_mean_masks_pairs():
    terms = torch.tensor([1.0, 2.0, 4.0], dtype=D64, requires_grad=True)
    w = torch.tensor([0.0, 1.1, 0.9], dtype=D64)
    out = weighted_mean(terms, w)
    assert out.item() == pytest.approx((2.0 * 1.1 + 4.0 * 0.9) / 2)
    out.backward()
    assert terms.grad.tolist() == pytest.approx([0.0, 0.55, 0.45])

    # all masked: a loss of exactly 0 with zero gradients, even for a non-finite term
    terms = torch.tensor([1.0, float("inf")], dtype=D64, requires_grad=True)
    out = weighted_mean(terms, torch.zeros(2, dtype=D64))
    out.backward()
    assert out.item() == 0.0 and terms.grad.tolist() == [0.0, 0.0]


def test_per_sample_mse_promotes_half_precision():
    a = torch.randn(2, 3, dtype=torch.bfloat16)
    assert per_sample_mse(a, torch.zeros_like(a)).dtype == torch.float32


# ---- the reference's bf16 numerics (upcast=False) ---------------------------------------------


def reference_loss_written_out(model_pred, ref_pred, target, method, beta, sdxl=False, alpha=0.0, scale=1.0):
    """The reference implementation's loss lines, written out with its dtypes: an fp32 policy
    prediction (autocast's output), a bf16 reference prediction and a bf16 target."""
    F = torch.nn.functional
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_w, model_l = model_losses.chunk(2)
    model_l_scaled = model_l.detach() + scale * (model_l - model_l.detach())
    model_diff = model_w - model_l_scaled
    ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])  # bf16, rounded in bf16
    ref_w, ref_l = ref_losses.chunk(2)
    ref_diff = ref_w - ref_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    if method == "diffusion-dpo":
        return -F.logsigmoid(inside).mean()
    if method == "dmpo":
        p = torch.sigmoid(inside)
        q = p.new_tensor([1.0 - alpha]).clamp(1e-6, 1 - 1e-6)
        kl = p * (-F.softplus(-inside) - torch.log(q)) + (1 - p) * (-F.softplus(inside) - torch.log1p(-q))
        return kl.mean()
    drift_w, _ = (model_pred - ref_pred).chunk(2)
    s = (1 - torch.sigmoid(inside))[:, None, None, None]
    if not sdxl:
        residual_w, _ = (model_pred - target).chunk(2)
        return (residual_w - beta * s * drift_w).pow(2).mean(dim=[1, 2, 3]).mean()
    if drift_w.pow(2).mean(dim=[1, 2, 3]).mean() >= 0.1:
        return (s * drift_w).pow(2).mean(dim=[1, 2, 3]).mean()
    return s.pow(2).mean(dim=[1, 2, 3]).mean()


def bf16_batch(B=4, seed=11, drift=0.05):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2 * B, 4, 8, 8, generator=g).bfloat16()
    model = (target.float() + 0.3 * torch.randn(2 * B, 4, 8, 8, generator=g))
    ref = (model + drift * torch.randn(2 * B, 4, 8, 8, generator=g)).bfloat16()
    return model, ref, target


@pytest.mark.parametrize("method,beta,sdxl,drift", [
    ("diffusion-dpo", 5000.0, False, 0.05), ("dmpo", 2000.0, False, 0.05), ("dspo", 0.001, False, 0.05),
    ("dspo", 5000.0, True, 0.05), ("dspo", 5000.0, True, 1.0),  # the SDXL form on both sides of the switch
])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_reference_precision_equals_the_reference_bitwise(method, beta, sdxl, drift, scale):
    model, ref, target = bf16_batch(drift=drift)
    ours_in = model.clone().requires_grad_(True)
    theirs_in = model.clone().requires_grad_(True)
    ours, stats = preference_loss(ours_in, ref, target, method=method, beta=beta, sdxl=sdxl, dmpo_alpha=0.01,
                                  loser_scale=torch.tensor(scale), upcast=False)
    theirs = reference_loss_written_out(theirs_in, ref, target, method, beta, sdxl, 0.01, torch.tensor(scale))
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)
    ours.backward()
    theirs.backward()
    assert torch.equal(ours_in.grad, theirs_in.grad)
    assert stats["ref_mse"].dtype == torch.bfloat16  # the reference losses were computed in bf16


def test_reference_precision_rounds_the_reference_losses_in_bf16():
    """The one place the modes differ on these inputs: r = mse(ref_pred, target) in bf16 or fp32."""
    model, ref, target = bf16_batch(B=64)
    r_bf16 = per_sample_mse(ref, target, upcast=False)
    r_fp32 = per_sample_mse(ref, target)
    assert r_bf16.dtype == torch.bfloat16 and r_fp32.dtype == torch.float32
    assert torch.equal(r_bf16, (ref - target).pow(2).mean(dim=[1, 2, 3]))
    # The policy losses are fp32 in both modes (fp32 prediction against a bf16 target).
    assert torch.equal(per_sample_mse(model, target, upcast=False), per_sample_mse(model, target))
    beta = 5000.0
    u = {}
    for upcast in (False, True):
        loss, stats = preference_loss(model, ref, target, method="diffusion-dpo", beta=beta, upcast=upcast)
        # By hand, in the order preference_loss computes: r in bf16 (reference) or fp32, l in fp32.
        r = ((ref - target) if not upcast else (ref.float() - target.float())).pow(2).mean(dim=[1, 2, 3])
        l = (model - target.float()).pow(2).mean(dim=[1, 2, 3])
        (l_w, l_l), (r_w, r_l) = l.chunk(2), r.chunk(2)
        u[upcast] = -0.5 * beta * ((l_w - l_l) - (r_w - r_l))
        assert r.dtype == (torch.float32 if upcast else torch.bfloat16) and u[upcast].dtype == torch.float32
        assert stats["ref_mse"].dtype == r.dtype and torch.equal(stats["ref_mse"], r.mean())
        assert torch.equal(stats["model_mse"], l.mean())
        assert torch.equal(stats["logit"], u[upcast].mean())
        assert torch.equal(stats["implicit_acc"], (u[upcast] > 0).float().mean())
        assert torch.equal(loss, -torch.nn.functional.logsigmoid(u[upcast]).mean())
    delta = (u[False] - u[True]).abs()
    # bf16 keeps 8 bits: r ~ 0.1 rounds by up to 2**-12, and beta / 2 = 2500 turns that into O(0.1).
    assert 0.01 < float(delta.mean()) < 2.0 and float(delta.max()) < 4.0


def test_dspo_sdxl_switch_tests_the_mean_of_per_sample_means():
    """Where the flat mean of d**2 and the mean of its per-sample means fall on different sides of
    0.1 in fp32, the switch follows the mean of per-sample means, as the reference."""
    g = torch.Generator().manual_seed(0)
    found = None
    for _ in range(200):
        base = torch.rand(3, 4, 9, 11, generator=g) * torch.rand(3, 1, 1, 1, generator=g) * 3
        scale = (0.1 / base.pow(2).mean(dim=[1, 2, 3]).mean().item()) ** 0.5
        for k in range(-30, 31):  # a few fp32 ulps either side of the threshold
            d = base * (scale * (1 + k * 3e-8))
            per_sample = bool(d.pow(2).mean(dim=[1, 2, 3]).mean() >= 0.1)
            if per_sample != bool(d.pow(2).mean() >= 0.1):
                found = (d, per_sample)
                break
        if found:
            break
    assert found is not None, "no fp32 input where the two means straddle 0.1"
    d, per_sample = found
    model = torch.cat([d, torch.zeros_like(d)])
    ref = target = torch.zeros_like(model)
    loss, _ = preference_loss(model, ref, target, method="dspo", beta=1.0, sdxl=True)
    u = preference_logit(*per_sample_mse(model, target).chunk(2), *per_sample_mse(ref, target).chunk(2), 1.0)
    s = 1 - torch.sigmoid(u)
    large = (s.view(-1, 1, 1, 1) * d).pow(2).mean(dim=[1, 2, 3]).mean()
    small = s.pow(2).mean()
    assert not torch.equal(large, small)
    assert torch.equal(loss, large if per_sample else small)
