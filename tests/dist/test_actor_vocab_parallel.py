"""vocab_parallel_log_probs on 2 TP ranks vs a full-vocabulary torch reference: values and
gradients of log-probs and entropy, temperature, chunking, padded vocabulary."""

import pytest
import torch

from ctpo_megatron.parallel.spawn import run_on_ranks

pytestmark = pytest.mark.dist

N, V_PAD, VOCAB = 12, 16, 13  # 3 padded vocabulary entries, all on rank 1's shard
TEMPERATURE = 0.8


def _inputs():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(N, V_PAD, generator=gen, dtype=torch.float64) * 3
    rows = torch.tensor([0, 2, 3, 5, 6, 7, 9, 11])  # score only some rows (response tokens)
    targets = torch.randint(0, VOCAB, (rows.numel(),), generator=gen)
    g_lp = torch.randn(rows.numel(), generator=gen, dtype=torch.float64)
    g_ent = torch.randn(rows.numel(), generator=gen, dtype=torch.float64)
    return logits, rows, targets, g_lp, g_ent


def _reference():
    logits, rows, targets, g_lp, g_ent = _inputs()
    logits = logits.clone().requires_grad_(True)
    z = logits[rows, :VOCAB] / TEMPERATURE
    lp_all = torch.log_softmax(z, dim=-1)
    lp = lp_all.gather(-1, targets[:, None])[:, 0]
    ent = -(lp_all.exp() * lp_all).sum(-1)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return lp.detach(), ent.detach(), logits.grad


def _tp2(rank, world_size, chunk_size):
    import torch.distributed as dist

    from ctpo_megatron.actor.vocab_parallel import vocab_parallel_log_probs

    logits, rows, targets, g_lp, g_ent = _inputs()
    shard = logits[:, rank * V_PAD // 2: (rank + 1) * V_PAD // 2].float().clone().requires_grad_(True)
    lp, ent = vocab_parallel_log_probs(shard, rows, targets, tp_group=dist.group.WORLD,
                                       vocab_size=VOCAB, temperature=TEMPERATURE,
                                       chunk_size=chunk_size, with_entropy=True)
    ((lp * g_lp.float()).sum() + (ent * g_ent.float()).sum()).backward()
    lp_only, none = vocab_parallel_log_probs(shard.detach(), rows, targets, tp_group=dist.group.WORLD,
                                             vocab_size=VOCAB, temperature=TEMPERATURE,
                                             chunk_size=chunk_size)
    assert none is None
    return lp.tolist(), ent.tolist(), shard.grad.tolist(), lp_only.tolist()


def test_matches_full_vocab_reference():
    ref_lp, ref_ent, ref_grad = _reference()
    results = run_on_ranks(_tp2, 2, 3, timeout=120)  # chunks of 3 tokens: 8 rows -> 3 chunks
    for rank, (lp, ent, grad, lp_only) in enumerate(results):
        # float32 kernel vs float64 reference on O(1) values: a few float32 ulps.
        torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64), ref_lp, rtol=0, atol=2e-6)
        torch.testing.assert_close(torch.tensor(lp_only, dtype=torch.float64), ref_lp, rtol=0, atol=2e-6)
        torch.testing.assert_close(torch.tensor(ent, dtype=torch.float64), ref_ent, rtol=0, atol=2e-6)
        want = ref_grad[:, rank * V_PAD // 2: (rank + 1) * V_PAD // 2]
        torch.testing.assert_close(torch.tensor(grad, dtype=torch.float64), want, rtol=0, atol=2e-6)
    # Padded vocabulary entries and unscored rows get exactly zero gradient.
    pad_grad = torch.tensor(results[1][2])[:, VOCAB - V_PAD // 2:]
    assert torch.count_nonzero(pad_grad) == 0
    assert torch.count_nonzero(torch.tensor(results[0][2])[[1, 4, 8, 10]]) == 0
