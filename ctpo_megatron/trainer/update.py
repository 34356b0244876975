"""The update phase of a step on this DP replica's shard: old log-probs and rollout-correction
weights, then the mini-batch CTPO updates, with the loss's statistics reduced once per step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ctpo_megatron.actor.context_parallel import context_parallel_policy_loss
from ctpo_megatron.algo import LossSums, PolicyLossConfig, RolloutCorrectionConfig, rollout_correction_weights
from ctpo_megatron.trainer.batch import StepBatch


def attach_old_log_probs(batch: StepBatch, old_log_probs: torch.Tensor | None,
                         correction: RolloutCorrectionConfig) -> dict[str, float]:
    """Sets `batch.old_log_probs` and `batch.is_weights`; returns the mismatch metrics.

    old_log_probs: [N, R] float32 — the trainer's recomputed log-probs (0 past each response),
    or None to use the rollout's behaviour log-probs (then no mismatch correction applies and
    the weights are 1). Metrics: mean/max |old - rollout| over generated tokens and the
    correction's IS-weight statistics, over this shard.
    """
    inside = batch.token_mask().to(torch.float32)
    batch.is_weights = inside
    if old_log_probs is None:
        batch.old_log_probs = batch.rollout_log_probs
        return {}
    if old_log_probs.shape != batch.rollout_log_probs.shape:
        raise ValueError(f"old log-probs have shape {tuple(old_log_probs.shape)}, the batch "
                         f"{tuple(batch.rollout_log_probs.shape)}")
    batch.old_log_probs = old_log_probs
    mask = batch.response_mask
    diff = (old_log_probs - batch.rollout_log_probs).abs() * mask
    metrics = {"mismatch/abs_log_prob_diff_mean": float(diff.sum() / mask.sum().clamp(min=1)),
               "mismatch/abs_log_prob_diff_max": float(diff.max())}
    if correction.enabled:
        weights, is_metrics = rollout_correction_weights(
            old_log_probs, batch.rollout_log_probs, mask, level=correction.level,
            mode=correction.mode, threshold=correction.threshold, normalize=correction.normalize)
        batch.is_weights = weights.to(torch.float32)
        metrics.update({f"mismatch/{k}": v for k, v in is_metrics.items()})
    return metrics


def make_loss_fn(cfg: PolicyLossConfig, edges: Sequence[int]
                 ) -> Callable[[torch.Tensor, dict[str, Any]], tuple[torch.Tensor, LossSums]]:
    """The actor's per-micro-batch loss: `context_parallel_policy_loss` and its `LossSums`.

    log_probs: float32 with grad (full over TP), and the per-token inputs old_log_probs,
    advantages, response_mask, rollout_is_weights: [b, R] response order at CP = 1, [b, S/cp]
    in the rank's local zigzag layout at CP > 1 (mask 0 at tokens this rank does not score).
    inputs also hold global_num_tokens, dp_size (DP x CP) and cp_group (see
    `PolicyActor.train_step`). At CP > 1, CTPO's C_t and n_t and the clip-rate-by-position
    buckets' positions come from the cross-rank prefix sum (`context_parallel_cumsum`); at
    CP = 1 the loss counts them itself, and on CPU "ctpo" gives its terms and their `LossSums`
    from one pass of its kernel (`ops.ctpo_token_loss_stats`).
    """
    def loss_fn(log_probs: torch.Tensor, inputs: dict[str, Any]) -> tuple[torch.Tensor, LossSums]:
        loss, _, sums = context_parallel_policy_loss(log_probs, inputs, cfg, with_metrics=False,
                                                     sums_bucket_edges=edges)
        return loss, sums

    return loss_fn


def run_updates(actor: Any, shard: StepBatch, *, num_mini_batches: int, epochs: int,
                loss_fn: Callable, cfg: PolicyLossConfig, edges: Sequence[int]) -> dict[str, float]:
    """`epochs` passes of `num_mini_batches` optimizer updates over this replica's shard (its
    rows are mini-batch-major: mini-batch k is rows [k n, (k+1) n)).

    Returns the step's metrics: the loss statistics summed over every update and micro-batch
    and reduced over ranks once (`actor/*`, `clip_rate_by_pos/*`), and grad norm / lr averaged
    over updates.
    """
    size = len(shard) // num_mini_batches
    results = []
    for _ in range(epochs):
        for k in range(num_mini_batches):
            part = shard.rows(k * size, (k + 1) * size).token_batch()
            results.append(actor.train_step(part, loss_fn,
                                            global_num_tokens=int(shard.mini_batch_tokens[k])))
    total = None
    for r in results:
        total = r.stats if total is None else total + r.stats
    sums = actor.reduce_sum(total)
    metrics = sums.metrics(num_updates=len(results), bucket_edges=edges, adaptive_clip=cfg.adaptive_clip)
    out = {(k if k.startswith("clip_rate_by_pos/") else f"actor/{k}"): v for k, v in metrics.items()}
    out["actor/grad_norm"] = sum(r.grad_norm for r in results) / len(results)
    out["actor/lr"] = sum(r.lr for r in results) / len(results)
    out["actor/update_successful"] = sum(r.update_successful for r in results) / len(results)
    return out
