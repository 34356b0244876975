"""Per-token loss terms shared by every loss: the result type and the clipped surrogate.

Every loss in the registry maps (log_probs, old_log_probs, advantages, response_mask, cfg)
to `TokenTerms`; aggregation and metrics are computed from `TokenTerms` afterwards, the same
way for all losses. The fused CTPO kernel produces the same `TokenTerms`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOG_RATIO_CLAMP = 20.0
"""Per-token log ratios are clamped to [-20, 20] before any sum (reference)."""

LOG_RATIO_MAX = 10.0
"""The (cumulative) log ratio fed to exp() is clamped above at 10 (reference)."""


@dataclass
class TokenTerms:
    """Per-token results of a policy loss, before IS weights and aggregation.

    All tensors are [B, S] (padded layout: B sequences, S response positions) on the inputs'
    device; float tensors use the compute dtype (float32, or float64 for float64 inputs).
    Boolean masks are False at invalid positions (mask 0: padding or tool output).
    """

    pg_losses: torch.Tensor
    """[B, S] float — per-token surrogate loss l_t, with autograd to log_probs; not yet
    multiplied by the mask (aggregation masks it) nor by rollout IS weights."""
    ratio: torch.Tensor
    """[B, S] float, detached — the importance ratio r_t used in the surrogate; meaningful at
    valid positions only (ctpo/seq: 0 elsewhere)."""
    log_ratio_clamped: torch.Tensor
    """[B, S] float, detached — d_t = clamp(log_probs - old_log_probs, -20, 20) (0 where invalid)."""
    clip_high: torch.Tensor
    """[B, S] bool — clipped above with A > 0 (LA: log r_t > H_t; plain: r_t > 1 + eps_high)."""
    clip_low: torch.Tensor
    """[B, S] bool — clipped below with A < 0 (LA: log r_t < -L_t; plain: r_t < 1 - eps_low)."""
    clip_dual: torch.Tensor
    """[B, S] bool — dual clip active: A < 0 and max(l1, l2) > l3."""
    clipped: torch.Tensor
    """[B, S] bool — the clipped branch is larger, l2 > l1 (the reference's pg_clipfrac)."""
    la_scale: torch.Tensor | None = None
    """[B, S] float, detached — adaptive clip scale g_t = max(n_t, 1)**p (None: no LA clip)."""
    zero_at_invalid: bool = False
    """pg_losses is exactly 0 at invalid positions (the fused kernel writes it so, and its
    gradient there is 0): the aggregation's sums then need no select."""

    @property
    def clip_any(self) -> torch.Tensor:
        """[B, S] bool — clipped high, low or dual (the reference's clip/total)."""
        return self.clip_high | self.clip_low | self.clip_dual


def compute_dtype(log_probs: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs, the input dtype otherwise (float32/float64)."""
    return torch.promote_types(log_probs.dtype, torch.float32)


def masked_inputs(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                  response_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Casts to the compute dtype and zeroes invalid positions.

    Padding may hold garbage (e.g. -inf log-probs); zeroing it keeps invalid positions at
    exactly zero gradient instead of NaN. Valid positions are unchanged.
    Returns (valid [B,S] bool, mask [B,S] float, lp, olp, adv [B,S] float); lp keeps autograd.
    """
    dtype = compute_dtype(log_probs)
    valid = response_mask > 0
    zero = torch.zeros((), dtype=dtype, device=log_probs.device)
    lp = torch.where(valid, log_probs.to(dtype), zero)
    olp = torch.where(valid, old_log_probs.detach().to(dtype), zero)
    adv = torch.where(valid, advantages.detach().to(dtype), zero)
    return valid, valid.to(dtype), lp, olp, adv


def clipped_surrogate(advantages: torch.Tensor, ratio: torch.Tensor, clipped_ratio: torch.Tensor,
                      dual_threshold: torch.Tensor | float | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO surrogate with optional dual clip, with torch's max/min tie semantics.

    advantages, ratio, clipped_ratio: [B, S] float; dual_threshold: [B, S] float, a float, or
    None for no dual clip. l1 = -A r, l2 = -A r_hat, c1 = max(l1, l2), l3 = -A D;
    l = min(l3, c1) where A < 0, else c1. Exact ties split the gradient 50/50 (torch.maximum).
    Returns (pg_losses, clipped = l2 > l1, dual = A < 0 and c1 > l3), all [B, S].
    """
    pg1 = -advantages * ratio
    pg2 = -advantages * clipped_ratio
    c1 = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if dual_threshold is None:
        return c1, clipped, torch.zeros_like(clipped)
    pg3 = -advantages * dual_threshold
    negative = advantages < 0
    pg_losses = torch.where(negative, torch.minimum(pg3, c1), c1)
    return pg_losses, clipped, (c1 > pg3) & negative
