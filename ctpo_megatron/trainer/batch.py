"""The step batch: one RL step's trajectories as typed tensors, built once on rank 0.

    trajectories --StepBatch.from_trajectories--> StepBatch (tokens, masks, behaviour log-probs,
    per-token weight versions, rewards, group ids, advantages)
    --plan_shards--> one row selection per DP replica (mini-batch-major, token-balanced)
    --transport.send_shards--> each replica's ranks get only their shard
    --> old log-probs, IS weights, mini-batches, micro-batches read the shard's tensors.

Every stage reads and adds tensors; nothing is converted to lists and back.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ctpo_megatron.actor.batching import TokenBatch
from ctpo_megatron.algo import grpo_advantages
from ctpo_megatron.rollout.agent.trajectory import version_number


@dataclass
class StepBatch:
    """N trajectories as tensors. Per-token tensors are [N, R] (R = longest response in this
    batch, 0 past each row's R_i); the rows of a shard are ordered mini-batch-major."""

    tokens: torch.Tensor
    """[N, L] int64 — prompt then response ids, right-padded with 0."""
    prompt_lens: torch.Tensor
    """[N] int64."""
    response_lens: torch.Tensor
    """[N] int64."""
    response_mask: torch.Tensor
    """[N, R] float32 — 1 generated token (trained), 0 tool output or padding."""
    rollout_log_probs: torch.Tensor
    """[N, R] float32 — the behaviour policy's log-prob of each generated token, as the server
    sampled it (0 at tool output)."""
    versions: torch.Tensor
    """[N, R] int64 — weight version (the trainer step whose weights sampled the token; 0 = the
    initial weights) of each generated token; -1 at tool output and padding. Tokens that
    `mask_stale_tokens` took out of the loss keep their version."""
    rewards: torch.Tensor
    """[N] float32."""
    group_ids: torch.Tensor
    """[N] int64 — responses to the same prompt share an id (the GRPO group)."""
    advantages: torch.Tensor
    """[N] float32 — GRPO advantage of each response (computed over the whole step)."""
    mini_batch_tokens: torch.Tensor | None = None
    """[M] int64 — generated tokens of each mini-batch over all DP replicas (the loss's
    token-mean denominator); set on shards by `shard`."""
    old_log_probs: torch.Tensor | None = None
    """[N, R] float32 — log-probs of the loss's old policy (set by the old-log-prob stage)."""
    is_weights: torch.Tensor | None = None
    """[N, R] float32 — rollout-correction weights (set with the old log-probs)."""

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        """Prompt + response tokens of all rows."""
        return int((self.prompt_lens + self.response_lens).sum())

    @property
    def positions(self) -> torch.Tensor:
        """[N, R] int64 — 1-indexed generated-token position n_t (tool output does not advance it)."""
        return torch.cumsum(self.response_mask > 0, dim=-1)

    def token_mask(self) -> torch.Tensor:
        """[N, R] bool — True at the R_i response tokens of each row (tool output included)."""
        return torch.arange(self.response_mask.shape[1]) < self.response_lens[:, None]

    # ------------------------------------------------------------------ build
    @classmethod
    def from_trajectories(cls, trajectories: Sequence[Any], *, norm_adv_by_std: bool = True) -> StepBatch:
        """One row per trajectory (a `rollout.Trajectory`), in order; advantages by GRPO over
        the trajectories' `prompt_index` groups."""
        if not trajectories:
            raise ValueError("StepBatch.from_trajectories: no trajectories")
        n = len(trajectories)
        p_lens = [len(t.prompt_ids) for t in trajectories]
        r_lens = [len(t.response_ids) for t in trajectories]
        width, r_max = max(p + r for p, r in zip(p_lens, r_lens)), max(max(r_lens), 1)
        tokens = torch.zeros((n, width), dtype=torch.int64)
        mask = torch.zeros((n, r_max), dtype=torch.float32)
        log_probs = torch.zeros((n, r_max), dtype=torch.float32)
        versions = torch.full((n, r_max), -1, dtype=torch.int64)
        for i, t in enumerate(trajectories):
            t.check()
            ids = list(t.prompt_ids) + list(t.response_ids)
            tokens[i, :len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
            r = r_lens[i]
            mask[i, :r] = torch.as_tensor(t.loss_mask, dtype=torch.float32)
            log_probs[i, :r] = torch.as_tensor(t.rollout_log_probs, dtype=torch.float32)
            token_versions = getattr(t, "token_versions", None)
            if token_versions:
                versions[i, :r] = torch.as_tensor(token_versions, dtype=torch.int64)
            else:
                # A rollout that spans weight updates without per-token versions: the oldest
                # (an upper bound on every token's staleness).
                versions[i, :r] = version_number(t.weight_versions[0] if t.weight_versions else None)
        versions = torch.where(mask > 0, versions, torch.full_like(versions, -1))
        rewards = torch.tensor([float(t.reward or 0.0) for t in trajectories], dtype=torch.float32)
        group_ids = torch.tensor([int(t.prompt_index) for t in trajectories], dtype=torch.int64)
        return cls(tokens=tokens, prompt_lens=torch.tensor(p_lens, dtype=torch.int64),
                   response_lens=torch.tensor(r_lens, dtype=torch.int64), response_mask=mask,
                   rollout_log_probs=log_probs, versions=versions, rewards=rewards,
                   group_ids=group_ids,
                   advantages=grpo_advantages(rewards, group_ids, norm_by_std=norm_adv_by_std))

    # ------------------------------------------------------------------ slicing
    def select(self, index: torch.Tensor) -> StepBatch:
        """Rows `index` ([K] int64), per-token tensors trimmed to the longest selected response
        and tokens to the longest selected sequence (so a shard's tensors are as wide as its
        rows need)."""
        r = max(int(self.response_lens[index].max()), 1) if index.numel() else 1
        length = int((self.prompt_lens + self.response_lens)[index].max()) if index.numel() else 1
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "mini_batch_tokens":
                out[f.name] = value
            elif f.name == "tokens":
                out[f.name] = value[index, :length]
            elif value.dim() == 2:
                out[f.name] = value[index, :r]
            else:
                out[f.name] = value[index]
        return StepBatch(**out)

    def rows(self, start: int, stop: int) -> StepBatch:
        """Rows [start, stop) (views)."""
        return StepBatch(**{f.name: (v if v is None or f.name == "mini_batch_tokens" else v[start:stop])
                            for f in dataclasses.fields(self) for v in [getattr(self, f.name)]})

    def token_batch(self) -> TokenBatch:
        """The actor's view: tokens plus the loss's per-token inputs ([N, R] each:
        response_mask, old_log_probs, advantages broadcast over the response, rollout_is_weights)."""
        per_token = {"response_mask": self.response_mask}
        if self.old_log_probs is not None:
            inside = self.token_mask().to(torch.float32)
            per_token["old_log_probs"] = self.old_log_probs
            per_token["advantages"] = self.advantages[:, None] * inside
            per_token["rollout_is_weights"] = inside if self.is_weights is None else self.is_weights
        return TokenBatch(self.tokens, self.prompt_lens, self.response_lens, per_token)

    # ------------------------------------------------------------------ transport form
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Field name -> tensor (fields that are None are left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> StepBatch:
        return cls(**tensors)


def plan_shards(batch: StepBatch, num_mini_batches: int, dp_size: int) -> list[torch.Tensor]:
    """Row indices of each DP replica's shard: mini-batch-major (the rows of mini-batch k
    first, then k+1, ...), and within each mini-batch balanced by token count.

    The step's rows split into `num_mini_batches` equal contiguous mini-batches (one optimizer
    update each); each mini-batch's rows go to the DP replicas greedily, longest first, to the
    replica with the fewest tokens (ties: lowest rank), with equal row counts per replica so
    every replica runs the same number of micro-batches. Within a replica rows keep their order.
    """
    n = len(batch)
    if num_mini_batches < 1 or n % num_mini_batches:
        raise ValueError(f"{n} trajectories cannot be split into {num_mini_batches} equal "
                         "mini-batches (trainer.prompts_per_step / trainer.mini_batch_prompts)")
    size = n // num_mini_batches
    if size % dp_size:
        raise ValueError(f"a mini-batch of {size} trajectories is not divisible by dp={dp_size}")
    per_rank = size // dp_size
    lengths = (batch.prompt_lens + batch.response_lens).tolist()
    shards: list[list[int]] = [[] for _ in range(dp_size)]
    for k in range(num_mini_batches):
        rows = range(k * size, (k + 1) * size)
        loads, counts = [0] * dp_size, [0] * dp_size
        owner = {}
        for i in sorted(rows, key=lambda i: -lengths[i]):  # stable: ties keep row order
            rank = min((r for r in range(dp_size) if counts[r] < per_rank), key=lambda r: (loads[r], r))
            owner[i] = rank
            counts[rank] += 1
            loads[rank] += lengths[i]
        for i in rows:
            shards[owner[i]].append(i)
    return [torch.tensor(s, dtype=torch.int64) for s in shards]


def shard(batch: StepBatch, num_mini_batches: int, dp_size: int) -> list[StepBatch]:
    """`plan_shards` applied: one StepBatch per DP replica, each carrying the step's
    `mini_batch_tokens` (generated tokens per mini-batch over all replicas)."""
    plans = plan_shards(batch, num_mini_batches, dp_size)  # validates the sizes
    size = len(batch) // num_mini_batches
    per_row = (batch.response_mask > 0).sum(-1)
    tokens = per_row.reshape(num_mini_batches, size).sum(-1)
    out = []
    for index in plans:
        part = batch.select(index)
        part.mini_batch_tokens = tokens
        out.append(part)
    return out


STALE_POLICIES = ("mask", "drop")
"""What `rollout.stale_policy` does with generated tokens older than `rollout.max_staleness`."""


def mask_stale_tokens(batch: StepBatch, policy_version: int, max_staleness: int, policy: str) -> dict[str, float]:
    """Takes generated tokens more than `max_staleness` versions behind `policy_version` out of
    the loss (in place, on `response_mask`); returns `stale/*` counts.

    policy "mask": only those tokens leave the loss; the trajectory's newer tokens stay, and the
    stale prefix becomes context (a token's version never decreases along a trajectory, so the
    stale tokens are its first generated ones: CTPO's cumulative ratio and positions then start
    after them). "drop": the whole trajectory leaves the loss. Either way the rows stay (the
    batch shape and mini-batch split do not change) and the GRPO advantages, computed over the
    whole group as generated, do not change: the stale samples still count in their group's
    baseline. Metrics: `stale/tokens` (generated tokens past the bound), `stale/masked_tokens`
    (tokens taken out of the loss: the stale ones, or every generated token of a dropped
    trajectory), `stale/dropped_trajectories`.
    """
    if policy not in STALE_POLICIES:
        raise ValueError(f"rollout.stale_policy={policy!r}: expected one of {', '.join(STALE_POLICIES)}")
    generated = batch.response_mask > 0
    stale = generated & (batch.versions < policy_version - max_staleness)
    rows = stale.any(dim=-1)
    removed = stale if policy == "mask" else generated & rows[:, None]
    batch.response_mask = batch.response_mask.masked_fill(removed, 0.0)
    return {"stale/tokens": float(stale.sum()), "stale/masked_tokens": float(removed.sum()),
            "stale/dropped_trajectories": float(rows.sum()) if policy == "drop" else 0.0}


def version_metrics(batch: StepBatch, policy_version: int) -> dict[str, float]:
    """How old the step's generated tokens are: `staleness/mean|max` and the fraction of
    tokens `staleness/<k>` that are k versions behind `policy_version` (the weights being
    trained), `tokens_per_version/<v>`, and `rollout/partial`: trajectories whose tokens come
    from more than one version (a weight update landed while they were generated). Synchronous
    steps show staleness 0 only."""
    generated = batch.response_mask > 0
    versions = batch.versions[generated]
    if versions.numel() == 0:
        return {}
    staleness = policy_version - versions
    newest = batch.versions.masked_fill(~generated, -1).max(dim=-1).values
    oldest = batch.versions.masked_fill(~generated, 1 << 62).min(dim=-1).values
    out = {"staleness/mean": float(staleness.double().mean()), "staleness/max": float(staleness.max()),
           "rollout/partial": float(((newest > oldest) & generated.any(dim=-1)).sum())}
    values, counts = torch.unique(staleness, return_counts=True)
    for v, c in zip(values.tolist(), counts.tolist()):
        out[f"staleness/{v}"] = c / versions.numel()
    values, counts = torch.unique(versions, return_counts=True)
    for v, c in zip(values.tolist(), counts.tolist()):
        out[f"tokens_per_version/{v}"] = float(c)
    return out


def rollout_metrics(trajectories: Sequence[Any], prefix: str = "") -> dict[str, float]:
    """Reward, accuracy, lengths, tool use and finish reasons of a batch of `Trajectory`s."""
    if not trajectories:
        return {}
    n = len(trajectories)
    rewards = [float(t.reward or 0.0) for t in trajectories]
    gen_lens = [sum(t.loss_mask) for t in trajectories]
    resp_lens = [len(t.response_ids) for t in trajectories]
    calls = [t.tool_calls for t in trajectories]
    out = {
        f"{prefix}reward/mean": statistics.fmean(rewards),
        f"{prefix}reward/std": statistics.pstdev(rewards),
        f"{prefix}accuracy": sum(bool(t.correct) for t in trajectories) / n,
        f"{prefix}boxed_rate": sum(bool(t.has_boxed) for t in trajectories) / n,
        f"{prefix}response_length/mean": statistics.fmean(resp_lens),
        f"{prefix}response_length/max": float(max(resp_lens)),
        f"{prefix}generated_tokens/mean": statistics.fmean(gen_lens),
        f"{prefix}tool/calls_mean": statistics.fmean(calls),
        f"{prefix}tool/use_rate": sum(c > 0 for c in calls) / n,
        f"{prefix}tool/turns_mean": statistics.fmean(t.num_turns for t in trajectories),
        f"{prefix}tool/error_rate": sum(t.tool_errors for t in trajectories) / max(sum(calls), 1),
        f"{prefix}tool/timeout_rate": sum(t.tool_timeouts for t in trajectories) / max(sum(calls), 1),
    }
    for reason in ("stop", "length", "max_turns", "abort"):
        out[f"{prefix}finish/{reason}"] = sum(t.finish_reason == reason for t in trajectories) / n
    groups: dict[int, list[float]] = {}
    for t, r in zip(trajectories, rewards):
        groups.setdefault(int(t.prompt_index), []).append(r)
    # Groups whose samples all score the same give zero advantage: no learning signal.
    out[f"{prefix}reward/solved_all_frac"] = sum(min(g) == max(g) and g[0] > 0 for g in groups.values()) / len(groups)
    out[f"{prefix}reward/solved_none_frac"] = sum(max(g) <= 0 for g in groups.values()) / len(groups)
    return out
