"""Pure-torch segmented scans: the fallback when the extension is missing and the test oracle.

Same contract as `torch.ops.ctpo_megatron.segmented_scan`: inclusive prefix sums of
`mask * values` and of `mask` within each segment — a row of a padded `[B, S]` tensor or a
`cu_seqlens` span of a packed `[T]` tensor — plus optional per-segment carries, forward or
reverse. Accumulates in float64 (a global cumsum minus segment offsets stays exact enough
there), then casts to float32 for 16-bit inputs or to the input dtype otherwise. Autograd
flows through plain torch ops.
"""

from __future__ import annotations

import torch


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit inputs, the input dtype otherwise (the extension's rule)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def segment_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token segment index of a packed layout.

    cu_seqlens: [N+1] int — offsets; tokens at or past cu_seqlens[-1] belong to no segment.
    Returns (ids: [T] int64, 0 for tokens outside every segment; inside: [T] bool).
    """
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    inside = torch.zeros(num_tokens, dtype=torch.bool, device=cu.device)
    inside[: ids.numel()] = True
    full = torch.zeros(num_tokens, dtype=torch.int64, device=cu.device)
    full[: ids.numel()] = ids
    return full, inside


def segmented_scan(values: torch.Tensor, mask: torch.Tensor | None = None,
                   cu_seqlens: torch.Tensor | None = None, carry_sum: torch.Tensor | None = None,
                   carry_count: torch.Tensor | None = None,
                   reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Segmented inclusive scan in pure torch.

    values: [B, S] (padded, one segment per row), [T] with cu_seqlens (packed), or [T] alone
        (one segment) — float.
    mask: like values, or None for all ones.
    cu_seqlens: [N+1] int — packed segment offsets (cu[0] = 0, non-decreasing, cu[-1] <= T).
    carry_sum, carry_count: [N] (or [B]) — added to every position of the segment.
    reverse: scan from each segment's end (suffix sums).
    Returns (cum, count), shaped like values.
    """
    out_dtype = result_dtype(values.dtype)
    x = values.to(torch.float64)
    m = torch.ones_like(x) if mask is None else mask.to(torch.float64)
    pairs = torch.stack([x * m, m])  # [2, ...]: both scans in one cumsum
    if cu_seqlens is None:
        flat = pairs.reshape(2, -1, values.shape[-1]) if values.dim() == 2 else pairs.reshape(2, 1, -1)
        scan = flat.flip(-1).cumsum(-1).flip(-1) if reverse else flat.cumsum(-1)
        carries = _carries(carry_sum, carry_count, flat.shape[1], x)
        scan = scan + carries.unsqueeze(-1)
        cum, count = scan.reshape(pairs.shape)
        return cum.to(out_dtype), count.to(out_dtype)
    ids, inside = segment_ids(cu_seqlens, values.numel())
    cu = cu_seqlens.to(torch.int64)
    zero = torch.zeros(2, 1, dtype=torch.float64, device=x.device)
    if reverse:
        # Suffix sums over the whole tensor minus the suffix that starts at the segment end.
        suffix = torch.cat([pairs.flip(-1).cumsum(-1).flip(-1), zero], dim=-1)
        scan = suffix[:, :-1] - suffix[:, cu[1:]][:, ids]
    else:
        prefix = torch.cat([zero, pairs.cumsum(-1)], dim=-1)
        scan = prefix[:, 1:] - prefix[:, cu[:-1]][:, ids]
    carries = _carries(carry_sum, carry_count, cu.numel() - 1, x)
    scan = torch.where(inside, scan + carries[:, ids], 0.0)
    cum, count = scan
    return cum.to(out_dtype), count.to(out_dtype)


def _carries(carry_sum: torch.Tensor | None, carry_count: torch.Tensor | None, n: int,
             like: torch.Tensor) -> torch.Tensor:
    zeros = torch.zeros(n, dtype=torch.float64, device=like.device)
    cs = zeros if carry_sum is None else carry_sum.to(torch.float64)
    cn = zeros if carry_count is None else carry_count.to(torch.float64)
    return torch.stack([cs, cn])
