"""Diagnostics of a policy-loss step: names of the ratio quantiles, clip rate by position.

The loss's statistics themselves are `algo.stats.LossSums` (summed on the device per
micro-batch, turned into floats once); `algo.stats.policy_metrics` gives them for one
micro-batch. This module holds the pieces they share: the quantile names, the per-position
clip counters and their power-of-two buckets, and the one-copy float conversion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RATIO_QUANTILES = (("p99", 0.99), ("p95", 0.95), ("p90", 0.90), ("p75", 0.75), ("p50", 0.50),
                   ("p25", 0.25))


def to_floats(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Converts a dict of 0-d tensors / floats to floats with a single device-to-host copy."""
    tensor_keys = [k for k, v in values.items() if torch.is_tensor(v)]
    result = {k: float(v) for k, v in values.items() if not torch.is_tensor(v)}
    if tensor_keys:
        stacked = torch.stack([values[k].detach().to(torch.float64) for k in tensor_keys]).cpu()
        result.update(zip(tensor_keys, stacked.tolist()))
    return {k: result[k] for k in values}


def position_bucket_edges(max_position: int, max_buckets: int | None = None) -> list[int]:
    """Powers of two 1, 2, 4, ... up to max_position (at most `max_buckets` of them): bucket i
    holds positions [edges[i], edges[i+1]), the last bucket [edges[-1], inf)."""
    if max_position < 1:
        raise ValueError(f"position_bucket_edges: max_position={max_position} must be >= 1")
    if max_buckets is not None and max_buckets < 1:
        raise ValueError(f"position_bucket_edges: max_buckets={max_buckets} must be >= 1")
    edges = [1]
    while edges[-1] * 2 <= max_position and (max_buckets is None or len(edges) < max_buckets):
        edges.append(edges[-1] * 2)
    return edges


def check_bucket_edges(bucket_edges: Sequence[int]) -> list[int]:
    """The edges as a list; ValueError unless strictly increasing integers >= 1."""
    edges = list(bucket_edges)
    if not edges or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"clip_rate_by_position: bucket_edges={edges} must be strictly "
                         "increasing integers >= 1")
    return edges


def position_counts(clip_mask: torch.Tensor, response_mask: torch.Tensor, *, size: int,
                    positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped-token and token counts per generated-token position (no host sync).

    clip_mask: [B, S] bool, False at invalid tokens (as `TokenTerms`' flags are);
    response_mask: [B, S] binary (only valid tokens count).
    positions: [B, S] — the position n_t of each token; default the 1-indexed generated-token
        position cumsum(mask) (tool output does not advance it). Positions >= size - 1 count
        in the last slot.
    Returns (clipped [size], tokens [size]) float64 on the input device: slot n counts the
    tokens at position n (slot 0: positions <= 0). Sum them over micro-batches and ranks, then
    `bucket_sums` them.
    """
    if clip_mask.shape != response_mask.shape:
        raise ValueError(f"clip_rate_by_position: clip_mask {tuple(clip_mask.shape)} and "
                         f"response_mask {tuple(response_mask.shape)} differ in shape")
    valid = response_mask > 0
    if positions is None:
        positions = torch.cumsum(valid, dim=-1)
    index = positions.reshape(-1).clamp(0, size - 1)
    tokens = torch.zeros(size, dtype=torch.float64, device=clip_mask.device)
    clipped = torch.zeros_like(tokens)
    tokens.index_add_(0, index, valid.reshape(-1).to(torch.float64))
    clipped.index_add_(0, index, clip_mask.reshape(-1).to(torch.float64))
    return clipped, tokens


def bucket_sums(per_position: torch.Tensor, bucket_edges: Sequence[int]) -> torch.Tensor:
    """[..., P] per-position counts (`position_counts`) -> [..., K] per bucket: bucket k sums
    positions [edges[k], edges[k+1]), the last one [edges[-1], P); positions below edges[0]
    are left out."""
    edges = check_bucket_edges(bucket_edges)
    size = per_position.shape[-1]
    cum = torch.nn.functional.pad(per_position.cumsum(-1), (1, 0))  # cum[..., n] = sum of [0, n)
    starts = torch.tensor([min(e, size) for e in edges], device=per_position.device)
    stops = torch.tensor([min(e, size) for e in edges[1:]] + [size], device=per_position.device)
    return cum[..., stops] - cum[..., starts]


def clip_rate_by_position(clip_mask: torch.Tensor, response_mask: torch.Tensor, *,
                          bucket_edges: Sequence[int] | None = None,
                          positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped-token and token counts per position bucket (sum over micro-batches/ranks, then
    divide: rate_k = clipped[k] / max(tokens[k], 1)).

    clip_mask: [B, S] bool — e.g. `terms.clip_any` or `terms.clip_high`.
    response_mask: [B, S] binary — only valid tokens are counted (clip_mask & mask).
    bucket_edges: increasing ints >= 1; bucket k = [edges[k], edges[k+1]), last one open.
        Default: `position_bucket_edges(S)` (powers of two).
    positions: [B, S] — token position to bucket by (see `position_counts`). Under context
        parallelism pass the global n_t of the local shard.
    Returns (clipped [K] int64, tokens [K] int64), K = len(bucket_edges), on the input device.
    """
    if bucket_edges is None:
        bucket_edges = position_bucket_edges(max(clip_mask.shape[-1], 1))
    edges = check_bucket_edges(bucket_edges)
    counts = torch.stack(position_counts(clip_mask & (response_mask > 0), response_mask, size=edges[-1] + 1,
                                         positions=positions))
    clipped, tokens = bucket_sums(counts, edges).round().to(torch.int64)
    return clipped, tokens


def position_clip_metrics(clipped: torch.Tensor, tokens: torch.Tensor, bucket_edges: Sequence[int],
                          prefix: str = "clip_rate_by_pos") -> dict[str, float]:
    """Rates per bucket as metrics, keyed f"{prefix}/{lo}-{hi}" (last: f"{prefix}/{lo}+");
    buckets without tokens are left out (no sample, no point in the plot)."""
    edges = list(bucket_edges)
    clipped_list, tokens_list = clipped.tolist(), tokens.tolist()
    out = {}
    for k, lo in enumerate(edges):
        if tokens_list[k] == 0:
            continue
        label = f"{lo}-{edges[k + 1] - 1}" if k + 1 < len(edges) else f"{lo}+"
        out[f"{prefix}/{label}"] = clipped_list[k] / tokens_list[k]
    return out
