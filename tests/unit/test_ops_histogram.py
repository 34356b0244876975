"""The `histogram_quantiles` op against its numpy definition (`algo.histogram`): equal results,
bit for bit, over random histograms with and without the extremes and the total, NaN and
out-of-range values, ties, one value and none; its input errors and opcheck."""

from __future__ import annotations

import pytest
import torch

from ctpo_megatron import ops
from ctpo_megatron.algo import histogram

pytestmark = pytest.mark.csrc  # tests/conftest.py: a failure in CI without the extension, a skip elsewhere

QS = [0.99, 0.95, 0.9, 0.75, 0.5, 0.25, 0.0, 1.0, 0.3333]
LAYOUT = dict(hist_shift=histogram.KERNEL_LAYOUT["hist_shift"], hist_first=histogram.KERNEL_LAYOUT["hist_first"])


def cases():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 10, 1000, 70000):
        for spread in (1e-3, 0.1, 3.0):
            values = torch.exp(spread * torch.randn(n, generator=g, dtype=torch.float64))
            yield f"n{n}-s{spread}", values
    yield "ties", torch.tensor([1.0] * 50 + [1.5] * 50, dtype=torch.float64)
    yield "out-of-range", torch.tensor([1e-30, 0.5, 2.0, 1e30], dtype=torch.float64)  # first and last bin
    yield "nan", torch.tensor([float("nan"), 0.9, 1.1, 1.2], dtype=torch.float64)


@pytest.mark.parametrize("known", ["extremes-and-total", "extremes", "nothing"])
def test_kernel_equals_numpy_bit_for_bit(known):
    for name, values in cases():
        counts = histogram.histogram(values, torch.ones_like(values))
        finite = values[~values.isnan()]
        lo = hi = total = None
        if known != "nothing":
            lo, hi = float(finite.min()), float(finite.max())
        if known == "extremes-and-total":
            total = float(counts.sum())
        kernel = ops.histogram_quantiles(counts, QS, lo=lo, hi=hi, total=total, **LAYOUT)
        numpy = histogram._numpy_quantiles(counts.numpy(), QS, lo=lo, hi=hi, total=total)
        assert kernel == numpy, (name, kernel, numpy)
        assert histogram.histogram_quantiles(counts, QS, lo=lo, hi=hi, total=total) == kernel  # it takes the op


def test_empty_histogram_and_no_quantiles():
    zeros = torch.zeros(histogram.NUM_BINS, dtype=torch.float64)
    assert ops.histogram_quantiles(zeros, [0.5, 0.9], lo=None, hi=None, total=None, **LAYOUT) == [0.0, 0.0]
    assert ops.histogram_quantiles(zeros, [0.5], lo=1.0, hi=2.0, total=0.0, **LAYOUT) == [0.0]
    ones = histogram.histogram(torch.ones(4), torch.ones(4))
    assert ops.histogram_quantiles(ones, [], lo=1.0, hi=1.0, total=4.0, **LAYOUT) == []


def test_bad_inputs_name_the_problem():
    counts = torch.zeros(histogram.NUM_BINS, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="counts must be a 1-d float64 tensor"):
        ops.histogram_quantiles(counts.float(), [0.5], lo=None, hi=None, total=None, **LAYOUT)
    with pytest.raises(RuntimeError, match="counts must be a 1-d float64 tensor"):
        ops.histogram_quantiles(counts.reshape(2, -1), [0.5], lo=None, hi=None, total=None, **LAYOUT)
    with pytest.raises(RuntimeError, match="quantile 1.5 is outside"):
        ops.histogram_quantiles(counts, [1.5], lo=None, hi=None, total=None, **LAYOUT)


def test_opcheck():
    counts = histogram.histogram(torch.tensor([0.5, 1.0, 2.0]), torch.ones(3))
    torch.library.opcheck(torch.ops.ctpo_megatron.histogram_quantiles.default,
                          (counts, [0.25, 0.5], 0.5, 2.0, 3.0, LAYOUT["hist_shift"], LAYOUT["hist_first"]),
                          test_utils=("test_schema", "test_faketensor"))
