"""Fixed-bin histograms of positive values (importance ratios, LA clip scales): quantiles
without sorting, additive over micro-batches and ranks.

A value v > 0 lands in a bin by its float32 bit pattern: exponent and the top `SUB_BITS`
mantissa bits. Bins are therefore log-spaced, 2**SUB_BITS per octave, each one of relative
width 2**-SUB_BITS (about 0.1%), over [2**LOG2_MIN, 2**LOG2_MAX); values outside (0, inf and
NaN included) are counted in the first or last bin. Building a histogram is one shift, one
clamp and one `index_add_` on the device, with no host sync; `histogram_quantiles` turns the
(summed) counts into torch.quantile-style quantiles on the host once per step.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence

import numpy as np
import torch

from ctpo_megatron import ops

SUB_BITS = 10
"""Bins per octave = 2**SUB_BITS: relative bin width 2**-10 (~0.1%)."""
LOG2_MIN, LOG2_MAX = -16, 16
"""Octaves covered: [2**-16, 2**16) (ratios exp(x), x <= 10, stay below 2**15)."""
NUM_BINS = (LOG2_MAX - LOG2_MIN) << SUB_BITS
_MANTISSA_BITS = 23  # float32
_FIRST = (127 + LOG2_MIN) << SUB_BITS  # biased exponent of 2**LOG2_MIN, shifted like the bins
KERNEL_LAYOUT = {"hist_shift": _MANTISSA_BITS - SUB_BITS, "hist_first": _FIRST, "hist_bins": NUM_BINS}
"""The bin layout as `ops.loss_stats` takes it (the kernel bins exactly like `bin_index`)."""


def bin_index(values: torch.Tensor) -> torch.Tensor:
    """int32 bin of every value (same shape), in [0, NUM_BINS). Cast to float32 first: its bit
    pattern is monotone in the value for positive floats, so the shift is a log2 binning."""
    bits = values.detach().to(torch.float32).contiguous().view(torch.int32)
    return ((bits >> (_MANTISSA_BITS - SUB_BITS)) - _FIRST).clamp_(0, NUM_BINS - 1)


def histogram(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[NUM_BINS] float64 counts: sum of `weights` per bin of `values` (same shape; e.g. the
    float64 response mask, so that invalid tokens count 0). On the values' device, no sync."""
    counts = torch.zeros(NUM_BINS, dtype=torch.float64, device=values.device)
    return counts.index_add_(0, bin_index(values).reshape(-1), weights.reshape(-1).to(torch.float64))


@functools.lru_cache(maxsize=1)
def bin_edges() -> torch.Tensor:
    """[NUM_BINS + 1] float64: bin k holds values in [edges[k], edges[k+1]) (exactly, for
    float32 values inside the covered range). Cached: do not modify it."""
    k = torch.arange(NUM_BINS + 1, dtype=torch.float64)
    octave, sub = torch.div(k, 1 << SUB_BITS, rounding_mode="floor"), k.remainder(1 << SUB_BITS)
    return torch.exp2(octave + LOG2_MIN) * (1 + sub / (1 << SUB_BITS))


def histogram_quantiles(counts: torch.Tensor, qs: Sequence[float], *, lo: float | None = None,
                        hi: float | None = None, total: float | None = None) -> list[float]:
    """Quantiles of the values counted in `counts` ([NUM_BINS], any device), as torch.quantile
    computes them (linear interpolation between the order statistics at rank q (n - 1)), with
    every order statistic estimated inside its bin (its elements spread evenly over the bin).
    Each result is within one bin width of the exact quantile (the widest bin of the two order
    statistics it interpolates). lo, hi: the exact minimum and maximum, if known; results are
    clamped to them, and q = 0 and q = 1 give them exactly. total: the sum of `counts`, if
    known (saves a pass over all bins). Returns len(qs) floats, 0.0 each when the counts are
    empty."""
    if counts.requires_grad or counts.device.type != "cpu" or counts.dtype != torch.float64:
        counts = counts.detach().to(device="cpu", dtype=torch.float64)  # (a no-op call costs microseconds)
    if ops.histogram_quantiles_kernel_for(counts.device):
        return ops.histogram_quantiles(counts, qs, lo=lo, hi=hi, total=total, hist_shift=KERNEL_LAYOUT["hist_shift"],
                                       hist_first=KERNEL_LAYOUT["hist_first"])
    return _numpy_quantiles(counts.numpy(), qs, lo=lo, hi=hi, total=total)


def _numpy_quantiles(counts_np: np.ndarray, qs: Sequence[float], *, lo: float | None, hi: float | None,
                     total: float | None) -> list[float]:
    """`histogram_quantiles` in numpy (its definition; the kernel computes the same in C++)."""
    edges_np = _bin_edges_np()
    if lo is not None and hi is not None and lo <= hi:
        # Only the bins between the extremes hold counts: the cumulative sum needs no more
        # (ratios cover a few thousand of the 32768 bins). NaN or out-of-range values would
        # sit outside: then the sums differ and all bins are used.
        first, last = _bin_of(lo), _bin_of(hi)
        window = counts_np[first:last + 1]
        cum = np.cumsum(window)
        if cum[-1] == (counts_np.sum() if total is None else total):
            return _quantiles(window, cum, edges_np[first:last + 2], qs, lo, hi)
    return _quantiles(counts_np, np.cumsum(counts_np), edges_np, qs, lo, hi)


def _bin_of(value: float) -> int:
    """`bin_index` of one Python float, without building a tensor or an array."""
    try:
        (bits,) = struct.unpack("<i", struct.pack("<f", value))
    except OverflowError:  # beyond float32: inf, the last bin, as bin_index does
        return NUM_BINS - 1 if value > 0 else 0
    return min(max((bits >> (_MANTISSA_BITS - SUB_BITS)) - _FIRST, 0), NUM_BINS - 1)


@functools.lru_cache(maxsize=1)
def _bin_edges_np() -> np.ndarray:
    return bin_edges().numpy()


def _quantiles(counts_np: np.ndarray, cum: np.ndarray, edges_np: np.ndarray, qs: Sequence[float],
               lo: float | None, hi: float | None) -> list[float]:
    """`histogram_quantiles` over a run of consecutive bins: counts [K], their cumulative sum
    [K], edges [K + 1]. In numpy: a handful of small array operations, where torch's per-call
    overhead would cost more than the work."""
    n = float(cum[-1])
    if n <= 0:
        return [0.0] * len(qs)
    rank = np.asarray(qs, dtype=np.float64) * (n - 1)
    lower, upper = np.floor(rank), np.ceil(rank)

    def order_statistic(r: np.ndarray) -> np.ndarray:
        k = np.minimum(np.searchsorted(cum, r, side="right"), counts_np.size - 1)  # first bin with cum > r
        inside = (r - (cum[k] - counts_np[k]) + 0.5) / counts_np[k]
        value = edges_np[k] + inside * (edges_np[k + 1] - edges_np[k])
        # The smallest and largest order statistics are the exact extremes, when known.
        if lo is not None:
            value = np.where(r == 0, lo, value)
        if hi is not None:
            value = np.where(r == n - 1, hi, value)
        return value

    both = order_statistic(np.concatenate([lower, upper]))
    low_value, high_value = both[:len(qs)], both[len(qs):]
    out = low_value + (rank - lower) * (high_value - low_value)
    if lo is not None or hi is not None:
        out = np.clip(out, lo, hi)
    return out.tolist()
