"""Diagnostics of a policy-loss step: clip fractions, ratio quantiles, LA scale, clip-by-position.

`policy_metrics` gives the reference's metrics under flat names (the trainer adds a prefix):

    clipfrac_{high,low,dual,total}    clip/{high,low,dual,total}/rate: count / valid tokens
    clip_count_{high,low,dual,total}  clip/*/count (sum these over micro-batches and ranks)
    valid_tokens, neg_adv_tokens      clip/valid_token_count, clip/neg_adv_token_count
    pg_clipfrac                       actor/pg_clipfrac: masked mean of l2 > l1
    pg_clipfrac_lower                 actor/pg_clipfrac_lower: masked mean of the dual clip
    ppo_kl                            actor/ppo_kl: masked mean of -d_t
    is_ratio_{mean,min,max,p99,p95,p90,p75,p50,p25}   is_ratio/*: r_t over valid tokens
    la_scale_{mean,min,max,p50}, la_clip_{high,low,c}_ratio_mean   (adaptive clipping only)

All values are 0.0 when there is no valid token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ctpo_megatron.algo.config import PolicyLossConfig
from ctpo_megatron.algo.terms import TokenTerms

RATIO_QUANTILES = (("p99", 0.99), ("p95", 0.95), ("p90", 0.90), ("p75", 0.75), ("p50", 0.50),
                   ("p25", 0.25))


def quantiles(values: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """Linear-interpolation quantiles of a non-empty 1-D tensor (torch.quantile's default
    method, without its 2**24-element limit). Returns [len(qs)] in values' dtype."""
    sorted_values = values.sort().values
    n = sorted_values.numel()
    pos = torch.tensor(list(qs), dtype=torch.float64) * (n - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    frac = (pos - lo).to(values.dtype).to(values.device)
    lo, hi = lo.to(values.device), hi.to(values.device)
    return torch.lerp(sorted_values[lo], sorted_values[hi], frac)


def policy_metrics(terms: TokenTerms, response_mask: torch.Tensor, advantages: torch.Tensor,
                   cfg: PolicyLossConfig) -> dict[str, float]:
    """Metrics of one micro-batch (see the module docstring for names and meanings).

    terms: the loss's `TokenTerms` ([B, S]); response_mask, advantages: [B, S] as given to the
    loss. Costs two host syncs (valid-token count, then every value at once).
    """
    valid = response_mask > 0
    mask = valid.to(terms.ratio.dtype)
    n_valid = int(valid.sum())
    out: dict[str, torch.Tensor | float] = {}
    counts = {"high": terms.clip_high, "low": terms.clip_low, "dual": terms.clip_dual,
              "total": terms.clip_any}
    denom_eps = mask.sum() + 1e-8  # the reference's masked_mean denominator
    out["pg_clipfrac"] = (terms.clipped.to(mask.dtype) * mask).sum() / denom_eps
    out["pg_clipfrac_lower"] = (terms.clip_dual.to(mask.dtype) * mask).sum() / denom_eps
    out["ppo_kl"] = (-terms.log_ratio_clamped * mask).sum() / denom_eps
    for key, flags in counts.items():
        count = (flags & valid).sum().to(mask.dtype)
        out[f"clip_count_{key}"] = count
        out[f"clipfrac_{key}"] = count / n_valid if n_valid else 0.0
    out["valid_tokens"] = float(n_valid)
    out["neg_adv_tokens"] = ((advantages < 0) & valid).sum().to(mask.dtype)

    names = ["is_ratio_mean", "is_ratio_min", "is_ratio_max"] + [f"is_ratio_{k}" for k, _ in RATIO_QUANTILES]
    if n_valid:
        ratio = terms.ratio[valid]
        stats = torch.cat([torch.stack([ratio.mean(), ratio.min(), ratio.max()]),
                           quantiles(ratio, [q for _, q in RATIO_QUANTILES])])
        out.update(zip(names, stats))
    else:
        out.update((name, 0.0) for name in names)
    if terms.la_scale is not None and n_valid:
        scale = terms.la_scale[valid]
        out["la_scale_mean"], out["la_scale_min"], out["la_scale_max"] = scale.mean(), scale.min(), scale.max()
        out["la_scale_p50"] = quantiles(scale, [0.5])[0]
        out["la_clip_high_ratio_mean"] = torch.exp(cfg.la_clip_high * scale).mean()
        out["la_clip_low_ratio_mean"] = torch.exp(-cfg.la_clip_low * scale).mean()
        out["la_clip_c_ratio_mean"] = torch.exp(cfg.la_clip_c * scale).mean()
    return to_floats(out)


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


def clip_rate_by_position(clip_mask: torch.Tensor, response_mask: torch.Tensor, *,
                          bucket_edges: Sequence[int] | None = None,
                          positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped-token and token counts per position bucket (sum over micro-batches/ranks, then
    divide: rate_k = clipped[k] / max(tokens[k], 1)).

    clip_mask: [B, S] bool — e.g. `terms.clip_any` or `terms.clip_high`.
    response_mask: [B, S] binary — only valid tokens are counted.
    bucket_edges: increasing ints >= 1; bucket k = [edges[k], edges[k+1]), last one open.
        Default: `position_bucket_edges(S)` (powers of two).
    positions: [B, S] — token position to bucket by; default the 1-indexed generated-token
        position n_t = cumsum(mask) (tool output does not advance it, as in the LA scale).
        Under context parallelism pass the global n_t of the local shard.
    Returns (clipped [K] int64, tokens [K] int64), K = len(bucket_edges), on the input device.
    """
    if clip_mask.shape != response_mask.shape:
        raise ValueError(f"clip_rate_by_position: clip_mask {tuple(clip_mask.shape)} and "
                         f"response_mask {tuple(response_mask.shape)} differ in shape")
    valid = response_mask > 0
    if positions is None:
        positions = torch.cumsum(valid.to(torch.int64), dim=-1)
    if bucket_edges is None:
        bucket_edges = position_bucket_edges(max(clip_mask.shape[-1], 1))
    edges = list(bucket_edges)
    if not edges or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"clip_rate_by_position: bucket_edges={edges} must be strictly "
                         "increasing integers >= 1")
    edge_tensor = torch.tensor(edges, dtype=positions.dtype, device=positions.device)
    bucket = torch.searchsorted(edge_tensor, positions.contiguous(), right=True) - 1
    counted = valid & (bucket >= 0)
    index = bucket.clamp(min=0).flatten()
    tokens = torch.zeros(len(edges), dtype=torch.int64, device=clip_mask.device)
    clipped = torch.zeros_like(tokens)
    tokens.index_add_(0, index, counted.flatten().to(torch.int64))
    clipped.index_add_(0, index, (counted & clip_mask).flatten().to(torch.int64))
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
