"""The prefix-sum and fused-loss paths: csrc kernels where the extension has them, the
pure-torch references otherwise (a fallback that really fires: the extension reported
missing), with the same results; and clear errors on bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ctpo_megatron.algo import PolicyLossConfig, ctpo_token_terms, fused_ctpo_token_terms, masked_cumsum, policy_loss
from ctpo_megatron.ops import _backend, extension_backends, reference

needs_ops = pytest.mark.skipif("cpu" not in extension_backends(), reason="csrc extension not built")


def without_extension(monkeypatch):
    """Makes `ops` report no extension: every kernel call takes its pure-torch fallback."""
    monkeypatch.setattr(_backend, "_load", lambda: (frozenset(), "disabled by the test"))


def batch(dtype=torch.float64, seed=0, B=5, S=33):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, S, generator=g, dtype=dtype)
    olp = lp + 0.3 * torch.randn(B, S, generator=g, dtype=dtype)
    adv = torch.randn(B, 1, generator=g, dtype=dtype).expand(B, S)
    mask = (torch.rand(B, S, generator=g) > 0.25).to(dtype)
    mask[0] = 0
    return lp, olp, adv, mask


def test_torch_scan_is_the_masked_cumsum(monkeypatch):
    without_extension(monkeypatch)
    lp, olp, _, mask = batch()
    cum, count = masked_cumsum(lp - olp, mask)
    assert torch.equal(count, torch.cumsum(mask, -1))
    torch.testing.assert_close(cum, torch.cumsum((lp - olp) * mask, -1), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="same shape"):
        masked_cumsum(lp, mask[:, 1:])


def test_missing_extension_falls_back_to_torch(monkeypatch):
    without_extension(monkeypatch)
    lp, olp, adv, mask = batch()
    calls = []
    monkeypatch.setattr(reference, "segmented_scan",
                        lambda *a, _f=reference.segmented_scan, **k: calls.append(1) or _f(*a, **k))
    terms = fused_ctpo_token_terms(lp, olp, adv, mask, PolicyLossConfig())
    assert calls  # the torch scan really ran
    assert torch.equal(terms.pg_losses, ctpo_token_terms(lp, olp, adv, mask, PolicyLossConfig()).pg_losses)
    loss, _ = policy_loss(lp, olp, adv, mask, PolicyLossConfig())
    assert torch.isfinite(loss)


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ops_scan_matches_torch_scan(dtype):
    lp, olp, _, mask = batch(dtype)
    a = masked_cumsum(lp - olp, mask)
    b = reference.segmented_scan((lp - olp).contiguous(), mask)
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # summation order may differ
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@needs_ops
@pytest.mark.parametrize("overrides", [dict(), dict(variant="geomean"), dict(adaptive_clip=False),
                                       dict(loss_agg_mode="seq-mean-token-mean", la_power=0.0)])
def test_policy_loss_same_with_and_without_ops(monkeypatch, overrides):
    cfg = PolicyLossConfig(**overrides)
    lp, olp, adv, mask = batch()
    results = []
    for use_ops in (True, False):
        with monkeypatch.context() as m:
            if not use_ops:
                without_extension(m)
            x = lp.clone().requires_grad_(True)
            loss, metrics = policy_loss(x, olp, adv, mask, cfg)
            loss.backward()
            results.append((loss.detach(), x.grad, metrics))
    (l1, g1, m1), (l2, g2, m2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)
    assert m1.keys() == m2.keys()
    for k in m1:
        assert m1[k] == pytest.approx(m2[k], rel=1e-9, abs=1e-12), k


def test_bad_inputs_name_the_tensor():
    lp, olp, adv, mask = batch()
    cfg = PolicyLossConfig()
    with pytest.raises(ValueError, match="old_log_probs"):
        policy_loss(lp, olp[:, :-1], adv, mask, cfg)
    with pytest.raises(ValueError, match="response_mask"):
        policy_loss(lp, olp, adv, mask[:-1], cfg)
    with pytest.raises(ValueError, match="rollout_is_weights"):
        policy_loss(lp, olp, adv, mask, cfg, rollout_is_weights=mask[:, :3])
    with pytest.raises(ValueError, match=r"log_probs must be \[B, S\]"):
        policy_loss(lp[0], olp[0], adv[0], mask[0], cfg)
    with pytest.raises(ValueError, match="cum_log_ratio"):
        policy_loss(lp, olp, adv, mask, PolicyLossConfig(name="grpo"), cum_log_ratio=lp, cum_count=mask)
    # [B] and [B, 1] advantages broadcast over tokens
    full, _ = policy_loss(lp, olp, adv, mask, cfg)
    assert policy_loss(lp, olp, adv[:, 0], mask, cfg)[0].item() == full.item()
    assert policy_loss(lp, olp, adv[:, :1], mask, cfg)[0].item() == full.item()


@pytest.mark.parametrize("name", ["ctpo", "grpo", "gspo", "seq"])
def test_packed_layout_equals_padded(name):
    lp, olp, adv, mask = batch(seed=4)
    lengths = [0, 5, 33, 12, 1]  # an empty sequence too
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    rows = [slice(0, n) for n in lengths]
    pack = lambda t: torch.cat([t[b, rows[b]] for b in range(len(lengths))] + [t.new_zeros(3)])  # noqa: E731
    keep = torch.zeros_like(mask)
    for b, n in enumerate(lengths):
        keep[b, :n] = 1
    cfg = PolicyLossConfig(name=name, loss_agg_mode="seq-mean-token-mean")
    x = lp.clone().requires_grad_(True)
    ref, ref_metrics = policy_loss(x, olp, adv, mask * keep, cfg)
    ref.backward()
    y = pack(lp).requires_grad_(True)  # 3 tokens of alignment padding at the end
    loss, metrics = policy_loss(y, pack(olp), pack(adv), pack(mask), cfg, cu_seqlens=cu)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(y.grad[:-3], pack(x.grad)[:-3], rtol=1e-12, atol=1e-14)
    assert (y.grad[-3:] == 0).all() and metrics["valid_tokens"] == ref_metrics["valid_tokens"]
    with pytest.raises(ValueError, match="packed advantages"):
        policy_loss(y, pack(olp), adv[:, 0], pack(mask), cfg, cu_seqlens=cu)


def test_return_terms_gives_the_terms_the_loss_was_built_from():
    from ctpo_megatron.algo import PolicyLossConfig, policy_loss
    from ctpo_megatron.algo.registry import LOSSES

    torch.manual_seed(3)
    lp = (torch.randn(3, 7, dtype=torch.float64) * 0.2 - 1).requires_grad_()
    olp = lp.detach() + torch.randn(3, 7, dtype=torch.float64) * 0.1
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mask = (torch.rand(3, 7) > 0.3).double()
    cfg = PolicyLossConfig()
    loss, metrics, terms = policy_loss(lp, olp, adv, mask, cfg, return_terms=True)
    plain_loss, plain_metrics = policy_loss(lp, olp, adv, mask, cfg)
    assert torch.equal(loss, plain_loss) and metrics == plain_metrics
    ref = LOSSES[cfg.name](lp.detach(), olp, adv[:, None].expand(3, 7), mask, cfg)
    assert torch.equal(terms.clip_any, ref.clip_any)
    assert torch.allclose(terms.pg_losses.detach(), ref.pg_losses, atol=1e-12)


class _CountOps(TorchDispatchMode):
    """Counts the aten ops run below autograd (forward and backward) on tensors of `shape`."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
            name = func.overloadpacket.__name__
            self.counts[name] = self.counts.get(name, 0) + 1
        return out


