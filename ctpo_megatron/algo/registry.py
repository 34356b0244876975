"""Loss registry: `PolicyLossConfig.name` -> the function producing that loss's `TokenTerms`.

Every entry has the signature of `ctpo_token_terms`:
`fn(log_probs, old_log_probs, advantages, response_mask, cfg, *, cum_log_ratio=None,
cum_count=None) -> TokenTerms`. "ctpo" runs the fused kernel (`ctpo.fused_ctpo_token_terms`,
which falls back to the pure-torch terms where there is no kernel); registering new losses
never touches `policy_loss`.
"""

from __future__ import annotations

from typing import Callable

from ctpo_megatron.algo.baselines import grpo_token_terms, gspo_token_terms, seq_token_terms
from ctpo_megatron.algo.ctpo import (TokenTermsFn, fused_ctpo_terms_and_metrics, fused_ctpo_terms_and_sums,
                                     fused_ctpo_token_terms)
from ctpo_megatron.algo.terms import TokenTerms
from ctpo_megatron.ops import LossStatsOut

LOSSES: dict[str, TokenTermsFn] = {
    "ctpo": fused_ctpo_token_terms,
    "grpo": grpo_token_terms,
    "gspo": gspo_token_terms,
    "seq": seq_token_terms,
}

TERMS_AND_METRICS: dict[str, Callable[..., tuple[TokenTerms, dict[str, float]] | None]] = {
    "ctpo": fused_ctpo_terms_and_metrics,
}
"""Losses that can give their terms and `policy_metrics` of them from one pass:
`fn(log_probs, old_log_probs, advantages, response_mask, cfg) -> (terms, metrics)`, or None
where it cannot (then `policy_loss` computes the metrics from the terms)."""

TERMS_AND_SUMS: dict[str, Callable[..., tuple[TokenTerms, LossStatsOut] | None]] = {
    "ctpo": fused_ctpo_terms_and_sums,
}
"""Losses that can give their terms and the statistics of `LossSums.from_terms` from one pass:
`fn(log_probs, old_log_probs, advantages, response_mask, cfg, bucket_edges) -> (terms,
ops.LossStatsOut)`, or None where it cannot (then `policy_loss` sums the terms)."""

FIXED_AGG_MODE: dict[str, str] = {"gspo": "seq-mean-token-mean"}
"""Losses that always aggregate one way, whatever `loss_agg_mode` says (reference GSPO)."""
