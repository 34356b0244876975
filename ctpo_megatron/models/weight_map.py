"""Name and layout map between HF Llama/Qwen tensors and megatron GPTModel parameters.

One `ParamMap` per megatron parameter of a model chunk says which HF tensors feed it and how the
TP shard is cut:

  replicated  same tensor on every TP rank (norms)
  col         split along dim 1 (row-parallel input columns: o_proj, down_proj)
  vocab       split along dim 0 of the padded vocabulary (embedding, lm_head); rows past the HF
              vocabulary are zero
  qkv         megatron's fused QKV: per query group g, [q heads of g; k_g; v_g] stacked; a TP
              rank owns whole query groups (ng / tp of them)
  fc1         megatron's fused gate/up: each TP rank holds [gate shard; up shard]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ctpo_megatron.models.config import ModelSpec

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# megatron suffix within a layer -> (kind, HF suffixes within model.layers.{g}).
# Both the local spec (separate norms) and TE's spec (norms fused into the next linear) appear.
_LAYER_MAP: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": (
        "qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    "self_attention.linear_qkv.bias": (
        "qkv", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")),
    "self_attention.q_layernorm.weight": ("replicated", ("self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": ("replicated", ("self_attn.k_norm.weight",)),
    "self_attention.linear_proj.weight": ("col", ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": ("fc1", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("col", ("mlp.down_proj.weight",)),
}


@dataclass(frozen=True)
class ParamMap:
    """How one megatron parameter of this chunk relates to HF tensors."""

    megatron_name: str
    """Name in the GPTModel chunk's `named_parameters()` (layer indices local to the stage)."""
    kind: str
    """One of replicated, col, vocab, qkv, fc1 (see module docstring)."""
    hf_names: tuple[str, ...]
    """HF tensor names in order (q, k, v for qkv; gate, up for fc1)."""
    hf_shapes: tuple[tuple[int, ...], ...]
    """Full (unsharded) HF shapes, one per hf_names entry."""


def _hf_shapes(kind: str, hf_suffixes: tuple[str, ...], spec: ModelSpec,
               local_shape: tuple[int, ...], tp: int) -> tuple[tuple[int, ...], ...]:
    h, d = spec.hidden_size, spec.head_dim
    if kind == "replicated":
        return (tuple(local_shape),)
    if kind == "col":
        return ((local_shape[0], local_shape[1] * tp),)
    if kind == "vocab":
        return ((spec.vocab_size, local_shape[1]),)
    if kind == "qkv":
        tail = (h,) if len(local_shape) == 2 else ()
        return ((spec.num_attention_heads * d, *tail), (spec.num_query_groups * d, *tail),
                (spec.num_query_groups * d, *tail))
    if kind == "fc1":
        return ((spec.ffn_hidden_size, h), (spec.ffn_hidden_size, h))
    raise AssertionError(kind)


def build_param_maps(model: torch.nn.Module, spec: ModelSpec, tp: int) -> list[ParamMap]:
    """Maps every parameter of one GPTModel chunk (unwrapped) to its HF tensors.

    Raises ValueError naming any megatron parameter this converter does not know.
    """
    maps = []
    for name, param in model.named_parameters():
        shape = tuple(param.shape)
        if name == "embedding.word_embeddings.weight":
            kind, hf = "vocab", ("model.embed_tokens.weight",)
        elif name == "output_layer.weight":
            # With tied embeddings and PP > 1 the last stage keeps its own copy of the embedding.
            kind = "vocab"
            hf = ("model.embed_tokens.weight",) if spec.tie_word_embeddings else ("lm_head.weight",)
        elif name == "decoder.final_layernorm.weight":
            kind, hf = "replicated", ("model.norm.weight",)
        else:
            match = _LAYER.match(name)
            if match is None or match.group(2) not in _LAYER_MAP:
                raise ValueError(f"megatron parameter {name!r} {shape} has no HF counterpart")
            local_index, suffix = int(match.group(1)), match.group(2)
            global_index = model.decoder.layers[local_index].layer_number - 1
            kind, hf_suffixes = _LAYER_MAP[suffix]
            hf = tuple(f"model.layers.{global_index}.{s}" for s in hf_suffixes)
        maps.append(ParamMap(name, kind, hf, _hf_shapes(kind, hf, spec, shape, tp)))
    return maps


def shard_slices(pmap: ParamMap, spec: ModelSpec, tp_rank: int, tp: int) -> list[tuple]:
    """Per HF tensor of `pmap`, the index (tuple of slices) this TP rank reads from it."""
    if pmap.kind == "replicated":
        return [tuple(slice(None) for _ in pmap.hf_shapes[0])]
    if pmap.kind == "fc1":
        rows = pmap.hf_shapes[0][0] // tp
        return [(slice(tp_rank * rows, (tp_rank + 1) * rows),) for _ in pmap.hf_names]
    if pmap.kind == "col":
        cols = pmap.hf_shapes[0][1] // tp
        return [(slice(None), slice(tp_rank * cols, (tp_rank + 1) * cols))]
    if pmap.kind == "vocab":
        rows = spec.padded_vocab_size // tp
        start = min(tp_rank * rows, spec.vocab_size)
        return [(slice(start, min((tp_rank + 1) * rows, spec.vocab_size)),)]
    if pmap.kind == "qkv":
        groups = spec.num_query_groups // tp
        q_rows = spec.num_attention_heads // spec.num_query_groups * spec.head_dim
        g0 = tp_rank * groups
        kv = slice(g0 * spec.head_dim, (g0 + groups) * spec.head_dim)
        return [(slice(g0 * q_rows, (g0 + groups) * q_rows),), (kv,), (kv,)]
    raise AssertionError(pmap.kind)


def assemble_shard(pmap: ParamMap, spec: ModelSpec, parts: list[torch.Tensor], tp: int,
                   local_shape: tuple[int, ...]) -> torch.Tensor:
    """Builds this rank's megatron shard from the HF slices read by `shard_slices`."""
    if pmap.kind in ("replicated", "col"):
        return parts[0]
    if pmap.kind == "fc1":
        return torch.cat(parts, dim=0)
    if pmap.kind == "vocab":
        out = parts[0].new_zeros(local_shape)  # padded vocab rows stay zero
        out[: parts[0].shape[0]] = parts[0]
        return out
    if pmap.kind == "qkv":
        groups = spec.num_query_groups // tp
        q, k, v = (p.reshape(groups, -1, *p.shape[1:]) for p in parts)
        return torch.cat([q, k, v], dim=1).reshape(local_shape)
    raise AssertionError(pmap.kind)


def full_to_hf(pmap: ParamMap, spec: ModelSpec, shards: list[torch.Tensor]) -> list[torch.Tensor]:
    """Turns the TP shards of one megatron parameter (ordered by TP rank) into its HF tensors."""
    tp = len(shards)
    if pmap.kind == "replicated":
        return [shards[0]]
    if pmap.kind == "col":
        return [torch.cat(shards, dim=1)]
    if pmap.kind == "vocab":
        return [torch.cat(shards, dim=0)[: spec.vocab_size]]
    if pmap.kind == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]
    if pmap.kind == "qkv":
        q_per_group = spec.num_attention_heads // spec.num_query_groups
        d = spec.head_dim
        full = torch.cat(shards, dim=0)
        grouped = full.reshape(spec.num_query_groups, (q_per_group + 2) * d, *full.shape[1:])
        q, k, v = grouped.split([q_per_group * d, d, d], dim=1)
        return [t.reshape(shape) for t, shape in zip((q, k, v), pmap.hf_shapes)]
    raise AssertionError(pmap.kind)
