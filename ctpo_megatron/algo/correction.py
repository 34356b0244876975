"""Rollout/trainer mismatch correction: importance weights old / rollout, truncated or masked.

The rollout engine (SGLang, bf16 kernels) and the trainer (Megatron) assign slightly different
log-probs to the same tokens. The trainer's recomputed `old_log_probs` define the behaviour
policy of the loss; the weights w = pi_old / pi_rollout correct the sampling distribution:

    token    : w_t = min(exp(clamp(old_t - rollout_t, -20, 20)) m_t, threshold)
    sequence : w_t = min(exp(clamp(sum_s m_s (old_s - rollout_s), -20, 20)) m_t, threshold)

("mask" mode zeroes weights above the threshold instead of capping them). The weights carry
no gradient and multiply the per-token loss (`policy_loss(..., rollout_is_weights=w)`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ctpo_megatron.algo.aggregate import masked_sum
from ctpo_megatron.algo.metrics import to_floats

LEVELS = ("token", "sequence")
MODES = ("truncate", "mask")
SAFETY_BOUND = 20.0
"""Log-space clamp before exp(), so weights stay finite (reference)."""


@dataclass
class RolloutCorrectionConfig:
    """Rollout-vs-trainer importance weighting (defaults: the paper run)."""

    enabled: bool = True
    """Multiply the per-token loss by the weights (needs rollout log-probs from the engine)."""
    level: str = "sequence"
    """"sequence": one weight per response (product of token ratios); "token": per token."""
    mode: str = "truncate"
    """"truncate": cap weights at threshold; "mask": drop (weight 0) tokens/sequences above it."""
    threshold: float = 5.0
    """Upper threshold on the weight, > 0."""
    normalize: bool = False
    """Rescale the (capped) weights to mean 1 over this batch (token- or sequence-wise)."""

    def __post_init__(self) -> None:
        _validate(self.level, self.mode, self.threshold)


def _validate(level: str, mode: str, threshold: float) -> None:
    if level not in LEVELS:
        raise ValueError(f"rollout correction level={level!r} is not one of {LEVELS}")
    if mode not in MODES:
        raise ValueError(f"rollout correction mode={mode!r} is not one of {MODES}")
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"rollout correction threshold={threshold!r} must be a finite number > 0")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    denom = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / (denom + 1e-8)


def _is_metrics(weights: torch.Tensor, log_ratio_for_metrics: torch.Tensor, mask: torch.Tensor,
                level: str, threshold: float) -> dict[str, torch.Tensor | float]:
    """The reference's IS-weight metrics, on weights before truncation."""
    valid = mask > 0
    lower = 1.0 / threshold
    out: dict[str, torch.Tensor | float] = {}
    if level == "sequence":
        out["rollout_is_max"] = torch.exp(log_ratio_for_metrics.max().clamp(max=SAFETY_BOUND))
        out["rollout_is_min"] = torch.exp(log_ratio_for_metrics.min())
        out["rollout_is_mean"] = _masked_mean(weights, mask)
        out["rollout_is_ratio_fraction_high"] = (log_ratio_for_metrics > math.log(threshold)).double().mean()
        out["rollout_is_ratio_fraction_low"] = (log_ratio_for_metrics < math.log(lower)).double().mean()
    else:
        out["rollout_is_mean"] = _masked_mean(weights, mask)
        out["rollout_is_ratio_fraction_high"] = _masked_mean((weights > threshold).to(mask.dtype), mask)
        out["rollout_is_ratio_fraction_low"] = _masked_mean((weights < lower).to(mask.dtype), mask)
        out["rollout_is_max"] = weights.masked_fill(~valid, -torch.inf).max()
        out["rollout_is_min"] = weights.masked_fill(~valid, torch.inf).min()
    bounded = weights.clamp(min=lower, max=threshold)
    mean_bounded = _masked_mean(bounded, mask)
    var = _masked_mean(bounded.square(), mask) - mean_bounded.square()
    out["rollout_is_std"] = torch.sqrt(var.clamp(min=0.0)) if mask.sum() > 1 else 0.0
    normalized = bounded / (mean_bounded + 1e-8)
    out["rollout_is_eff_sample_size"] = 1.0 / _masked_mean(normalized.square(), mask)
    seq_mean = _masked_mean(weights, mask, dim=-1)
    out["rollout_is_seq_mean"] = seq_mean.mean()
    out["rollout_is_seq_std"] = seq_mean.std() if seq_mean.numel() > 1 else 0.0
    out["rollout_is_seq_max"] = seq_mean.max()
    out["rollout_is_seq_min"] = seq_mean.min()
    out["rollout_is_seq_max_deviation"] = (seq_mean - 1.0).abs().max()
    out["rollout_is_seq_fraction_high"] = (seq_mean > threshold).double().mean()
    out["rollout_is_seq_fraction_low"] = (seq_mean < lower).double().mean()
    return out


