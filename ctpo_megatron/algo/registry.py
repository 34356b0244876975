"""Loss registry: `PolicyLossConfig.name` -> the function producing that loss's `TokenTerms`.

Every entry has the signature of `ctpo_token_terms`:
`fn(log_probs, old_log_probs, advantages, response_mask, cfg, *, cum_log_ratio=None,
cum_count=None) -> TokenTerms`. "ctpo" runs the fused kernel (`ctpo.fused_ctpo_token_terms`,
which falls back to the pure-torch terms where there is no kernel); registering new losses
never touches `policy_loss`.
"""

from __future__ import annotations

from ctpo_megatron.algo.baselines import grpo_token_terms, gspo_token_terms, seq_token_terms
from ctpo_megatron.algo.ctpo import TokenTermsFn, fused_ctpo_token_terms

LOSSES: dict[str, TokenTermsFn] = {
    "ctpo": fused_ctpo_token_terms,
    "grpo": grpo_token_terms,
    "gspo": gspo_token_terms,
    "seq": seq_token_terms,
}

FIXED_AGG_MODE: dict[str, str] = {"gspo": "seq-mean-token-mean"}
"""Losses that always aggregate one way, whatever `loss_agg_mode` says (reference GSPO)."""
