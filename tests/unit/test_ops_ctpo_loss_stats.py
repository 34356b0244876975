"""`ops.ctpo_token_loss_stats` (the loss and the `loss_stats` of its terms from one pass, what
the trainer sums per micro-batch) against the two ops it fuses, `ctpo_token_loss` then
`loss_stats`: equal bit for bit, for every clip mode, both dtypes, one and two threads; its
gradient, its errors, opcheck; `policy_loss(..., sums_bucket_edges=...)` running it, and the
trainer's loss function at CP 1 running it without a prefix-sum exchange."""

from __future__ import annotations

import pytest
import torch

from ctpo_megatron import ops
from ctpo_megatron.algo import PolicyLossConfig, policy_loss
from ctpo_megatron.algo import stats
from ctpo_megatron.algo.ctpo import _kernel_terms, _kernel_variant, fused_ctpo_terms_and_sums
from ctpo_megatron.algo.registry import TERMS_AND_SUMS
from tests.unit.test_ops_ctpo_loss import CONFIGS, batch
from tests.unit.test_ops_ctpo_loss_metrics import (check_empty_and_single_token, check_gradient_is_the_plain_ops,
                                                   check_input_errors, check_ragged_batches, schema_args)

pytestmark = pytest.mark.csrc  # tests/conftest.py: a failure in CI without the extension, a skip elsewhere

EDGES = (1, 2, 4, 8, 16, 64, 256, 1024)


def one_pass(lp, olp, adv, mask, cfg, edges=EDGES):
    return ops.ctpo_token_loss_stats(lp, olp, adv, mask, **_kernel_variant(cfg),
                                     **stats.sums_op_arguments(edges, cfg))


def two_ops(lp, olp, adv, mask, cfg, edges=EDGES):
    """ctpo_token_loss, then loss_stats of its terms (what LossSums.from_terms passes at running positions)."""
    out = ops.ctpo_token_loss(lp, olp, adv, mask, cu_seqlens=None, cum_log_ratio=None, cum_count=None,
                              **_kernel_variant(cfg))
    return out, ops.loss_stats(mask > 0, adv, out.ratio, out.log_ratio, None,
                               (out.clip_high, out.clip_low, out.clip_dual, out.clipped), positions=None,
                               la_power=cfg.la_power if cfg.adaptive_clip else None,
                               **stats.sums_op_arguments(edges, cfg))


def raw_args(tensors, cfg, **overrides) -> tuple:
    named = {**_kernel_variant(cfg), **stats.sums_op_arguments(EDGES, cfg), **overrides}
    return schema_args(torch.ops.ctpo_megatron.ctpo_token_loss_stats, tensors, named)


def assert_same(a, b):
    for name, x, y in zip(a._fields, a, b):
        assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.variant}-{'la' if c.adaptive_clip else 'plain'}"
                                                       f"-p{c.la_power}")
def test_one_pass_equals_the_loss_then_the_statistics(cfg, dtype, threads):
    check_ragged_batches(one_pass, two_ops, assert_same, lambda sums: sums.sums[0], cfg, dtype, threads)


@pytest.mark.parametrize("shape", [(0, 9), (3, 0), (1, 1)])
def test_empty_and_single_token_batches(shape):
    check_empty_and_single_token(one_pass, two_ops, assert_same, shape)


def test_calls_in_a_row_do_not_share_statistics():
    """Each call's vectors are its own: a second call neither adds to nor changes the first's."""
    cfg = PolicyLossConfig()
    big = [t.contiguous() for t in batch(torch.float32, seed=1, B=4, S=2000, spread=1.0)]
    small = [t.contiguous() for t in batch(torch.float32, seed=2, B=2, S=50, spread=0.01)]
    _, first = one_pass(*big, cfg)
    kept = first.sums.clone()
    _, second = one_pass(*small, cfg)
    assert torch.equal(first.sums, kept)
    assert_same(second, two_ops(*small, cfg)[1])


