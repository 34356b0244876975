"""The masked prefix sum behind every cumulative-token ratio.

`masked_cumsum` is the only place the CTPO losses compute `C_t = sum_{s<=t} m_s d_s` and
`n_t = sum_{s<=t} m_s`. It runs `ctpo_megatron.ops.segmented_cumsum`: the csrc scan (CPU or
CUDA), or, on a device without kernels or without the extension, the scan's one pure-torch
reference (`ops.reference.segmented_scan`). Under context parallelism the caller computes the
global prefix sums with `ctpo_megatron.ops.context_parallel_cumsum` and hands them to the loss.
"""

from __future__ import annotations

import torch

from ctpo_megatron.ops import segmented_cumsum


def masked_cumsum(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive prefix sums of `mask * values` and of `mask` along each row.

    values: [B, S] float — per-token values; the whole row is one sequence (padded layout).
    mask: [B, S] bool/int/float, binary — 1 where the token counts (generated), 0 elsewhere.
    Returns (cum, count): [B, S] in values' dtype; cum_t = sum_{s<=t} m_s v_s, count_t =
    sum_{s<=t} m_s. Autograd flows to `values` (the CTPO losses pass detached values: the
    prefix sum carries no gradient there).
    """
    if values.shape != mask.shape:
        raise ValueError(f"masked_cumsum: values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape")
    cum, count = segmented_cumsum(values, mask.to(values.dtype))
    return cum.to(values.dtype), count.to(values.dtype)
