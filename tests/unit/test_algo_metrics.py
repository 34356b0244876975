"""Loss metrics (quantiles, clip counters) and the clip rate by token position."""

from __future__ import annotations

import math

import pytest
import torch

from ctpo_megatron.algo import (PolicyLossConfig, clip_rate_by_position, ctpo_token_terms, policy_loss,
                                position_bucket_edges, position_clip_metrics)
from ctpo_megatron.algo import histogram


def _bin_width(value: float) -> float:
    edges = histogram.bin_edges()
    k = int(torch.searchsorted(edges, torch.tensor([value], dtype=torch.float64), right=True)) - 1
    return float(edges[k + 1] - edges[k])


@pytest.fixture(params=[pytest.param("kernel", marks=pytest.mark.csrc), "numpy"])
def quantile_path(request, monkeypatch):
    """histogram_quantiles through the extension's op (`csrc`: see tests/conftest.py) or its
    numpy definition."""
    from ctpo_megatron import ops

    if request.param == "numpy":
        monkeypatch.setattr(ops, "histogram_quantiles_kernel_for", lambda device: False)
    return request.param


def test_histogram_quantiles_match_torch_quantile_within_a_bin(quantile_path):
    g = torch.Generator().manual_seed(0)
    qs = [0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 1.0]
    samples = {n: torch.exp(0.05 * torch.randn(n, generator=g, dtype=torch.float64)) for n in (1, 2, 7, 1000)}
    samples["wide"] = torch.exp(3.0 * torch.randn(5000, generator=g, dtype=torch.float64))  # 1e-6 .. 1e5
    samples["ties"] = torch.tensor([1.0] * 50 + [1.5] * 50, dtype=torch.float64)
    for name, values in samples.items():
        counts = histogram.histogram(values, torch.ones_like(values))
        assert counts.sum() == values.numel()
        exact = torch.quantile(values, torch.tensor(qs, dtype=torch.float64))
        est = histogram.histogram_quantiles(counts, qs, lo=float(values.min()), hi=float(values.max()))
        ordered = values.sort().values
        for q, e, x in zip(qs, est, exact.tolist()):
            rank = q * (values.numel() - 1)
            width = max(_bin_width(float(ordered[math.floor(rank)])), _bin_width(float(ordered[math.ceil(rank)])))
            assert abs(e - x) <= width, (name, q, e, x, width)
            assert abs(e - x) <= 2 ** -histogram.SUB_BITS * x + 1e-12, (name, q)  # ~0.1% relative
        assert est[0] == float(values.min()) and est[-1] == float(values.max())
    # equal values come back exactly (clamped to the exact min and max)
    ones = histogram.histogram(torch.ones(10), torch.ones(10))
    assert histogram.histogram_quantiles(ones, [0.5], lo=1.0, hi=1.0) == [1.0]
    # weights leave tokens out; an empty histogram gives zeros
    values = torch.tensor([1.0, 100.0, 2.0])
    assert histogram.histogram_quantiles(histogram.histogram(values, torch.tensor([1.0, 0.0, 1.0])), [1.0])[0] < 2.01
    assert histogram.histogram_quantiles(torch.zeros(histogram.NUM_BINS), [0.5]) == [0.0]


def test_histogram_bins_are_log_spaced_and_clamp_out_of_range_values():
    edges = histogram.bin_edges()
    assert edges[0] == 2.0 ** histogram.LOG2_MIN and edges[-1] == 2.0 ** histogram.LOG2_MAX
    widths = (edges[1:] - edges[:-1]) / edges[:-1]
    assert widths.max() <= 2 ** -histogram.SUB_BITS and widths.min() >= 2 ** -(histogram.SUB_BITS + 1)
    values = torch.tensor([0.0, 1e-30, 1.0, 1.0009, 1e30, float("inf")])
    index = histogram.bin_index(values).tolist()
    assert index[:2] == [0, 0] and index[-2:] == [histogram.NUM_BINS - 1] * 2
    one = index[2]
    assert edges[one] == 1.0 and index[3] == one  # 1.0009 < 1 + 2**-10
    # every float32 value lands in the bin whose edges hold it
    v = torch.exp(torch.linspace(-10, 10, 10001)).float()
    k = histogram.bin_index(v).long()
    assert ((edges[k] <= v.double()) & (v.double() < edges[k + 1])).all()


def test_bucket_edges_are_powers_of_two():
    assert position_bucket_edges(1) == [1]
    assert position_bucket_edges(20) == [1, 2, 4, 8, 16]
    with pytest.raises(ValueError, match="max_position"):
        position_bucket_edges(0)


