"""Zigzag CP sharding helpers: layout, round trip, offsets and the divisibility error."""

from __future__ import annotations

import pytest
import torch

from ctpo_megatron.ops import (zigzag_chunk_cu_seqlens, zigzag_local_cu_seqlens, zigzag_shard,
                               zigzag_unshard)


def test_padded_shard_holds_chunks_r_and_2cp_minus_1_minus_r():
    x = torch.arange(16).view(2, 8)  # cp=2: 4 chunks of 2 tokens
    assert zigzag_shard(x, 2, 0).tolist() == [[0, 1, 6, 7], [8, 9, 14, 15]]
    assert zigzag_shard(x, 2, 1).tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    hidden = torch.arange(24).view(1, 8, 3)  # sequence along dim 1, hidden after it
    assert zigzag_shard(hidden, 2, 1, seq_dim=1)[0, :, 0].tolist() == [6, 9, 12, 15]


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_round_trip_padded_and_packed(cp):
    x = torch.randn(3, 2 * cp * 5)
    assert torch.equal(zigzag_unshard([zigzag_shard(x, cp, r) for r in range(cp)]), x)
    cu = torch.tensor([0, 2 * cp, 2 * cp, 2 * cp * 4, 2 * cp * 5], dtype=torch.int32)
    packed = torch.randn(int(cu[-1]), 2)
    shards = [zigzag_shard(packed, cp, r, cu_seqlens=cu, seq_dim=0) for r in range(cp)]
    local_cu = zigzag_local_cu_seqlens(cu, cp)
    assert all(s.shape[0] == int(local_cu[-1]) for s in shards)
    assert torch.equal(zigzag_unshard(shards, cu_seqlens=cu, seq_dim=0), packed)


def test_packed_shard_layout_and_chunk_offsets():
    cu = torch.tensor([0, 8, 12], dtype=torch.int32)  # cp=2: chunks of 2 and 1 tokens
    x = torch.arange(12)
    assert zigzag_shard(x, 2, 1, cu_seqlens=cu, seq_dim=0).tolist() == [2, 3, 4, 5, 9, 10]
    local = zigzag_local_cu_seqlens(cu, 2)
    assert local.tolist() == [0, 4, 6]
    assert zigzag_chunk_cu_seqlens(local).tolist() == [0, 2, 4, 5, 6]


def test_length_not_divisible_by_2cp_is_a_clear_error():
    with pytest.raises(ValueError, match=r"sequence length 10 .* not a multiple of 2\*cp = 4"):
        zigzag_shard(torch.zeros(2, 10), 2, 0)
    cu = torch.tensor([0, 8, 14], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"sequence 1 has length 6, not a multiple of 2\*cp = 4"):
        zigzag_shard(torch.zeros(14), 2, 0, cu_seqlens=cu, seq_dim=0)
    with pytest.raises(ValueError, match="cp_rank must be in"):
        zigzag_shard(torch.zeros(2, 8), 2, 2)
    with pytest.raises(ValueError, match="must be even"):
        zigzag_chunk_cu_seqlens(torch.tensor([0, 3]))
