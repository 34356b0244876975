"""The policy's memory estimate from the trainer's own settings: one function for the launcher's
plan (`--dry-run`) and the trainer's start-up check.

`estimate_inputs` is the one place where settings become `estimate_memory` inputs. It reads the
actor's settings as the trainer builds the actor (`TrainConfig.actor_config(dims)`: micro-batch
size, log-prob chunk, recompute, sequence parallelism, distributed optimizer), the rollout's
sequence budget and weight-sync bucket, and the cluster's GPU memory and overhead allowance. A
new batching setting of the actor (like the token budget per micro-batch) is fed in there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ctpo_megatron.cluster.memory import GIB, MemoryEstimate, estimate_memory
from ctpo_megatron.cluster.model_dims import model_dims_of
from ctpo_megatron.parallel.dims import ParallelDims

if TYPE_CHECKING:  # the trainer's config pulls in torch; only the annotations need it here
    from ctpo_megatron.config.schema import TrainConfig


def estimate_inputs(cfg: "TrainConfig", dims: ParallelDims) -> dict[str, Any]:
    """`estimate_memory` keywords for `cfg` at the resolved `dims` (dp >= 1).

    seq_len: rollout.max_prompt_len + rollout.max_response_len (the longest trajectory).
    micro_batch: actor.micro_batch_size sequences, or with actor.micro_batch_tokens > 0 that
    token budget (micro_batch_tokens). num_microbatches: micro-batches of one optimizer update
    on one DP rank (trainer.mini_batch_prompts x rollout.n_samples / dp, in micro-batches; with
    a token budget at most one per sample), which bounds the 1F1B in-flight count.
    """
    actor = cfg.actor_config(dims)
    per_rank = cfg.trainer.mini_batch_prompts * cfg.rollout.n_samples // dims.dp
    return dict(
        seq_len=cfg.rollout.max_prompt_len + cfg.rollout.max_response_len,
        micro_batch=actor.micro_batch_size,
        micro_batch_tokens=actor.micro_batch_tokens,
        num_microbatches=max(1, per_rank if actor.micro_batch_tokens else -(-per_rank // actor.micro_batch_size)),
        recompute=actor.recompute_granularity if actor.recompute else "none",
        distributed_optimizer=actor.use_distributed_optimizer,
        sequence_parallel=actor.sequence_parallel,
        logits_chunk_tokens=actor.logprob_chunk_size,
        weight_sync_bucket_bytes=cfg.rollout.weight_sync.bucket_bytes,
        gpu_memory_gib=cfg.cluster.gpu_memory_gib,
        overhead_gib=cfg.cluster.memory_overhead_gib)


def estimate_for_train_config(cfg: "TrainConfig", dims: ParallelDims, **changes: Any) -> MemoryEstimate:
    """Memory per GPU of the trainer's config at resolved `dims` (see `estimate_inputs`).

    changes: `estimate_memory` keywords that replace the config's (what-ifs; the trainer passes
    the memory of the GPU it runs on as `gpu_memory_gib`).
    """
    return estimate_memory(model_dims_of(cfg.model), dims, **{**estimate_inputs(cfg, dims), **changes})


def memory_what_ifs(cfg: "TrainConfig", dims: ParallelDims) -> dict[str, float]:
    """Total GiB per GPU with each memory-saving setting of the config turned off in turn."""
    base = estimate_inputs(cfg, dims)

    def total(at: ParallelDims = dims, **changes: Any) -> int:
        return estimate_for_train_config(cfg, at, **changes).total

    out = {}
    if base["recompute"] != "none":
        out["without activation recompute"] = total(recompute="none")
    for mode in ("selective", "full"):  # the other recompute kinds (model.recompute_granularity)
        if mode != base["recompute"]:
            out[f"with {mode} recompute"] = total(recompute=mode)
    if base["distributed_optimizer"]:
        out["without distributed optimizer"] = total(distributed_optimizer=False)
    out["without logits chunking"] = total(logits_chunk_tokens=0)
    if base["sequence_parallel"]:
        out["without sequence parallel"] = total(sequence_parallel=False)
    cp1 = ParallelDims(tp=dims.tp, pp=dims.pp, cp=1, dp=dims.dp)
    if dims.cp > 1:
        out["with cp=1 (same tp, pp, dp)"] = total(cp1)
    if base["recompute"] != "none" and base["distributed_optimizer"]:
        out["with none of these"] = total(cp1, logits_chunk_tokens=0, recompute="none",
                                          distributed_optimizer=False, sequence_parallel=False)
    return {name: value / GIB for name, value in out.items()}


def colocated_mem_fraction(cfg: "TrainConfig") -> float:
    """The --mem-fraction-static of servers colocated with the trainer
    (`rollout.placement=colocated`: `rollout.server_mem_fraction_static`, or the launcher's
    default for that placement); 0.0 when the servers run on other GPUs."""
    if cfg.rollout.placement != "colocated":
        return 0.0
    from ctpo_megatron.rollout.serving.launcher import COLOCATED_MEM_FRACTION
    return cfg.rollout.server_mem_fraction_static or COLOCATED_MEM_FRACTION