@pytest.mark.csrc
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
def test_fused_pg_losses_aggregate_without_a_select(mode):
    """The fused kernel's pg_losses are exactly 0 at invalid tokens, so policy_loss sums them
    without a torch.where (forward or backward); with IS weights (anything at invalid tokens)
    it selects. Both give the same loss and gradient. (Per-sequence modes still select among
    the [B] sequence sums.)"""
    cfg = PolicyLossConfig(loss_agg_mode=mode)
    lp, olp, adv, mask = batch(torch.float32)
    results = []
    for weights in (None, torch.ones_like(lp)):
        x = lp.clone().requires_grad_(True)
        with _CountOps(lp.shape) as ops_run:
            loss, _, terms = policy_loss(x, olp, adv, mask, cfg, rollout_is_weights=weights, with_metrics=False,
                                         return_terms=True)
            loss.backward()
        assert terms.zero_at_invalid
        assert (ops_run.counts.get("where", 0) == 0) == (weights is None), ops_run.counts
        results.append((loss.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_torch_terms_are_not_taken_as_zero_at_invalid_tokens(monkeypatch):
    """The torch path gives no such guarantee: its terms keep the select."""
    without_extension(monkeypatch)
    lp, olp, adv, mask = batch()
    _, _, terms = policy_loss(lp, olp, adv, mask, PolicyLossConfig(), with_metrics=False, return_terms=True)
    assert not terms.zero_at_invalid
