"""policy_loss vs an independent float64 reference written from the formulas, token by token.

The reference below loops over tokens with Python floats and writes the derivative of every
branch by hand (ties of max/min split 50/50, clamp bounds inclusive); it shares no code with
`ctpo_megatron.algo`. Batches are ragged, with tool-output gaps inside responses, an empty
row, a length-1 row, both advantage signs, and log-ratio scales from 1e-7 to beyond the +-20
and 10 clamps.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ctpo_megatron.algo import PolicyLossConfig, ctpo_token_terms, policy_loss
from ctpo_megatron.algo.aggregate import aggregate_loss
from ctpo_megatron.algo.ctpo import ctpo_terms_from_prefix
from ctpo_megatron.algo.terms import masked_inputs

AGG_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def _max_with_grad(a, da, b, db):
    if a > b:
        return a, da
    if b > a:
        return b, db
    return a, 0.5 * (da + db)


def _min_with_grad(a, da, b, db):
    value, grad = _max_with_grad(-a, -da, -b, -db)
    return -value, -grad


def reference_token_losses(lp, olp, adv, mask, cfg, stats=None):
    """Per-token loss and d loss / d lp_t (lists of lists of floats), from the formulas.

    stats: optional dict, filled with the valid tokens' ratios and clip-flag counts.
    """
    losses, grads = [], []
    if stats is not None:
        stats.update(ratios=[], high=0, low=0, dual=0)
    for b in range(len(lp)):
        valid = [mask[b][t] > 0 for t in range(len(lp[b]))]
        d = [max(-20.0, min(20.0, lp[b][t] - olp[b][t])) for t in range(len(lp[b]))]
        n_total = sum(valid)
        total = sum(d[t] for t in range(len(d)) if valid[t])
        raw_mean = sum(lp[b][t] - olp[b][t] for t in range(len(d)) if valid[t]) / max(n_total, 1)
        cum, n = 0.0, 0
        row_loss, row_grad = [], []
        for t in range(len(d)):
            if not valid[t]:
                row_loss.append(0.0)
                row_grad.append(0.0)
                continue
            cum += d[t]
            n += 1
            a = adv[b][t]
            if cfg.name == "grpo":
                x, dx = d[t], 1.0 if -20.0 <= lp[b][t] - olp[b][t] <= 20.0 else 0.0
            else:
                if cfg.name == "gspo":
                    s_t, n_t = raw_mean, n
                else:
                    s_t, n_t = (cum, n) if cfg.name == "ctpo" else (total, n_total)
                    if cfg.variant == "geomean":
                        s_t = s_t / max(n_t, 1)
                x, dx = min(s_t, 10.0), 1.0 if s_t <= 10.0 else 0.0
            r = math.exp(x)
            adaptive = cfg.adaptive_clip and cfg.name in ("ctpo", "seq")
            if adaptive:
                g = max(n_t, 1) ** cfg.la_power if cfg.la_power != 0 else 1.0
                lo, hi = cfg.la_clip_low * g, cfg.la_clip_high * g
                r_hat = math.exp(max(-lo, min(hi, x)))
                dr_hat = r_hat if -lo <= x <= hi else 0.0
                dual = math.exp(cfg.la_clip_c * g)
            else:
                r_hat = max(1 - cfg.clip_ratio_low, min(1 + cfg.clip_ratio_high, r))
                dr_hat = r if 1 - cfg.clip_ratio_low <= r <= 1 + cfg.clip_ratio_high else 0.0
                dual = cfg.clip_ratio_c
            value, grad = _max_with_grad(-a * r, -a * r, -a * r_hat, -a * dr_hat)
            if stats is not None:
                stats["ratios"].append(r)
                above = x > hi if adaptive else r > 1 + cfg.clip_ratio_high
                below = x < -lo if adaptive else r < 1 - cfg.clip_ratio_low
                stats["high"] += int(above and a > 0)
                stats["low"] += int(below and a < 0)
                stats["dual"] += int(a < 0 and cfg.name != "gspo" and value > -a * dual)
            if a < 0 and cfg.name != "gspo":
                value, grad = _min_with_grad(-a * dual, 0.0, value, grad)
            row_loss.append(value)
            row_grad.append(grad * dx)
        losses.append(row_loss)
        grads.append(row_grad)
    return losses, grads


def reference_weights(mask, mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor):
    """Aggregation weights W_bt with loss = sum W_bt * l_bt."""
    B, S = len(mask), len(mask[0])
    n_b = [sum(1 for t in range(S) if mask[b][t] > 0) for b in range(B)]
    if mode == "token-mean":
        n_tok = batch_num_tokens if batch_num_tokens is not None else sum(n_b)
        return [[(mask[b][t] > 0) / max(n_tok, 1) * dp_size for t in range(S)] for b in range(B)]
    if mode == "seq-mean-token-sum-norm":
        factor = loss_scale_factor if loss_scale_factor is not None else S
        return [[(mask[b][t] > 0) / factor for t in range(S)] for b in range(B)]
    n_seq = global_batch_size if global_batch_size is not None else sum(1 for x in n_b if x > 0)
    per_seq = [1.0 if mode == "seq-mean-token-sum" else 1.0 / (n_b[b] + 1e-8) for b in range(B)]
    return [[(mask[b][t] > 0) * (n_b[b] > 0) * per_seq[b] / max(n_seq, 1) * dp_size
             for t in range(S)] for b in range(B)]


def reference_loss(lp, olp, adv, mask, cfg, weights=None, stats=None, **agg):
    losses, grads = reference_token_losses(lp, olp, adv, mask, cfg, stats)
    mode = "seq-mean-token-mean" if cfg.name == "gspo" else cfg.loss_agg_mode
    W = reference_weights(mask, mode, agg.get("dp_size", 1), agg.get("batch_num_tokens"),
                          agg.get("global_batch_size"), agg.get("loss_scale_factor"))
    B, S = len(mask), len(mask[0])
    w = weights if weights is not None else [[1.0] * S for _ in range(B)]
    loss = sum(W[b][t] * w[b][t] * losses[b][t] for b in range(B) for t in range(S))
    grad = [[W[b][t] * w[b][t] * grads[b][t] for t in range(S)] for b in range(B)]
    return loss, grad


def ragged_batch(seed: int, B: int = 8, S: int = 20):
    """Random [B, S] float64 batch covering the edge cases listed in the module docstring."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, S, generator=g, dtype=torch.float64) * 3
    scales = torch.tensor([1e-7, 1e-3, 0.05, 0.3, 1.0, 4.0, 30.0, 0.2], dtype=torch.float64)[:B]
    olp = lp - scales[:, None] * torch.randn(B, S, generator=g, dtype=torch.float64)
    mask = torch.ones(B, S, dtype=torch.float64)
    lengths = torch.randint(2, S + 1, (B,), generator=g)
    for b in range(B):
        mask[b, lengths[b]:] = 0
        start = int(torch.randint(0, S - 4, (1,), generator=g))
        mask[b, start:start + int(torch.randint(1, 5, (1,), generator=g))] = 0  # tool output
    mask[0] = 0  # empty response
    mask[1] = 0
    mask[1, 3] = 1  # length-1 response after a leading tool span
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, S).clone()
    adv[2] = 0.0
    adv[3] = -adv[3].abs() - 0.1
    adv[4] = adv[4].abs() + 0.1
    # garbage at invalid positions must not leak into values or gradients
    lp = torch.where(mask > 0, lp, torch.full_like(lp, -1e4))
    return lp, olp, adv, mask


