"""`policy_loss`: validate inputs, per-token terms from the registry, IS weights, aggregate, metrics."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ctpo_megatron.algo.aggregate import aggregate_loss
from ctpo_megatron.algo.config import PolicyLossConfig
from ctpo_megatron.algo.layout import packed_to_padded
from ctpo_megatron.algo.metrics import check_bucket_edges
from ctpo_megatron.algo.registry import FIXED_AGG_MODE, LOSSES, TERMS_AND_METRICS, TERMS_AND_SUMS
from ctpo_megatron.algo.stats import LossSums, policy_metrics
from ctpo_megatron.logging_utils import warn_once

logger = logging.getLogger(__name__)


def _check_inputs(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                  response_mask: torch.Tensor,
                  extra: dict[str, torch.Tensor | None]) -> torch.Tensor:
    if log_probs.dim() != 2:
        raise ValueError(f"policy_loss: log_probs must be [B, S], got shape {tuple(log_probs.shape)}")
    if not log_probs.is_floating_point():
        raise ValueError(f"policy_loss: log_probs must be floating point, got {log_probs.dtype}")
    shape = log_probs.shape
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    if advantages.shape[-1] == 1 and advantages.dim() == 2:
        advantages = advantages.expand(shape)
    named = {"old_log_probs": old_log_probs, "advantages": advantages, "response_mask": response_mask,
             **extra}
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != shape:
            raise ValueError(f"policy_loss: {name} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(shape)} (the shape of log_probs)")
        if tensor is not None and tensor.device != log_probs.device:
            raise ValueError(f"policy_loss: {name} is on {tensor.device}, log_probs on {log_probs.device}")
    return advantages


def policy_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, cfg: PolicyLossConfig,
                rollout_is_weights: torch.Tensor | None = None, *,
                batch_num_tokens: int | torch.Tensor | None = None,
                global_batch_size: int | torch.Tensor | None = None, dp_size: int = 1,
                loss_scale_factor: float | None = None,
                cum_log_ratio: torch.Tensor | None = None,
                cum_count: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, return_terms: bool = False,
                with_metrics: bool = True, sums_bucket_edges: Sequence[int] | None = None):
    """The policy-gradient loss of one micro-batch and its metrics.

    log_probs: [B, S] float — current policy log-prob per response token (autograd); B
        sequences, S response positions (padded layout, prompt excluded); full over TP.
    old_log_probs: [B, S] float — behaviour-policy log-probs (no gradient).
    advantages: [B, S] float, or [B] / [B, 1] broadcast over tokens (no gradient).
    response_mask: [B, S] binary — 1 generated token, 0 padding or tool output.
    cfg: which loss and its settings.
    rollout_is_weights: optional [B, S] rollout-correction weights multiplied into the
        per-token loss (see `rollout_correction_weights`), no gradient.
    batch_num_tokens, global_batch_size, dp_size, loss_scale_factor: global-batch
        normalisation (see `aggregate_loss`); defaults give the micro-batch mean.
    cum_log_ratio, cum_count: optional [B, S] prefix sums for "ctpo" (global totals for "seq"),
        e.g. from the context-parallel scan; see `ctpo_token_terms`.
    cu_seqlens: optional [N+1] int — packed layout (THD): every per-token tensor above is [T]
        (or [1, T]) with sequence n at [cu_seqlens[n], cu_seqlens[n+1]); advantages per token.
        The loss is computed on the zero-padded [N, S_max] view; gradients flow back packed.
    return_terms: also return the per-token `TokenTerms` the loss was built from (e.g. for
        clip rates by position), so callers need not compute them a second time.
    with_metrics: False skips `policy_metrics` (and its one device-to-host copy); metrics is
        then {} (the trainer sums `algo.stats.LossSums` over the step instead).
    sums_bucket_edges: also return the micro-batch's `algo.stats.LossSums` (what the trainer
        adds up over a step; clip-rate buckets at these edges, positions the running count or
        the given cum_count; no host sync), from the loss's own pass where the loss has one
        (`TERMS_AND_SUMS`, e.g. "ctpo" on CPU), else `LossSums.from_terms`.
    Returns (loss: 0-d tensor in the compute dtype with autograd to log_probs; metrics: dict of
    floats, see `algo.stats.policy_metrics`), plus the TokenTerms ([B, S], padded layout)
    when `return_terms`, plus the LossSums when `sums_bucket_edges` is given (in that order).
    """
    if cu_seqlens is not None:
        padded = packed_to_padded(cu_seqlens, {
            "log_probs": log_probs, "old_log_probs": old_log_probs, "advantages": advantages,
            "response_mask": response_mask, "rollout_is_weights": rollout_is_weights,
            "cum_log_ratio": cum_log_ratio, "cum_count": cum_count})
        log_probs, old_log_probs, advantages = padded["log_probs"], padded["old_log_probs"], padded["advantages"]
        response_mask, rollout_is_weights = padded["response_mask"], padded["rollout_is_weights"]
        cum_log_ratio, cum_count = padded["cum_log_ratio"], padded["cum_count"]
    advantages = _check_inputs(log_probs, old_log_probs, advantages, response_mask,
                               {"rollout_is_weights": rollout_is_weights,
                                "cum_log_ratio": cum_log_ratio, "cum_count": cum_count})
    edges = None if sums_bucket_edges is None else check_bucket_edges(sums_bucket_edges)
    # One pass of the loss gives its terms and their statistics, where the loss has one and
    # counts the positions itself: the sums when asked for (the trainer), else the metrics.
    terms_and_metrics = terms_and_stats = None
    if cum_count is None and edges is not None and cfg.name in TERMS_AND_SUMS:
        terms_and_stats = TERMS_AND_SUMS[cfg.name](log_probs, old_log_probs, advantages, response_mask, cfg, edges)
    elif cum_count is None and with_metrics and cfg.name in TERMS_AND_METRICS:
        terms_and_metrics = TERMS_AND_METRICS[cfg.name](log_probs, old_log_probs, advantages, response_mask, cfg)
    if terms_and_metrics is not None:
        terms, metrics = terms_and_metrics
    elif terms_and_stats is not None:
        terms, stats = terms_and_stats
    else:
        terms = LOSSES[cfg.name](log_probs, old_log_probs, advantages, response_mask, cfg,
                                 cum_log_ratio=cum_log_ratio, cum_count=cum_count)
    pg_losses = terms.pg_losses
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights.detach().to(pg_losses.dtype)
    agg_mode = FIXED_AGG_MODE.get(cfg.name, cfg.loss_agg_mode)
    if agg_mode != cfg.loss_agg_mode:
        warn_once(logger, f"{cfg.name} loss aggregates with {agg_mode}; "
                          f"loss_agg_mode={cfg.loss_agg_mode!r} is ignored")
    valid = response_mask if response_mask.dtype == torch.bool else response_mask > 0
    # IS weights may be anything at invalid tokens (0 * inf): then the sums select.
    zero_at_invalid = terms.zero_at_invalid and rollout_is_weights is None
    loss = aggregate_loss(pg_losses, valid, agg_mode, dp_size=dp_size,
                          batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                          loss_scale_factor=loss_scale_factor, zero_at_invalid=zero_at_invalid)
    # Given prefix counts are the n_t of the terms (e.g. global under context parallelism).
    positions = None if cum_count is None or (not with_metrics and edges is None) else (
        cum_count.detach().round().to(torch.int64))
    if not with_metrics:
        metrics = {}
    elif terms_and_metrics is None:
        with torch.no_grad():
            metrics = policy_metrics(terms, valid, advantages, cfg, positions=positions)
    out = (loss, metrics, terms) if return_terms else (loss, metrics)
    if edges is None:
        return out
    if terms_and_stats is not None:
        sums = LossSums.from_stats(stats, loss=loss, dp_size=dp_size)
    else:
        sums = LossSums.from_terms(terms, valid, advantages, cfg, loss=loss, dp_size=dp_size, bucket_edges=edges,
                                   positions=positions)
    return (*out, sums)
