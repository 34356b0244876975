"""`loss_stats`: the additive statistics of one micro-batch's policy-loss terms in one kernel
pass (the raw op behind `algo.stats.LossSums.from_terms`).

One pass over the valid tokens sums the counts (tokens, negative advantages, the four clip
flags, l2 > l1), -d_t, r_t and the LA scale g_t, keeps their extremes, counts r_t and g_t in
the log-bin histograms of `algo.histogram`, sums exp(c g_t) per coefficient and counts tokens
and clipped tokens per position bucket: what ~25 separate torch reductions (each a full pass
plus a temporary) computed before. The pure-torch definition, and the path on devices without
kernels, is `LossSums.from_terms` itself. `ops` never imports `algo`: the histogram layout
comes in as arguments.

`loss_metrics` turns such statistics into the metric values of `LossSums.metrics` (whose
Python body defines them) in one call on the host, and `loss_stats_metrics` does both for one
micro-batch (`algo.stats.policy_metrics`), its statistics in a per-thread buffer instead of a
new 0.5 MB vector: at one micro-batch, the ~15 tensor calls and the Python that built the
values, and zeroing that vector, cost as much as the pass over the tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ctpo_megatron.ops._backend import cpu_kernel_for, dense, extension_backends, op_overload

_OP = "ctpo_megatron::loss_stats"

# Leading slots of `LossStatsOut.sums` and the slots of `LossStatsOut.maxima`
# (csrc/include/ctpo/loss_stats.h: SumSlot, MaxSlot).
SUM_SLOTS = ("tokens", "neg_adv_tokens", "clip_high", "clip_low", "clip_dual", "clip_any", "clipped",
             "neg_log_ratio", "ratio_sum", "la_scale_sum")
MAX_SLOTS = ("ratio_max", "ratio_neg_min", "la_scale_max", "la_scale_neg_min")


def sum_sections(num_exp: int, hist_bins: int, num_buckets: int) -> dict[str, slice]:
    """Where each section lies in `LossStatsOut.sums` (StatsLayout in the header): the
    SUM_SLOTS, "exp_sums" [num_exp], "ratio_hist" and "la_scale_hist" [hist_bins] each,
    "position_clipped" and "position_tokens" [num_buckets] each (the last one ends the vector)."""
    sizes = {"scalars": len(SUM_SLOTS), "exp_sums": num_exp, "ratio_hist": hist_bins, "la_scale_hist": hist_bins,
             "position_clipped": num_buckets, "position_tokens": num_buckets}
    out, offset = {}, 0
    for name, size in sizes.items():
        out[name] = slice(offset, offset + size)
        offset += size
    return out


class LossStatsOut(NamedTuple):
    """float64 results on the inputs' device: two vectors, so that a step sums them with one
    add and one max (and reduces them over ranks with two all-reduces)."""

    sums: torch.Tensor
    """[sum_sections(...)["position_tokens"].stop]: the sums named in SUM_SLOTS (the la_scale slot 0 without
    la_scale or la_power), sum exp(c g_t) per exp_coeffs entry (0 without LA), the histograms
    of r_t and g_t (valid-token counts per bin; g_t's zeros without LA), then clipped (high,
    low or dual) and valid tokens per position bucket."""
    maxima: torch.Tensor
    """[len(MAX_SLOTS)]: max and -min of r_t and of g_t over the valid tokens (0 and -inf when
    there is none, or no LA scale)."""


def loss_stats_kernel_for(device: torch.device) -> bool:
    """Whether the op has a kernel for `device`: the CPU build of the extension. On CUDA the
    caller's torch reductions run instead (no host sync either; a CUDA kernel is not written)."""
    return cpu_kernel_for(device)


def loss_stats(valid: torch.Tensor, advantages: torch.Tensor, ratio: torch.Tensor, log_ratio: torch.Tensor,
               la_scale: torch.Tensor | None, flags: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
               *, positions: torch.Tensor | None, bucket_edges: Sequence[int],
               exp_coeffs: tuple[float, ...], hist_shift: int, hist_first: int, hist_bins: int,
               la_power: float | None = None) -> LossStatsOut:
    """Runs the op (call only where `loss_stats_kernel_for(device)`).

    valid: [..., S] bool, the token mask; advantages, ratio, log_ratio, la_scale (optional):
    like valid, one float dtype (float32 or float64); flags: (clip_high, clip_low, clip_dual,
    clipped) bool like valid; positions: optional int64 like valid, the position n_t of each
    token (default: the running count of valid tokens along the last dimension);
    bucket_edges: K strictly increasing positions >= 1, bucket k holding positions
    [bucket_edges[k], bucket_edges[k + 1]) and the last one those from its edge up (positions
    below the first edge are left out); exp_coeffs: the c of each exp(c g_t) sum
    (equal ones are evaluated once); hist_*: the bin layout of `algo.histogram`.
    la_power: instead of la_scale (pass one or neither), the LA scale of every valid token is
    g_t = max(n_t, 1)^la_power with n_t its position as above: what the CTPO loss computed
    when the positions are its own n_t. Its statistics are then taken per distinct position,
    each weighted by its tokens: B rows of S tokens cost S evaluations, and no [B, S] scale
    tensor is read.
    """
    return LossStatsOut(*op_overload("loss_stats")(*_stats_args(
        valid, advantages, ratio, log_ratio, la_scale, flags, positions, bucket_edges, exp_coeffs,
        hist_shift, hist_first, hist_bins, la_power)))


