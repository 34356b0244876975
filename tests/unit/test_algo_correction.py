"""Rollout/trainer mismatch IS weights: values from the formulas, modes, metrics, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from ctpo_megatron.algo import PolicyLossConfig, policy_loss, rollout_correction_weights


def batch(seed=0, B=6, S=12):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, S, generator=g, dtype=torch.float64) * 2
    rollout = old + 0.4 * torch.randn(B, S, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, S, generator=g) > 0.2).double()
    mask[0] = 0
    mask[1, 5] = 0
    rollout[1, 5] = -1e9  # garbage at a masked position must not matter
    return old, rollout, mask


def formula(old, rollout, mask, level, threshold):
    out = torch.zeros_like(old)
    for b in range(old.shape[0]):
        valid = [t for t in range(old.shape[1]) if mask[b, t] > 0]
        total = sum(old[b, t].item() - rollout[b, t].item() for t in valid)
        for t in valid:
            lr = total if level == "sequence" else old[b, t].item() - rollout[b, t].item()
            out[b, t] = math.exp(max(-20.0, min(20.0, lr)))
    return out


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_truncated_and_masked_weights_follow_the_formula(level):
    old, rollout, mask = batch()
    raw = formula(old, rollout, mask, level, 1.5)
    w, metrics = rollout_correction_weights(old, rollout, mask, level=level, mode="truncate", threshold=1.5)
    torch.testing.assert_close(w, raw.clamp(max=1.5), rtol=1e-12, atol=0)
    assert not w.requires_grad
    assert metrics["rollout_is_max"] == pytest.approx(raw[mask > 0].max().item(), rel=1e-12)
    assert metrics["rollout_is_mean"] == pytest.approx(raw[mask > 0].mean().item(), rel=1e-6)
    frac_high = ((raw > 1.5) & (mask > 0)).sum().item() / mask.sum().item()
    if level == "token":
        assert metrics["rollout_is_ratio_fraction_high"] == pytest.approx(frac_high, rel=1e-6)
    w_mask, m_mask = rollout_correction_weights(old, rollout, mask, level=level, mode="mask", threshold=1.5)
    torch.testing.assert_close(w_mask, torch.where(raw > 1.5, torch.zeros_like(raw), raw), rtol=1e-12, atol=0)
    assert m_mask["rollout_is_masked_fraction"] == pytest.approx(frac_high, rel=1e-6)


def test_sequence_weights_are_constant_per_row_and_normalize_to_one():
    old, rollout, mask = batch(1)
    w, metrics = rollout_correction_weights(old, rollout, mask, threshold=5.0, normalize=True)
    rows = [w[b][mask[b] > 0] for b in range(w.shape[0]) if mask[b].sum() > 0]
    assert all(torch.allclose(r, r[0].expand_as(r)) for r in rows)
    # the reference's per-row mean divides by (n_b + 1e-8): normalised to 1 within ~1e-9
    assert torch.stack([r[0] for r in rows]).mean().item() == pytest.approx(1.0, rel=1e-8)
    assert metrics["rollout_is_batch_norm_factor"] > 0
    w_tok, _ = rollout_correction_weights(old, rollout, mask, level="token", normalize=True)
    assert w_tok[mask > 0].mean().item() == pytest.approx(1.0, rel=1e-8)


def test_identical_policies_give_unit_weights_and_unchanged_loss():
    old, _, mask = batch(2)
    w, metrics = rollout_correction_weights(old, old, mask)
    torch.testing.assert_close(w, mask)
    assert metrics["rollout_is_eff_sample_size"] == pytest.approx(1.0, rel=1e-6)
    lp = (old + 0.01).requires_grad_(True)
    adv = torch.ones_like(old)
    a, _ = policy_loss(lp, old, adv, mask, PolicyLossConfig(), rollout_is_weights=w)
    b, _ = policy_loss(lp, old, adv, mask, PolicyLossConfig())
    assert a.item() == b.item()


def test_weights_scale_the_per_token_loss():
    old, rollout, mask = batch(3)
    w, _ = rollout_correction_weights(old, rollout, mask, level="token", threshold=3.0)
    lp = (old + 0.02 * torch.randn_like(old)).requires_grad_(True)
    adv = torch.randn(old.shape[0], 1, dtype=torch.float64)
    cfg = PolicyLossConfig(loss_agg_mode="seq-mean-token-sum-norm")
    loss_w, _ = policy_loss(lp, old, adv, mask, cfg, rollout_is_weights=w)
    grad_w, = torch.autograd.grad(loss_w, lp)
    loss, _ = policy_loss(lp, old, adv, mask, cfg)
    grad, = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad_w, grad * w, rtol=1e-12, atol=1e-15)  # linear, per token


def test_empty_mask_and_bad_arguments():
    old, rollout, _ = batch()
    w, metrics = rollout_correction_weights(old, rollout, torch.zeros_like(old))
    assert (w == 0).all() and metrics == {}
    with pytest.raises(ValueError, match="level"):
        rollout_correction_weights(old, rollout, torch.ones_like(old), level="batch")
    with pytest.raises(ValueError, match="threshold"):
        rollout_correction_weights(old, rollout, torch.ones_like(old), threshold=-1.0)
    with pytest.raises(ValueError, match="rollout_log_probs"):
        rollout_correction_weights(old, rollout[:, :-1], torch.ones_like(old))
