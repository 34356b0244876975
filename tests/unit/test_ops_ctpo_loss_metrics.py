"""`ops.ctpo_token_loss_metrics` (the loss and the metric values of its terms from one pass)
against the two ops it fuses, `ctpo_token_loss` then `loss_stats_metrics`: equal bit for bit,
for every clip mode, both dtypes, one and two threads; its gradient, its errors, opcheck, and
`policy_loss` running it."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ctpo_megatron import ops
from ctpo_megatron.algo import PolicyLossConfig, policy_loss
from ctpo_megatron.algo import histogram, stats
from ctpo_megatron.algo.ctpo import _kernel_variant, fused_ctpo_terms_and_metrics
from ctpo_megatron.algo.registry import TERMS_AND_METRICS
from tests.unit.test_ops_ctpo_loss import CONFIGS, batch

pytestmark = pytest.mark.csrc  # tests/conftest.py: a failure in CI without the extension, a skip elsewhere

SHAPES = [(6, 300), (1, 3000), (9, 1100), (3, 7)]


def one_pass(lp, olp, adv, mask, cfg):
    return ops.ctpo_token_loss_metrics(lp, olp, adv, mask, **_kernel_variant(cfg),
                                       **stats.metrics_op_arguments(lp.shape[-1], cfg))


def two_ops(lp, olp, adv, mask, cfg):
    """ctpo_token_loss, then loss_stats_metrics of its terms (what policy_metrics passes)."""
    out = ops.ctpo_token_loss(lp, olp, adv, mask, cu_seqlens=None, cum_log_ratio=None, cum_count=None,
                              **_kernel_variant(cfg))
    args = stats.metrics_op_arguments(lp.shape[-1], cfg)
    values = ops.loss_stats_metrics(mask > 0, adv, out.ratio, out.log_ratio, None,
                                    (out.clip_high, out.clip_low, out.clip_dual, out.clipped), positions=None,
                                    adaptive_clip=cfg.adaptive_clip,
                                    la_power=cfg.la_power if cfg.adaptive_clip else None, **args)
    return out, values


def schema_args(op, tensors, named: dict) -> tuple:
    """A raw op's positional arguments: the tensors, then the rest from `named` in its schema's order."""
    rest = [named[a.name] for a in op.default._schema.arguments[len(tensors):]]
    return (*tensors, *(list(v) if isinstance(v, tuple) else v for v in rest))


def raw_args(tensors, cfg, **overrides) -> tuple:
    """The raw op's positional arguments: the four tensors, then the rest in its schema's order."""
    named = {**_kernel_variant(cfg), **stats.metrics_op_arguments(tensors[0].shape[-1], cfg),
             **overrides}
    return schema_args(torch.ops.ctpo_megatron.ctpo_token_loss_metrics, tensors, named)


def assert_values_equal(a, b):
    assert len(a) == len(b)
    for k, (x, y) in enumerate(zip(a, b)):
        assert x == y or (math.isnan(x) and math.isnan(y)), (k, x, y)


def check_equals_the_two_ops(one_pass, two_ops, assert_stats_equal, cfg, inputs):
    """A one-pass op against the two ops it fuses on `inputs`: the loss's tensors equal (dtype
    and values), the statistics by `assert_stats_equal`. Returns the one pass's statistics."""
    out, got = one_pass(*inputs, cfg)
    ref, expected = two_ops(*inputs, cfg)
    for name, a, b in zip(ref._fields, out, ref):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert_stats_equal(got, expected)
    return got


