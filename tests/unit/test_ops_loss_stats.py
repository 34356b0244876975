"""The one-pass `loss_stats` kernel against `LossSums`' torch reductions (its definition): every
field, for every loss and clip mode, float32 / float64, given and running positions, several
threads, empty batches; its input errors and opcheck."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctpo_megatron import ops
from ctpo_megatron.algo import PolicyLossConfig, policy_loss
from ctpo_megatron.algo import histogram, stats
from ctpo_megatron.algo.metrics import position_bucket_edges
from tests.unit.test_ops_ctpo_loss import batch

pytestmark = pytest.mark.csrc  # tests/conftest.py: a failure in CI without the extension, a skip elsewhere

CONFIGS = {
    "ctpo-la": PolicyLossConfig(),
    "ctpo-la-dual-c": PolicyLossConfig(la_clip_c=0.2),
    "ctpo-plain": PolicyLossConfig(adaptive_clip=False),
    "grpo": PolicyLossConfig(name="grpo", adaptive_clip=False),
}
COUNT_FIELDS = ("tokens", "neg_adv_tokens", "clip", "pg_clipped", "ratio_max", "ratio_neg_min", "ratio_hist",
                "la_scale_max", "la_scale_neg_min", "la_scale_hist", "position_clipped", "position_tokens", "loss")


def both_paths(terms, mask, adv, cfg, *, positions=None, edges=None, by_position=True):
    """(torch LossSums, kernel LossSums) of the same terms; by_position: the kernel takes the LA
    scales from the positions and cfg.la_power (what `LossSums.from_terms` asks for), else it
    reads terms.la_scale per token."""
    valid = mask > 0
    adv = adv.reshape(adv.shape[0], -1).expand(valid.shape)
    edges = edges or position_bucket_edges(mask.shape[-1])
    args = (terms, valid, adv, torch.zeros((), dtype=torch.float64), edges, positions,
            (cfg.la_clip_high, -cfg.la_clip_low, cfg.la_clip_c))
    return stats._torch_sums(*args), stats._kernel_sums(*args, cfg.la_power if by_position else None)


def terms_at_positions(cfg, lp, olp, adv, mask, positions):
    """The loss's terms with n_t = positions (as under context parallelism, where the prefix
    counts come from other ranks too), so that their LA scales are g(positions)."""
    log_ratio = ((lp - olp) * (mask > 0)).nan_to_num()
    _, _, terms = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, return_terms=True,
                              cum_log_ratio=torch.cumsum(log_ratio, dim=-1), cum_count=positions.to(lp.dtype))
    return terms


def assert_same(reference, kernel, rtol):
    assert reference.sums.shape == kernel.sums.shape and reference.maxima.shape == kernel.maxima.shape
    for name in stats.FIELDS:
        a, b = reference.field(name), kernel.field(name)
        assert a.shape == b.shape and b.dtype == torch.float64, name
        if name in COUNT_FIELDS:  # counts, maxima and histograms: exact
            assert torch.equal(a, b), f"{name}: {a} vs {b}"
        else:  # sums: the kernel accumulates in float64, torch in the compute dtype
            torch.testing.assert_close(b, a, rtol=rtol, atol=rtol, msg=name)


@pytest.mark.parametrize("by_position", [True, False], ids=["la-by-position", "la-per-token"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kernel_sums_equal_torch_sums(name, dtype, rtol, by_position):
    cfg = CONFIGS[name]
    lp, olp, adv, mask = batch(dtype, spread=0.2)
    _, _, terms = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, return_terms=True)
    reference, kernel = both_paths(terms, mask, adv, cfg, by_position=by_position)
    assert float(reference.tokens) > 0 and float(reference.clip[3]) > 0  # the batch clips something
    assert (terms.la_scale is not None) == (float(kernel.la_scale_sum) > 0)
    assert_same(reference, kernel, rtol)


@pytest.mark.parametrize("power", [0.0, 0.3, 1.0, -0.5, 0.75])
@pytest.mark.parametrize("given", [False, True], ids=["running-count", "given-positions"])
def test_la_statistics_by_position_equal_per_token(power, given):
    """The LA scale statistics counted per position equal those of the loss's per-token scales
    (histogram and extremes exactly), for powers with and without a special case, with running
    and with given positions (offset, with repeats across rows and a row of several tiles)."""
    cfg = PolicyLossConfig(la_power=power)  # exp(la_clip_c g) stays finite up to g = 1600
    lp, olp, adv, mask = batch(torch.float32, B=5, S=700, spread=0.2)
    positions = None
    if given:
        positions = torch.cumsum(mask > 0, dim=-1) + torch.tensor([[0], [3], [900], [-200], [41]])
        terms = terms_at_positions(cfg, lp, olp, adv, mask, positions)
    else:
        _, _, terms = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, return_terms=True)
    reference, kernel = both_paths(terms, mask, adv, cfg, positions=positions)
    _, per_token = both_paths(terms, mask, adv, cfg, positions=positions, by_position=False)
    assert float(reference.la_scale_hist.sum()) == float(reference.tokens) > 0
    assert_same(reference, kernel, 2e-5)
    assert_same(per_token, kernel, 2e-5)


def test_la_tables_follow_each_calls_power_coefficients_dtype_and_length():
    """With running positions the LA statistics come from per-position tables built once and
    kept for later calls. Calls that change the row length (beyond the tables and back), the
    power, the exp coefficients or the dtype in turn each get their own statistics: equal to the
    per-token ones of the same terms."""
    # Each call changes one thing: the length (up, back down), the coefficients, the dtype, the power.
    calls = [(100, 0.5, torch.float32, 0.2), (5000, 0.5, torch.float32, 0.2), (100, 0.5, torch.float32, 0.2),
             (300, 0.5, torch.float32, 0.4), (300, 0.5, torch.float64, 0.4), (3000, 0.3, torch.float64, 0.4)]
    for S, power, dtype, la_clip_c in calls:
        cfg = PolicyLossConfig(la_power=power, la_clip_c=la_clip_c)
        lp, olp, adv, mask = batch(dtype, B=3, S=S, spread=0.2)
        _, _, terms = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, return_terms=True)
        reference, kernel = both_paths(terms, mask, adv, cfg)
        _, per_token = both_paths(terms, mask, adv, cfg, by_position=False)
        assert float(kernel.la_scale_hist.sum()) == float(kernel.tokens) > 0
        assert_same(per_token, kernel, 1e-10 if dtype == torch.float64 else 2e-5)
        assert_same(reference, kernel, 1e-10 if dtype == torch.float64 else 2e-5)


def test_la_rows_longer_than_the_tables_are_evaluated_per_position():
    """A row of more valid tokens than the tables hold (2^20) takes the per-position loop: its
    statistics equal the per-token ones too."""
    cfg = PolicyLossConfig()
    S = (1 << 20) + 300
    lp, olp, adv, mask = batch(torch.float32, B=1, S=S, spread=0.2)
    mask = torch.ones_like(mask)  # every token valid: the running count reaches S
    lp = lp.nan_to_num(neginf=-1.0)
    _, _, terms = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, return_terms=True)
    valid = mask > 0
    args = (terms, valid, adv.reshape(1, -1).expand(valid.shape), torch.zeros((), dtype=torch.float64),
            position_bucket_edges(S), None, (cfg.la_clip_high, -cfg.la_clip_low, cfg.la_clip_c))
    kernel, per_token = stats._kernel_sums(*args, cfg.la_power), stats._kernel_sums(*args, None)
    assert float(kernel.la_scale_max) == pytest.approx(S ** 0.5)
    assert_same(per_token, kernel, 2e-5)  # per token, exp sums add up in float32 per tile


def test_la_by_position_is_not_per_token_when_positions_are_not_the_losss():
    """The per-position statistics are those of g(positions): positions that are not the n_t
    the loss used give other LA statistics (what LossSums.from_terms's contract rules out), and
    the per-token path keeps reading the terms."""
    cfg = CONFIGS["ctpo-la"]
    lp, olp, adv, mask = batch(torch.float32, spread=0.2)
    _, _, terms = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, return_terms=True)
    shifted = torch.cumsum(mask > 0, dim=-1) + 100
    reference, kernel = both_paths(terms, mask, adv, cfg, positions=shifted)
    _, per_token = both_paths(terms, mask, adv, cfg, positions=shifted, by_position=False)
    assert_same(reference, per_token, 2e-5)
    assert float(kernel.la_scale_sum) > float(reference.la_scale_sum)
    assert float(-kernel.la_scale_neg_min) == pytest.approx(101 ** cfg.la_power)


def test_given_positions_out_of_range_and_odd_edges():
    """Context parallelism passes the global n_t: positions past the last edge land in the open
    last bucket, positions below the first edge (and negative ones) are left out."""
    cfg = CONFIGS["ctpo-la"]
    lp, olp, adv, mask = batch(torch.float32, spread=0.2)
    _, _, terms = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, return_terms=True)
    g = torch.Generator().manual_seed(3)
    positions = torch.randint(-5, 2000, mask.shape, generator=g)
    terms = terms_at_positions(cfg, lp, olp, adv, mask, positions)
    reference, kernel = both_paths(terms, mask, adv, cfg, positions=positions, edges=[3, 10, 64, 100])
    assert float(reference.position_tokens.sum()) < float(reference.tokens)  # some were left out
    assert_same(reference, kernel, 2e-5)


@pytest.mark.parametrize("given", [False, True], ids=["running-count", "given-positions"])
def test_long_rows_take_whole_tiles_into_position_buckets(given):
    """Rows of many 256-token tiles: a tile whose tokens share a position bucket is counted at
    once, one that crosses an edge token by token; an odd row length, a fully masked span of
    tiles, and (given) positions offset as a later context-parallel chunk's global n_t are, or
    below the first edge."""
    cfg = CONFIGS["ctpo-la"]
    lp, olp, adv, mask = batch(torch.float32, B=3, S=2999, spread=0.2)
    mask[:, 512:1100] = 0  # whole tiles without a valid token
    _, _, terms = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, return_terms=True)
    positions = None
    if given:
        positions = torch.cumsum(mask > 0, dim=-1) + torch.tensor([[0], [700], [-300]])
        terms = terms_at_positions(cfg, lp, olp, adv, mask, positions)
    edges = [1, 64, 700, 1500, 2048] if given else None
    reference, kernel = both_paths(terms, mask, adv, cfg, positions=positions, edges=edges)
    assert (reference.position_tokens > 0).sum() >= 3
    assert_same(reference, kernel, 2e-5)


def test_random_masks_and_garbage_at_invalid_tokens_leave_no_counts_behind():
    """A random mask (invalid tokens inside the tiles that cross bucket edges, which are counted
    without a branch on the mask) and garbage ratios at invalid tokens (far outside the bins of
    the valid ones: the kernel's per-thread bin counts are cleared over the valid tokens' bin
    range only). Every field equals the torch path's, call after call."""
    cfg = CONFIGS["ctpo-la"]
    garbage_values = torch.tensor([0.0, 1e-30, 3.0, 1e30])
    for seed in range(4):
        lp, olp, adv, mask = batch(torch.float32, seed=seed, B=4, S=1500, spread=0.3)
        g = torch.Generator().manual_seed(seed)
        mask = mask * (torch.rand(mask.shape, generator=g) > 0.3)
        _, _, terms = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, return_terms=True)
        garbage = garbage_values[torch.randint(0, len(garbage_values), mask.shape, generator=g)]
        terms = dataclasses.replace(terms, ratio=torch.where(mask > 0, terms.ratio, garbage))
        reference, kernel = both_paths(terms, mask, adv, cfg)
        assert float(reference.tokens) > 100
        assert_same(reference, kernel, 2e-5)


