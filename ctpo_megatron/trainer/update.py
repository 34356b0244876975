"""The update phase of a step: old log-probs, mismatch correction, mini-batch CTPO updates.

Runs on every rank with the same broadcast samples; each data-parallel rank trains on its
share of every mini-batch (`batch.dp_shard`). The actor's `train_step` reduces metrics over
micro-batches and DP ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ctpo_megatron.algo import (PolicyLossConfig, RolloutCorrectionConfig, clip_rate_by_position,
                                policy_loss, rollout_correction_weights)
from ctpo_megatron.trainer.batch import Sample, dp_shard, mini_batches
from ctpo_megatron.trainer.metrics import mean_metrics

logger = logging.getLogger(__name__)

CLIP_POS_PREFIX = "clip_rate_by_pos"


def position_edges(max_response_len: int, bins: int) -> list[int]:
    """Bucket starts (1-indexed generated-token positions) of the clip-rate-by-position metric:
    powers of two, at most `bins` buckets, the last one open-ended."""
    edges = [1]
    while edges[-1] * 2 <= max_response_len and len(edges) < bins:
        edges.append(edges[-1] * 2)
    return edges


def _pad(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.as_tensor(row, dtype=torch.float32)
    return out


def attach_old_log_probs(samples: list[Sample], old_log_probs: list[torch.Tensor] | None,
                         correction: RolloutCorrectionConfig) -> dict[str, float]:
    """Adds `old_log_probs`, per-token `advantages` and `rollout_is_weights` to each sample.

    old_log_probs: per sample [R_i] float32 — the trainer's recomputed log-probs, or None to
    use the rollout engine's (then no mismatch correction applies). Returns the correction's
    metrics (IS-weight statistics, log-prob mismatch) over these samples.
    """
    metrics: dict[str, float] = {}
    if old_log_probs is None:
        for s in samples:
            s["old_log_probs"] = list(s["rollout_log_probs"])
    else:
        if len(old_log_probs) != len(samples):
            raise ValueError(f"{len(old_log_probs)} old log-prob rows for {len(samples)} samples")
        for s, lp in zip(samples, old_log_probs):
            s["old_log_probs"] = lp.tolist()
        width = max(len(s["response_ids"]) for s in samples)
        old = _pad([s["old_log_probs"] for s in samples], width)
        rollout = _pad([s["rollout_log_probs"] for s in samples], width)
        mask = _pad([s["response_mask"] for s in samples], width)
        diff = (old - rollout).abs() * mask
        n = mask.sum().clamp(min=1)
        metrics["mismatch/abs_log_prob_diff_mean"] = float(diff.sum() / n)
        metrics["mismatch/abs_log_prob_diff_max"] = float(diff.max())
        if correction.enabled:
            weights, is_metrics = rollout_correction_weights(
                old, rollout, mask, level=correction.level, mode=correction.mode,
                threshold=correction.threshold, normalize=correction.normalize)
            metrics.update({f"mismatch/{k}": v for k, v in is_metrics.items()})
            for i, s in enumerate(samples):
                s["rollout_is_weights"] = weights[i, :len(s["response_ids"])].tolist()
    for s in samples:
        s["advantages"] = [s["advantage"]] * len(s["response_ids"])
        s.setdefault("rollout_is_weights", [1.0] * len(s["response_ids"]))
    return metrics


def make_loss_fn(cfg: PolicyLossConfig, edges: list[int]) -> Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]:
    """The actor's per-micro-batch loss: `policy_loss` plus clip counts per position bucket.

    log_probs: [b, R] float32 with grad (full over TP); batch: [b, R] old_log_probs,
    advantages, response_mask, rollout_is_weights and ints global_num_tokens, dp_size.
    """
    def loss_fn(log_probs: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        mask = batch["response_mask"]
        loss, metrics, terms = policy_loss(
            log_probs, batch["old_log_probs"], batch["advantages"], mask, cfg,
            rollout_is_weights=batch["rollout_is_weights"],
            batch_num_tokens=batch["global_num_tokens"], dp_size=batch["dp_size"], return_terms=True)
        with torch.no_grad():
            clipped, tokens = clip_rate_by_position(terms.clip_any, mask, bucket_edges=edges)
        for k, (c, t) in enumerate(zip(clipped.tolist(), tokens.tolist())):
            metrics[f"_clip_pos_clipped/{k}"] = float(c)
            metrics[f"_clip_pos_tokens/{k}"] = float(t)
        return loss, metrics

    return loss_fn


def position_metrics(metrics: dict[str, float], edges: list[int]) -> dict[str, float]:
    """Turns the loss's per-bucket counts (means over micro-batches and ranks, so their ratio
    is the ratio of sums) into `clip_rate_by_pos/<lo>-<hi>` rates; drops the counts."""
    out = {k: v for k, v in metrics.items() if not k.startswith("_clip_pos_")}
    for k, lo in enumerate(edges):
        tokens = metrics.get(f"_clip_pos_tokens/{k}", 0.0)
        if tokens <= 0:
            continue
        label = f"{lo}-{edges[k + 1] - 1}" if k + 1 < len(edges) else f"{lo}+"
        out[f"{CLIP_POS_PREFIX}/{label}"] = metrics[f"_clip_pos_clipped/{k}"] / tokens
    return out


def run_updates(actor: Any, samples: list[Sample], *, num_mini_batches: int, epochs: int,
                dp_rank: int, dp_size: int, loss_fn: Callable, edges: list[int]) -> dict[str, float]:
    """`epochs` passes of `num_mini_batches` optimizer updates over the step's samples.

    Each update trains this rank on its DP share of one mini-batch. Returns the metrics
    averaged over updates, under `actor/` (loss terms) and `clip_rate_by_pos/`.
    """
    per_update = []
    for _ in range(epochs):
        for mb in mini_batches(samples, num_mini_batches):
            per_update.append(actor.train_step(dp_shard(mb, dp_rank, dp_size), loss_fn))
    metrics = position_metrics(mean_metrics(per_update), edges)
    return {(k if k.startswith(CLIP_POS_PREFIX) else f"actor/{k}"): v for k, v in metrics.items()}