def check_ragged_batches(one_pass, two_ops, assert_stats_equal, valid_tokens, cfg, dtype, threads):
    """`check_equals_the_two_ops` on SHAPES' ragged batches (a tool span, an all-masked row, -inf
    padding; rows of one tile and of many) with `threads` threads: with two, rows split over
    threads (several rows) and the two passes one after the other (one row). valid_tokens(stats)
    must be the mask's count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed, (B, S) in enumerate(SHAPES):
            lp, olp, adv, mask = batch(dtype, seed=seed, B=B, S=S, spread=0.3)
            got = check_equals_the_two_ops(one_pass, two_ops, assert_stats_equal, cfg,
                                           (lp, olp, adv.contiguous(), mask))
            assert valid_tokens(got) == (mask > 0).sum(), (B, S)
    finally:
        torch.set_num_threads(previous)


def check_empty_and_single_token(one_pass, two_ops, assert_stats_equal, shape):
    lp, mask = torch.full(shape, -0.5), torch.ones(shape)
    check_equals_the_two_ops(one_pass, two_ops, assert_stats_equal, PolicyLossConfig(), (lp, lp - 0.1, lp, mask))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.variant}-{'la' if c.adaptive_clip else 'plain'}"
                                                       f"-p{c.la_power}")
def test_one_pass_equals_the_loss_then_the_statistics(cfg, dtype, threads):
    check_ragged_batches(one_pass, two_ops, assert_values_equal,
                         lambda values: values[stats.METRIC_KEYS.index("valid_tokens")], cfg, dtype, threads)


@pytest.mark.parametrize("shape", [(0, 9), (3, 0), (1, 1)])
def test_empty_and_single_token_batches(shape):
    check_empty_and_single_token(one_pass, two_ops, assert_values_equal, shape)


def test_calls_in_a_row_start_from_clean_statistics():
    """The statistics' per-thread buffer is cleared between calls, also after a failed one."""
    cfg = PolicyLossConfig()
    big = [t.contiguous() for t in batch(torch.float32, seed=1, B=4, S=2000, spread=1.0)]
    small = [t.contiguous() for t in batch(torch.float32, seed=2, B=2, S=50, spread=0.01)]
    one_pass(*big, cfg)
    with pytest.raises(RuntimeError, match="quantile"):
        ops.ctpo_token_loss_metrics(*big, **_kernel_variant(cfg),
                                    **{**stats.metrics_op_arguments(2000, cfg), "qs": [1.5]})
    _, values = one_pass(*small, cfg)
    assert_values_equal(values, two_ops(*small, cfg)[1])


def check_gradient_is_the_plain_ops(one_pass, two_ops):
    """The one-pass op's gradient (of a weighted sum of pg_losses) equals the plain ops'."""
    cfg = PolicyLossConfig()
    lp, olp, adv, mask = batch(torch.float64, B=4, S=400, spread=0.3)
    lp = torch.where(mask > 0, lp, 0.0)
    grads = []
    for run in (one_pass, two_ops):
        x = lp.clone().requires_grad_(True)
        out, _ = run(x, olp, adv.contiguous(), mask, cfg)
        (out.pg_losses * torch.linspace(0.5, 2.0, lp.shape[-1], dtype=lp.dtype)).sum().backward()
        grads.append(x.grad)
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


def check_input_errors(raw, raw_args, cfg, tensors):
    """The errors a one-pass op shares with the loss op: dtype, rank, mismatched shapes, bad edges."""
    name = raw.default._schema.name.split("::")[-1]
    with pytest.raises(RuntimeError, match=f"{name}: log_probs must be float32 or float64"):
        raw(*raw_args([t.bfloat16() for t in tensors], cfg))
    with pytest.raises(RuntimeError, match=r"must be \[S\] or \[B, S\]"):
        raw(*raw_args([t.reshape(2, 4, 4) for t in tensors], cfg))
    with pytest.raises(RuntimeError, match="old_log_probs must have the shape of log_probs"):
        raw(*raw_args([tensors[0], tensors[1][:, 1:].contiguous(), *tensors[2:]], cfg))
    with pytest.raises(RuntimeError, match="bucket_edges must be strictly increasing"):
        raw(*raw_args(tensors, cfg, bucket_edges=[4, 2]))


