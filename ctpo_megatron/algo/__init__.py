"""CTPO algorithm core: pure tensor math, no process groups. Imports `ctpo_megatron.ops`
(kernels), which never imports `algo`.

    from ctpo_megatron.algo import PolicyLossConfig, policy_loss, grpo_advantages
    loss, metrics = policy_loss(log_probs, old_log_probs, advantages, response_mask, cfg)

Files: config (PolicyLossConfig), cumulative (the masked prefix sum, via `ops`), ctpo
(cumulative-token terms: pure torch, and the fused kernel from `ops`), baselines (grpo, gspo, seq), registry
(LOSSES), aggregate (agg modes), loss (policy_loss), advantages (GRPO), correction (rollout
IS weights), metrics (clip rate by position, quantile names), histogram (fixed-bin
histograms for quantiles), stats (LossSums: the loss's statistics as additive sums, reduced
once per step; policy_metrics), layout (packed THD -> padded).
"""

from ctpo_megatron.algo.advantages import grpo_advantages
from ctpo_megatron.algo.aggregate import aggregate_loss
from ctpo_megatron.algo.config import AGG_MODES, LOSS_NAMES, VARIANTS, PolicyLossConfig
from ctpo_megatron.algo.correction import RolloutCorrectionConfig, rollout_correction_weights
from ctpo_megatron.algo.ctpo import ctpo_log_ratio, ctpo_token_terms, fused_ctpo_token_terms
from ctpo_megatron.algo.cumulative import masked_cumsum
from ctpo_megatron.algo.loss import policy_loss
from ctpo_megatron.algo.metrics import clip_rate_by_position, position_bucket_edges, position_clip_metrics
from ctpo_megatron.algo.registry import LOSSES
from ctpo_megatron.algo.stats import LossSums, policy_metrics
from ctpo_megatron.algo.terms import TokenTerms

__all__ = [
    "AGG_MODES", "LOSSES", "LOSS_NAMES", "LossSums", "VARIANTS", "PolicyLossConfig", "RolloutCorrectionConfig",
    "TokenTerms", "aggregate_loss", "clip_rate_by_position", "ctpo_log_ratio", "ctpo_token_terms",
    "fused_ctpo_token_terms",
    "grpo_advantages", "masked_cumsum", "policy_loss", "policy_metrics", "position_bucket_edges",
    "position_clip_metrics", "rollout_correction_weights",
]
