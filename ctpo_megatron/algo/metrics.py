"""Diagnostics of a policy-loss step: names of the ratio quantiles, clip rate by position.

The loss's statistics themselves are `algo.stats.LossSums` (summed on the device per
micro-batch, turned into floats once); `algo.stats.policy_metrics` gives them for one
micro-batch. This module holds the pieces they share: the quantile names, the per-position
clip counters and their power-of-two buckets, and the one-copy float conversion.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=16)
def bucket_of_position(edges: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[edges[-1] + 1] int64 on `device`: the bucket of each position 0..edges[-1], K for
    positions below edges[0] (left out). Built and copied once per edges and device."""
    bucket = torch.searchsorted(torch.tensor(edges), torch.arange(edges[-1] + 1), right=True) - 1
    return torch.where(bucket < 0, len(edges), bucket).to(device)


def position_counts(clip_mask: torch.Tensor, response_mask: torch.Tensor, *, bucket_edges: Sequence[int],
                    positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped-token and token counts per position bucket, float64 (no host sync).

    clip_mask: [B, S] bool, False at invalid tokens (as `TokenTerms`' flags are);
    response_mask: [B, S] binary (only valid tokens count); bucket_edges: see
    `clip_rate_by_position`; positions: [B, S] — the position n_t of each token; default the
    1-indexed generated-token position cumsum(mask) (tool output does not advance it).
    Returns (clipped [K], tokens [K]) on the input device; sum them over micro-batches and
    ranks. A bucket lookup table (one gather) replaces a search per token.
    """
    if clip_mask.shape != response_mask.shape:
        raise ValueError(f"clip_rate_by_position: clip_mask {tuple(clip_mask.shape)} and "
                         f"response_mask {tuple(response_mask.shape)} differ in shape")
    edges = check_bucket_edges(bucket_edges)
    valid = response_mask > 0
    if positions is None:
        positions = torch.cumsum(valid, dim=-1)
    lookup = bucket_of_position(tuple(edges), clip_mask.device)
    index = lookup.index_select(0, positions.reshape(-1).clamp(0, edges[-1]))
    tokens = torch.zeros(len(edges) + 1, dtype=torch.float64, device=clip_mask.device)
    clipped = torch.zeros_like(tokens)
    tokens.index_add_(0, index, valid.reshape(-1).to(torch.float64))
    clipped.index_add_(0, index, clip_mask.reshape(-1).to(torch.float64))
    return clipped[:-1], tokens[:-1]


def clip_rate_by_position(clip_mask: torch.Tensor, response_mask: torch.Tensor, *,
                          bucket_edges: Sequence[int] | None = None,
                          positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped-token and token counts per position bucket (sum over micro-batches/ranks, then
    divide: rate_k = clipped[k] / max(tokens[k], 1)).

    clip_mask: [B, S] bool — e.g. `terms.clip_any` or `terms.clip_high`.
    response_mask: [B, S] binary — only valid tokens are counted (clip_mask & mask).
    bucket_edges: increasing ints >= 1; bucket k = [edges[k], edges[k+1]), last one open.
        Default: `position_bucket_edges(S)` (powers of two).
    positions: [B, S] — token position to bucket by; default the 1-indexed generated-token
        position n_t = cumsum(mask) (tool output does not advance it, as in the LA scale).
        Under context parallelism pass the global n_t of the local shard.
    Returns (clipped [K] int64, tokens [K] int64), K = len(bucket_edges), on the input device.
    """
    if bucket_edges is None:
        bucket_edges = position_bucket_edges(max(clip_mask.shape[-1], 1))
    clipped, tokens = position_counts(clip_mask & (response_mask > 0), response_mask, bucket_edges=bucket_edges,
                                      positions=positions)
    return clipped.round().to(torch.int64), tokens.round().to(torch.int64)


def position_clip_metrics(clipped: torch.Tensor | Sequence[float], tokens: torch.Tensor | Sequence[float],
                          bucket_edges: Sequence[int], prefix: str = "clip_rate_by_pos") -> dict[str, float]:
    """Rates per bucket as metrics, keyed f"{prefix}/{lo}-{hi}" (last: f"{prefix}/{lo}+");
    buckets without tokens are left out (no sample, no point in the plot). clipped, tokens:
    [K] counts per bucket, tensors or sequences of numbers."""
    clipped_list = clipped.tolist() if torch.is_tensor(clipped) else clipped
    tokens_list = tokens.tolist() if torch.is_tensor(tokens) else tokens
    return {key: c / n for key, c, n in zip(_bucket_keys(tuple(bucket_edges), prefix), clipped_list, tokens_list)
            if n != 0}


def position_rate_metrics(rates: Sequence[float], bucket_edges: Sequence[int],
                          prefix: str = "clip_rate_by_pos") -> dict[str, float]:
    """`position_clip_metrics` from the rates per bucket, NaN for a bucket without tokens (as
    `ops.loss_metrics` gives them): those are left out."""
    return {key: r for key, r in zip(_bucket_keys(tuple(bucket_edges), prefix), rates) if r == r}


@functools.lru_cache(maxsize=64)
def _bucket_keys(edges: tuple[int, ...], prefix: str) -> tuple[str, ...]:
    """The metric key of each bucket (formatted once per edges: this runs per micro-batch)."""
    return tuple(f"{prefix}/{lo}-{edges[k + 1] - 1}" if k + 1 < len(edges) else f"{prefix}/{lo}+"
                 for k, lo in enumerate(edges))
