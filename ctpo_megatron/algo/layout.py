"""Packed (THD, `cu_seqlens`) <-> padded ([N, S_max]) layouts for the loss inputs."""

from __future__ import annotations

import torch


def packed_to_padded(cu_seqlens: torch.Tensor,
                     tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """Scatters packed per-token tensors into one zero-padded row per sequence.

    cu_seqlens: [N+1] int — sequence offsets into the packed dim (cu_seqlens[0] == 0);
        tokens past cu_seqlens[-1] (alignment padding) are dropped.
    tensors: name -> [T] or [1, T] tensor (T >= cu_seqlens[-1]), or None (passed through).
    Returns name -> [N, S_max] tensor, zero where a row is shorter than S_max; autograd flows back
    to the packed tensors.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be [N+1], got shape {tuple(cu_seqlens.shape)}")
    offsets = cu_seqlens.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    if int(offsets[0]) != 0 or bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu_seqlens.tolist()}")
    n_seqs, total = lengths.numel(), int(offsets[-1])
    max_len = int(lengths.max()) if n_seqs else 0
    device = cu_seqlens.device
    seq = torch.repeat_interleave(torch.arange(n_seqs, device=device), lengths)
    pos = torch.arange(total, device=device) - offsets[:-1][seq]
    out: dict[str, torch.Tensor | None] = {}
    for name, t in tensors.items():
        if t is None:
            out[name] = None
            continue
        flat = t.reshape(-1) if t.dim() == 2 and t.shape[0] == 1 else t
        if flat.dim() != 1 or flat.numel() < total:
            raise ValueError(f"packed {name} of shape {tuple(t.shape)} does not hold the "
                             f"{total} tokens that cu_seqlens describes ([T] or [1, T] expected)")
        padded = flat.new_zeros(n_seqs, max_len)
        out[name] = padded.index_put((seq.to(flat.device), pos.to(flat.device)), flat[:total])
    return out
