"""The masked prefix sum behind every cumulative-token ratio: one function, two backends.

`masked_cumsum` is the only place the CTPO losses compute `C_t = sum_{s<=t} m_s d_s` and
`n_t = sum_{s<=t} m_s`. It uses `ctpo_megatron.ops.segmented_cumsum` (the csrc scan, CPU or
CUDA) when that package is importable and falls back to `torch.cumsum` otherwise; both give
the same values. Under context parallelism the caller computes the global prefix sums with
`ctpo_megatron.ops.context_parallel_cumsum` and hands them to the loss instead.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch

logger = logging.getLogger(__name__)

ScanFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@functools.cache
def ops_segmented_cumsum() -> ScanFn | None:
    """`ctpo_megatron.ops.segmented_cumsum` if that package imports, else None (looked up once).

    Imported lazily so `algo` stays importable alone and there is no import cycle when `ops`
    uses `algo` as its oracle.
    """
    try:
        from ctpo_megatron.ops import segmented_cumsum
    except ImportError as exc:
        logger.info("ctpo_megatron.ops.segmented_cumsum unavailable (%s); using torch.cumsum", exc)
        return None
    return segmented_cumsum


def torch_masked_cumsum(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch inclusive masked prefix sums along the last dim (the reference's exact ops).

    values: [B, S] float — per-token values (e.g. clamped log ratios).
    mask: [B, S] float — 1 for generated tokens, 0 for padding / tool output.
    Returns (cum [B, S] = cumsum(values * mask), count [B, S] = cumsum(mask)), dtype of values.
    """
    mask = mask.to(values.dtype)
    return torch.cumsum(values * mask, dim=-1), torch.cumsum(mask, dim=-1)


def masked_cumsum(values: torch.Tensor, mask: torch.Tensor, *,
                  use_ops: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive prefix sums of `mask * values` and of `mask` along each row.

    values: [B, S] float — per-token values; the whole row is one sequence (padded layout).
    mask: [B, S] bool/int/float, binary — 1 where the token counts (generated), 0 elsewhere.
    use_ops: None = the csrc scan when `ctpo_megatron.ops` imports, else torch; True = require
        the csrc scan (ImportError if missing); False = torch only.
    Returns (cum, count): [B, S] in values' dtype; cum_t = sum_{s<=t} m_s v_s, count_t =
    sum_{s<=t} m_s. Autograd flows to `values` on both backends (the CTPO losses pass detached
    values: the prefix sum carries no gradient there).
    """
    if values.shape != mask.shape:
        raise ValueError(f"masked_cumsum: values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape")
    scan = None if use_ops is False else ops_segmented_cumsum()
    if scan is None:
        if use_ops:
            raise ImportError("masked_cumsum(use_ops=True): ctpo_megatron.ops.segmented_cumsum "
                              "is not importable")
        return torch_masked_cumsum(values, mask)
    cum, count = scan(values, mask.to(values.dtype))
    return cum.to(values.dtype), count.to(values.dtype)
