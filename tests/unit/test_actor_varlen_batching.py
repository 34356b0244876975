"""Token-budget micro-batches and sequence packing (actor/token_budget.py, actor/packing.py),
no ranks needed: the plan, the packed layout (cu_seqlens, position ids, scored rows), the
block-diagonal mask, unpacking per sample, the settings' errors and the padding metric."""

import random

import pytest
import torch

from ctpo_megatron.actor.batching import TokenBatch, build_micro_batch
from ctpo_megatron.actor.config import ActorConfig
from ctpo_megatron.actor.context_parallel import shard_micro_batch
from ctpo_megatron.actor.packing import (
    block_causal_mask, build_packed_micro_batch, check_packing_backend, packed_attention_inputs,
)
from ctpo_megatron.actor.policy import PER_TOKEN_FIELDS
from ctpo_megatron.actor.schedule import budget_micro_batches
from ctpo_megatron.actor.token_budget import group_cost, plan_groups, plan_token_budget, split_to_count
from ctpo_megatron.parallel.dims import ParallelDims
from ctpo_megatron.trainer.metrics import padding_metrics


def _samples(lengths=((3, 5), (1, 1), (7, 4), (2, 0), (4, 9))):
    samples = []
    for k, (p, r) in enumerate(lengths):
        samples.append({"prompt_ids": [(7 * k + j) % 50 + 1 for j in range(p)],
                        "response_ids": [(11 * k + j) % 50 + 1 for j in range(r)],
                        "old_log_probs": [100.0 * k + j for j in range(r)], "advantages": [1.0] * r})
    return samples


def _batch(samples=None):
    return TokenBatch.from_samples(samples or _samples(), PER_TOKEN_FIELDS)


def test_group_cost_padded_and_packed():
    assert group_cost([5, 3, 2], packed=False) == 15
    assert group_cost([5, 3, 2], packed=True) == 10
    assert group_cost([5, 3, 2], packed=False, seq_multiple=4) == 24
    assert group_cost([5, 3, 2], packed=True, seq_multiple=4) == 12
    assert group_cost([], packed=True) == 0


@pytest.mark.parametrize("packed", [False, True])
def test_plan_fills_to_the_budget_longest_first(packed):
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(40)] + [150]  # one sample over the budget
    groups = plan_groups(lengths, 100, packed=packed)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each sample once
    assert groups[0] == [40]  # the over-budget sample runs alone, first
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(lengths, reverse=True)
    for k, g in enumerate(groups):
        cost = group_cost([lengths[i] for i in g], packed=packed)
        assert cost <= 100 or len(g) == 1
        if k + 1 < len(groups):  # greedy: the next sample did not fit
            nxt = groups[k + 1][0]
            assert group_cost([lengths[i] for i in g] + [lengths[nxt]], packed=packed) > 100


def test_plan_rejects_a_non_positive_budget():
    with pytest.raises(ValueError, match="actor.micro_batch_tokens=0"):
        plan_groups([3], 0, packed=False)


def test_split_to_count_splits_the_most_expensive_then_adds_fillers():
    lengths = [10, 9, 3, 2, 2]
    groups = plan_groups(lengths, 25, packed=False)
    assert groups == [[0, 1], [2, 3, 4]]
    grown = split_to_count(groups, 3, lengths, packed=False)
    assert grown == [[0], [1], [2, 3, 4]]  # cost 20 was the largest
    costs = [group_cost([lengths[i] for i in g], packed=False) for g in grown]
    assert max(costs) <= 20
    assert split_to_count(groups, 7, lengths, packed=False) == [[0], [1], [2], [3], [4], [], []]
    assert split_to_count(groups, 2, lengths, packed=False) == groups
    with pytest.raises(ValueError, match="cannot become 1"):
        split_to_count(groups, 1, lengths, packed=False)
    # without a DP group the plan is the greedy one
    assert plan_token_budget(lengths, 25, packed=False) == groups


def test_budget_micro_batches_hold_the_rows_they_name():
    batch = _batch()
    mbs = budget_micro_batches(batch, token_budget=16)
    assert sorted(int(i) for mb in mbs for i in mb.sample_index) == list(range(len(batch)))
    for mb in mbs:
        rows = batch.select(mb.sample_index)
        assert mb.tokens.shape == (len(rows), int(rows.lengths.max()))  # padded to its own longest
        for j, i in enumerate(mb.sample_index.tolist()):
            r = int(batch.response_lens[i])
            assert torch.equal(mb.fields["old_log_probs"][j, :r], batch.per_token["old_log_probs"][i, :r])
    assert sum(mb.computed_tokens for mb in mbs) < len(batch) * int(batch.lengths.max())


def test_filler_micro_batches_weigh_nothing():
    batch = _batch(_samples(((3, 5),)))
    mbs = budget_micro_batches(batch, token_budget=100)
    assert len(mbs) == 1
    groups = split_to_count([[0]], 3, [8], packed=False)
    assert groups == [[0], [], []]
    from ctpo_megatron.actor.token_budget import filler_batch

    filler = build_micro_batch(filler_batch(PER_TOKEN_FIELDS))
    assert filler.tokens.shape == (1, 2) and filler.targets.numel() == 1  # one token runs the loss
    assert all(float(t.abs().sum()) == 0 for t in filler.fields.values())  # mask 0: no weight


