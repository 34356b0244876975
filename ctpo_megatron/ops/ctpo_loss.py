"""`ctpo_token_loss`: the per-token CTPO terms from one fused kernel pass (the raw op).

One kernel pass per sequence scans the clamped log-ratios and evaluates the surrogate, its
derivative with respect to the log-prob (kept for the backward: the gradient reaches only the
current token), the ratio, the log-ratio, the LA scale and the clip flags. This module knows
nothing about configs or `TokenTerms`: `ctpo_megatron.algo.ctpo.fused_ctpo_token_terms` wraps
it (and falls back to algo's pure-torch `ctpo_token_terms`, the kernel's one reference, on
devices without kernels). `ops` never imports `algo`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ctpo_megatron.ops import reference
from ctpo_megatron.ops._backend import cpu_kernel_for, dense, extension_backends, op_overload, use_extension
from ctpo_megatron.ops.loss_stats import MAX_SLOTS, LossStatsOut, metric_count, sum_sections

_OP = "ctpo_megatron::ctpo_token_loss"
_METRICS_OP = "ctpo_megatron::ctpo_token_loss_metrics"
_STATS_OP = "ctpo_megatron::ctpo_token_loss_stats"


class CtpoKernelOut(NamedTuple):
    """The op's outputs, each shaped like log_probs (la_scale: [0] without adaptive clip)."""

    pg_losses: torch.Tensor
    dpg_dlogp: torch.Tensor
    ratio: torch.Tensor
    log_ratio: torch.Tensor
    la_scale: torch.Tensor
    clip_high: torch.Tensor
    clip_low: torch.Tensor
    clip_dual: torch.Tensor
    clipped: torch.Tensor


def has_kernel(device: torch.device) -> bool:
    """Whether the fused op has a kernel for `device` (else warns once and says False)."""
    return use_extension(device)


def ctpo_token_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, *, cu_seqlens: torch.Tensor | None,
                    cum_log_ratio: torch.Tensor | None, cum_count: torch.Tensor | None,
                    geomean: bool, adaptive: bool, clip_low: float, clip_high: float, clip_c: float,
                    power: float) -> CtpoKernelOut:
    """Runs the fused op (call only where `has_kernel(log_probs.device)`).

    log_probs: [B, S] or packed [T] float (autograd); old_log_probs, advantages, response_mask:
    like log_probs, no gradient; cu_seqlens: optional [N+1] int; cum_log_ratio, cum_count:
    optional precomputed prefix sums (both or neither); geomean/adaptive and the three clip
    bases select the variant (LA: la_clip_low/high/c and power; plain: clip_ratio_low/high/c).
    Inputs are cast to one compute dtype (float32 for 16-bit inputs); pg_losses has autograd.
    """
    dtype = log_probs.dtype
    if not (old_log_probs.dtype == advantages.dtype == dtype and log_probs.is_floating_point()):
        dtype = torch.promote_types(dtype, torch.float32)  # mixed inputs: one compute dtype
    lp = dense(log_probs, dtype)
    olp, adv, mask = (_constant(t, dtype) for t in (old_log_probs, advantages, response_mask))
    out_dtype = reference.result_dtype(dtype)
    cum = None if cum_log_ratio is None else cum_log_ratio.detach().to(out_dtype).contiguous()
    count = None if cum_count is None else cum_count.detach().to(out_dtype).contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    return CtpoKernelOut(*torch.ops.ctpo_megatron.ctpo_token_loss(
        lp, olp, adv, mask, cu_seqlens, cum, count, bool(geomean), bool(adaptive),
        float(clip_low), float(clip_high), float(clip_c), float(power)))