def test_threads_split_rows_and_merge_exactly():
    """Enough tokens for the kernel to split rows over threads: the merged result is the
    one-thread result (counts, extremes and histograms exactly)."""
    cfg = CONFIGS["ctpo-la"]
    lp, olp, adv, mask = batch(torch.float32, B=16, S=8192, spread=0.2)
    _, _, terms = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, return_terms=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, single = both_paths(terms, mask, adv, cfg)
        torch.set_num_threads(4)
        reference, split = both_paths(terms, mask, adv, cfg)
    finally:
        torch.set_num_threads(threads)
    assert_same(single, split, 1e-12)
    assert_same(reference, split, 2e-5)


def test_no_valid_token_gives_neutral_extremes():
    cfg = CONFIGS["ctpo-la"]
    lp, olp, adv, mask = batch(torch.float32)
    mask = torch.zeros_like(mask)
    _, _, terms = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, return_terms=True)
    reference, kernel = both_paths(terms, mask, adv, cfg)
    assert float(kernel.tokens) == 0 and float(kernel.ratio_neg_min) == float("-inf")
    assert_same(reference, kernel, 1e-12)
    assert kernel.metrics(num_updates=1, bucket_edges=position_bucket_edges(8), adaptive_clip=True)["is_ratio_max"] == 0


