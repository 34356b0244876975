"""Baseline losses users compare CTPO against, as `TokenTerms` producers.

- grpo: PPO/GRPO per-token ratio r_t = exp(clamp(lp_t - olp_t, -20, 20)), ratio-space clip
  [1 - eps_low, 1 + eps_high], dual clip at clip_ratio_c for A < 0 (the reference's "vanilla").
- gspo: length-normalised sequence ratio, log r_t = min(sg(mean_b(lp - olp)) + lp_t - sg(lp_t), 10)
  (no +-20 clamp inside the mean), ratio-space clip, no dual clip (the reference's "gspo").
- seq: the full-sequence ratio: CTPO with every prefix sum replaced by the sequence total
  (C_t := C_T, n_t := n_T), same variant and clipping settings as "ctpo".

All take the `ctpo_token_terms` signature so the registry can call them interchangeably.
"""

from __future__ import annotations

import torch

from ctpo_megatron.algo.config import PolicyLossConfig
from ctpo_megatron.algo.ctpo import ctpo_log_ratio, ctpo_token_terms
from ctpo_megatron.algo.terms import (LOG_RATIO_CLAMP, LOG_RATIO_MAX, TokenTerms, clipped_surrogate,
                                      masked_inputs)


def _ratio_space_terms(ratio: torch.Tensor, adv: torch.Tensor, valid: torch.Tensor,
                       log_ratio: torch.Tensor, cfg: PolicyLossConfig,
                       dual: float | None) -> TokenTerms:
    clipped_ratio = torch.clamp(ratio, 1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    pg_losses, clipped, clip_dual = clipped_surrogate(adv, ratio, clipped_ratio, dual)
    ratio = ratio.detach()
    return TokenTerms(
        pg_losses=pg_losses, ratio=ratio, log_ratio_clamped=log_ratio,
        clip_high=(ratio > 1.0 + cfg.clip_ratio_high) & (adv > 0) & valid,
        clip_low=(ratio < 1.0 - cfg.clip_ratio_low) & (adv < 0) & valid,
        clip_dual=clip_dual & valid, clipped=clipped & valid)


def _no_prefix_sums(name: str, cum_log_ratio: torch.Tensor | None) -> None:
    if cum_log_ratio is not None:
        raise ValueError(f"{name} loss does not take cum_log_ratio/cum_count (per-token or "
                         "per-sequence ratio, no prefix sums)")


def grpo_token_terms(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                     response_mask: torch.Tensor, cfg: PolicyLossConfig, *,
                     cum_log_ratio: torch.Tensor | None = None,
                     cum_count: torch.Tensor | None = None) -> TokenTerms:
    """GRPO/PPO per-token clipped ratio with dual clip. Shapes as `ctpo_token_terms`.

    The gradient passes through the +-20 clamp (inclusive bounds), as in the reference.
    """
    _no_prefix_sums("grpo", cum_log_ratio)
    valid, _, lp, olp, adv = masked_inputs(log_probs, old_log_probs, advantages, response_mask)
    log_ratio = torch.clamp(lp - olp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return _ratio_space_terms(torch.exp(log_ratio), adv, valid, log_ratio.detach(), cfg,
                              cfg.clip_ratio_c)


def gspo_token_terms(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                     response_mask: torch.Tensor, cfg: PolicyLossConfig, *,
                     cum_log_ratio: torch.Tensor | None = None,
                     cum_count: torch.Tensor | None = None) -> TokenTerms:
    """GSPO length-normalised sequence ratio, ratio-space clip, no dual clip.

    Shapes as `ctpo_token_terms`; the sequence mean is over the row's valid tokens, divided by
    max(n_b, 1). `policy_loss` always aggregates it with seq-mean-token-mean (reference).
    """
    _no_prefix_sums("gspo", cum_log_ratio)
    valid, mask, lp, olp, adv = masked_inputs(log_probs, old_log_probs, advantages, response_mask)
    raw_log_ratio = (lp - olp).detach()
    seq_log_ratio = (raw_log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    x = torch.clamp(lp - lp.detach() + seq_log_ratio.unsqueeze(-1), max=LOG_RATIO_MAX)
    log_ratio = raw_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return _ratio_space_terms(torch.exp(x), adv, valid, log_ratio, cfg, None)


def seq_token_terms(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, cfg: PolicyLossConfig, *,
                    cum_log_ratio: torch.Tensor | None = None,
                    cum_count: torch.Tensor | None = None) -> TokenTerms:
    """Full-sequence ratio: CTPO terms with C_t := C_T and n_t := n_T at every token.

    Shapes as `ctpo_token_terms`. cum_log_ratio, cum_count: optional [B, S] per-sequence
    totals broadcast over tokens (e.g. summed over CP ranks); default: the row totals.
    """
    if cum_log_ratio is None and cum_count is None:
        log_ratio = ctpo_log_ratio(log_probs, old_log_probs, response_mask)
        mask = (response_mask > 0).to(log_ratio.dtype)
        cum_log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(log_ratio)
        cum_count = mask.sum(-1, keepdim=True).expand_as(mask)
    return ctpo_token_terms(log_probs, old_log_probs, advantages, response_mask, cfg,
                            cum_log_ratio=cum_log_ratio, cum_count=cum_count)