def test_gradient_is_the_plain_ops():
    check_gradient_is_the_plain_ops(one_pass, two_ops)


def test_bad_inputs_name_the_problem():
    cfg = PolicyLossConfig()
    tensors = [t.contiguous() for t in batch(torch.float32, B=2, S=16)]
    raw = torch.ops.ctpo_megatron.ctpo_token_loss_stats
    check_input_errors(raw, raw_args, cfg, tensors)
    with pytest.raises(RuntimeError, match="ctpo_token_loss_stats: bad layout"):
        raw(*raw_args(tensors, cfg, exp_coeffs=[1.0] * 5))


@pytest.mark.parametrize("adaptive", [True, False])
def test_opcheck(adaptive):
    cfg = PolicyLossConfig(adaptive_clip=adaptive)
    lp, olp, adv, mask = batch(torch.float64, B=3, S=20)
    lp = torch.where(mask > 0, lp, 0.0).requires_grad_(True)
    torch.library.opcheck(torch.ops.ctpo_megatron.ctpo_token_loss_stats.default,
                          raw_args([lp, olp, adv.contiguous(), mask], cfg))


def _policy_loss_runs(monkeypatch, lp, olp, adv, mask, cfg, **kwargs):
    """policy_loss with sums, with and without the one-pass entry: [(loss, grad, outputs)]."""
    results = []
    for one in (True, False):
        with monkeypatch.context() as patch:
            if not one:
                patch.delitem(TERMS_AND_SUMS, "ctpo")
            x = lp.clone().requires_grad_(True)
            out = policy_loss(x, olp, adv, mask, cfg, sums_bucket_edges=EDGES, **kwargs)
            out[0].backward()
            results.append((out[0], x.grad, out))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_metrics", [False, True])
def test_policy_loss_sums_equal_the_terms_sums(monkeypatch, dtype, with_metrics):
    """policy_loss's one-pass LossSums equal `LossSums.from_terms` of its terms exactly, its
    loss and gradient the path without it, and the metrics (when asked for too) are the same."""
    lp, olp, adv, mask = batch(dtype, B=5, S=600, spread=0.3)
    lp = torch.where(mask > 0, lp, 0.0)
    calls = []
    real = ops.ctpo_token_loss_stats
    monkeypatch.setattr(ops, "ctpo_token_loss_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    for cfg in (PolicyLossConfig(), PolicyLossConfig(variant="geomean", adaptive_clip=False)):
        calls.clear()
        (loss, grad, out), (ref_loss, ref_grad, ref_out) = _policy_loss_runs(
            monkeypatch, lp, olp, adv[:, :1], mask, cfg, with_metrics=with_metrics, dp_size=2)
        assert len(calls) == 1  # the one pass ran once, the reference path not at all
        assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
        sums, ref_sums = out[-1], ref_out[-1]
        assert isinstance(sums, stats.LossSums) and len(out) == 3
        for a, b in zip(sums.to_vectors(), ref_sums.to_vectors()):
            assert torch.equal(a, b)
        assert sums.loss == loss.detach().double() / 2
        assert out[1] == ref_out[1] and bool(out[1]) == with_metrics


def test_policy_loss_sums_with_terms_and_given_counts(monkeypatch):
    """return_terms puts the terms before the sums; given prefix sums (context parallelism)
    take the path through the terms, with the given counts as positions."""
    cfg = PolicyLossConfig()
    lp, olp, adv, mask = batch(torch.float64, B=3, S=300, spread=0.3)
    lp = torch.where(mask > 0, lp, 0.0)
    loss, metrics, terms, sums = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, return_terms=True,
                                             sums_bucket_edges=EDGES)
    assert metrics == {} and terms.ratio.shape == lp.shape
    monkeypatch.setattr(ops, "ctpo_token_loss_stats", None)  # must not be called with given counts
    valid = mask > 0
    count = torch.cumsum(valid.double(), -1) + 100  # e.g. a later piece of each sequence
    cum = torch.cumsum(torch.where(valid, lp - olp, 0.0), -1)
    _, _, given_terms, given = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, return_terms=True,
                                           sums_bucket_edges=EDGES, cum_log_ratio=cum, cum_count=count)
    ref = stats.LossSums.from_terms(given_terms, mask, adv, cfg, loss=loss, dp_size=1, bucket_edges=EDGES,
                                    positions=count.round().long())
    assert torch.equal(given.sums, ref.sums)
    assert not torch.equal(given.position_tokens, sums.position_tokens)  # the positions moved