@pytest.mark.parametrize("name,op", [("ctpo-la", "ctpo_token_loss_metrics"), ("ctpo-plain", "ctpo_token_loss_metrics"),
                                     ("grpo", "loss_stats_metrics")])
def test_policy_loss_metrics_come_from_the_kernel(monkeypatch, name, op):
    """policy_loss's metrics on CPU are computed by the kernels in one call (for CTPO together
    with the loss itself; for other losses the statistics and values of the terms), and equal
    the torch path's."""
    cfg = CONFIGS[name]
    lp, olp, adv, mask = batch(torch.float32, spread=0.2)
    calls = []
    for spied in ("ctpo_token_loss_metrics", "loss_stats_metrics"):
        original = getattr(ops, spied)
        monkeypatch.setattr(ops, spied, lambda *a, _f=original, _n=spied, **k: calls.append(_n) or _f(*a, **k))
    _, metrics = policy_loss(lp, olp, adv, mask, cfg)
    assert calls == [op]
    monkeypatch.setattr(ops, "loss_stats_kernel_for", lambda device: False)
    monkeypatch.setattr(ops, "ctpo_loss_metrics_kernel_for", lambda device: False)
    _, torch_metrics = policy_loss(lp, olp, adv, mask, cfg)
    assert calls == [op] and metrics.keys() == torch_metrics.keys()
    for key, value in metrics.items():
        assert value == pytest.approx(torch_metrics[key], rel=1e-4, abs=1e-6), key


