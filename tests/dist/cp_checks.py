"""Context-parallel core attention (local spec) vs full causal attention, values and gradients.

The checks run inside the 4-rank spawn of `test_actor_context_parallel.py` (one rank start-up
for all CP tests); `check_cp_attention` is the part that runs on each rank."""

import torch

S, B, HEADS, GROUPS, HD = 24, 2, 4, 2, 8


def _reference(q, k, v):
    """Full causal attention, float64: q [S, b, np, hn], k/v [S, b, ng, hn] -> [S, b, np*hn]."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("qbnh,kbnh->bnqk", q, k) / HD ** 0.5
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("bnqk,kbnh->qbnh", probs, v).reshape(q.shape[0], q.shape[1], -1)


def check_cp_attention(cp):
    """On every rank of a world divisible by cp: max abs errors of the output and of the q, k, v
    gradients against full causal attention, float64 (re-initializes megatron's groups)."""
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


def _cp_setup(cp, samples, current):
    """Groups (CP of `cp` ranks, and this rank alone), the whole micro-batch `mb` and this
    rank's zigzag part of it, the current log-probs `full` [N, R] float64, the token count."""
    import torch.distributed as dist

    from ctpo_megatron.actor.batching import TokenBatch, build_micro_batch
    from ctpo_megatron.actor.context_parallel import shard_micro_batch
    from ctpo_megatron.actor.policy import PER_TOKEN_FIELDS
    from ctpo_megatron.parallel import ParallelDims, init_parallel

    _, pgs = init_parallel(ParallelDims(cp=cp))
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    one = singles[dist.get_rank()]
    mb = build_micro_batch(TokenBatch.from_samples(samples, PER_TOKEN_FIELDS), seq_multiple=2 * cp)
    part = shard_micro_batch(mb, cp, pgs.cp.rank())
    full = torch.zeros(len(samples), mb.max_response_len, dtype=torch.float64)
    for i, lp in enumerate(current):
        full[i, :len(lp)] = torch.as_tensor(lp, dtype=torch.float64)
    return pgs, one, mb, part, full, int(mb.fields["response_mask"].sum())


def check_cp_loss(cp, samples, current):
    """On every rank (cp divides the world): the CTPO/GRPO loss through
    `context_parallel_policy_loss` on this rank's zigzag part vs the same function at CP 1 on
    the whole batch (a group of one rank), float64. Returns max abs errors per config of the
    loss, its gradient w.r.t. the log-probs (summed over CP, averaged as DDP does) and the
    global token positions n_t."""
    import torch.distributed as dist

    from ctpo_megatron.actor.context_parallel import context_parallel_policy_loss
    from ctpo_megatron.algo import PolicyLossConfig

    pgs, one, mb, part, full, tokens = _cp_setup(cp, samples, current)
    errors = {}
    configs = {"ctpo_cumprod_la": PolicyLossConfig(name="ctpo"),
               "ctpo_geomean_la": PolicyLossConfig(name="ctpo", variant="geomean"),
               "grpo": PolicyLossConfig(name="grpo")}
    for name, cfg in configs.items():
        lp1 = full.clone().requires_grad_()
        batch1 = {k: v.double() for k, v in mb.fields.items()}
        batch1.update(global_num_tokens=tokens, dp_size=1, cp_group=one)
        loss1, _, _, pos1 = context_parallel_policy_loss(lp1, batch1, cfg, return_terms=True)
        loss1.backward()
        lp2 = full.clone().requires_grad_()
        local = part.scatter(lp2[part.resp_row, part.resp_col])
        batch2 = {k: v.double() for k, v in part.fields.items()}
        batch2.update(global_num_tokens=tokens, dp_size=cp, cp_group=pgs.cp)
        loss2, _, _, pos2 = context_parallel_policy_loss(local, batch2, cfg, return_terms=True)
        loss2.backward()
        grad, total = lp2.grad.clone(), loss2.detach().clone()
        dist.all_reduce(grad, group=pgs.cp)
        dist.all_reduce(total, group=pgs.cp)
        owned = part.to_response_layout(torch.ones_like(pos2)).bool() & (mb.fields["response_mask"] > 0)
        errors[name] = {
            "loss": abs(total.item() / cp - loss1.item()),
            "grad": (grad / cp - lp1.grad).abs().max().item(),
            "grad_scale": lp1.grad.abs().max().item(),
            "positions": (part.to_response_layout(pos2) - pos1)[owned].abs().max().item(),
        }
    return errors


def check_trainer_loss(cp, samples, current, edges):
    """The trainer's loss closure (`trainer.update.make_loss_fn`) at CP `cp` on each rank's
    zigzag part vs CP 1 on the whole batch, float64: its `LossSums`, reduced over CP as
    `PolicyActor.reduce_sum` does, turned into metrics (clip rates by position included), and
    its gradient. Returns per config: max abs metric error over the keys (order statistics
    excepted: per-piece under CP), gradient error, the CP-1 metrics and the key sets."""
    import torch.distributed as dist

    from ctpo_megatron.algo import PolicyLossConfig
    from ctpo_megatron.algo.metrics import RATIO_QUANTILES
    from ctpo_megatron.trainer.update import make_loss_fn

    pgs, one, mb, part, full, tokens = _cp_setup(cp, samples, current)
    approximate = {f"is_ratio_{name}" for name, _ in RATIO_QUANTILES} | {"la_scale_p50"}
    out = {}
    for name, cfg in {"ctpo_cumprod_la": PolicyLossConfig(name="ctpo"),
                      "grpo": PolicyLossConfig(name="grpo")}.items():
        loss_fn = make_loss_fn(cfg, edges)
        lp1 = full.clone().requires_grad_()
        batch1 = {k: v.double() for k, v in mb.fields.items()}
        batch1.update(global_num_tokens=tokens, dp_size=1, cp_group=one)
        loss1, sums1 = loss_fn(lp1, batch1)
        loss1.backward()
        lp2 = full.clone().requires_grad_()
        batch2 = {k: v.double() for k, v in part.fields.items()}
        batch2.update(global_num_tokens=tokens, dp_size=cp, cp_group=pgs.cp)
        loss2, sums2 = loss_fn(part.scatter(lp2[part.resp_row, part.resp_col]), batch2)
        loss2.backward()
        grad = lp2.grad.clone()
        dist.all_reduce(grad, group=pgs.cp)
        summed, maxima = sums2.to_vectors()
        dist.all_reduce(summed, group=pgs.cp)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=pgs.cp)
        sums2 = sums2.from_vectors(summed, maxima)
        kw = dict(num_updates=1, bucket_edges=edges, adaptive_clip=cfg.adaptive_clip)
        m1, m2 = sums1.metrics(**kw), sums2.metrics(**kw)
        out[name] = {
            "metrics": max(abs(m1[k] - m2[k]) for k in m1 if k not in approximate),
            "grad": (grad / cp - lp1.grad).abs().max().item(),
            "position_tokens": (sums1.position_tokens - sums2.position_tokens).abs().max().item(),
            "cp1": m1, "keys_equal": set(m1) == set(m2)}
    return out