def test_one_pass_declines_what_it_does_not_run(monkeypatch):
    """16-bit inputs and devices without the CPU kernels get None; policy_loss then sums the terms."""
    cfg = PolicyLossConfig()
    lp, olp, adv, mask = batch(torch.float32, B=2, S=32)
    assert fused_ctpo_terms_and_sums(lp.bfloat16(), olp, adv, mask, cfg, EDGES) is None
    with pytest.raises(ValueError, match="fused_ctpo_terms_and_sums: advantages has shape"):
        fused_ctpo_terms_and_sums(lp, olp, adv[:, :1], mask, cfg, EDGES)
    terms, _ = fused_ctpo_terms_and_sums(lp, olp, adv, mask, cfg, EDGES)
    out = ops.ctpo_token_loss(lp, olp, adv, mask, cu_seqlens=None, cum_log_ratio=None, cum_count=None,
                              **_kernel_variant(cfg))
    assert torch.equal(terms.pg_losses, _kernel_terms(out, cfg).pg_losses)
    monkeypatch.setattr(ops, "ctpo_loss_metrics_kernel_for", lambda device: False)
    assert fused_ctpo_terms_and_sums(lp, olp, adv, mask, cfg, EDGES) is None
    *_, sums = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, sums_bucket_edges=EDGES)
    assert sums.tokens == (mask > 0).sum()


def test_trainer_loss_at_cp1_runs_the_one_pass_without_an_exchange(monkeypatch):
    """The trainer's loss function with a CP group of one rank: the loss's own prefix sums and
    the one-pass statistics (no `context_parallel_cumsum`), equal to the loss and `from_terms`."""
    import torch.distributed as dist

    from ctpo_megatron.actor import context_parallel
    from ctpo_megatron.trainer.update import make_loss_fn

    class OneRank:  # what dist.get_world_size reads of the actor's CP group at CP 1
        pass

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(context_parallel, "context_parallel_cumsum", None)  # a call would fail
    calls = []
    real = ops.ctpo_token_loss_stats
    monkeypatch.setattr(ops, "ctpo_token_loss_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = PolicyLossConfig()
    lp, olp, adv, mask = batch(torch.float32, B=4, S=500, spread=0.3)
    lp = torch.where(mask > 0, lp, 0.0)
    tokens = int((mask > 0).sum())
    inputs = dict(old_log_probs=olp, advantages=adv[:, :1], response_mask=mask, global_num_tokens=tokens + 7,
                  dp_size=2, cp_group=OneRank())
    x = lp.clone().requires_grad_(True)
    loss, sums = make_loss_fn(cfg, EDGES)(x, inputs)
    assert calls == [1]
    ref_loss, _, terms = policy_loss(lp, olp, adv[:, :1], mask, cfg, batch_num_tokens=tokens + 7, dp_size=2,
                                     with_metrics=False, return_terms=True)
    ref = stats.LossSums.from_terms(terms, mask, adv[:, :1], cfg, loss=ref_loss, dp_size=2, bucket_edges=EDGES)
    assert torch.equal(loss.detach(), ref_loss)
    for a, b in zip(sums.to_vectors(), ref.to_vectors()):
        assert torch.equal(a, b)