def rollout_correction_weights(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor,
                               response_mask: torch.Tensor, level: str = "sequence",
                               mode: str = "truncate", threshold: float = 5.0,
                               normalize: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Importance weights pi_old / pi_rollout per token, and their metrics.

    old_log_probs: [B, S] float — the trainer's log-probs of the sampled tokens (behaviour
        policy of the loss).
    rollout_log_probs: [B, S] float — the rollout engine's log-probs of the same tokens.
    response_mask: [B, S] binary — 1 generated token, 0 padding or tool output.
    level: "sequence" (one weight per row, exp of the masked log-ratio sum) or "token".
    mode: "truncate" (cap at threshold) or "mask" (weight 0 above threshold).
    normalize: rescale to mean 1 over this batch (tokens for "token", rows for "sequence").
    Returns (weights [B, S] detached, float32/float64, 0 where the mask is 0; metrics: the
    reference's rollout_is_* statistics of the weights before truncation, plus
    rollout_is_masked_fraction in "mask" mode). An empty mask gives weights 0, no metrics.
    """
    _validate(level, mode, threshold)
    if old_log_probs.shape != rollout_log_probs.shape or old_log_probs.shape != response_mask.shape:
        raise ValueError(
            f"rollout_correction_weights: old_log_probs {tuple(old_log_probs.shape)}, "
            f"rollout_log_probs {tuple(rollout_log_probs.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must have the same [B, S] shape")
    dtype = torch.promote_types(old_log_probs.dtype, torch.float32)
    valid = response_mask > 0
    mask = valid.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=old_log_probs.device)
    log_ratio = torch.where(valid, old_log_probs.detach().to(dtype) - rollout_log_probs.detach().to(dtype), zero)
    if level == "token":
        log_ratio_for_metrics = log_ratio
        weights = torch.exp(log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND))
    else:
        log_ratio_for_metrics = log_ratio.sum(-1, keepdim=True)
        weights = torch.exp(log_ratio_for_metrics.clamp(-SAFETY_BOUND, SAFETY_BOUND)).expand_as(log_ratio)
    weights = weights * mask
    if not bool(valid.any()):
        return weights, {}
    metrics = _is_metrics(weights, log_ratio_for_metrics, mask, level, threshold)
    if mode == "truncate":
        weights = weights.clamp(max=threshold)
    else:
        rejected = valid & (weights > threshold)
        metrics["rollout_is_masked_fraction"] = _masked_mean(rejected.to(dtype), mask)
        weights = torch.where(rejected, zero, weights)
    if normalize:
        if level == "token":
            weights_mean = _masked_mean(weights, mask)
        else:
            seq_mask = (mask.sum(-1) > 0).to(dtype)
            weights_mean = (_masked_mean(weights, mask, dim=-1) * seq_mask).sum() / seq_mask.sum().clamp_min(1e-8)
        if weights_mean > 1e-8:
            weights = weights / weights_mean
            metrics["rollout_is_batch_norm_factor"] = weights_mean
        else:
            metrics["rollout_is_batch_norm_factor"] = 1.0
    return weights.detach(), to_floats(metrics)
