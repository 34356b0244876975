"""From scored trajectories to the actor's samples: advantages, rollout metrics, sharding.

Every rank runs these functions on the same broadcast trajectories, so every rank derives the
same advantages and the same mini-batch split without further communication.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch

from ctpo_megatron.algo import grpo_advantages

Sample = dict[str, Any]
"""One trajectory as the actor consumes it: `prompt_ids`, `response_ids` ([R] ints),
`response_mask` ([R] 0/1: 1 generated, 0 tool output), `rollout_log_probs` ([R] floats),
`advantage` (float), later `old_log_probs` and `rollout_is_weights` ([R] floats)."""


def traj_field(traj: Any, name: str) -> Any:
    """Reads `name` from a Trajectory object or its dict form (broadcast trajectories are dicts)."""
    return traj[name] if isinstance(traj, dict) else getattr(traj, name)


def compute_advantages(trajectories: Sequence[Any], *, norm_by_std: bool = True) -> torch.Tensor:
    """GRPO advantages: [N] float32, rewards normalized within each prompt's group of samples."""
    rewards = torch.tensor([float(traj_field(t, "reward") or 0.0) for t in trajectories], dtype=torch.float32)
    groups = [int(traj_field(t, "prompt_index")) for t in trajectories]
    return grpo_advantages(rewards, groups, norm_by_std=norm_by_std)


def build_samples(trajectories: Sequence[Any], advantages: torch.Tensor) -> list[Sample]:
    """One sample per trajectory, in order (see `Sample`)."""
    if len(trajectories) != advantages.shape[0]:
        raise ValueError(f"build_samples: {len(trajectories)} trajectories but {advantages.shape[0]} advantages")
    samples = []
    for traj, adv in zip(trajectories, advantages.tolist()):
        samples.append({
            "prompt_ids": list(traj_field(traj, "prompt_ids")),
            "response_ids": list(traj_field(traj, "response_ids")),
            "response_mask": list(traj_field(traj, "loss_mask")),
            "rollout_log_probs": list(traj_field(traj, "rollout_log_probs")),
            "advantage": float(adv),
        })
    return samples


def mini_batches(samples: list[Sample], num: int) -> list[list[Sample]]:
    """Splits the step's samples into `num` equal contiguous mini-batches (one optimizer update each)."""
    if num < 1 or len(samples) % num:
        raise ValueError(f"mini_batches: {len(samples)} samples cannot be split into {num} equal "
                         "mini-batches (trainer.prompts_per_step / trainer.mini_batch_prompts)")
    size = len(samples) // num
    return [samples[i * size:(i + 1) * size] for i in range(num)]


def dp_shard(samples: list[Sample], dp_rank: int, dp_size: int) -> list[Sample]:
    """This data-parallel rank's share: samples balanced by token count over the dp ranks.

    Greedy longest-first assignment to the rank with the fewest tokens (ties: lowest rank) and
    equal sample counts per rank, so every rank runs the same number of micro-batches.
    """
    if len(samples) % dp_size:
        raise ValueError(f"dp_shard: {len(samples)} samples are not divisible by dp={dp_size}")
    per_rank = len(samples) // dp_size
    order = sorted(range(len(samples)),
                   key=lambda i: -(len(samples[i]["prompt_ids"]) + len(samples[i]["response_ids"])))
    loads = [0] * dp_size
    counts = [0] * dp_size
    owner = [0] * len(samples)
    for i in order:
        rank = min((r for r in range(dp_size) if counts[r] < per_rank), key=lambda r: (loads[r], r))
        owner[i] = rank
        counts[rank] += 1
        loads[rank] += len(samples[i]["prompt_ids"]) + len(samples[i]["response_ids"])
    return [s for s, r in zip(samples, owner) if r == dp_rank]


def rollout_metrics(trajectories: Sequence[Any], prefix: str = "") -> dict[str, float]:
    """Reward, accuracy, lengths, tool use and finish reasons of a batch of trajectories."""
    if not trajectories:
        return {}
    n = len(trajectories)
    rewards = [float(traj_field(t, "reward") or 0.0) for t in trajectories]
    gen_lens = [sum(traj_field(t, "loss_mask")) for t in trajectories]
    resp_lens = [len(traj_field(t, "response_ids")) for t in trajectories]
    calls = [traj_field(t, "tool_calls") for t in trajectories]
    out = {
        f"{prefix}reward/mean": statistics.fmean(rewards),
        f"{prefix}reward/std": statistics.pstdev(rewards),
        f"{prefix}accuracy": sum(bool(traj_field(t, "correct")) for t in trajectories) / n,
        f"{prefix}boxed_rate": sum(bool(traj_field(t, "has_boxed")) for t in trajectories) / n,
        f"{prefix}response_length/mean": statistics.fmean(resp_lens),
        f"{prefix}response_length/max": float(max(resp_lens)),
        f"{prefix}generated_tokens/mean": statistics.fmean(gen_lens),
        f"{prefix}tool/calls_mean": statistics.fmean(calls),
        f"{prefix}tool/use_rate": sum(c > 0 for c in calls) / n,
        f"{prefix}tool/turns_mean": statistics.fmean(traj_field(t, "num_turns") for t in trajectories),
        f"{prefix}tool/error_rate": sum(traj_field(t, "tool_errors") for t in trajectories) / max(sum(calls), 1),
        f"{prefix}tool/timeout_rate": sum(traj_field(t, "tool_timeouts") for t in trajectories) / max(sum(calls), 1),
    }
    for reason in ("stop", "length", "max_turns", "abort"):
        out[f"{prefix}finish/{reason}"] = sum(traj_field(t, "finish_reason") == reason for t in trajectories) / n
    groups: dict[int, list[float]] = {}
    for t, r in zip(trajectories, rewards):
        groups.setdefault(int(traj_field(t, "prompt_index")), []).append(r)
    # Groups whose samples all score the same give zero advantage: no learning signal.
    out[f"{prefix}reward/solved_all_frac"] = sum(min(g) == max(g) and g[0] > 0 for g in groups.values()) / len(groups)
    out[f"{prefix}reward/solved_none_frac"] = sum(max(g) <= 0 for g in groups.values()) / len(groups)
    return out
