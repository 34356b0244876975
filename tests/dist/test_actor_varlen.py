"""Token-budget micro-batches (`actor.micro_batch_tokens`) and sequence packing
(`actor.pack_sequences`) change nothing numerically: on TP2 x PP2 x DP2 with uneven DP shares
(so the replicas must agree on a micro-batch count, one of them with filler micro-batches)
the log-probs, the loss, the grad norm and the weights after one step equal the single-rank
step with fixed micro-batches."""

import pytest
import torch

from ctpo_megatron.parallel.spawn import run_on_ranks
from tests._tiny_hf import build_qwen3
from tests.dist.test_actor_train import _samples, train

pytestmark = pytest.mark.dist

SHARES = ([0, 1, 2, 3, 4, 5], [6, 7])
"""Sample indices of DP replica 0 and 1 (uneven on purpose)."""
BUDGET = 40
"""Tokens per micro-batch: the samples are 6..38 tokens long, so 1-2 samples each."""


def _run(rank, world_size, model_dir, modes):
    from ctpo_megatron.actor import ActorConfig, PolicyActor
    from ctpo_megatron.actor.batching import TokenBatch
    from ctpo_megatron.actor.policy import PER_TOKEN_FIELDS
    from ctpo_megatron.parallel import ParallelDims

    samples = _samples()
    out = {}
    for mode, layout in modes.items():
        dims = {k: v for k, v in layout.items() if k in ("tp", "pp", "cp")}
        cfg = ActorConfig(hf_model_dir=model_dir, dims=ParallelDims(**dims), lr=0.01,
                          adam_eps=1e-3, clip_grad=1.0, micro_batch_size=2, logprob_chunk_size=5,
                          micro_batch_tokens=0 if mode == "fixed" else BUDGET,
                          pack_sequences=layout.get("packed", False),
                          sequence_parallel=layout.get("sp", False))
        actor = PolicyActor(cfg)
        dp, dp_rank = actor.pgs.dp.size(), actor.pgs.dp.rank()
        index = list(range(len(samples))) if dp == 1 else SHARES[dp_rank]
        share = [samples[i] for i in index]
        log_probs = {i: t.tolist() for i, t in zip(index, actor.compute_log_probs(share))}
        counts = actor.pop_token_counts()
        plan = actor._micro_batches(TokenBatch.from_samples(share, PER_TOKEN_FIELDS), same_count_over_dp=True)
        actor.pop_token_counts()
        metrics = train(actor, share)
        weights = {k: v.numpy() for k, v in actor.iter_hf_weights() if v is not None}
        out[mode] = dict(dp_rank=dp_rank, log_probs=log_probs, counts=counts, metrics=metrics,
                         micro_batches=[mb.num_samples if mb.sample_index is None else mb.sample_index.numel()
                                        for mb in plan],
                         weights=weights if rank == 0 else None)
        del actor
    return out


MODES = {"budget": dict(tp=2, pp=2), "packed": dict(tp=2, pp=2, packed=True),
         "packed_sp": dict(tp=2, pp=2, packed=True, sp=True), "budget_cp": dict(tp=2, cp=2, sp=True)}
"""Layouts on 8 ranks (DP 2 each): TP2 x PP2 padded and packed, packed with sequence
parallelism (packs rounded up to a multiple of TP), TP2 x CP2 zigzag with the token budget."""


def test_token_budget_and_packing_match_fixed_micro_batches(tmp_path):
    model_dir = str(build_qwen3(tmp_path / "qwen3"))
    ref = run_on_ranks(_run, 1, model_dir, {"fixed": {}}, timeout=300)[0]["fixed"]
    par = run_on_ranks(_run, 8, model_dir, MODES, timeout=900)
    assert ref["metrics"]["grad_norm"] > 1.0  # the clip (1.0) acted
    lengths = [len(s["prompt_ids"]) + len(s["response_ids"]) for s in _samples()]
    for mode, layout in MODES.items():
        for r, out in enumerate(par):
            got = out[mode]
            for key in ("loss", "grad_norm", "mean_log_prob"):
                assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5, abs=1e-6), (mode, key)
            for i, lp in got["log_probs"].items():
                torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref["log_probs"][i]),
                                           rtol=0, atol=2e-5, msg=f"{mode} sample {i}")
        # DP replicas 0 and 1 run as many micro-batches; replica 1 has only two samples, so the
        # rest are fillers (0 real samples).
        by_dp = {out[mode]["dp_rank"]: out[mode] for out in par}
        plans = [by_dp[0]["micro_batches"], by_dp[1]["micro_batches"]]
        assert len(plans[0]) == len(plans[1]) > 2 and sum(plans[0]) == 6 and sum(plans[1]) == 2
        assert plans[1].count(0) == len(plans[1]) - 2
        # The score pass padded at most to each micro-batch's longest (packed: not at all).
        useful = sum(lengths[i] for i in SHARES[0])
        assert by_dp[0]["counts"]["perf/actor_tokens_useful"] == useful
        computed = by_dp[0]["counts"]["perf/actor_tokens_computed"]
        if layout.get("packed") and not layout.get("sp"):
            assert computed == useful
        else:  # rounded up for SP / CP, still below padding every row to the longest
            assert useful <= computed < len(SHARES[0]) * max(lengths)
        for name, want in ref["weights"].items():
            # one Adam step (lr/eps = 10) amplifies fp32 summation-order differences ~10x
            torch.testing.assert_close(torch.from_numpy(par[0][mode]["weights"][name]), torch.from_numpy(want),
                                       rtol=0, atol=2e-6, msg=f"{mode} {name}")
    assert ref["counts"]["perf/actor_tokens_computed"] > ref["counts"]["perf/actor_tokens_useful"]
