"""The fused CTPO kernel against algo's pure-torch `ctpo_token_terms` (the oracle), the tie
vector, packed and precomputed-sum layouts, the policy_loss wiring, errors and opcheck."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ctpo_megatron.algo import PolicyLossConfig, ctpo_log_ratio, ctpo_token_terms, fused_ctpo_token_terms, policy_loss
from ctpo_megatron.algo.ctpo import fused_ctpo_terms_and_metrics
from ctpo_megatron.algo.registry import LOSSES, TERMS_AND_METRICS
from ctpo_megatron.ops import extension_backends, segmented_cumsum

pytestmark = pytest.mark.csrc  # tests/conftest.py: a failure in CI without the extension, a skip elsewhere
op = torch.ops.ctpo_megatron.ctpo_token_loss if "cpu" in extension_backends() else None  # loads _C

CONFIGS = [
    PolicyLossConfig(variant="cumprod", adaptive_clip=True),
    PolicyLossConfig(variant="geomean", adaptive_clip=True, la_power=-0.5),
    PolicyLossConfig(variant="cumprod", adaptive_clip=True, la_power=0.0),
    PolicyLossConfig(variant="geomean", adaptive_clip=True, la_power=0.3),
    PolicyLossConfig(variant="cumprod", adaptive_clip=False),
    PolicyLossConfig(variant="geomean", adaptive_clip=False),
]
BOOL_FIELDS = ("clip_high", "clip_low", "clip_dual", "clipped")


def batch(dtype=torch.float64, seed=0, B=6, S=300, spread=0.05):
    """Ragged responses with tool-output spans, an all-masked row and -inf padding."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, S, generator=g, dtype=torch.float64)
    olp = lp + spread * torch.randn(B, S, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, S)
    lengths = torch.randint(0, S + 1, (B,), generator=g)
    mask = (torch.arange(S) < lengths[:, None]).double()
    mask[:, 40:55] = 0  # a tool-output span
    if B > 1:
        mask[1] = 0
    lp = torch.where(mask > 0, lp, torch.full_like(lp, -float("inf")))  # garbage padding
    return [t.to(dtype) for t in (lp, olp, adv, mask)]


def compare(terms, ref, mask, tol):
    valid = mask > 0
    for name in ("pg_losses", "ratio", "log_ratio_clamped"):
        a, b = getattr(terms, name), getattr(ref, name)
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a[valid], b[valid].detach(), rtol=tol, atol=tol, msg=name)
    if ref.la_scale is None:
        assert terms.la_scale is None
    else:
        torch.testing.assert_close(terms.la_scale, ref.la_scale, rtol=tol, atol=tol)
    for name in BOOL_FIELDS:
        assert torch.equal(getattr(terms, name), getattr(ref, name)), name


# float64: identical math up to exp/pow rounding; float32: same, one float32 ulp of exp apart.
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.variant}-la{c.adaptive_clip}-p{c.la_power}")
def test_fused_terms_and_gradients_match_torch(cfg, dtype, tol):
    lp, olp, adv, mask = batch(dtype, spread=0.3 if cfg.variant == "geomean" else 0.05)
    lp.requires_grad_(True)
    weights = torch.rand(lp.shape, dtype=dtype)
    fused = fused_ctpo_token_terms(lp, olp, adv, mask, cfg)
    ref = ctpo_token_terms(lp, olp, adv, mask, cfg)
    compare(fused, ref, mask, tol)
    g_fused, = torch.autograd.grad((fused.pg_losses * weights * mask).sum(), lp)
    g_ref, = torch.autograd.grad((ref.pg_losses * weights * mask).sum(), lp)
    torch.testing.assert_close(g_fused, g_ref, rtol=tol, atol=tol)
    clipped = sum(int(getattr(fused, f).sum()) for f in BOOL_FIELDS)
    assert clipped > 0 and bool((g_fused != 0).any())  # the batch exercises clips and gradients


@pytest.mark.parametrize("adaptive", [True, False])
def test_log_ratio_cap_at_10_and_the_20_clamp(adaptive):
    cfg = PolicyLossConfig(adaptive_clip=adaptive)
    lp, olp, adv, mask = batch(torch.float64, spread=1.0)
    olp[0, 3] = lp[0, 3] - 50.0  # a log-ratio beyond the +-20 clamp
    lp.requires_grad_(True)
    fused = fused_ctpo_token_terms(lp, olp, adv, mask, cfg)
    ref = ctpo_token_terms(lp, olp, adv, mask, cfg)
    compare(fused, ref, mask, 1e-12)
    assert bool((fused.ratio == torch.tensor(10.0, dtype=torch.float64).exp()).any())  # capped tokens
    assert fused.log_ratio_clamped.max().item() == 20.0
    g_fused, = torch.autograd.grad((fused.pg_losses * mask).sum(), lp)
    g_ref, = torch.autograd.grad((ref.pg_losses * mask).sum(), lp)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-12, atol=1e-12)


def test_bfloat16_inputs_compute_in_float32_like_torch():
    cfg = PolicyLossConfig()
    lp, olp, adv, mask = batch(torch.bfloat16)
    lp.requires_grad_(True)
    fused = fused_ctpo_token_terms(lp, olp, adv, mask, cfg)
    ref = ctpo_token_terms(lp, olp, adv, mask, cfg)
    assert fused.pg_losses.dtype == torch.float32
    compare(fused, ref, mask, 1e-6)  # both cast to float32 before any arithmetic
    g_fused, = torch.autograd.grad(fused.pg_losses.sum(), lp)
    assert g_fused.dtype == torch.bfloat16