def loss_stats_metrics(valid: torch.Tensor, advantages: torch.Tensor, ratio: torch.Tensor, log_ratio: torch.Tensor,
                       la_scale: torch.Tensor | None,
                       flags: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], *,
                       positions: torch.Tensor | None, bucket_edges: Sequence[int],
                       exp_coeffs: tuple[float, ...], hist_shift: int, hist_first: int, hist_bins: int,
                       qs: Sequence[float], adaptive_clip: bool, la_power: float | None = None) -> list[float]:
    """`loss_stats` and `loss_metrics` of its result (loss 0, one update) in one call: the
    metric values of one micro-batch (arguments as there; call only where
    `loss_stats_kernel_for(device)`)."""
    return op_overload("loss_stats_metrics")(*_stats_args(
        valid, advantages, ratio, log_ratio, la_scale, flags, positions, bucket_edges, exp_coeffs,
        hist_shift, hist_first, hist_bins, la_power), [float(q) for q in qs], bool(adaptive_clip)).tolist()


def loss_metrics(sums: torch.Tensor, maxima: torch.Tensor, *, loss: float, num_exp: int, num_buckets: int,
                 num_updates: int, adaptive_clip: bool, qs: Sequence[float], hist_shift: int, hist_first: int,
                 hist_bins: int) -> list[float]:
    """The metric values of a `loss_stats` result summed over `num_updates` optimizer updates
    (`algo.stats.LossSums.metrics` defines them and names them, `METRIC_KEYS`), on the host:
    sums, maxima: `LossStatsOut`'s vectors (float64, CPU); loss: the summed loss; qs: the ratio
    quantiles. Returns 17 + len(qs) + 4 + num_exp + num_buckets floats: the LA ones 0 unless
    adaptive_clip and a valid token, a position bucket without tokens NaN."""
    return op_overload("loss_metrics")(sums, maxima, float(loss), int(num_exp), int(num_buckets), int(num_updates),
                                       bool(adaptive_clip), [float(q) for q in qs], int(hist_shift), int(hist_first),
                                       int(hist_bins)).tolist()


def _stats_args(valid, advantages, ratio, log_ratio, la_scale, flags, positions, bucket_edges, exp_coeffs,
                hist_shift, hist_first, hist_bins, la_power) -> tuple:
    """The op's positional arguments, in its dtypes and contiguous."""
    dtype = ratio.dtype
    return (dense(valid), dense(advantages, dtype), dense(ratio), dense(log_ratio, dtype),
            None if la_scale is None else dense(la_scale, dtype), None if la_power is None else float(la_power),
            *(dense(f) for f in flags), None if positions is None else dense(positions, torch.int64),
            bucket_edges, [float(c) for c in exp_coeffs], int(hist_shift), int(hist_first),
            int(hist_bins))


def metric_count(num_exp: int, num_quantiles: int, num_buckets: int) -> int:
    """How many values `loss_metrics` returns."""
    return 17 + num_quantiles + 4 + num_exp + num_buckets


def _register() -> None:
    @torch.library.register_fake(_OP)
    def _fake(valid, advantages, ratio, log_ratio, la_scale, la_power, clip_high, clip_low, clip_dual, clipped,
              positions, bucket_edges, exp_coeffs, hist_shift, hist_first, hist_bins):
        size = sum_sections(len(exp_coeffs), hist_bins, len(bucket_edges))["position_tokens"].stop
        return (valid.new_empty((size,), dtype=torch.float64), valid.new_empty((len(MAX_SLOTS),), dtype=torch.float64))

    @torch.library.register_fake("ctpo_megatron::loss_metrics")
    def _fake_metrics(sums, maxima, loss, num_exp, num_buckets, num_updates, adaptive_clip, qs, hist_shift,
                      hist_first, hist_bins):
        return sums.new_empty((metric_count(num_exp, len(qs), num_buckets),))

    @torch.library.register_fake("ctpo_megatron::loss_stats_metrics")
    def _fake_stats_metrics(valid, advantages, ratio, log_ratio, la_scale, la_power, clip_high, clip_low, clip_dual,
                            clipped, positions, bucket_edges, exp_coeffs, hist_shift, hist_first, hist_bins, qs,
                            adaptive_clip):
        return valid.new_empty((metric_count(len(exp_coeffs), len(qs), len(bucket_edges)),), dtype=torch.float64)


if extension_backends():
    _register()
