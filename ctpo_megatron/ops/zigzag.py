"""Megatron's zigzag context-parallel layout: shard sequences into 2*cp chunks and back.

With cp ranks every sequence is cut into 2*cp equal chunks and rank r holds chunks r and
2*cp-1-r, concatenated (so causal attention work is balanced). Padded batches `[B, S]` are
cut along the sequence dim; packed batches `[T]` + `cu_seqlens [N+1]` are cut per sequence,
each sequence length a multiple of 2*cp (Megatron pads to it), and the local shards are packed
again in sequence order with `zigzag_local_cu_seqlens`. The trainer shards with these helpers,
`context_parallel_cumsum` relies on the same layout.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _check_cp(cp_size: int, cp_rank: int | None = None) -> None:
    if cp_size < 1:
        raise ValueError(f"zigzag: cp_size must be >= 1, got {cp_size}")
    if cp_rank is not None and not 0 <= cp_rank < cp_size:
        raise ValueError(f"zigzag: cp_rank must be in [0, {cp_size}), got {cp_rank}")


def _seq_lengths(cu_seqlens: torch.Tensor, multiple: int, what: str) -> list[int]:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    bad = [(i, n) for i, n in enumerate(lengths) if n % multiple]
    if bad:
        i, n = bad[0]
        raise ValueError(f"{what}: sequence {i} has length {n}, not a multiple of 2*cp = {multiple} "
                         f"({len(bad)} such sequences); pad every sequence to a multiple of 2*cp, as "
                         "Megatron requires for context parallelism")
    return lengths


def zigzag_shard(x: torch.Tensor, cp_size: int, cp_rank: int, *, cu_seqlens: torch.Tensor | None = None,
                 seq_dim: int = -1) -> torch.Tensor:
    """This rank's zigzag shard of a padded or packed batch.

    x: [..., S, ...] padded (sequence along `seq_dim`, S a multiple of 2*cp), or [T, ...] packed
        with `cu_seqlens` (tokens along dim 0; every sequence length a multiple of 2*cp).
    cu_seqlens: [N+1] int — global packed offsets (None for padded).
    Returns [..., S/cp, ...] (chunks cp_rank and 2*cp-1-cp_rank, concatenated) or [T/cp, ...]
    packed in sequence order (offsets: `zigzag_local_cu_seqlens(cu_seqlens, cp_size)`).
    Raises ValueError naming the length when it is not a multiple of 2*cp.
    """
    _check_cp(cp_size, cp_rank)
    parts = 2 * cp_size
    if cu_seqlens is None:
        length = x.shape[seq_dim]
        if length % parts:
            raise ValueError(f"zigzag_shard: sequence length {length} (dim {seq_dim} of shape "
                             f"{tuple(x.shape)}) is not a multiple of 2*cp = {parts}; pad every "
                             "sequence to a multiple of 2*cp, as Megatron requires for context parallelism")
        chunks = x.chunk(parts, dim=seq_dim) if length else [x] * parts
        return torch.cat([chunks[cp_rank], chunks[parts - 1 - cp_rank]], dim=seq_dim)
    lengths = _seq_lengths(cu_seqlens, parts, "zigzag_shard")
    starts = cu_seqlens[:-1].tolist()
    pieces = []
    for start, n in zip(starts, lengths):
        c = n // parts
        pieces.append(x[start + cp_rank * c: start + (cp_rank + 1) * c])
        pieces.append(x[start + (parts - 1 - cp_rank) * c: start + (parts - cp_rank) * c])
    return torch.cat(pieces, dim=0) if pieces else x[:0]


def zigzag_local_cu_seqlens(cu_seqlens: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Offsets of the local packed shards: cu_seqlens / cp (lengths must divide by 2*cp).

    cu_seqlens: [N+1] int — global packed offsets. Returns [N+1], same dtype and device.
    """
    _check_cp(cp_size)
    _seq_lengths(cu_seqlens, 2 * cp_size, "zigzag_local_cu_seqlens")
    return torch.div(cu_seqlens, cp_size, rounding_mode="floor")


def zigzag_chunk_cu_seqlens(local_cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Offsets of the 2N local chunks (two per sequence shard) from the local offsets.

    local_cu_seqlens: [N+1] int — offsets of this rank's shards (each length even).
    Returns [2N+1] int32: shard i's first chunk is [2i, 2i+1], its second [2i+1, 2i+2].
    """
    cu = local_cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    if bool((lengths % 2).any()):
        raise ValueError("zigzag_chunk_cu_seqlens: every local shard holds two equal chunks, so its "
                         f"length must be even; got lengths {lengths.tolist()}")
    mids = cu[:-1] + lengths // 2
    chunk = torch.stack([cu[:-1], mids], dim=1).reshape(-1)
    return torch.cat([chunk, cu[-1:]]).to(torch.int32)


def zigzag_unshard(shards: Sequence[torch.Tensor], *, cu_seqlens: torch.Tensor | None = None,
                   seq_dim: int = -1) -> torch.Tensor:
    """Inverse of `zigzag_shard`: rebuilds the full batch from every rank's shard.

    shards: cp tensors, rank order, as returned by `zigzag_shard` (e.g. from an all-gather).
    cu_seqlens: [N+1] int — the GLOBAL packed offsets (None for padded).
    Returns the padded [..., S, ...] or packed [T, ...] tensor.
    """
    cp_size = len(shards)
    _check_cp(cp_size)
    parts = 2 * cp_size
    if cu_seqlens is None:
        chunks: list[torch.Tensor | None] = [None] * parts
        for rank, shard in enumerate(shards):
            first, second = shard.chunk(2, dim=seq_dim) if shard.shape[seq_dim] else (shard, shard)
            chunks[rank], chunks[parts - 1 - rank] = first, second
        return torch.cat(chunks, dim=seq_dim)
    lengths = _seq_lengths(cu_seqlens, parts, "zigzag_unshard")
    offsets = [0] * cp_size
    pieces: list[torch.Tensor] = []
    for n in lengths:
        c = n // parts
        seq: list[torch.Tensor | None] = [None] * parts
        for rank, shard in enumerate(shards):
            o = offsets[rank]
            seq[rank], seq[parts - 1 - rank] = shard[o: o + c], shard[o + c: o + 2 * c]
            offsets[rank] = o + 2 * c
        pieces.extend(seq)
    return torch.cat(pieces, dim=0) if pieces else shards[0][:0]