def test_tie_at_the_upper_bound_splits_the_gradient():
    # x = H = la_high exactly and la_c == la_high, A < 0: max(l1, l2) ties and so does the dual
    # clip; torch.maximum/minimum halve the gradient: d pg / d lp = 0.5 * exp(0.05).
    cfg = PolicyLossConfig()
    lp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    olp = torch.full((1, 1), -0.05, dtype=torch.float64)
    adv, mask = -torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    fused = fused_ctpo_token_terms(lp, olp, adv, mask, cfg)
    grad, = torch.autograd.grad(fused.pg_losses.sum(), lp)
    assert grad.item() == pytest.approx(0.5 * torch.tensor(0.05, dtype=torch.float64).exp().item(), abs=1e-15)
    ref_grad, = torch.autograd.grad(ctpo_token_terms(lp, olp, adv, mask, cfg).pg_losses.sum(), lp)
    assert grad.item() == ref_grad.item()
    assert not fused.clip_dual.any() and not fused.clip_high.any()


def test_packed_layout_and_precomputed_sums_equal_padded_rows():
    cfg = PolicyLossConfig(variant="geomean")
    lp, olp, adv, mask = batch(torch.float64, B=4, S=50)
    padded = fused_ctpo_token_terms(lp, olp, adv, mask, cfg)
    cu = torch.arange(0, 201, 50, dtype=torch.int32)
    packed = fused_ctpo_token_terms(lp.reshape(-1), olp.reshape(-1), adv.reshape(-1), mask.reshape(-1), cfg,
                                    cu_seqlens=cu)
    for name in ("pg_losses", "ratio", "la_scale", *BOOL_FIELDS):
        assert torch.equal(getattr(packed, name), getattr(padded, name).reshape(-1)), name
    log_ratio = ctpo_log_ratio(lp, olp, mask)
    cum, count = segmented_cumsum(log_ratio, mask > 0)
    given = fused_ctpo_token_terms(lp, olp, adv, mask, cfg, cum_log_ratio=cum, cum_count=count)
    for name in ("pg_losses", "ratio", "la_scale", *BOOL_FIELDS):
        assert torch.equal(getattr(given, name), getattr(padded, name)), name


def test_long_sequence_blocked_path_equals_serial():
    cfg = PolicyLossConfig()
    lp, olp, adv, mask = batch(torch.float64, B=1, S=30000, spread=0.01)
    mask[0] = 1
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = fused_ctpo_token_terms(lp, olp, adv, mask, cfg)
        torch.set_num_threads(2)
        blocked = fused_ctpo_token_terms(lp, olp, adv, mask, cfg)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(blocked.pg_losses, serial.pg_losses, rtol=1e-12, atol=1e-12)  # sum order


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_policy_loss_uses_the_fused_kernel_with_identical_results(monkeypatch, dtype, tol):
    assert LOSSES["ctpo"] is fused_ctpo_token_terms and TERMS_AND_METRICS["ctpo"] is fused_ctpo_terms_and_metrics
    lp, olp, adv, mask = batch(dtype)
    lp.requires_grad_(True)
    weights = torch.rand(lp.shape, dtype=dtype) + 0.5
    for cfg in (PolicyLossConfig(), dataclasses.replace(PolicyLossConfig(), loss_agg_mode="seq-mean-token-mean")):
        loss, metrics = policy_loss(lp, olp, adv[:, :1], mask, cfg, weights)
        grad, = torch.autograd.grad(loss, lp)
        calls = []

        def torch_terms(*args, **kwargs):
            calls.append(1)
            return ctpo_token_terms(*args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setitem(LOSSES, "ctpo", torch_terms)
            patch.delitem(TERMS_AND_METRICS, "ctpo")  # else the loss and its metrics come from one op
            ref_loss, ref_metrics = policy_loss(lp, olp, adv[:, :1], mask, cfg, weights)
        assert calls == [1]
        ref_grad, = torch.autograd.grad(ref_loss, lp)
        torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
        torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol)
        assert metrics.keys() == ref_metrics.keys()
        for key in metrics:
            assert metrics[key] == pytest.approx(ref_metrics[key], rel=tol, abs=tol), key


def test_bad_inputs_name_the_tensor():
    cfg = PolicyLossConfig()
    lp, olp, adv, mask = batch(torch.float64, B=2, S=8)
    with pytest.raises(ValueError, match="old_log_probs has shape"):
        fused_ctpo_token_terms(lp, olp[:, 1:], adv, mask, cfg)
    with pytest.raises(ValueError, match="both cum_log_ratio and cum_count"):
        fused_ctpo_token_terms(lp, olp, adv, mask, cfg, cum_log_ratio=lp)
    with pytest.raises(RuntimeError, match="mask must be Double"):
        op(lp, olp, adv.contiguous(), mask.float(), None, None, None, False, True, 0.025, 0.05, 0.05, 0.5)


@pytest.mark.parametrize("adaptive", [True, False])
def test_opcheck(adaptive):
    lp, olp, adv, mask = batch(torch.float64, B=3, S=20)
    lp = torch.where(mask > 0, lp, 0.0).requires_grad_(True)
    torch.library.opcheck(op, (lp, olp, adv.contiguous(), mask, None, None, None, True, adaptive, 0.025, 0.05,
                               0.05, 0.5))
