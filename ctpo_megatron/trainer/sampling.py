"""Dynamic sampling (`rollout.filter_zero_variance_groups`): keep drawing prompts until the
step's batch is full of informative groups.

A group whose n samples all get the same reward has zero GRPO advantage: it costs a rollout
and an update and teaches nothing. With filtering on, rank 0 drops such groups and draws
more prompts (from the same sampler, so the data position stays exact across resumes) until
`prompts_per_step` informative groups are collected, or `rollout.max_sampling_rounds` rounds
ran (then the batch is topped up with dropped groups, which contribute zero advantage).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)


def group_by_prompt(trajectories: Sequence[Any]) -> list[list[Any]]:
    """Trajectories grouped by `prompt_index`, groups in first-seen order."""
    groups: dict[int, list[Any]] = {}
    for t in trajectories:
        groups.setdefault(int(t.prompt_index), []).append(t)
    return list(groups.values())


def is_informative(group: Sequence[Any]) -> bool:
    """Whether the group's rewards differ (so its GRPO advantages are not all zero)."""
    rewards = [float(t.reward or 0.0) for t in group]
    return max(rewards) > min(rewards)


def fill_informative_groups(generate: Callable[[list, int], list], sampler: Any, prompts: list,
                            *, target: int, max_rounds: int) -> tuple[list[Any], list[Any], dict[str, float]]:
    """Rounds of `generate(prompts, round) -> trajectories` over `prompts`, then over newly drawn
    prompts (`sampler.next_batch(missing)`), until `target` informative groups are kept.

    Returns (kept trajectories, target groups re-indexed 0..target-1 by `prompt_index`;
    every trajectory generated; metrics sampling/groups_drawn, groups_dropped, rounds,
    topped_up).
    """
    kept: list[list[Any]] = []
    dropped: list[list[Any]] = []
    generated: list[Any] = []
    rounds = 0
    while True:
        trajs = generate(prompts, rounds)
        rounds += 1
        generated += trajs
        for group in group_by_prompt(trajs):
            (kept if is_informative(group) else dropped).append(group)
        missing = target - len(kept)
        if missing <= 0 or rounds >= max_rounds:
            break
        prompts = sampler.next_batch(missing)
    topped_up = max(target - len(kept), 0)
    if topped_up:
        logger.warning("dynamic sampling: %d of %d groups still uninformative after %d rounds; "
                       "training on them (zero advantage)", topped_up, target, rounds)
        kept += dropped[:topped_up]
    kept = kept[:target]
    out = []
    for index, group in enumerate(kept):
        for t in group:
            t.prompt_index = index
            out.append(t)
    metrics = {"sampling/groups_drawn": float(len(kept) - topped_up + len(dropped)),
               "sampling/groups_dropped": float(len(dropped)), "sampling/rounds": float(rounds),
               "sampling/topped_up": float(topped_up)}
    return out, generated, metrics
