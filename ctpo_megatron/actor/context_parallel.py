"""The actor's data layout under context parallelism (CP > 1), and the policy loss on it.

A micro-batch is first built as usual (`batching.build_micro_batch`: `[b, S]` right-padded
tokens), with S rounded up to a multiple of 2*cp (of 2*cp*tp with sequence parallelism), then
every row is cut zigzag (`ops.zigzag`): CP rank r keeps chunks r and 2*cp-1-r of c = S/(2*cp)
tokens each, so it feeds GPTModel `[b, L]` tokens, L = S/cp. Megatron's RoPE slices its table
the same way (positions r*c.. and (2*cp-1-r)*c..), and the core attention gathers K/V over CP
(`models.cp_attention` on the local spec, TransformerEngine's on GPUs).

Response token j of sample i is predicted by the logits at global position p = P_i + j - 1;
the rank whose chunks contain p scores it (vocab-parallel over TP, as without CP), so every
response token is scored on exactly one CP rank. Per-token values of a rank live in the
"local layout" `[b, L]`: column l of row i is global position `zigzag_global_positions(...)[l]`,
and 0 (mask 0) where no response token of this rank is predicted. That layout is what
`ops.context_parallel_cumsum` expects, so the CTPO prefix sums C_t and n_t are exact across
ranks while only per-chunk totals are exchanged. Log-probs returned to callers are put back in
response order with one all-reduce over CP (each token is non-zero on one rank only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ctpo_megatron.actor.batching import MicroBatch
from ctpo_megatron.ops.context_parallel import context_parallel_cumsum
from ctpo_megatron.ops.zigzag import zigzag_shard


@dataclass
class ContextParallelMicroBatch(MicroBatch):
    """This CP rank's part of a micro-batch.

    tokens/position_ids are `[b, L]` (the rank's two zigzag chunks of every row, L = S/cp;
    position_ids hold the global positions); rows/targets/resp_row/resp_col cover only the
    response tokens this rank scores (rows index the flattened `[b * L]` logits);
    `fields` are `[b, L]` in the local layout (0 elsewhere, so `response_mask` sums to this
    rank's share of the tokens); response_lengths are the full R_i.
    """

    local_col: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    """[M_local] int64 — column (0..L-1) of each scored token in the local layout."""
    cp_size: int = 1
    """Context-parallel size the batch was cut for."""
    global_seq_len: int = 0
    """S: the padded length of the whole rows (L * cp)."""

    @property
    def computed_tokens(self) -> int:
        """Token positions of the whole micro-batch over all CP ranks (b * S)."""
        return self.tokens.shape[0] * self.global_seq_len

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """[M_local] per scored token -> [b, L] local layout, 0 elsewhere (keeps autograd)."""
        out = values.new_zeros(self.tokens.shape)
        index = (self.resp_row.to(values.device), self.local_col.to(values.device))
        return out.index_put(index, values)

    def to_response_layout(self, local: torch.Tensor) -> torch.Tensor:
        """[b, L] local layout -> [b, R] response order, 0 at tokens other ranks score."""
        device = local.device
        values = local[self.resp_row.to(device), self.local_col.to(device)]
        out = local.new_zeros((self.tokens.shape[0], max(self.max_response_len, 1)))
        return out.index_put((self.resp_row.to(device), self.resp_col.to(device)), values)


def cp_seq_multiple(cp_size: int, tp_size: int, sequence_parallel: bool) -> int:
    """What every micro-batch length must divide by: 2*cp zigzag chunks, and with sequence
    parallelism the local length S/cp split again over TP."""
    return 2 * cp_size * (tp_size if sequence_parallel else 1)


def zigzag_global_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """[S/cp] int64 — global position of each local column (chunk r, then chunk 2*cp-1-r)."""
    return zigzag_shard(torch.arange(seq_len), cp_size, cp_rank)


def shard_micro_batch(mb: MicroBatch, cp_size: int, cp_rank: int) -> ContextParallelMicroBatch:
    """Cuts a padded micro-batch `[b, S]` (S a multiple of 2*cp) into this rank's part."""
    b, s = mb.tokens.shape
    parts = 2 * cp_size
    if s % parts:
        raise ValueError(f"shard_micro_batch: sequence length {s} is not a multiple of 2*cp = {parts}; "
                         "build micro-batches with seq_multiple=cp_seq_multiple(...)")
    c = s // parts
    local_len = s // cp_size
    pos = mb.rows % s  # global position of the logits row predicting each response token
    chunk = torch.div(pos, c, rounding_mode="floor")
    first, second = cp_rank, parts - 1 - cp_rank
    own = (chunk == first) | (chunk == second)
    local = torch.where(chunk == first, pos - first * c, c + pos - second * c)[own]
    resp_row, resp_col = mb.resp_row[own], mb.resp_col[own]
    fields = {}
    for name, padded in mb.fields.items():
        out = torch.zeros((b, local_len), dtype=padded.dtype)
        out[resp_row, local] = padded[resp_row, resp_col]
        fields[name] = out
    return ContextParallelMicroBatch(
        tokens=zigzag_shard(mb.tokens, cp_size, cp_rank),
        position_ids=zigzag_shard(mb.position_ids, cp_size, cp_rank),
        rows=resp_row * local_len + local, targets=mb.targets[own], resp_row=resp_row,
        resp_col=resp_col, response_lengths=list(mb.response_lengths), fields=fields,
        sample_index=mb.sample_index, local_col=local, cp_size=cp_size, global_seq_len=s)


def gather_response_layout(mb: ContextParallelMicroBatch, local: torch.Tensor, cp_group) -> torch.Tensor:
    """[b, L] local values (e.g. log-probs) -> [b, R] full response order on every CP rank
    (one all-reduce of b*R floats over cp_group; every token is scored on one rank only)."""
    full = mb.to_response_layout(local.detach()).contiguous()
    dist.all_reduce(full, group=cp_group)
    return full


# ---------------------------------------------------------------------------- the loss
_TOKEN_LOCAL_LOSSES = ("grpo",)
"""Losses whose per-token terms need nothing from other tokens (no prefix sum)."""


def check_context_parallel_loss(cfg, cp_size: int) -> None:
    """Raises ValueError, naming the settings, when `cfg` (`algo.PolicyLossConfig`) cannot run
    at CP size `cp_size`: above 1 only algo.name "ctpo" or "grpo" with loss_agg_mode
    "token-mean" (other losses or aggregations need whole sequences on one rank). The trainer
    calls it at start-up, before any process group exists."""
    if cp_size > 1 and (cfg.name not in ("ctpo",) + _TOKEN_LOCAL_LOSSES or cfg.loss_agg_mode != "token-mean"):
        raise ValueError(f"algo.name={cfg.name!r} with algo.loss_agg_mode={cfg.loss_agg_mode!r} is not "
                         f"supported under context parallelism (parallel.cp={cp_size}): use algo.name=ctpo "
                         "or grpo with algo.loss_agg_mode=token-mean, or parallel.cp=1")


def context_parallel_policy_loss(log_probs: torch.Tensor, batch: dict, cfg, *, return_terms: bool = False,
                                 with_metrics: bool = True, sums_bucket_edges: Sequence[int] | None = None):
    """`algo.policy_loss` on this CP rank's tokens, with CTPO's prefix sums taken over CP.

    log_probs: [b, L] float with grad — the actor's per-token log-probs in its layout (local
        zigzag layout at CP > 1; [b, R] response order at CP = 1).
    batch: the actor's loss batch: old_log_probs, advantages, response_mask, rollout_is_weights
        (same layout), global_num_tokens (response tokens of the whole mini-batch, all DP and CP
        ranks), dp_size (ranks the gradient is averaged over: DP x CP), cp_group (the actor
        sets it, of size 1 without CP; absent or None counts as size 1).
    cfg: `algo.PolicyLossConfig`. At CP > 1 supported are "ctpo" (C_t and n_t from
        `context_parallel_cumsum`: one exchange of per-chunk totals forward, one backward) and
        the token-local "grpo" (n_t from the same exchange, for the statistics by position),
        with loss_agg_mode "token-mean"; others raise ValueError. At CP = 1 the rows are whole
        responses in order: the loss takes its own prefix sums (no exchange, no scan outside
        the loss), so that a loss with a one-pass kernel runs it.
    The loss is normalized like over DP (`sum(mask * l) / global_num_tokens * dp_size`), so with
    DDP averaging over DP x CP the gradient equals the whole mini-batch's on one rank.
    with_metrics: False skips `algo.metrics.policy_metrics` (metrics is {}; the trainer sums
        `algo.stats.LossSums` instead). Per-rank metrics cover only this rank's tokens.
    sums_bucket_edges: also return this rank's `algo.stats.LossSums` (see `algo.policy_loss`),
        positions the global n_t.
    Returns (loss, metrics), with return_terms (loss, metrics, TokenTerms, positions) where
    positions [b, L] is the global generated-token index n_t (1-based) for
    `algo.metrics.clip_rate_by_position(..., positions=positions)`, and the LossSums last when
    sums_bucket_edges is given.
    """
    from ctpo_megatron.algo import policy_loss
    from ctpo_megatron.algo.ctpo import ctpo_log_ratio

    cp_group = batch.get("cp_group")
    cp_size = 1 if cp_group is None else dist.get_world_size(cp_group)
    check_context_parallel_loss(cfg, cp_size)
    mask = batch["response_mask"]
    cum = count = None
    if cp_size > 1 and (cfg.name == "ctpo" or with_metrics or return_terms or sums_bucket_edges is not None):
        # Each rank holds pieces of every sequence: n_t (and CTPO's C_t) are sums over ranks.
        if cfg.name == "ctpo":
            cum, count = context_parallel_cumsum(ctpo_log_ratio(log_probs, batch["old_log_probs"], mask),
                                                 mask > 0, cp_group)
        else:
            with torch.no_grad():
                _, count = context_parallel_cumsum(torch.zeros_like(mask, dtype=torch.float32), mask > 0, cp_group)
    out = policy_loss(log_probs, batch["old_log_probs"], batch["advantages"], mask, cfg,
                      rollout_is_weights=batch.get("rollout_is_weights"),
                      batch_num_tokens=batch["global_num_tokens"], dp_size=batch["dp_size"],
                      cum_log_ratio=cum, cum_count=count, return_terms=return_terms,
                      with_metrics=with_metrics, sums_bucket_edges=sums_bucket_edges)
    if not return_terms:
        return out
    if count is None:  # whole responses in order: n_t is the running count
        count = torch.cumsum((mask > 0).to(torch.int64), dim=-1)
    return (*out[:3], count.round().to(torch.int64), *out[3:])


def cp_micro_batches(batch, cp_group, *, micro_batch_size: int, fixed_shape: bool,
                     tp_size: int = 1, sequence_parallel: bool = False, token_budget: int = 0,
                     dp_group=None) -> list[ContextParallelMicroBatch]:
    """`schedule.make_micro_batches` of a `TokenBatch` (or with token_budget > 0
    `schedule.budget_micro_batches`, padded, never packed: the zigzag cut needs whole padded
    rows), padded for CP, then cut to this rank's part."""
    from ctpo_megatron.actor.schedule import budget_micro_batches, make_micro_batches

    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    multiple = cp_seq_multiple(cp_size, tp_size, sequence_parallel)
    if token_budget:
        full = budget_micro_batches(batch, token_budget=token_budget, seq_multiple=multiple,
                                    dp_group=dp_group)
    else:
        full = make_micro_batches(batch, micro_batch_size=micro_batch_size, fixed_shape=fixed_shape,
                                  seq_multiple=multiple)
    return [shard_micro_batch(mb, cp_size, cp_rank) for mb in full]