def test_clip_rate_by_position_counts_generated_positions():
    # one row: tokens at columns 0..6; columns 2-3 are tool output (do not advance n_t)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1]])
    clip = torch.tensor([[False, True, True, True, False, True, True]])
    # n_t of generated tokens: 1, 2, 3, 4, 5 -> buckets [1], [2,3], [4,7]
    clipped, tokens = clip_rate_by_position(clip, mask, bucket_edges=[1, 2, 4])
    assert tokens.tolist() == [1, 2, 2] and clipped.tolist() == [0, 1, 2]
    assert position_clip_metrics(clipped, tokens, [1, 2, 4]) == {
        "clip_rate_by_pos/1-1": 0.0, "clip_rate_by_pos/2-3": 0.5, "clip_rate_by_pos/4+": 1.0}
    # buckets starting above 1 drop earlier positions; an empty bucket is left out of the metrics
    clipped, tokens = clip_rate_by_position(clip, mask, bucket_edges=[2, 10])
    assert tokens.tolist() == [4, 0] and clipped.tolist() == [3, 0]
    assert position_clip_metrics(clipped, tokens, [2, 10]) == {"clip_rate_by_pos/2-9": 0.75}
    with pytest.raises(ValueError, match="bucket_edges"):
        clip_rate_by_position(clip, mask, bucket_edges=[4, 2])


def test_position_counts_sum_over_micro_batches():
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(8, 64, generator=g, dtype=torch.float64)
    olp = lp + 0.3 * torch.randn(8, 64, generator=g, dtype=torch.float64)
    adv = torch.randn(8, 1, generator=g, dtype=torch.float64).expand(8, 64)
    mask = (torch.rand(8, 64, generator=g) > 0.2).double()
    terms = ctpo_token_terms(lp, olp, adv, mask, PolicyLossConfig())
    whole = clip_rate_by_position(terms.clip_any, mask)
    halves = [clip_rate_by_position(terms.clip_any[i:i + 4], mask[i:i + 4]) for i in (0, 4)]
    assert torch.equal(whole[0], halves[0][0] + halves[1][0]) and torch.equal(whole[1], halves[0][1] + halves[1][1])
    assert whole[1].sum().item() == mask.sum().item()
    assert whole[0].sum().item() == terms.clip_any.sum().item()
    # the adaptive window widens with position: clip rate falls from the first to the last bucket
    rates = whole[0].double() / whole[1].clamp(min=1)
    assert rates[0] > rates[-1]


def test_loss_metrics_are_floats_with_reference_relations():
    g = torch.Generator().manual_seed(2)
    lp = -torch.rand(6, 30, generator=g)
    olp = lp + 0.2 * torch.randn(6, 30, generator=g)
    adv = torch.randn(6, 1, generator=g).expand(6, 30)
    mask = (torch.rand(6, 30, generator=g) > 0.3).float()
    _, m = policy_loss(lp.requires_grad_(True), olp, adv, mask, PolicyLossConfig())
    assert all(type(v) is float for v in m.values())
    n = mask.sum().item()
    assert m["valid_tokens"] == n
    assert m["clip_count_total"] <= m["clip_count_high"] + m["clip_count_low"] + m["clip_count_dual"]
    assert m["clipfrac_dual"] == pytest.approx(m["pg_clipfrac_lower"], rel=1e-6)
    assert m["is_ratio_min"] <= m["is_ratio_p25"] <= m["is_ratio_p50"] <= m["is_ratio_p99"] <= m["is_ratio_max"]
    assert m["la_scale_min"] == 1.0 and m["la_scale_max"] == pytest.approx(mask.sum(-1).max().item() ** 0.5)
    assert m["ppo_kl"] == pytest.approx(((olp - lp) * mask).sum().item() / n, rel=1e-5)
    _, m_plain = policy_loss(lp, olp, adv, mask, PolicyLossConfig(adaptive_clip=False))
    assert "la_scale_mean" not in m_plain and "clipfrac_high" in m_plain


def test_bin_of_one_float_matches_bin_index():
    """The host-side bin of the extremes (`histogram_quantiles`' window) is `bin_index`'s."""
    values = [0.0, -1.0, 1e-30, 2.0 ** -16, 0.5, 1.0, 1.0001, 3.7, 65535.0, 1e30, 1e39, -1e39, float("inf"),
              float("nan")]
    expected = histogram.bin_index(torch.tensor(values, dtype=torch.float64)).tolist()
    assert [histogram._bin_of(v) for v in values] == expected
