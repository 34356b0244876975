"""Context-parallel core attention (local spec) vs full causal attention, values and gradients."""

import pytest
import torch

from ctpo_megatron.parallel.spawn import run_on_ranks

pytestmark = pytest.mark.dist

S, B, HEADS, GROUPS, HD = 24, 2, 4, 2, 8


def _reference(q, k, v):
    """Full causal attention, float64: q [S, b, np, hn], k/v [S, b, ng, hn] -> [S, b, np*hn]."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("qbnh,kbnh->bnqk", q, k) / HD ** 0.5
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("bnqk,kbnh->qbnh", probs, v).reshape(q.shape[0], q.shape[1], -1)


def _check(cp):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ctpo_megatron.models.cp_attention import ContextParallelDotProductAttention
    from ctpo_megatron.ops.zigzag import zigzag_shard
    from ctpo_megatron.parallel import ParallelDims, init_parallel

    _, pgs = init_parallel(ParallelDims(cp=cp))
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HD, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, kv_channels=HD, context_parallel_size=cp,
                               params_dtype=torch.float64, attention_dropout=0.0, hidden_dropout=0.0,
                               attention_softmax_in_fp32=False)
    attn = ContextParallelDotProductAttention(config, 1, AttnMaskType.causal, "self", pg_collection=pgs)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(S, B, HEADS, HD, generator=gen, dtype=torch.float64)
    k = torch.randn(S, B, GROUPS, HD, generator=gen, dtype=torch.float64)
    v = torch.randn(S, B, GROUPS, HD, generator=gen, dtype=torch.float64)
    w = torch.randn(S, B, HEADS * HD, generator=gen, dtype=torch.float64)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    (_reference(*full) * w).sum().backward()
    rank = pgs.cp.rank()
    shard = lambda t: zigzag_shard(t, cp, rank, seq_dim=0)  # noqa: E731
    local = [shard(t).detach().requires_grad_() for t in (q, k, v)]
    out = attn(*local, attention_mask=None)
    (out * shard(w)).sum().backward()
    errors = {"out": (out - shard(_reference(q, k, v))).abs().max().item()}
    for name, mine, ref in zip("qkv", local, full):
        errors[f"grad_{name}"] = (mine.grad - shard(ref.grad)).abs().max().item()
    return errors


def _run(rank, world_size):
    return {cp: _check(cp) for cp in (world_size, 2)}


def test_cp_attention_equals_full_causal_attention():
    """CP 4 and CP 2 (4 ranks, GQA 4 heads / 2 groups): output and the q, k, v gradients (k/v
    gradients reduce-scattered back to their owners) equal full causal attention in float64."""
    for result in run_on_ranks(_run, 4, timeout=300):
        for cp, errors in result.items():
            for name, err in errors.items():
                assert err < 1e-12, (cp, name, err)