def raw_args(B=2, S=16, dtype=torch.float32):
    valid = torch.ones(B, S, dtype=torch.bool)
    values = torch.rand(B, S, dtype=dtype)
    flags = torch.zeros(B, S, dtype=torch.bool)
    return [valid, values, values, values, values, None, flags, flags, flags, flags, None, [1, 2, 4, 8], [0.1],
            histogram.KERNEL_LAYOUT["hist_shift"], histogram.KERNEL_LAYOUT["hist_first"],
            histogram.KERNEL_LAYOUT["hist_bins"]]


@pytest.mark.parametrize("index,bad,message", [
    (0, torch.ones(2, 16), "valid must be bool"),
    (2, torch.rand(2, 15), "ratio must have the shape of valid"),
    (3, torch.rand(2, 16, dtype=torch.float64), "log_ratio must be Float"),
    (5, 0.5, "pass la_scale .* or la_power .*, not both"),
    (6, torch.zeros(2, 16), "clip_high must be Bool"),
    (10, torch.zeros(2, 16, dtype=torch.int32), "positions must be Long"),
    (11, list(range(1, 66)), "bucket_edges must hold 1 to 64 edges, got 65"),
    (11, [], "bucket_edges must hold 1 to 64 edges, got 0"),
    (11, [1, 4, 4], "bucket_edges must be strictly increasing integers >= 1"),
    (11, [0, 4], "bucket_edges must be strictly increasing integers >= 1"),
    (12, [0.1] * 5, "at most 4 exp_coeffs"),
])
def test_bad_inputs_name_the_argument(index, bad, message):
    args = raw_args()
    args[index] = bad
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ctpo_megatron.loss_stats(*args)


