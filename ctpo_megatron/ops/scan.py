"""`segmented_cumsum`: masked inclusive prefix sums per sequence, with autograd.

Dispatch: the extension op `torch.ops.ctpo_megatron.segmented_scan` (CUDA or CPU kernels)
when it has kernels for the input's device, else the pure-torch scan in `reference.py`.
The op gets a fake kernel and an autograd formula here, so `torch.library.opcheck` and
`torch.compile` see a normal op: the backward of a prefix sum is the reverse prefix sum of
the incoming gradient, masked; a carry's gradient is its segment's gradient total.
"""

from __future__ import annotations

import torch

from ctpo_megatron.ops import reference
from ctpo_megatron.ops._backend import extension_backends, use_extension

_OP = "ctpo_megatron::segmented_scan"


def _check_args(values: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor | None,
                carry: torch.Tensor | None, what: str) -> None:
    if not values.is_floating_point():
        raise ValueError(f"{what}: values must be a floating tensor, got {values.dtype}")
    if mask.shape != values.shape:
        raise ValueError(f"{what}: mask has shape {tuple(mask.shape)}, expected {tuple(values.shape)} "
                         "(the shape of values)")
    if cu_seqlens is None:
        if values.dim() not in (1, 2):
            raise ValueError(f"{what}: padded values must be [B, S] (or [T] for one sequence), got "
                             f"shape {tuple(values.shape)}; pass cu_seqlens for a packed [T] batch")
        segments = values.shape[0] if values.dim() == 2 else 1
    else:
        if values.dim() != 1:
            raise ValueError(f"{what}: packed values (cu_seqlens given) must be 1-D [T], got shape "
                             f"{tuple(values.shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.is_floating_point():
            raise ValueError(f"{what}: cu_seqlens must be a 1-D integer tensor [N+1], got "
                             f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
        segments = cu_seqlens.numel() - 1
    if carry is not None and carry.shape != (segments,):
        raise ValueError(f"{what}: carry has shape {tuple(carry.shape)}, expected ({segments},) — "
                         "one value per sequence")


def segmented_cumsum(values: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                     carry: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive prefix sums of `mask * values` and of `mask`, restarting at every sequence.

    values: [B, S] float — padded batch, one sequence per row; or [T] float — packed tokens
        with `cu_seqlens` (or one sequence without it).
    mask: like values (bool/int/float) — 1 for tokens that count (generated), 0 for padding
        and tool output; carries no gradient.
    cu_seqlens: [N+1] int32 (int64 is converted) — packed sequence offsets; cu[0] = 0,
        non-decreasing; tokens past cu[-1] (tail padding) get 0.
    carry: [B] or [N] float — per-sequence value added to every sum of that sequence (a
        carry-in, e.g. the total of earlier context-parallel chunks); differentiable.
    Returns (cum, count), shaped like values: cum_t = carry + sum_{s<=t} m_s v_s and count_t =
    sum_{s<=t} m_s within the sequence; float32 for 16-bit values (float64 accumulation on CPU
    and CUDA), else values' dtype. Autograd flows to values and carry.
    """
    _check_args(values, mask, cu_seqlens, carry, "segmented_cumsum")
    mask = mask.detach().to(values.dtype)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    carry64 = None if carry is None else carry.to(torch.float64).contiguous()
    return raw_scan(values.contiguous(), mask.contiguous(), cu_seqlens, carry64)


def raw_scan(values: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
             carry_sum: torch.Tensor | None = None, carry_count: torch.Tensor | None = None,
             reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan op (or its torch fallback) on prepared inputs: contiguous values, mask in
    values' dtype or None, int32 cu_seqlens, float64 carries. See `reference.segmented_scan`."""
    if use_extension(values.device):
        return torch.ops.ctpo_megatron.segmented_scan(values, mask, cu_seqlens, carry_sum, carry_count, reverse)
    return reference.segmented_scan(values, mask, cu_seqlens, carry_sum, carry_count, reverse)


def segment_boundary(scan: torch.Tensor, cu_seqlens: torch.Tensor | None, at_end: bool) -> torch.Tensor:
    """Value of `scan` at each segment's first (or last) token; 0 for empty segments.

    scan: [B, S], [T] packed (with cu_seqlens [N+1]) or [T] as one segment.
    Returns [B] / [N] / [1] in scan's dtype.
    """
    if cu_seqlens is None:
        rows = scan.reshape(-1, scan.shape[-1]) if scan.dim() == 2 else scan.reshape(1, -1)
        if rows.shape[-1] == 0:
            return rows.new_zeros(rows.shape[0])
        return rows[:, -1] if at_end else rows[:, 0]
    cu = cu_seqlens.to(torch.int64)
    nonempty = cu[1:] > cu[:-1]
    if scan.numel() == 0:
        return scan.new_zeros(cu.numel() - 1)
    index = (cu[1:] - 1 if at_end else cu[:-1]).clamp(0, scan.numel() - 1)
    return torch.where(nonempty, scan[index], scan.new_zeros(()))


def _register() -> None:
    @torch.library.register_fake(_OP)
    def _fake(values, mask, cu_seqlens, carry_sum, carry_count, reverse):
        out_dtype = reference.result_dtype(values.dtype)
        return torch.empty_like(values, dtype=out_dtype), torch.empty_like(values, dtype=out_dtype)

    def _setup_context(ctx, inputs, output):
        values, mask, cu_seqlens, carry_sum, carry_count, reverse = inputs
        ctx.save_for_backward(mask, cu_seqlens)
        ctx.reverse = reverse
        ctx.values_dtype = values.dtype
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the count

    def _backward(ctx, grad_cum, grad_count):
        mask, cu_seqlens = ctx.saved_tensors
        if grad_cum is None:
            return None, None, None, None, None, None
        # d cum_t / d v_s = m_s for s on the scanned side of t: a scan the other way round.
        back, _ = torch.ops.ctpo_megatron.segmented_scan(grad_cum.contiguous(), None, cu_seqlens, None, None,
                                                         not ctx.reverse)
        grad_values = back if mask is None else back * mask
        grad_carry = None
        if ctx.needs_input_grad[3]:
            # Every position of a segment adds the carry: its gradient is the segment total,
            # which the reverse scan holds at the segment's first token (last, for reverse).
            grad_carry = segment_boundary(back, cu_seqlens, at_end=ctx.reverse).to(torch.float64)
        return grad_values.to(ctx.values_dtype), None, None, grad_carry, None, None

    torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


if extension_backends():
    _register()
