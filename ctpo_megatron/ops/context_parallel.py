"""`context_parallel_cumsum`: exact global prefix sums when sequences are zigzag-sharded over CP.

Each rank holds chunks r and 2*cp-1-r of every sequence (see `zigzag.py`). The prefix sum at
a local token needs the totals of every earlier chunk, most of which live on other ranks.
Instead of all-gathering the values (O(tokens) bytes, what verl/slime do for sequence-level
losses), every rank scans its two chunks locally, all-gathers only the per-chunk totals
(sum and count: 4 float64 per sequence per rank, O(cp x sequences) bytes, independent of the
length), computes the carry-in of each local chunk and scans again from it (the kernel adds
the carry in its float64 accumulator, so the result is rounded once, like an unsharded scan). The backward is the reverse
prefix sum of the incoming gradient, whose carries come from LATER chunks, exchanged the same
way: forward and backward are exact.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ctpo_megatron.ops.scan import _check_args, raw_scan, segment_boundary
from ctpo_megatron.ops.zigzag import zigzag_chunk_cu_seqlens


def _chunk_layout(values: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[torch.Size, torch.Tensor | None]:
    """Shape of the chunk view (padded: [2B, S_cp/2]) and the chunk offsets (packed: [2N+1])."""
    if cu_seqlens is None:
        rows = values.shape[0] if values.dim() == 2 else 1
        length = values.shape[-1]
        if length % 2:
            raise ValueError(f"context_parallel_cumsum: the local sequence length {length} must be even "
                             "(two zigzag chunks of equal length per rank); pad every sequence to a "
                             "multiple of 2*cp before sharding")
        return torch.Size((2 * rows, length // 2)), None
    return values.shape, zigzag_chunk_cu_seqlens(cu_seqlens)


def _exchange_carries(totals: torch.Tensor, cp_group: dist.ProcessGroup, reverse: bool) -> torch.Tensor:
    """Carry-ins of this rank's chunks from every rank's chunk totals.

    totals: [K, M, 2] float64 — K statistics (sum, count...), M sequences, local chunks
        (first = global chunk r, second = 2*cp-1-r). All-gathered over cp_group (M*K*2*8 bytes
        per rank).
    Returns [K, M, 2] float64: for each local chunk, the sum of the totals of the chunks before
    it in its sequence (after it when reverse).
    """
    cp = dist.get_world_size(cp_group)
    rank = dist.get_rank(cp_group)
    gathered = [torch.empty_like(totals) for _ in range(cp)]
    dist.all_gather(gathered, totals.contiguous(), group=cp_group)
    stacked = torch.stack(gathered)  # [cp, K, M, 2]
    ranks = torch.arange(cp, device=totals.device)
    order = totals.new_empty((*totals.shape[:2], 2 * cp))
    order[..., ranks] = stacked[..., 0].permute(1, 2, 0)
    order[..., 2 * cp - 1 - ranks] = stacked[..., 1].permute(1, 2, 0)
    if reverse:
        order = order.flip(-1)
    zero = torch.zeros_like(order[..., :1])
    exclusive = torch.cat([zero, order[..., :-1].cumsum(-1)], dim=-1)
    if reverse:
        exclusive = exclusive.flip(-1)
    return torch.stack([exclusive[..., rank], exclusive[..., 2 * cp - 1 - rank]], dim=-1)


def _cp_scan(values: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
             cp_group: dist.ProcessGroup, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Local chunk scan, exchange of chunk totals, then the scan again from the carries (the
    kernel adds them in its float64 accumulator: one rounding, as in an unsharded scan).
    A group of one rank holds whole sequences: one scan, no chunk view (any length)."""
    if dist.get_world_size(cp_group) == 1:
        return raw_scan(values, mask, cu_seqlens, reverse=reverse)
    view_shape, chunk_cu = _chunk_layout(values, cu_seqlens)
    local = values.reshape(view_shape) if chunk_cu is None else values
    local_mask = mask.reshape(view_shape) if mask is not None and chunk_cu is None else mask
    cum, count = raw_scan(local, local_mask, chunk_cu, reverse=reverse)
    # A chunk's total sits at its last token (first, for the reverse scan); 0 when empty.
    totals = torch.stack([segment_boundary(s, chunk_cu, at_end=not reverse).to(torch.float64)
                          for s in (cum, count)])
    carries = _exchange_carries(totals.reshape(2, -1, 2), cp_group, reverse).reshape(2, -1)
    cum, count = raw_scan(local, local_mask, chunk_cu, carries[0].contiguous(), carries[1].contiguous(),
                          reverse=reverse)
    return cum.reshape(values.shape), count.reshape(values.shape)


class _ContextParallelCumsum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, mask, cu_seqlens, cp_group):
        cum, count = _cp_scan(values, mask, cu_seqlens, cp_group, reverse=False)
        ctx.save_for_backward(mask, cu_seqlens)
        ctx.cp_group = cp_group
        ctx.values_dtype = values.dtype
        ctx.mark_non_differentiable(count)
        ctx.set_materialize_grads(False)
        return cum, count

    @staticmethod
    def backward(ctx, grad_cum, grad_count):
        mask, cu_seqlens = ctx.saved_tensors
        if grad_cum is None:
            return None, None, None, None
        # Every rank must join the exchange, even one whose local gradient is all zeros.
        back, _ = _cp_scan(grad_cum.contiguous(), None, cu_seqlens, ctx.cp_group, reverse=True)
        return (back * mask).to(ctx.values_dtype), None, None, None


def context_parallel_cumsum(values: torch.Tensor, mask: torch.Tensor, cp_group: dist.ProcessGroup,
                            cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Global masked prefix sums at this rank's tokens of zigzag-sharded sequences.

    values: [B, S_cp] float — this CP rank's shard of a padded batch (S_cp = S/cp: chunk r then
        chunk 2*cp-1-r, see `zigzag_shard`); or [T_cp] float packed with `cu_seqlens`.
    mask: like values — 1 for tokens that count (generated), 0 for padding / tool output; no
        gradient.
    cp_group: the context-parallel process group (every rank of it must call this, in the same
        order); a group of size 1 gives the plain `segmented_cumsum`.
    cu_seqlens: [N+1] int32 — offsets of the LOCAL shards (`zigzag_local_cu_seqlens`).
    Returns (cum, count), shaped like values: the same values `segmented_cumsum` gives on the
    unsharded sequences, at the local tokens (float32 for 16-bit values, float64 carries).
    Autograd flows to values; the backward runs one more exchange over cp_group.
    Collective: one all_gather of 4 float64 per sequence per rank in forward, one in backward.
    """
    if cp_group is None:
        raise ValueError("context_parallel_cumsum: cp_group is required (use a group of size 1 "
                         "without context parallelism)")
    _check_args(values, mask, cu_seqlens, None, "context_parallel_cumsum")
    mask = mask.detach().to(values.dtype).contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    return _ContextParallelCumsum.apply(values.contiguous(), mask, cu_seqlens, cp_group)
