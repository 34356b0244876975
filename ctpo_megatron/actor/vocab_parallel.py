"""Per-token log-probs and entropy from vocab-parallel logits, chunked over tokens.

Each TP rank holds the logits of its vocabulary shard `[vocab_start, vocab_start + V_tp)`. The
softmax normalizer is built from per-token partial statistics all-reduced over the TP group (a
max, then [sum exp, sum exp*z, target logit]), so the full vocabulary is never gathered on one
rank. Tokens are processed `chunk_size` at a time in forward *and* backward (a custom autograd
Function that saves only the logits it was given plus two floats per token), so the float32
temporaries are bounded by `chunk_size x V_tp` whatever the sequence length.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and group.size() > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelLogProbs(torch.autograd.Function):
    """Forward returns (log_probs [M] float32, entropy [M] float32 or empty).

    Every chunk works in place on one [chunk, V_tp] float32 buffer (two in backward with
    entropy), so the extra memory is that, plus the gradient of the logits in backward.
    """

    @staticmethod
    def forward(ctx, logits, rows, targets, temperature, chunk_size, vocab_start, valid_local,
                tp_group, with_entropy):
        m = rows.numel()
        log_probs = torch.empty(m, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(log_probs)
        entropy = torch.empty_like(log_probs) if with_entropy else log_probs.new_empty(0)
        for start in range(0, m, chunk_size):
            sl = slice(start, min(start + chunk_size, m))
            z, in_shard, local_t = _chunk_logits(logits, rows[sl], targets[sl], temperature,
                                                 vocab_start, valid_local)
            z_target = torch.where(in_shard, z.gather(-1, local_t[:, None])[:, 0], 0.0)
            z_max = _all_reduce(z.max(dim=-1).values, dist.ReduceOp.MAX, tp_group)
            shifted = z.sub_(z_max[:, None])  # z - max, in place; -inf on padded entries
            z_target -= torch.where(in_shard, z_max, 0.0)  # the owning rank's shifted target
            if with_entropy:
                exp = shifted.exp()
                sum_exp = exp.sum(-1)
                # sum_j e^{z'_j} z'_j; padded entries have e = 0 and z' = -inf: keep them out.
                sum_exp_z = exp.mul_(shifted.nan_to_num_(neginf=0.0)).sum(-1)
                stats = torch.stack([sum_exp, z_target, sum_exp_z], dim=-1)
                del exp
            else:
                stats = torch.stack([shifted.exp_().sum(-1), z_target], dim=-1)
            del z, shifted
            stats = _all_reduce(stats, dist.ReduceOp.SUM, tp_group)
            log_z = torch.log(stats[:, 0])  # log-sum-exp of the shifted logits
            lse[sl] = z_max + log_z
            log_probs[sl] = stats[:, 1] - log_z
            if with_entropy:
                entropy[sl] = log_z - stats[:, 2] / stats[:, 0]
        ctx.save_for_backward(logits, rows, targets, lse, entropy)
        ctx.args = (temperature, chunk_size, vocab_start, valid_local, with_entropy)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        logits, rows, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk_size, vocab_start, valid_local, with_entropy = ctx.args
        grad_logits = torch.zeros_like(logits)
        use_entropy = with_entropy and grad_entropy is not None
        for start in range(0, rows.numel(), chunk_size):
            sl = slice(start, min(start + chunk_size, rows.numel()))
            z, in_shard, local_t = _chunk_logits(logits, rows[sl], targets[sl], temperature,
                                                 vocab_start, valid_local)
            g_lp = grad_log_probs[sl].float()[:, None]
            log_p = z.sub_(lse[sl, None])  # in place; -inf on padded entries
            if use_entropy:
                # d log p_t / d z_j = 1[j = t] - p_j ;  d H / d z_j = -p_j (log p_j + H)
                # => g_j = -p_j (g_lp + g_H (log p_j + H)) + g_lp 1[j = t]
                probs = log_p.exp()
                g_z = log_p.nan_to_num_(neginf=0.0).add_(entropy[sl, None])
                g_z.mul_(grad_entropy[sl].float()[:, None]).add_(g_lp).mul_(probs).neg_()
                del probs
            else:
                g_z = log_p.exp_().mul_(-g_lp)
            g_z.scatter_add_(-1, local_t[:, None], torch.where(in_shard[:, None], g_lp, 0.0))
            if temperature != 1.0:
                g_z.div_(temperature)
            grad_logits.index_copy_(0, rows[sl], g_z.to(logits.dtype))
            del z, log_p, g_z
        return grad_logits, None, None, None, None, None, None, None, None


def _chunk_logits(logits, rows, targets, temperature, vocab_start, valid_local):
    """A fresh float32 copy of the chunk's rows divided by the temperature, padded vocabulary
    set to -inf, and where each target falls in this shard."""
    z = logits.index_select(0, rows).float()  # index_select copies: safe to modify in place
    if temperature != 1.0:
        z.div_(temperature)
    if valid_local < z.shape[-1]:
        z[:, valid_local:] = float("-inf")
    local_t = targets - vocab_start
    in_shard = (local_t >= 0) & (local_t < valid_local)
    return z, in_shard, local_t.clamp(0, z.shape[-1] - 1)


def vocab_parallel_log_probs(
    logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, *, tp_group,
    vocab_size: int, temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropy) of `targets` under softmax(logits / temperature).

    logits: [N, V_tp] any float dtype — vocab-parallel logits (this rank's vocabulary shard
        `[tp_rank * V_tp, (tp_rank + 1) * V_tp)`; entries at global ids >= vocab_size are
        padding and excluded); may require grad.
    rows: [M] int64 — distinct rows of `logits` to score (e.g. only response positions).
    targets: [M] int64 — global token id scored at each row (< vocab_size).
    tp_group: the tensor-parallel group the vocabulary is split over (all-reduces go there);
        None only when the logits hold the whole vocabulary (no TP).
    Returns log_probs: [M] float32 and entropy: [M] float32 or None — full over TP (identical
    on every TP rank). Gradients flow to `logits` through both.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [N, V_tp], got shape {tuple(logits.shape)}")
    if rows.shape != targets.shape or rows.dim() != 1:
        raise ValueError(f"rows {tuple(rows.shape)} and targets {tuple(targets.shape)} must be "
                         "equal 1-D shapes")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    v_tp = logits.shape[-1]
    tp_rank = tp_group.rank() if tp_group is not None else 0
    vocab_start = tp_rank * v_tp
    valid_local = max(0, min(v_tp, vocab_size - vocab_start))
    log_probs, entropy = _VocabParallelLogProbs.apply(
        logits, rows.long(), targets.long(), float(temperature), int(chunk_size), vocab_start,
        valid_local, tp_group, with_entropy)
    return log_probs, (entropy if with_entropy else None)
