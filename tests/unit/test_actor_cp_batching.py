"""The actor's context-parallel micro-batch layout (actor/context_parallel.py), no ranks needed."""

import pytest
import torch

from ctpo_megatron.actor.batching import TokenBatch, build_micro_batch
from ctpo_megatron.actor.policy import PER_TOKEN_FIELDS
from ctpo_megatron.actor.context_parallel import (
    cp_seq_multiple, shard_micro_batch, zigzag_global_positions,
)


def _batch(cp):
    samples = [{"prompt_ids": [5, 6, 7], "response_ids": [8, 9, 10, 11, 12]},
               {"prompt_ids": [1], "response_ids": [2]},
               {"prompt_ids": [3, 4, 5, 6, 7, 8, 9], "response_ids": [10, 11, 12, 13]}]
    for k, s in enumerate(samples):
        r = len(s["response_ids"])
        s.update(old_log_probs=[100.0 * k + j for j in range(r)], advantages=[1.0] * r)
    return samples, build_micro_batch(TokenBatch.from_samples(samples, PER_TOKEN_FIELDS), seq_multiple=2 * cp)


@pytest.mark.parametrize("cp", [2, 3])
def test_every_response_token_is_scored_on_exactly_one_rank_in_the_zigzag_layout(cp):
    samples, mb = _batch(cp)
    s = mb.tokens.shape[1]
    assert s % (2 * cp) == 0 and s >= 11
    owners = torch.zeros(mb.fields["old_log_probs"].shape)
    rebuilt = torch.zeros_like(owners)
    for rank in range(cp):
        part = shard_micro_batch(mb, cp, rank)
        positions = zigzag_global_positions(s, cp, rank)
        assert part.tokens.shape == (3, s // cp)
        assert torch.equal(part.position_ids[0], positions)
        assert torch.equal(part.tokens, mb.tokens[:, positions])
        # the logits row of each scored token predicts exactly its target, at its global position
        flat = part.tokens.reshape(-1)
        for row, col, tgt, lcol in zip(part.resp_row, part.resp_col, part.targets, part.local_col):
            p = len(samples[row]["prompt_ids"]) + col
            assert positions[lcol] == p - 1 and mb.tokens[row, p] == tgt
        assert torch.equal(part.rows, part.resp_row * (s // cp) + part.local_col)
        assert flat.numel() == 3 * s // cp
        owners += part.to_response_layout(torch.ones(part.tokens.shape))
        rebuilt += part.to_response_layout(part.fields["old_log_probs"])
        assert part.fields["response_mask"].sum() == part.targets.numel()
    real = torch.zeros_like(owners)
    for i, n in enumerate(mb.response_lengths):
        real[i, :n] = 1
    assert torch.equal(owners, real)  # once each, and never a padded slot
    assert torch.equal(rebuilt, mb.fields["old_log_probs"])


def test_length_not_a_multiple_of_2cp_is_refused():
    samples, _ = _batch(1)
    mb = build_micro_batch(TokenBatch.from_samples(samples))  # longest sample: 11 tokens
    with pytest.raises(ValueError, match="sequence length 11 is not a multiple of 2\\*cp = 4"):
        shard_micro_batch(mb, 2, 0)


def test_seq_multiple_includes_tp_under_sequence_parallelism():
    assert cp_seq_multiple(2, 4, False) == 4 and cp_seq_multiple(2, 4, True) == 16