def _constant(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An input without gradient, dense in `dtype` (detached only if it had autograd: a
    detach is a new tensor, ~0.6 µs, per input and micro-batch)."""
    return dense(tensor.detach() if tensor.requires_grad else tensor, dtype)


def ctpo_loss_metrics_kernel_for(device: torch.device) -> bool:
    """Whether `ctpo_token_loss_metrics` and `ctpo_token_loss_stats` run on `device`: the
    extension's CPU kernels."""
    return cpu_kernel_for(device)


def ctpo_token_loss_metrics(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                            response_mask: torch.Tensor, *, geomean: bool, adaptive: bool, clip_low: float,
                            clip_high: float, clip_c: float, power: float, bucket_edges: Sequence[int],
                            exp_coeffs: tuple[float, ...], hist_shift: int, hist_first: int, hist_bins: int,
                            qs: Sequence[float]) -> tuple[CtpoKernelOut, list[float]]:
    """`ctpo_token_loss` and the metric values of its terms in one pass (call only where
    `ctpo_loss_metrics_kernel_for(device)`): each tile of terms goes to the statistics of
    `loss_stats_metrics` right after the kernel wrote it, while it is in cache.

    log_probs: [B, S] or [S] float32 or float64 (autograd); old_log_probs, advantages,
    response_mask: like log_probs, no gradient (cast to its dtype); the loss arguments as
    `ctpo_token_loss` (padded layout, the prefix sums its own: no cu_seqlens, cum_log_ratio or
    cum_count); the statistics' as `loss_stats_metrics` with the running count of valid tokens as
    positions and, with adaptive clipping, la_power = power. Returns (the outputs of
    `ctpo_token_loss`, the values of `loss_stats_metrics` for them), equal to those two ops'.
    """
    dtype = log_probs.dtype
    *terms, values = op_overload("ctpo_token_loss_metrics")(
        dense(log_probs), _constant(old_log_probs, dtype), _constant(advantages, dtype),
        _constant(response_mask, dtype), geomean, adaptive, clip_low, clip_high, clip_c, power, bucket_edges,
        exp_coeffs, hist_shift, hist_first, hist_bins, qs)
    return CtpoKernelOut(*terms), values.tolist()


def ctpo_token_loss_stats(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                          response_mask: torch.Tensor, *, geomean: bool, adaptive: bool, clip_low: float,
                          clip_high: float, clip_c: float, power: float, bucket_edges: Sequence[int],
                          exp_coeffs: tuple[float, ...], hist_shift: int, hist_first: int,
                          hist_bins: int) -> tuple[CtpoKernelOut, LossStatsOut]:
    """`ctpo_token_loss` and `loss_stats` of its terms in one pass (call only where
    `ctpo_loss_metrics_kernel_for(device)`): what the trainer sums per micro-batch.

    Arguments as `ctpo_token_loss_metrics` without qs. Returns (the outputs of
    `ctpo_token_loss`, `loss_stats` of them with the running count of valid tokens as positions
    and, with adaptive clipping, la_power = power), equal to those two ops'.
    """
    dtype = log_probs.dtype
    *terms, sums, maxima = op_overload("ctpo_token_loss_stats")(
        dense(log_probs), _constant(old_log_probs, dtype), _constant(advantages, dtype),
        _constant(response_mask, dtype), geomean, adaptive, clip_low, clip_high, clip_c, power, bucket_edges,
        exp_coeffs, hist_shift, hist_first, hist_bins)
    return CtpoKernelOut(*terms), LossStatsOut(sums, maxima)


def _register() -> None:
    @torch.library.register_fake(_OP)
    def _fake(log_probs, old_log_probs, advantages, mask, cu_seqlens, cum, count, geomean, adaptive,
              clip_low, clip_high, clip_c, power):
        dtype = reference.result_dtype(log_probs.dtype)
        like = [torch.empty_like(log_probs, dtype=dtype) for _ in range(4)]
        scale = torch.empty_like(log_probs, dtype=dtype) if adaptive else log_probs.new_empty((0,), dtype=dtype)
        return (*like, scale, *(torch.empty_like(log_probs, dtype=torch.bool) for _ in range(4)))

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.lp_dtype = inputs[0].dtype
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # else autograd allocates zero grads for 8 unused outputs

    def _backward(ctx, grad_pg, *unused):
        (dpg_dlogp,) = ctx.saved_tensors
        grad_lp = None if grad_pg is None else (grad_pg * dpg_dlogp).to(ctx.lp_dtype)
        return (grad_lp,) + (None,) * 12

    torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)

    @torch.library.register_fake(_METRICS_OP)
    def _fake_metrics(log_probs, old_log_probs, advantages, mask, geomean, adaptive, clip_low, clip_high, clip_c,
                      power, bucket_edges, exp_coeffs, hist_shift, hist_first, hist_bins, qs):
        terms = _fake(log_probs, old_log_probs, advantages, mask, None, None, None, geomean, adaptive, clip_low,
                      clip_high, clip_c, power)
        return (*terms, log_probs.new_empty((metric_count(len(exp_coeffs), len(qs), len(bucket_edges)),),
                                            dtype=torch.float64))

    def _backward_metrics(ctx, grad_pg, *unused):
        return _backward(ctx, grad_pg)[:1] + (None,) * 15

    torch.library.register_autograd(_METRICS_OP, _backward_metrics, setup_context=_setup_context)

    @torch.library.register_fake(_STATS_OP)
    def _fake_stats(log_probs, old_log_probs, advantages, mask, geomean, adaptive, clip_low, clip_high, clip_c,
                    power, bucket_edges, exp_coeffs, hist_shift, hist_first, hist_bins):
        terms = _fake(log_probs, old_log_probs, advantages, mask, None, None, None, geomean, adaptive, clip_low,
                      clip_high, clip_c, power)
        size = sum_sections(len(exp_coeffs), hist_bins, len(bucket_edges))["position_tokens"].stop
        return (*terms, log_probs.new_empty((size,), dtype=torch.float64),
                log_probs.new_empty((len(MAX_SLOTS),), dtype=torch.float64))

    def _backward_stats(ctx, grad_pg, *unused):
        return _backward(ctx, grad_pg)[:1] + (None,) * 14

    torch.library.register_autograd(_STATS_OP, _backward_stats, setup_context=_setup_context)


if extension_backends():
    _register()