def test_la_power_must_be_finite_and_positions_bounded():
    args = raw_args()
    args[4], args[5] = None, float("nan")
    with pytest.raises(RuntimeError, match="la_power must be finite"):
        torch.ops.ctpo_megatron.loss_stats(*args)
    args[5] = 0.5
    args[10] = torch.full((2, 16), (1 << 30) + 1, dtype=torch.int64)  # a per-position table of 8 GiB
    with pytest.raises(RuntimeError, match="position 1073741825 is above 1073741824"):
        torch.ops.ctpo_megatron.loss_stats(*args)
    # The error left no counts behind in the kernel's per-thread buffers.
    args[10] = torch.arange(1, 17).expand(2, 16).contiguous()
    sums, _ = torch.ops.ctpo_megatron.loss_stats(*args)
    sections = ops.loss_stats_sections(1, histogram.NUM_BINS, 4)
    assert float(sums[sections["ratio_hist"]].sum()) == float(sums[sections["la_scale_hist"]].sum()) == 32


def test_policy_loss_metrics_use_the_given_prefix_counts():
    """policy_loss with given prefix sums (context parallelism): its metrics take n_t from
    cum_count, so the kernel's LA statistics (from the positions) equal the torch path's (from
    the terms) and the clip rates by position are by the global n_t."""
    cfg = CONFIGS["ctpo-la"]
    lp, olp, adv, mask = batch(torch.float32, spread=0.2)
    count = torch.cumsum(mask > 0, dim=-1).float() + 500
    cum = torch.cumsum(((lp - olp) * (mask > 0)).nan_to_num(), dim=-1)
    _, metrics = policy_loss(lp, olp, adv, mask, cfg, cum_log_ratio=cum, cum_count=count)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "loss_stats_kernel_for", lambda device: False)
        _, torch_metrics = policy_loss(lp, olp, adv, mask, cfg, cum_log_ratio=cum, cum_count=count)
    assert metrics["la_scale_min"] == pytest.approx(501 ** 0.5)
    assert not any(key.startswith("clip_rate_by_pos/1-") for key in metrics)  # all tokens are past 500
    assert metrics.keys() == torch_metrics.keys()
    for key, value in metrics.items():
        assert value == pytest.approx(torch_metrics[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("la_power", [None, 0.5], ids=["la-per-token", "la-by-position"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype, la_power):
    args = raw_args(dtype=dtype)
    if la_power is not None:
        args[4], args[5] = None, la_power
    args[10] = torch.arange(16).expand(2, 16).contiguous()
    torch.library.opcheck(torch.ops.ctpo_megatron.loss_stats.default, tuple(args),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("shape,given,by_position", [((4, 300), False, True), ((1, 300), False, True),
                                                     ((4, 300), True, True), ((1, 300), True, False)],
                         ids=["rows", "one-row", "rows-given", "one-row-given"])
def test_from_terms_counts_la_per_position_unless_one_row_has_given_positions(monkeypatch, shape, given,
                                                                             by_position):
    """`LossSums.from_terms` asks the kernel for per-position LA statistics with running
    positions (its tables), and with given positions where several rows share them; one row of
    given positions (as many positions as tokens) reads the per-token scales. All give the torch
    path's statistics."""
    cfg = CONFIGS["ctpo-la"]
    lp, olp, adv, mask = batch(torch.float32, B=shape[0], S=shape[1], spread=0.2)
    positions = torch.cumsum(mask > 0, dim=-1) + 7 if given else None
    if given:
        terms = terms_at_positions(cfg, lp, olp, adv, mask, positions)
    else:
        _, _, terms = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, return_terms=True)
    calls = []
    raw = ops.loss_stats
    monkeypatch.setattr(ops, "loss_stats", lambda *a, **k: calls.append((k["la_scale"], k["la_power"])) or raw(*a, **k))
    kw = dict(loss=torch.zeros(()), dp_size=1, bucket_edges=position_bucket_edges(shape[1]), positions=positions)
    kernel = stats.LossSums.from_terms(terms, mask > 0, adv, cfg, **kw)
    assert calls == [(None, cfg.la_power)] if by_position else calls == [(terms.la_scale, None)]
    monkeypatch.setattr(ops, "loss_stats_kernel_for", lambda device: False)
    assert_same(stats.LossSums.from_terms(terms, mask > 0, adv, cfg, **kw), kernel, 2e-5)


def metric_cases():
    """(name, LossSums, bucket edges, adaptive_clip): real terms of each config, two of them
    added, one with no valid token, and random sums with empty position buckets."""
    for name, cfg in CONFIGS.items():
        lp, olp, adv, mask = batch(torch.float32, B=3, S=300, spread=0.3)
        _, _, terms = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, return_terms=True)
        edges = position_bucket_edges(300)
        sums = stats.LossSums.from_terms(terms, mask, adv, cfg, loss=torch.tensor(0.7), dp_size=2, bucket_edges=edges)
        yield name, sums, edges, terms.la_scale is not None
        yield f"{name}-added", sums + sums, edges, terms.la_scale is not None
        _, _, terms = policy_loss(lp, olp, adv, torch.zeros_like(mask), cfg, with_metrics=False, return_terms=True)
        empty = stats.LossSums.from_terms(terms, torch.zeros_like(mask), adv, cfg, loss=torch.tensor(0.0), dp_size=1,
                                          bucket_edges=edges)
        yield f"{name}-no-token", empty, edges, terms.la_scale is not None
    g = torch.Generator().manual_seed(3)
    edges = [1, 4, 16, 64]
    counts = torch.randint(0, 50, (ops.loss_stats_sections(3, histogram.NUM_BINS, 4)["position_tokens"].stop,),
                           generator=g).to(torch.float64)
    counts[-4:-2] = 0  # the first two buckets without tokens: no rate
    counts[ops.LOSS_STATS_SUM_SLOTS.index("tokens")] = 1234.0
    maxima = torch.tensor([7.5, -0.01, 3.0, -1.0], dtype=torch.float64)
    yield "random", stats.LossSums(torch.tensor(2.5, dtype=torch.float64), counts, maxima), edges, True


@pytest.mark.parametrize("num_updates", [1, 3])
def test_loss_metrics_kernel_equals_the_python_definition(num_updates):
    """`LossSums.metrics` through `ops.loss_metrics` gives its Python body's dict: the same keys in
    the same order and equal values (the same arithmetic in the same order), with and without LA
    statistics, no valid token, and buckets without tokens left out."""
    for name, sums, edges, adaptive in metric_cases():
        for adaptive_clip in {adaptive, False}:
            kw = dict(num_updates=num_updates, bucket_edges=edges, adaptive_clip=adaptive_clip)
            kernel, python = sums.metrics(**kw), sums._metrics_definition(**kw)
            assert list(kernel) == list(python), name
            assert kernel == python, (name, {k: (kernel[k], python[k]) for k in kernel if kernel[k] != python[k]})
    assert [key for key in kernel if key.startswith("clip_rate")] == ["clip_rate_by_pos/16-63", "clip_rate_by_pos/64+"]


def test_policy_metrics_in_one_call_equal_loss_sums_metrics():
    """`policy_metrics` (`ops.loss_stats_metrics`: statistics and values in one call) equals
    `LossSums.from_terms(...).metrics(...)` without the loss, for every config."""
    for name, cfg in CONFIGS.items():
        lp, olp, adv, mask = batch(torch.float32, B=3, S=300, spread=0.3)
        _, _, terms = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, return_terms=True)
        edges = position_bucket_edges(300)
        sums = stats.LossSums.from_terms(terms, mask, adv, cfg, loss=torch.zeros(()), dp_size=1, bucket_edges=edges)
        expected = sums.metrics(num_updates=1, bucket_edges=edges, adaptive_clip=terms.la_scale is not None)
        del expected["loss"]
        assert stats.policy_metrics(terms, mask, adv, cfg) == expected, name


def test_loss_metrics_bad_inputs_name_the_problem():
    layout = dict(num_exp=3, num_buckets=4, num_updates=1, adaptive_clip=True, qs=[0.5], **histogram.KERNEL_LAYOUT)
    size = ops.loss_stats_sections(3, histogram.NUM_BINS, 4)["position_tokens"].stop
    maxima = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"sums must be a contiguous float64 \[%d\]" % size):
        ops.loss_metrics(torch.zeros(size - 1, dtype=torch.float64), maxima, loss=0.0, **layout)
    with pytest.raises(RuntimeError, match="sums must be a contiguous float64"):
        ops.loss_metrics(torch.zeros(size), maxima, loss=0.0, **layout)
    with pytest.raises(RuntimeError, match=r"maxima must be a contiguous float64 \[4\]"):
        ops.loss_metrics(torch.zeros(size, dtype=torch.float64), maxima[:3], loss=0.0, **layout)
    with pytest.raises(RuntimeError, match="quantile 2 is outside"):
        ops.loss_metrics(torch.zeros(size, dtype=torch.float64), maxima, loss=0.0, **{**layout, "qs": [2.0]})
    with pytest.raises(RuntimeError, match="quantile -0.5 is outside"):
        torch.ops.ctpo_megatron.loss_stats_metrics(*raw_args(), [-0.5], True)


