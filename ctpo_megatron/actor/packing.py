"""Sequence packing: a micro-batch of n samples as one row of T = sum(P_i + R_i) tokens, no
padding between them (`ActorConfig.pack_sequences`, with the token budget of
`actor/token_budget.py`).

Layout (megatron's THD contract, `megatron.core.packed_seq_params.PackedSeqParams`):
tokens and position_ids are [1, T] (T rounded up to `seq_multiple`, the tail filled with 0 as a
segment of its own that nothing scores), position ids restart at 0 for every sample, and
`cu_seqlens` [n(+1) + 1] int32 holds the segment boundaries (0, L_0, L_0 + L_1, ..., T).

On a GPU, TransformerEngine's attention takes the boundaries as `PackedSeqParams(qkv_format=
"thd", cu_seqlens_q/kv, max_seqlen_q/kv)` and GPTModel applies RoPE per segment. Megatron's
local (pure torch) spec cannot read PackedSeqParams; there (CPU mode) the same attention is
computed with an explicit block-diagonal causal mask [1, 1, T, T]: every token sees only the
earlier tokens of its own sample, and rotary attention scores depend only on the distance
between two tokens, so running RoPE over the whole row gives each sample the logits it has
alone (up to float rounding). A GPU without TransformerEngine is refused (`PolicyActor`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ctpo_megatron.actor.batching import MicroBatch, TokenBatch, build_micro_batch
from ctpo_megatron.actor.token_budget import round_up


@dataclass
class PackedMicroBatch(MicroBatch):
    """n samples packed into one row: tokens/position_ids [1, T]; rows index the [T] logits;
    resp_row/resp_col/fields/response_lengths are per sample as in `MicroBatch` ([n, R])."""

    cu_seqlens: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.int32))
    """[segments + 1] int32 — cumulative segment lengths: one segment per sample, plus the
    padding tail when T was rounded up."""
    max_seqlen: int = 0
    """Longest segment."""

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """[M] per scored token -> [n, R] padded with 0 (keeps autograd)."""
        out = values.new_zeros((self.num_samples, max(self.max_response_len, 1)))
        return out.index_put((self.resp_row, self.resp_col), values)

    def packed_seq_params(self, device: torch.device):
        """megatron's `PackedSeqParams` for TransformerEngine's THD attention."""
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = self.cu_seqlens.to(device=device, dtype=torch.int32)
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)


def build_packed_micro_batch(batch: TokenBatch, *, seq_multiple: int = 1) -> PackedMicroBatch:
    """Packs the rows of `batch` (in order) into one [1, T] row, T = round_up(sum of lengths,
    seq_multiple). Per-token fields are [n, R] as in `build_micro_batch`."""
    padded = build_micro_batch(batch)  # [n, S]: scored rows, targets, fields in sample order
    s_len = padded.tokens.shape[1]
    lengths = batch.lengths
    real = torch.arange(s_len) < lengths[:, None]
    flat = padded.tokens[real]  # sample after sample
    total = round_up(max(int(flat.numel()), 1), seq_multiple)
    seg_lens = lengths.tolist() + ([total - flat.numel()] if total > flat.numel() else [])
    seg = torch.tensor(seg_lens, dtype=torch.int64)
    cu = torch.zeros(len(seg_lens) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(seg, 0)
    tokens = torch.zeros((1, total), dtype=torch.int64)
    tokens[0, :flat.numel()] = flat
    segment = torch.repeat_interleave(torch.arange(len(seg_lens)), seg)
    position_ids = (torch.arange(total) - cu[segment])[None]
    # padded.rows = i * S + p -> offset of sample i + p in the packed row
    rows = cu[padded.resp_row] + padded.rows % s_len
    return PackedMicroBatch(tokens=tokens, position_ids=position_ids, rows=rows, targets=padded.targets,
                            resp_row=padded.resp_row, resp_col=padded.resp_col,
                            response_lengths=padded.response_lengths, fields=padded.fields,
                            cu_seqlens=cu.to(torch.int32), max_seqlen=max(seg_lens, default=0))


def block_causal_mask(cu_seqlens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[1, 1, T, T] bool, True = masked (megatron's convention): causal within each segment of
    `cu_seqlens`, nothing across segments. Not cached: every pack has its own boundaries."""
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=device), cu.diff())
    total = int(cu[-1])
    later = torch.triu(torch.ones(total, total, dtype=torch.bool, device=device), 1)
    return (later | (seg[:, None] != seg[None, :]))[None, None]


def check_packing_backend(pack_sequences: bool, *, use_te: bool, on_gpu: bool) -> None:
    """Raises ValueError for packing on a GPU without TransformerEngine (megatron's local spec
    cannot take PackedSeqParams, and a [T, T] mask per pack is what packing avoids there)."""
    if pack_sequences and on_gpu and not use_te:
        raise ValueError("actor.pack_sequences=true needs TransformerEngine on a GPU (megatron's local "
                         "spec cannot take PackedSeqParams); install it or set actor.pack_sequences=false")


def packed_attention_inputs(mb: PackedMicroBatch, device: torch.device):
    """(attention_mask, packed_seq_params) for GPTModel: the block-diagonal causal mask on CPU
    (megatron's local spec), `PackedSeqParams` (THD, TransformerEngine) elsewhere."""
    if device.type == "cpu":
        return block_causal_mask(mb.cu_seqlens, device), None
    return None, mb.packed_seq_params(device)