CONFIGS = (
    [dict(name="ctpo", variant=v, adaptive_clip=a, la_power=p)
     for v, a, p in itertools.product(["cumprod", "geomean"], [True, False], [0.5])]
    + [dict(name="ctpo", variant="cumprod", la_power=0.0), dict(name="ctpo", variant="geomean", la_power=-0.5),
       dict(name="ctpo", la_clip_low=0.3, la_clip_high=0.2, la_clip_c=0.6, la_power=1.0),
       # bounds wide enough that cumulative log-ratios above 10 stay unclipped (the 10 clamp shows)
       dict(name="ctpo", la_clip_low=5.0, la_clip_high=5.0, la_clip_c=5.0),
       dict(name="ctpo", adaptive_clip=False, clip_ratio_low=1.0, clip_ratio_high=1e6, clip_ratio_c=1e7),
       dict(name="grpo"), dict(name="grpo", clip_ratio_low=0.1, clip_ratio_high=0.28, clip_ratio_c=2.0),
       dict(name="gspo", loss_agg_mode="seq-mean-token-mean"),
       dict(name="seq", adaptive_clip=False), dict(name="seq", adaptive_clip=True),
       dict(name="seq", variant="geomean", adaptive_clip=False)]
)


def _check(lp, olp, adv, mask, cfg, weights=None, **agg):
    x = lp.clone().requires_grad_(True)
    loss, metrics = policy_loss(x, olp, adv, mask, cfg, rollout_is_weights=weights, **agg)
    loss.backward()
    stats = {}
    ref_loss, ref_grad = reference_loss(lp.tolist(), olp.tolist(), adv.tolist(), mask.tolist(), cfg,
                                        None if weights is None else weights.tolist(), stats, **agg)
    # float64, identical formulas: only summation order differs (relative 1e-12 is ~1e4 ulp).
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(x.grad, torch.tensor(ref_grad, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert all(math.isfinite(v) for v in metrics.values())
    n_valid = len(stats["ratios"])
    assert metrics["valid_tokens"] == n_valid
    for key in ("high", "low", "dual"):
        assert metrics[f"clip_count_{key}"] == stats[key], key
        assert metrics[f"clipfrac_{key}"] == pytest.approx(stats[key] / max(n_valid, 1), rel=1e-6)
    if n_valid:
        ratios = sorted(stats["ratios"])
        assert metrics["is_ratio_max"] == pytest.approx(ratios[-1], rel=1e-12)
        assert metrics["is_ratio_min"] == pytest.approx(ratios[0], rel=1e-12)
        assert metrics["is_ratio_mean"] == pytest.approx(sum(ratios) / n_valid, rel=1e-12)
    return loss, metrics


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_losses_match_reference(overrides):
    for seed in range(3):
        lp, olp, adv, mask = ragged_batch(seed)
        _check(lp, olp, adv, mask, PolicyLossConfig(**overrides))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregation_modes_and_global_batch_match_reference(mode):
    lp, olp, adv, mask = ragged_batch(7)
    weights = torch.rand(lp.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    for name in ("ctpo", "grpo", "seq"):
        cfg = PolicyLossConfig(name=name, loss_agg_mode=mode)
        _check(lp, olp, adv, mask, cfg)
        _check(lp, olp, adv, mask, cfg, weights=weights)
        _check(lp, olp, adv, mask, cfg, weights=weights, dp_size=4, batch_num_tokens=311,
               global_batch_size=37, loss_scale_factor=1000.0)


def test_tie_at_upper_bound_gives_half_gradient():
    # d = 0.05 exactly at a length-1 response: x == H_1 = la_high and la_c == la_high, so for
    # A < 0 the dual clip ties with the surrogate: torch.minimum splits the gradient 50/50.
    lp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    olp = torch.full((1, 1), -0.05, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.float64)
    cfg = PolicyLossConfig()
    for a, factor in ((-1.0, 0.5), (1.0, 1.0)):
        lp.grad = None
        adv = torch.full((1, 1), a, dtype=torch.float64)
        loss, _ = policy_loss(lp, olp, adv, mask, cfg)
        loss.backward()
        assert loss.item() == pytest.approx(-a * math.exp(0.05), rel=1e-15)
        assert lp.grad.item() == pytest.approx(-a * math.exp(0.05) * factor, rel=1e-15)
        _check(lp.detach(), olp, adv, mask, cfg)


def test_empty_batch_gives_zero_loss_and_gradient():
    lp = -torch.rand(3, 5, dtype=torch.float64)
    mask = torch.zeros(3, 5, dtype=torch.float64)
    for mode in AGG_MODES:
        loss, metrics = _check(lp, lp - 0.1, torch.ones(3, 5, dtype=torch.float64), mask,
                               PolicyLossConfig(loss_agg_mode=mode))
        assert loss.item() == 0.0
        assert metrics["valid_tokens"] == 0.0 and metrics["clipfrac_high"] == 0.0


def test_half_precision_inputs_compute_in_float32():
    lp, olp, adv, mask = ragged_batch(3)
    x = lp.to(torch.bfloat16).requires_grad_(True)
    loss, _ = policy_loss(x, olp.to(torch.bfloat16), adv, mask.bool(), PolicyLossConfig())
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref, _ = reference_loss(x.detach().double().tolist(), olp.to(torch.bfloat16).double().tolist(),
                            adv.tolist(), mask.tolist(), PolicyLossConfig())
    assert loss.item() == pytest.approx(ref, rel=1e-5)  # float32 compute of the same values


def _anchored_ctpo_loss(lp, anchor, olp, adv, mask, cfg):
    valid, maskf, lp_m, olp_m, adv_m = masked_inputs(lp, olp, adv, mask)
    anchor_m = torch.where(valid, anchor, torch.zeros_like(anchor))
    log_ratio = (anchor_m - olp_m).clamp(-20, 20)
    cum, count = torch.cumsum(log_ratio * maskf, -1), torch.cumsum(maskf, -1)
    terms = ctpo_terms_from_prefix(lp_m, anchor_m, adv_m, valid, log_ratio, cum, count, cfg)
    return aggregate_loss(terms.pg_losses, maskf, cfg.loss_agg_mode)


@pytest.mark.parametrize("overrides", [dict(), dict(variant="geomean"), dict(adaptive_clip=False),
                                       dict(variant="geomean", adaptive_clip=False, loss_agg_mode="seq-mean-token-mean")])
def test_gradcheck_ctpo_surrogate(overrides):
    # With a constant anchor (the stop-gradient point), the surrogate is an ordinary function
    # of lp whose derivative is the CTPO gradient; gradcheck checks it at a point away from
    # clip kinks, and the loss's own gradient at the anchor equals it.
    lp, olp, adv, mask = ragged_batch(11, B=5, S=8)
    lp = torch.where(mask > 0, lp, torch.zeros_like(lp))
    cfg = PolicyLossConfig(**overrides)
    anchor = lp.clone()
    x = lp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: _anchored_ctpo_loss(v, anchor, olp, adv, mask, cfg), (x,),
                                    eps=1e-7, atol=1e-7)
    _anchored_ctpo_loss(x, anchor, olp, adv, mask, cfg).backward()
    y = lp.clone().requires_grad_(True)
    policy_loss(y, olp, adv, mask, cfg)[0].backward()
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-12, atol=1e-15)


def test_gradcheck_grpo_and_aggregation():
    lp, olp, adv, mask = ragged_batch(5, B=5, S=8)
    olp = torch.where(mask > 0, olp, lp)
    x = lp.clone().requires_grad_(True)
    for mode in AGG_MODES:
        cfg = PolicyLossConfig(name="grpo", loss_agg_mode=mode)
        assert torch.autograd.gradcheck(lambda v: policy_loss(v, olp, adv, mask, cfg)[0], (x,), eps=1e-7, atol=1e-7)
        assert torch.autograd.gradcheck(lambda v: aggregate_loss(v, mask, mode, dp_size=2), (x,))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_a_bool_mask_aggregates_like_its_float_mask(mode):
    """policy_loss passes the bool valid mask: every mode's loss and gradient are bit for bit
    those of the 0/1 float mask, and inf/NaN at masked tokens stay out of both."""
    lp, olp, adv, mask = ragged_batch(7, B=5, S=8)
    values = torch.where(mask > 0, lp - olp, torch.tensor(float("nan"), dtype=lp.dtype))
    values[0] = float("inf")  # row 0 is fully masked
    grads = []
    for m in (mask, mask > 0):
        x = values.clone().requires_grad_(True)
        loss = aggregate_loss(x, m, mode, dp_size=2)
        loss.backward()
        assert torch.isfinite(loss)
        grads.append((loss.detach(), x.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("mode", AGG_MODES)
def test_values_zero_at_invalid_tokens_sum_without_the_select(mode):
    """zero_at_invalid (values already 0 where the bool mask is False, as the fused kernel
    writes pg_losses): the same loss and gradient, bit for bit, as the select."""
    lp, olp, adv, mask = ragged_batch(7, B=5, S=8)
    values = torch.where(mask > 0, lp - olp, torch.zeros((), dtype=lp.dtype))
    grads = []
    for zero_at_invalid in (False, True):
        x = values.clone().requires_grad_(True)
        loss = aggregate_loss(x, mask > 0, mode, dp_size=2, zero_at_invalid=zero_at_invalid)
        loss.backward()
        grads.append((loss.detach(), x.grad * (mask > 0)))  # the kernel's gradient is 0 there
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_precomputed_prefix_sums_equal_row_scan():
    lp, olp, adv, mask = ragged_batch(2)
    cfg = PolicyLossConfig()
    d = (lp - olp).clamp(-20, 20) * mask
    cum, count = torch.cumsum(d, -1), torch.cumsum(mask, -1)
    a = ctpo_token_terms(lp, olp, adv, mask, cfg)
    b = ctpo_token_terms(lp, olp, adv, mask, cfg, cum_log_ratio=cum, cum_count=count)
    torch.testing.assert_close(a.pg_losses, b.pg_losses, rtol=0, atol=0)
    # a shifted carry-in (as from earlier CP chunks) moves every ratio of the row
    c = ctpo_token_terms(lp, olp, adv, mask, cfg, cum_log_ratio=cum + 0.5, cum_count=count)
    valid = mask > 0
    assert torch.allclose(c.ratio[valid], torch.minimum(a.ratio * math.exp(0.5), torch.tensor(math.exp(10.0)))[valid])
    with pytest.raises(ValueError, match="both cum_log_ratio and cum_count"):
        ctpo_token_terms(lp, olp, adv, mask, cfg, cum_log_ratio=cum)
