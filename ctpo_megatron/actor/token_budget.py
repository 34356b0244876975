"""Token-budget micro-batches: which samples of a DP share go into which micro-batch.

With `ActorConfig.micro_batch_tokens` > 0 the share's samples are sorted by length (longest
first) and micro-batches are filled greedily up to the budget, so each one is padded only to
its own longest sample (or packed without padding, `actor/packing.py`):

  padded: cost(group) = len(group) * round_up(longest, seq_multiple)
  packed: cost(group) = round_up(sum of lengths, seq_multiple)

A sample longer than the budget gets a micro-batch of its own (it is never dropped or cut;
`max_position_embeddings` still bounds it). The schedule and DDP's gradient reduction expect
the same number of micro-batches on every DP replica, so training agrees on the largest count
over DP (`agree_count`) and every replica with fewer splits its most expensive micro-batches
in two (which only lowers their padding) until it has that many; a replica with fewer samples
than the count adds filler micro-batches of one masked-out token (`filler_batch`: zero loss
weight, zero gradient). The plan never changes the loss: it is normalized by the mini-batch's
token count, not per micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from ctpo_megatron.actor.batching import TokenBatch


def round_up(n: int, multiple: int) -> int:
    multiple = max(multiple, 1)
    return -(-n // multiple) * multiple


def group_cost(lengths: Sequence[int], *, packed: bool, seq_multiple: int = 1) -> int:
    """Tokens the model computes for a micro-batch of samples with these lengths (P_i + R_i)."""
    if not lengths:
        return 0
    if packed:
        return round_up(sum(lengths), seq_multiple)
    return len(lengths) * round_up(max(lengths), seq_multiple)


def plan_groups(lengths: Sequence[int], budget: int, *, packed: bool, seq_multiple: int = 1
                ) -> list[list[int]]:
    """Sample indices of each micro-batch: samples taken longest first (ties by index), each
    micro-batch filled while its `group_cost` stays within `budget` (a sample over the budget
    alone). Groups list their samples longest first, the longest group first."""
    if budget < 1:
        raise ValueError(f"actor.micro_batch_tokens={budget}: must be >= 1 (or 0 for fixed micro-batches)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        trial = [lengths[j] for j in current] + [lengths[i]]
        if current and group_cost(trial, packed=packed, seq_multiple=seq_multiple) > budget:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def split_to_count(groups: list[list[int]], count: int, lengths: Sequence[int], *, packed: bool,
                   seq_multiple: int = 1) -> list[list[int]]:
    """`groups` grown to exactly `count` micro-batches (count >= len(groups)): the most
    expensive group with 2+ samples is cut in two where the larger half is cheapest, until
    there are `count`; when every group holds one sample, empty groups (fillers) make up the
    rest."""
    if count < len(groups):
        raise ValueError(f"split_to_count: {len(groups)} micro-batches cannot become {count}")
    groups = [list(g) for g in groups]
    cost = lambda g: group_cost([lengths[i] for i in g], packed=packed, seq_multiple=seq_multiple)  # noqa: E731
    while len(groups) < count:
        splittable = [k for k, g in enumerate(groups) if len(g) > 1]
        if not splittable:
            groups.extend([] for _ in range(count - len(groups)))
            break
        k = max(splittable, key=lambda k: (cost(groups[k]), -k))
        g = groups.pop(k)
        cut = min(range(1, len(g)), key=lambda c: (max(cost(g[:c]), cost(g[c:])), c))
        groups[k:k] = [g[:cut], g[cut:]]
    return groups


def agree_count(local: int, group) -> int:
    """The largest micro-batch count over `group` (one all-reduce of one int; None or a group
    of one rank: `local`)."""
    if group is None or dist.get_world_size(group) == 1:
        return local
    from ctpo_megatron.actor.schedule import model_device

    t = torch.tensor([local], dtype=torch.int64, device=model_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def plan_token_budget(lengths: Sequence[int], budget: int, *, packed: bool, seq_multiple: int = 1,
                      dp_group=None) -> list[list[int]]:
    """`plan_groups`, then (with dp_group) `split_to_count` to the count agreed over DP."""
    groups = plan_groups(lengths, budget, packed=packed, seq_multiple=seq_multiple)
    if dp_group is None:
        return groups
    count = agree_count(len(groups), dp_group)
    return split_to_count(groups, count, lengths, packed=packed, seq_multiple=seq_multiple)


def filler_batch(fields: Sequence[str]) -> TokenBatch:
    """One sample of prompt [0] and response [0] whose per-token fields (response_mask
    included) are all 0: a micro-batch that runs the model but weighs nothing in the loss."""
    return TokenBatch(torch.zeros((1, 2), dtype=torch.int64), torch.ones(1, dtype=torch.int64),
                      torch.ones(1, dtype=torch.int64),
                      {name: torch.zeros((1, 1), dtype=torch.float32) for name in fields})
