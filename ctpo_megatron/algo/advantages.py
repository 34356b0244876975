"""GRPO outcome advantages: rewards normalised within each prompt's group of samples."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


def _group_index(group_ids: torch.Tensor | Sequence[Hashable], batch: int,
                 device: torch.device) -> torch.Tensor:
    if torch.is_tensor(group_ids):
        if group_ids.shape != (batch,):
            raise ValueError(f"grpo_advantages: group_ids has shape {tuple(group_ids.shape)}, "
                             f"expected ({batch},) like rewards")
        return torch.unique(group_ids.to(device), return_inverse=True)[1]
    ids = list(group_ids)
    if len(ids) != batch:
        raise ValueError(f"grpo_advantages: {len(ids)} group_ids for {batch} rewards")
    first_seen: dict[Hashable, int] = {}
    index = [first_seen.setdefault(g, len(first_seen)) for g in ids]
    return torch.tensor(index, dtype=torch.int64, device=device)


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor | Sequence[Hashable],
                    norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages, one per response (the reference's GRPO estimator).

    rewards: [B] float — scalar reward (score) of each response.
    group_ids: [B] int tensor, or B hashables (e.g. prompt uids) — responses to the same
        prompt share an id; groups need not be contiguous.
    norm_by_std: divide by (std + eps) (GRPO); False keeps only the mean removal (Dr.GRPO).
    eps: added to the group std.
    Returns [B] advantages in rewards' dtype (float32 for integer rewards), no gradient:
    (r - mean_g) / (std_g + eps), std unbiased (ddof 1). A group of one response uses mean 0
    and std 1 (reference), so its advantage is r / (1 + eps); groups of equal rewards give
    exactly 0 (the reference returns rounding noise there, up to ~1e-2).
    Broadcast over tokens with `adv[:, None] * response_mask`.
    """
    if rewards.dim() != 1:
        raise ValueError(f"grpo_advantages: rewards must be [B], got shape {tuple(rewards.shape)}")
    rewards = rewards.detach()
    if not rewards.is_floating_point():
        rewards = rewards.float()
    batch = rewards.shape[0]
    index = _group_index(group_ids, batch, rewards.device)
    n_groups = int(index.max()) + 1 if batch else 0
    ones = torch.ones_like(rewards)
    size = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, index, ones)
    total = torch.zeros_like(size).index_add_(0, index, rewards)
    mean = total / size
    group_max = torch.full_like(size, -torch.inf).scatter_reduce_(0, index, rewards, "amax")
    group_min = torch.full_like(size, torch.inf).scatter_reduce_(0, index, rewards, "amin")
    # Equal rewards give exactly 0: the float mean of equal values can be off by an ulp, and
    # the reference then divides that rounding noise by (std ~ 1e-8) + eps.
    centered = torch.where((group_max == group_min)[index], torch.zeros_like(rewards),
                           rewards - mean[index])
    sq = torch.zeros_like(size).index_add_(0, index, centered * centered)
    std = torch.sqrt(sq / (size - 1).clamp(min=1))
    singleton = size[index] == 1
    # Reference: a single-sample group has mean 0 and std 1.
    centered = torch.where(singleton, rewards, centered)
    if not norm_by_std:
        return centered
    return centered / (torch.where(singleton, ones, std[index]) + eps)
