"""Exact causal core attention under context parallelism for megatron's local layer spec.

Megatron's local `DotProductAttention` refuses `context_parallel_size > 1` (only
TransformerEngine's attention implements CP). This module takes its place in the local spec
when CP > 1 (no TE, e.g. CPU mode). Layout (megatron's zigzag, `ops/zigzag.py`): with cp ranks
every sequence of the padded batch is cut into 2*cp chunks of c = S/(2*cp) tokens, and CP rank
r holds chunks r and 2*cp-1-r, concatenated, so its local sequence is 2c = S/cp tokens.

Per layer, K and V (RoPE already applied at their global positions) are all-gathered over the
CP group with megatron's `gather_from_sequence_parallel_region` (forward all-gather; backward
reduce-scatter, which sums each rank's K/V gradient contributions onto the owner), reordered to
global order, and each local query chunk g attends to the keys 0 .. (g+1)*c - 1, causally
within its own chunk: exactly the keys a full causal mask allows, computed block-wise (every
rank does the same 2*cp+1 chunk-blocks of work). Right padding needs no extra mask: padded
positions follow every real token of their row, so a causal mask already hides them from real
queries (padded queries see real keys, and their outputs are never scored). GQA is computed
without repeating K/V (queries are grouped per KV head).
"""

from __future__ import annotations

import math

import torch

from ctpo_megatron.ops.zigzag import zigzag_unshard


def causal_block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                           key_offset: int, scale: float, softmax_in_fp32: bool = True,
                           dropout: torch.nn.Module | None = None) -> torch.Tensor:
    """Queries at global positions key_offset .. key_offset+sq-1 over keys 0 .. sk-1.

    query: [sq, b, ng, rep, hn]; key, value: [sk, b, ng, hn] with sk = key_offset + sq (the
    keys end where the queries end). Key j is visible to query i iff j <= key_offset + i.
    Returns context [sq, b, ng, rep, hn] in query's dtype.
    """
    sq, sk = query.shape[0], key.shape[0]
    if sk != key_offset + sq:
        raise ValueError(f"causal_block_attention: {sk} keys, expected key_offset {key_offset} + {sq} queries")
    # Broadcasting matmuls rather than einsum: einsum would save a permuted copy of the
    # [.., sq, sk] probabilities for backward, doubling the largest activation.
    scores = torch.matmul(query.permute(1, 2, 3, 0, 4), key.permute(1, 2, 3, 0)[:, :, None]) * scale
    if softmax_in_fp32:
        scores = scores.float()
    masked = torch.ones(sq, sk, dtype=torch.bool, device=query.device).triu_(key_offset + 1)
    probs = torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1).to(value.dtype)
    if dropout is not None:
        probs = dropout(probs)
    context = torch.matmul(probs, value.permute(1, 2, 0, 3)[:, :, None])  # [b, ng, rep, sq, hn]
    return context.permute(3, 0, 1, 2, 4)


def zigzag_global_chunks(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The global chunk ids (of 2*cp) this CP rank holds, in local order."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def _megatron_module():
    from megatron.core.transformer.module import MegatronModule

    return MegatronModule


class ContextParallelDotProductAttention(_megatron_module()):
    """Core attention for megatron's local spec at CP > 1 (drop-in for `DotProductAttention`).

    Constructed by megatron's `SelfAttention` from the layer spec (same arguments as
    `DotProductAttention`). forward(query [sq, b, np, hn], key/value [sq, b, ng, hn], ...) ->
    context [sq, b, np*hn], sq = S/cp local tokens in zigzag order. Only causal self-attention
    on padded batches (`attention_mask` must be None: the mask follows from the global chunk
    positions); no packed sequences, no attention bias.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.utils import divide

        if pg_collection is None or not hasattr(pg_collection, "cp") or not hasattr(pg_collection, "tp"):
            raise ValueError("ContextParallelDotProductAttention needs a pg_collection with tp and cp groups")
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"context-parallel attention supports causal masks only, got {attn_mask_type}")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("context-parallel attention: sliding-window attention is not supported")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"context-parallel attention: softmax_type={config.softmax_type!r} is not supported")
        self.config = config
        self.cp_group = pg_collection.cp
        tp = pg_collection.tp.size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        # (megatron's apply_query_key_layer_scaling divides this by the layer number and the
        # softmax multiplies it back: the same probabilities, so it is not modelled here.)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.attention_dropout = torch.nn.Dropout(p) if p > 0 else None

    def _dropout(self):
        if self.attention_dropout is None:
            return None
        from megatron.core import tensor_parallel

        def apply(probs):
            if self.config.sequence_parallel:
                return self.attention_dropout(probs)
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.attention_dropout(probs)
        return apply

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        if packed_seq_params is not None:
            raise ValueError("context-parallel attention (local spec): packed sequences are not "
                             "supported; use padded micro-batches")
        if attention_bias is not None:
            raise ValueError("context-parallel attention (local spec): attention_bias is not supported")
        if attention_mask is not None:
            raise ValueError("context-parallel attention (local spec): pass attention_mask=None; the "
                             "causal mask follows from each rank's zigzag chunk positions")
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        sq, b = query.shape[0], query.shape[1]
        if sq % 2:
            raise ValueError(f"context-parallel attention: the local sequence ({sq} tokens) must hold "
                             "two equal zigzag chunks; pad sequences to a multiple of 2*cp")
        c = sq // 2
        # [cp * sq, b, ng, hn] in rank order; backward reduce-scatters the gradients.
        keys = gather_from_sequence_parallel_region(key, tensor_parallel_output_grad=True, group=self.cp_group)
        values = gather_from_sequence_parallel_region(value, tensor_parallel_output_grad=True, group=self.cp_group)
        keys = zigzag_unshard(list(keys.chunk(cp, dim=0)), seq_dim=0)  # global order [S, b, ng, hn]
        values = zigzag_unshard(list(values.chunk(cp, dim=0)), seq_dim=0)
        q = query.reshape(sq, b, self.groups, self.heads // self.groups, self.head_dim)
        dropout = self._dropout()
        outputs = []
        for local, chunk in enumerate(zigzag_global_chunks(cp, rank)):
            end = (chunk + 1) * c
            outputs.append(causal_block_attention(
                q[local * c:(local + 1) * c], keys[:end], values[:end], key_offset=chunk * c,
                scale=self.softmax_scale, softmax_in_fp32=self.config.attention_softmax_in_fp32,
                dropout=dropout))
        context = torch.cat(outputs, dim=0)
        return context.reshape(sq, b, self.heads * self.head_dim)
