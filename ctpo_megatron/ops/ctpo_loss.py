"""`fused_ctpo_token_terms`: the per-token CTPO terms from one fused kernel pass.

Drop-in for `ctpo_megatron.algo.ctpo_token_terms` (same arguments, same `TokenTerms`), which
`algo.policy_loss` picks up through its seam `resolve_ctpo_token_terms`. One kernel pass per
sequence scans the clamped log-ratios and evaluates the surrogate, its derivative with
respect to the log-prob (kept for the backward: the gradient reaches only the current token),
the ratio, the log-ratio, the LA scale and the clip flags. Without kernels for the device it
falls back to the pure-torch `ctpo_token_terms` (one warning).
"""

from __future__ import annotations

import torch

from ctpo_megatron.algo.config import PolicyLossConfig
from ctpo_megatron.algo.ctpo import ctpo_log_ratio, ctpo_token_terms
from ctpo_megatron.algo.terms import TokenTerms, compute_dtype
from ctpo_megatron.ops import reference
from ctpo_megatron.ops._backend import extension_backends, use_extension

_OP = "ctpo_megatron::ctpo_token_loss"

def fused_ctpo_token_terms(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                           response_mask: torch.Tensor, cfg: PolicyLossConfig, *,
                           cum_log_ratio: torch.Tensor | None = None, cum_count: torch.Tensor | None = None,
                           cu_seqlens: torch.Tensor | None = None) -> TokenTerms:
    """Per-token CTPO terms (cumprod/geomean, LA or plain clip) from the fused kernel.

    log_probs: [B, S] float — current policy log-prob per response token (autograd); padded
        layout, one sequence per row; or [T] packed with `cu_seqlens`. Full over TP.
    old_log_probs: like log_probs — behaviour-policy log-probs (no gradient).
    advantages: like log_probs — per-token advantages (no gradient).
    response_mask: like log_probs, binary — 1 generated token, 0 padding or tool output.
    cfg: variant, adaptive_clip, la_clip_low/high/c, la_power, clip_ratio_low/high/c.
    cum_log_ratio, cum_count: optional, like log_probs — precomputed prefix sums C_t and n_t
        (e.g. global ones from `context_parallel_cumsum` under CP); both or neither.
    cu_seqlens: optional [N+1] int32 — packed sequence offsets (not needed with the sums).
    Returns TokenTerms (see `algo.terms`); tensors shaped like log_probs, in the compute dtype
    (float32 for 16-bit inputs); pg_losses has autograd to log_probs.
    """
    if (cum_log_ratio is None) != (cum_count is None):
        raise ValueError("fused_ctpo_token_terms: pass both cum_log_ratio and cum_count, or neither")
    for name, t in (("old_log_probs", old_log_probs), ("advantages", advantages),
                    ("response_mask", response_mask), ("cum_log_ratio", cum_log_ratio),
                    ("cum_count", cum_count)):
        if t is not None and t.shape != log_probs.shape:
            raise ValueError(f"fused_ctpo_token_terms: {name} has shape {tuple(t.shape)}, expected "
                             f"{tuple(log_probs.shape)} (the shape of log_probs)")
    if not use_extension(log_probs.device):
        return _torch_terms(log_probs, old_log_probs, advantages, response_mask, cfg, cum_log_ratio, cum_count,
                            cu_seqlens)
    dtype = log_probs.dtype
    if not (old_log_probs.dtype == advantages.dtype == dtype and log_probs.is_floating_point()):
        dtype = compute_dtype(log_probs)  # mixed inputs: compute like the torch path
    lp = log_probs.to(dtype).contiguous()
    olp, adv, mask = (t.detach().to(dtype).contiguous() for t in (old_log_probs, advantages, response_mask))
    out_dtype = reference.result_dtype(dtype)
    cum = None if cum_log_ratio is None else cum_log_ratio.detach().to(out_dtype).contiguous()
    count = None if cum_count is None else cum_count.detach().to(out_dtype).contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    adaptive = bool(cfg.adaptive_clip)
    clips = (cfg.la_clip_low, cfg.la_clip_high, cfg.la_clip_c) if adaptive else (
        cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c)
    pg, _, ratio, log_ratio, la_scale, high, low, dual, clipped = torch.ops.ctpo_megatron.ctpo_token_loss(
        lp, olp, adv, mask, cu_seqlens, cum, count, cfg.variant == "geomean", adaptive, *clips,
        float(cfg.la_power))
    return TokenTerms(pg_losses=pg, ratio=ratio.detach(), log_ratio_clamped=log_ratio.detach(),
                      clip_high=high, clip_low=low, clip_dual=dual, clipped=clipped,
                      la_scale=la_scale.detach() if adaptive else None)


def _torch_terms(log_probs, old_log_probs, advantages, response_mask, cfg, cum, count, cu_seqlens) -> TokenTerms:
    """The pure-torch terms; packed inputs get their prefix sums from the torch scan."""
    if cum is None and (cu_seqlens is not None or log_probs.dim() == 1):
        log_ratio = ctpo_log_ratio(log_probs, old_log_probs, response_mask)
        mask = (response_mask > 0).to(log_ratio.dtype)
        cum, count = reference.segmented_scan(log_ratio, mask, cu_seqlens)
    return ctpo_token_terms(log_probs, old_log_probs, advantages, response_mask, cfg,
                            cum_log_ratio=cum, cum_count=count)


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


if extension_backends():
    _register()