def test_loss_metrics_opcheck():
    size = ops.loss_stats_sections(1, histogram.NUM_BINS, 4)["position_tokens"].stop
    sums = torch.zeros(size, dtype=torch.float64)
    sums[0] = 2.0
    layout = histogram.KERNEL_LAYOUT
    torch.library.opcheck(torch.ops.ctpo_megatron.loss_metrics.default,
                          (sums, torch.zeros(4, dtype=torch.float64), 0.5, 1, 4, 2, True, [0.5, 0.9],
                           layout["hist_shift"], layout["hist_first"], layout["hist_bins"]),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.ctpo_megatron.loss_stats_metrics.default, (*raw_args(), [0.5], True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("power", [0.5, 1.0, 0.3, -0.5, 0.0])
@pytest.mark.parametrize("threads", [1, 2])
def test_la_median_from_the_rows_equals_the_histograms(power, threads):
    """With running positions `loss_stats_metrics` takes the LA scales' median from the rows'
    counts and the position tables (bisection over the runs of equal bins) instead of filling
    and walking their histogram: equal to the median of `loss_stats`' histogram bit for bit,
    for scales that grow (power > 0), shrink (< 0) or stay (0) with the position, ragged rows,
    rows without a valid token, one long row, and rows split over threads."""
    g = torch.Generator().manual_seed(7)
    shapes = [(5, 700), (1, 20000), (4, 40000), (3, 33)]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for B, S in shapes:
            valid = torch.rand(B, S, generator=g) > 0.3
            valid[:, int(S * 0.6):] &= torch.rand(B, 1, generator=g) > 0.5  # ragged ends
            if B > 1:
                valid[0] = False  # a row without a valid token
            values = torch.rand(B, S, generator=g) + 0.5
            flags = tuple(torch.rand(B, S, generator=g) > 0.8 for _ in range(4))
            args = [valid, values - 1.0, values, values.log(), None, power, *flags, None,
                    position_bucket_edges(S), [0.28], *histogram.KERNEL_LAYOUT.values()]
            fused = torch.ops.ctpo_megatron.loss_stats_metrics(*args, [0.5], True).tolist()
            sums, maxima = torch.ops.ctpo_megatron.loss_stats(*args)
            composed = ops.loss_metrics(sums, maxima, loss=0.0, num_exp=1, num_buckets=len(args[11]), num_updates=1,
                                        adaptive_clip=True, qs=[0.5], **histogram.KERNEL_LAYOUT)
            median = 17 + 1 + 3  # the leading values, one ratio quantile, la_scale_{mean,min,max}, la_scale_p50
            assert composed[median] > 0 and (composed[median] == 1.0) == (power == 0)
            assert fused == pytest.approx(composed, nan_ok=True, rel=0, abs=0), (B, S)
    finally:
        torch.set_num_threads(old)


def test_loss_stats_metrics_reuses_a_clean_buffer_across_calls_and_errors():
    """`loss_stats_metrics` keeps its statistics in a per-thread buffer that it clears after each
    call (only the bins written): calls in a row with other data, shapes, LA modes and bucket
    counts, also after an error half-way through the statistics, each equal `loss_stats` and
    `loss_metrics` on fresh zeros."""
    qs = [0.99, 0.5, 0.01]

    def both(args, adaptive_clip):
        fused = torch.ops.ctpo_megatron.loss_stats_metrics(*args, qs, adaptive_clip)
        sums, maxima = torch.ops.ctpo_megatron.loss_stats(*args)
        composed = ops.loss_metrics(sums, maxima, loss=0.0, num_exp=len(args[12]), num_buckets=len(args[11]),
                                    num_updates=1, adaptive_clip=adaptive_clip, qs=qs, **histogram.KERNEL_LAYOUT)
        return fused.tolist(), composed

    calls = []
    for seed, (B, S, spread) in enumerate([(3, 300, 3.0), (1, 64, 0.01), (2, 1000, 0.5)]):
        for cfg in CONFIGS.values():
            lp, olp, adv, mask = batch(torch.float32, B=B, S=S, spread=spread)
            _, _, terms = policy_loss(lp, olp, adv, mask, cfg, with_metrics=False, return_terms=True)
            edges = position_bucket_edges(S, max_buckets=4 + seed)
            kw = stats._kernel_args(terms, mask > 0, adv.reshape(B, -1).expand(B, S).contiguous(), edges, None,
                                    stats._coefficients(cfg), cfg.la_power)
            calls.append(([kw["valid"], kw["advantages"], kw["ratio"], kw["log_ratio"], kw["la_scale"], kw["la_power"],
                           *kw["flags"], None, list(kw["bucket_edges"]), list(kw["exp_coeffs"]),
                           *histogram.KERNEL_LAYOUT.values()], terms.la_scale is not None))
    for args, adaptive_clip in calls + calls[::-1]:
        fused, composed = both(args, adaptive_clip)
        assert fused == pytest.approx(composed, nan_ok=True, rel=0, abs=0)
    # An error in the middle of the statistics (a position above the LA tables' limit, found in
    # a later row than the first one's counts) leaves nothing behind for the next call.
    args, adaptive_clip = calls[0]
    bad = list(args)
    bad[4], bad[5] = None, 0.5
    bad[10] = torch.ones(args[0].shape, dtype=torch.int64)
    bad[10][-1, -1] = (1 << 30) + 1
    bad[0] = torch.ones_like(args[0])
    with pytest.raises(RuntimeError, match="is above"):
        torch.ops.ctpo_megatron.loss_stats_metrics(*bad, qs, True)
    for args, adaptive_clip in calls:
        fused, composed = both(args, adaptive_clip)
        assert fused == pytest.approx(composed, nan_ok=True, rel=0, abs=0)


def test_generic_loops_equal_the_torch_path_too():
    """The CPU kernel's generic float32 loops (machines without AVX-512 BW run them; this one
    takes one AVX-512 pass per tile): the kernel-against-torch tests again, in a process where
    CTPO_CPU_GENERIC_STATS=1 turns that pass off."""
    selected = ("kernel_sums_equal_torch_sums or random_masks or threads_split or long_rows or odd_edges "
                "or la_statistics_by_position or buffer_across_calls")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", selected]
    result = subprocess.run(command, env={**os.environ, "CTPO_CPU_GENERIC_STATS": "1"},
                            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "deselected" in result.stdout