def test_gradient_is_the_plain_ops():
    check_gradient_is_the_plain_ops(one_pass, two_ops)


def test_bad_inputs_name_the_problem():
    cfg = PolicyLossConfig()
    tensors = [t.contiguous() for t in batch(torch.float32, B=2, S=16)]
    raw = torch.ops.ctpo_megatron.ctpo_token_loss_metrics
    check_input_errors(raw, raw_args, cfg, tensors)
    with pytest.raises(RuntimeError, match="bucket_edges must hold 1 to 64 edges, got 0"):
        raw(*raw_args(tensors, cfg, bucket_edges=[]))
    with pytest.raises(RuntimeError, match="ctpo_token_loss_metrics: quantile 2"):
        raw(*raw_args(tensors, cfg, qs=[2.0]))


@pytest.mark.parametrize("adaptive", [True, False])
def test_opcheck(adaptive):
    cfg = PolicyLossConfig(adaptive_clip=adaptive)
    lp, olp, adv, mask = batch(torch.float64, B=3, S=20)
    lp = torch.where(mask > 0, lp, 0.0).requires_grad_(True)
    torch.library.opcheck(torch.ops.ctpo_megatron.ctpo_token_loss_metrics.default,
                          raw_args([lp, olp, adv.contiguous(), mask], cfg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_policy_loss_with_metrics_equals_the_separate_path(monkeypatch, dtype):
    """policy_loss's one-pass metrics equal `policy_metrics` of its terms exactly (same keys, in
    the same order), and its loss and gradient equal the path without metrics."""
    lp, olp, adv, mask = batch(dtype, B=5, S=600, spread=0.3)
    lp = torch.where(mask > 0, lp, 0.0)
    for cfg in (PolicyLossConfig(), PolicyLossConfig(variant="geomean", adaptive_clip=False),
                dataclasses.replace(PolicyLossConfig(), loss_agg_mode="seq-mean-token-mean")):
        results = []
        for one in (True, False):
            with monkeypatch.context() as patch:
                if not one:
                    patch.delitem(TERMS_AND_METRICS, "ctpo")
                x = lp.clone().requires_grad_(True)
                loss, metrics = policy_loss(x, olp, adv[:, :1], mask, cfg)
                loss.backward()
                results.append((loss, x.grad, metrics))
        (loss, grad, metrics), (ref_loss, ref_grad, ref_metrics) = results
        assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
        assert list(metrics) == list(ref_metrics)
        assert_values_equal(list(metrics.values()), list(ref_metrics.values()))


def test_one_pass_declines_what_it_does_not_run(monkeypatch):
    """16-bit inputs and devices without the CPU kernels get None (policy_loss then computes
    the metrics from the terms), and shapes are checked like the terms' own."""
    cfg = PolicyLossConfig()
    lp, olp, adv, mask = batch(torch.float32, B=2, S=32)
    assert fused_ctpo_terms_and_metrics(lp.bfloat16(), olp, adv, mask, cfg) is None
    with pytest.raises(ValueError, match="fused_ctpo_terms_and_metrics: advantages has shape"):
        fused_ctpo_terms_and_metrics(lp, olp, adv[:, :1], mask, cfg)
    assert fused_ctpo_terms_and_metrics(lp, olp, adv, mask, cfg) is not None
    monkeypatch.setattr(ops, "ctpo_loss_metrics_kernel_for", lambda device: False)
    assert fused_ctpo_terms_and_metrics(lp, olp, adv, mask, cfg) is None
    _, metrics = policy_loss(lp, olp, adv, mask, cfg)  # the separate path
    assert metrics["valid_tokens"] == float((mask > 0).sum())


def test_histogram_layout_is_the_algo_ones():
    args = stats.metrics_op_arguments(100, PolicyLossConfig())
    assert {k: args[k] for k in histogram.KERNEL_LAYOUT} == histogram.KERNEL_LAYOUT
