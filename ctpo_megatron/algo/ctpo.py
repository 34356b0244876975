"""CTPO: cumulative-token importance ratios with position-adaptive (or plain) clipping.

    d_t   = clamp(lp_t - olp_t, -20, 20)
    C_t   = sum_{s<=t} m_s d_s,  n_t = sum_{s<=t} m_s            (masked_cumsum)
    L_t   = C_t (cumprod) or C_t / max(n_t, 1) (geomean), 0 where m_t = 0
    x_t   = min(sg(L_t) + lp_t - sg(lp_t), 10);  r_t = exp(x_t) (0 where m_t = 0)
    LA    : r_hat_t = exp(clamp(x_t, -la_low g_t, la_high g_t)),  D_t = exp(la_c g_t),
            g_t = max(n_t, 1)**p
    plain : r_hat_t = clamp(r_t, 1 - eps_low, 1 + eps_high),     D_t = clip_ratio_c
    l_t   = max(-A r_t, -A r_hat_t), capped at -A D_t where A < 0

The gradient reaches only the current token's log-prob (the prefix sum is detached).
`ctpo_token_terms` is the pure-torch definition (the fused kernel's reference);
`fused_ctpo_token_terms` runs the kernel from `ctpo_megatron.ops` and falls back to it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Callable

import torch

from ctpo_megatron import ops
from ctpo_megatron.algo import stats
from ctpo_megatron.algo.config import PolicyLossConfig
from ctpo_megatron.algo.cumulative import masked_cumsum
from ctpo_megatron.algo.terms import (LOG_RATIO_CLAMP, LOG_RATIO_MAX, TokenTerms, clipped_surrogate,
                                      masked_inputs)

logger = logging.getLogger(__name__)

TokenTermsFn = Callable[..., TokenTerms]


def ctpo_log_ratio(log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                   response_mask: torch.Tensor) -> torch.Tensor:
    """The per-token values whose masked prefix sum is C_t (what a CP scan must sum).

    log_probs, old_log_probs: [B, S] (or [T]) float; response_mask: same shape, binary.
    Returns d = clamp(log_probs - old_log_probs, -20, 20), detached, 0 where the mask is 0,
    in the compute dtype (float32 for half inputs).
    """
    _, _, lp, olp, _ = masked_inputs(log_probs, old_log_probs, old_log_probs, response_mask)
    return (lp - olp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).detach()


def ctpo_token_terms(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                     response_mask: torch.Tensor, cfg: PolicyLossConfig, *,
                     cum_log_ratio: torch.Tensor | None = None,
                     cum_count: torch.Tensor | None = None) -> TokenTerms:
    """Per-token CTPO terms (pure torch; the oracle of the fused kernel).

    log_probs: [B, S] float — current policy log-prob per response token (autograd).
    old_log_probs: [B, S] float — behaviour-policy log-probs (no gradient).
    advantages: [B, S] float — per token (GRPO: the sequence advantage broadcast).
    response_mask: [B, S] binary — 1 generated token, 0 padding or tool output.
    cfg: uses variant, adaptive_clip, la_clip_low/high/c, la_power, clip_ratio_low/high/c.
    cum_log_ratio, cum_count: optional [B, S] precomputed prefix sums C_t and n_t of
        `ctpo_log_ratio(...)` and the mask (e.g. global sums under context parallelism, where
        the row is this rank's shard); both or neither. Default: `masked_cumsum` per row.
    """
    valid, mask, lp, olp, adv = masked_inputs(log_probs, old_log_probs, advantages, response_mask)
    log_ratio = (lp - olp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).detach()
    if (cum_log_ratio is None) != (cum_count is None):
        raise ValueError("ctpo_token_terms: pass both cum_log_ratio and cum_count, or neither")
    if cum_log_ratio is None:
        cum, count = masked_cumsum(log_ratio, mask)
    else:
        for name, t in (("cum_log_ratio", cum_log_ratio), ("cum_count", cum_count)):
            if t.shape != lp.shape:
                raise ValueError(f"ctpo_token_terms: {name} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(lp.shape)} (the shape of log_probs)")
        cum, count = cum_log_ratio.detach().to(lp.dtype), cum_count.detach().to(lp.dtype)
    return ctpo_terms_from_prefix(lp, lp.detach(), adv, valid, log_ratio, cum, count, cfg)


def ctpo_terms_from_prefix(lp: torch.Tensor, lp_anchor: torch.Tensor, adv: torch.Tensor,
                           valid: torch.Tensor, log_ratio: torch.Tensor, cum: torch.Tensor,
                           count: torch.Tensor, cfg: PolicyLossConfig) -> TokenTerms:
    """CTPO terms from the prefix sums: x_t = min(sg(L_t) + lp_t - lp_anchor_t, 10), then clip.

    lp, lp_anchor, adv, log_ratio, cum, count: [B, S] compute dtype (invalid positions zeroed);
    valid: [B, S] bool. The loss passes lp_anchor = sg(lp): the value is L_t and the gradient
    reaches only lp_t. A constant anchor turns the same code into an ordinary function of lp
    whose derivative is that gradient (what the float64 gradcheck checks).
    """
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    cum_values = cum / count.clamp(min=1.0) if cfg.variant == "geomean" else cum
    cum_values = torch.where(valid, cum_values, zero)
    # Value L_t, gradient only through the current token's log-prob (reference expression order).
    x = torch.clamp(cum_values.detach() + lp - lp_anchor, max=LOG_RATIO_MAX)
    ratio = torch.where(valid, torch.exp(x), zero)

    la_scale = None
    if cfg.adaptive_clip:
        # p == 0 means a uniform scale; the reference crashes there (exp of a Python float).
        la_scale = count.clamp(min=1.0).pow(cfg.la_power) if cfg.la_power != 0.0 else torch.ones_like(count)
        bound_low = cfg.la_clip_low * la_scale
        bound_high = cfg.la_clip_high * la_scale
        clipped_ratio = torch.where(valid, torch.exp(torch.clamp(x, -bound_low, bound_high)), zero)
        dual = torch.where(valid, torch.exp(cfg.la_clip_c * la_scale), torch.ones_like(la_scale))
        clip_high = (x > bound_high) & (adv > 0)
        clip_low = (x < -bound_low) & (adv < 0)
    else:
        clipped_ratio = torch.clamp(ratio, 1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
        dual = cfg.clip_ratio_c
        clip_high = (ratio > 1.0 + cfg.clip_ratio_high) & (adv > 0)
        clip_low = (ratio < 1.0 - cfg.clip_ratio_low) & (adv < 0)

    pg_losses, clipped, clip_dual = clipped_surrogate(adv, ratio, clipped_ratio, dual)
    return TokenTerms(
        pg_losses=pg_losses, ratio=ratio.detach(), log_ratio_clamped=log_ratio,
        clip_high=clip_high & valid, clip_low=clip_low & valid, clip_dual=clip_dual & valid,
        clipped=clipped & valid, la_scale=None if la_scale is None else la_scale.detach())


def fused_ctpo_token_terms(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                           response_mask: torch.Tensor, cfg: PolicyLossConfig, *,
                           cum_log_ratio: torch.Tensor | None = None, cum_count: torch.Tensor | None = None,
                           cu_seqlens: torch.Tensor | None = None) -> TokenTerms:
    """Per-token CTPO terms from the fused kernel (`ops.ctpo_token_loss`), or, on a device the
    extension has no kernels for, from the pure-torch `ctpo_token_terms` (one warning).

    Arguments and result as `ctpo_token_terms`, plus: log_probs and the other per-token
    tensors may be packed [T] with `cu_seqlens` [N+1] (then the prefix sums restart at every
    sequence). Tensors come back shaped like log_probs, in the compute dtype (float32 for 16-bit
    inputs); pg_losses has autograd to log_probs. This is what the "ctpo" loss runs.
    """
    if (cum_log_ratio is None) != (cum_count is None):
        raise ValueError("fused_ctpo_token_terms: pass both cum_log_ratio and cum_count, or neither")
    _check_shapes("fused_ctpo_token_terms", log_probs, old_log_probs=old_log_probs, advantages=advantages,
                  response_mask=response_mask, cum_log_ratio=cum_log_ratio, cum_count=cum_count)
    if not ops.has_kernel(log_probs.device):
        if cum_log_ratio is None and (cu_seqlens is not None or log_probs.dim() == 1):
            # Packed rows: the prefix sums restart at every sequence (the torch scan does that).
            log_ratio = ctpo_log_ratio(log_probs, old_log_probs, response_mask)
            mask = (response_mask > 0).to(log_ratio.dtype)
            cu = None if cu_seqlens is None else cu_seqlens.to(torch.int32)
            cum_log_ratio, cum_count = ops.segmented_cumsum(log_ratio, mask, cu)
        return ctpo_token_terms(log_probs, old_log_probs, advantages, response_mask, cfg,
                                cum_log_ratio=cum_log_ratio, cum_count=cum_count)
    out = ops.ctpo_token_loss(log_probs, old_log_probs, advantages, response_mask, cu_seqlens=cu_seqlens,
                              cum_log_ratio=cum_log_ratio, cum_count=cum_count, **_kernel_variant(cfg))
    return _kernel_terms(out, cfg)


def fused_ctpo_terms_and_metrics(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                                 response_mask: torch.Tensor,
                                 cfg: PolicyLossConfig) -> tuple[TokenTerms, dict[str, float]] | None:
    """`fused_ctpo_token_terms` and `algo.stats.policy_metrics` of its terms from one pass
    (`ops.ctpo_token_loss_metrics`: the statistics read each tile of terms right after the kernel
    wrote it, instead of reading them all back from memory afterwards), or None where that op
    does not run: no CPU kernel, not float32/float64. The results equal the two calls'.

    log_probs, old_log_probs, advantages, response_mask: [B, S] as for `ctpo_token_terms` (the
    prefix sums the kernel's own; positions the running count). Returns (terms, metrics).
    """
    if (log_probs.dtype not in (torch.float32, torch.float64) or log_probs.dim() != 2
            or not ops.ctpo_loss_metrics_kernel_for(log_probs.device)):
        return None
    _check_shapes("fused_ctpo_terms_and_metrics", log_probs, old_log_probs=old_log_probs, advantages=advantages,
                  response_mask=response_mask)
    length = log_probs.shape[-1]
    out, values = ops.ctpo_token_loss_metrics(log_probs, old_log_probs, advantages, response_mask,
                                              **_kernel_variant(cfg),
                                              **stats.metrics_op_arguments(length, cfg))
    return _kernel_terms(out, cfg), stats.metrics_from_values(values, length, adaptive_clip=cfg.adaptive_clip)


def fused_ctpo_terms_and_sums(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                              response_mask: torch.Tensor, cfg: PolicyLossConfig,
                              bucket_edges: Sequence[int]) -> tuple[TokenTerms, ops.LossStatsOut] | None:
    """`fused_ctpo_token_terms` and the `ops.loss_stats` of its terms (what
    `algo.stats.LossSums.from_terms` computes, clip-rate buckets at `bucket_edges`, positions the
    running count) from one pass (`ops.ctpo_token_loss_stats`), or None where that op does not
    run (as `fused_ctpo_terms_and_metrics`). The results equal the two calls'.

    Shapes as `fused_ctpo_terms_and_metrics`. Returns (terms, the statistics' two vectors).
    """
    if (log_probs.dtype not in (torch.float32, torch.float64) or log_probs.dim() != 2
            or not ops.ctpo_loss_metrics_kernel_for(log_probs.device)):
        return None
    _check_shapes("fused_ctpo_terms_and_sums", log_probs, old_log_probs=old_log_probs, advantages=advantages,
                  response_mask=response_mask)
    out, sums = ops.ctpo_token_loss_stats(log_probs, old_log_probs, advantages, response_mask,
                                          **_kernel_variant(cfg), **stats.sums_op_arguments(bucket_edges, cfg))
    return _kernel_terms(out, cfg), sums


def _check_shapes(what: str, log_probs: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.shape != log_probs.shape:
            raise ValueError(f"{what}: {name} has shape {tuple(t.shape)}, expected "
                             f"{tuple(log_probs.shape)} (the shape of log_probs)")


def _kernel_variant(cfg: PolicyLossConfig) -> dict:
    """The loss arguments of `ops.ctpo_token_loss` for `cfg` (LA or plain clip bounds)."""
    adaptive = bool(cfg.adaptive_clip)
    clips = (cfg.la_clip_low, cfg.la_clip_high, cfg.la_clip_c) if adaptive else (
        cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c)
    return dict(geomean=cfg.variant == "geomean", adaptive=adaptive, clip_low=clips[0], clip_high=clips[1],
                clip_c=clips[2], power=cfg.la_power)


def _kernel_terms(out: ops.ctpo_loss.CtpoKernelOut, cfg: PolicyLossConfig) -> TokenTerms:
    return TokenTerms(pg_losses=out.pg_losses, ratio=out.ratio.detach(),
                      log_ratio_clamped=out.log_ratio.detach(), clip_high=out.clip_high,
                      clip_low=out.clip_low, clip_dual=out.clip_dual, clipped=out.clipped,
                      la_scale=out.la_scale.detach() if cfg.adaptive_clip else None, zero_at_invalid=True)