@pytest.mark.parametrize("seq_multiple", [1, 4])
def test_packed_layout(seq_multiple):
    samples = _samples()
    batch = _batch(samples)
    mb = build_packed_micro_batch(batch, seq_multiple=seq_multiple)
    lengths = batch.lengths.tolist()
    total = sum(lengths)
    padded_total = -(-total // seq_multiple) * seq_multiple
    assert mb.tokens.shape == mb.position_ids.shape == (1, padded_total)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    if padded_total > total:
        bounds.append(padded_total)  # the rounding tail is a segment of its own
    assert mb.cu_seqlens.dtype == torch.int32 and mb.cu_seqlens.tolist() == bounds
    assert mb.max_seqlen == max(b - a for a, b in zip(bounds, bounds[1:]))
    for k, s in enumerate(samples):
        ids = s["prompt_ids"] + s["response_ids"]
        a = bounds[k]
        assert mb.tokens[0, a:a + len(ids)].tolist() == ids
        assert mb.position_ids[0, a:a + len(ids)].tolist() == list(range(len(ids)))  # restart per sample
    # each scored row is the position before its target, inside the target's own sample
    assert torch.equal(mb.tokens[0, mb.rows + 1], mb.targets)
    for row, col, logits_row in zip(mb.resp_row.tolist(), mb.resp_col.tolist(), mb.rows.tolist()):
        assert logits_row == bounds[row] + len(samples[row]["prompt_ids"]) + col - 1
    assert mb.computed_tokens == padded_total
    # unpacking per sample: per-token values scatter back to [n, R] response order
    back = mb.scatter(mb.targets.float())
    for k, s in enumerate(samples):
        r = len(s["response_ids"])
        assert back[k, :r].tolist() == [float(t) for t in s["response_ids"]]
        assert (back[k, r:] == 0).all()
    assert torch.equal(mb.fields["old_log_probs"], build_micro_batch(batch).fields["old_log_probs"])


def test_block_causal_mask_is_causal_within_each_segment_only():
    cu = torch.tensor([0, 3, 4, 7], dtype=torch.int32)
    mask = block_causal_mask(cu, torch.device("cpu"))[0, 0]
    assert mask.shape == (7, 7)
    seg = [0, 0, 0, 1, 2, 2, 2]
    for i in range(7):
        for j in range(7):
            assert bool(mask[i, j]) == (j > i or seg[i] != seg[j]), (i, j)


def test_packed_attention_inputs_follow_megatrons_thd_contract():
    mb = build_packed_micro_batch(_batch(), seq_multiple=4)
    mask, params = packed_attention_inputs(mb, torch.device("cpu"))
    assert params is None and mask.shape == (1, 1, mb.tokens.shape[1], mb.tokens.shape[1])
    # any non-CPU device (meta stands in for a GPU here): THD PackedSeqParams, no mask
    mask, params = packed_attention_inputs(mb, torch.device("meta"))
    assert mask is None and params.qkv_format == "thd"
    assert params.cu_seqlens_q is params.cu_seqlens_kv and params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.device.type == "meta" and params.cu_seqlens_q.shape == mb.cu_seqlens.shape
    assert params.max_seqlen_q == params.max_seqlen_kv == mb.max_seqlen


def test_packing_backend_check():
    check_packing_backend(True, use_te=True, on_gpu=True)
    check_packing_backend(True, use_te=False, on_gpu=False)  # CPU: the block mask
    check_packing_backend(False, use_te=False, on_gpu=True)
    with pytest.raises(ValueError, match="pack_sequences=true needs TransformerEngine"):
        check_packing_backend(True, use_te=False, on_gpu=True)


def test_token_budget_micro_batches_cut_for_context_parallelism():
    batch = _batch()
    mbs = budget_micro_batches(batch, token_budget=16, seq_multiple=4)
    part = shard_micro_batch(mbs[0], 2, 1)
    assert torch.equal(part.sample_index, mbs[0].sample_index)
    assert part.computed_tokens == mbs[0].computed_tokens  # b * S, over all CP ranks


def test_actor_config_token_budget_settings():
    assert ActorConfig().micro_batch_tokens == 0
    assert ActorConfig(micro_batch_tokens=None).micro_batch_tokens == 0
    with pytest.raises(ValueError, match="actor.micro_batch_tokens=-1"):
        ActorConfig(micro_batch_tokens=-1)
    with pytest.raises(ValueError, match="pack_sequences=true needs actor.micro_batch_tokens"):
        ActorConfig(pack_sequences=True)
    with pytest.raises(ValueError, match="not supported under context parallelism"):
        ActorConfig(pack_sequences=True, micro_batch_tokens=4096, dims=ParallelDims(cp=2))
    ActorConfig(micro_batch_tokens=4096, dims=ParallelDims(cp=2))  # padded budget under CP is fine


def test_padding_metric():
    assert padding_metrics({}) == {}
    got = padding_metrics({"perf/actor_tokens_computed": 300.0, "perf/actor_tokens_useful": 200.0})
    assert got == {"perf/padding_ratio": 1.5}
