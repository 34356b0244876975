"""PolicyActor options on TP2: activation recomputation changes nothing numerically; bf16
parameters score close to float32 and train."""

import pytest

from ctpo_megatron.parallel.spawn import run_on_ranks
from tests._tiny_hf import build_llama, random_samples
from tests.dist.test_actor_train import _samples, train

pytestmark = pytest.mark.dist


def _run(rank, world_size, model_dir):
    from ctpo_megatron.actor import ActorConfig, PolicyActor
    from ctpo_megatron.parallel import ParallelDims

    out = {}
    for name, dtype, recompute in (("fp32", "float32", False), ("recompute", "float32", True),
                                   ("bf16", "bfloat16", False)):
        actor = PolicyActor(ActorConfig(hf_model_dir=model_dir, dims=ParallelDims(tp=2),
                                        params_dtype=dtype, recompute=recompute,
                                        micro_batch_size=2, lr=1e-3))
        lps = [t.tolist() for t in actor.compute_log_probs(random_samples(4, seed=5))]
        steps = [train(actor, _samples()) for _ in range(2)]
        # numpy arrays pickle by value (torch tensors would go through shared-memory handles
        # that die with the rank process).
        weights = {k: v.float().numpy() for k, v in actor.iter_hf_weights() if v is not None}
        out[name] = (lps, steps, weights)
    return out if rank == 0 else None


def test_recompute_and_bf16(tmp_path):
    out = run_on_ranks(_run, 2, str(build_llama(tmp_path / "llama")), timeout=400)[0]
    (lp32, steps32, w32), (lprc, stepsrc, wrc), (lp16, steps16, _) = (
        out["fp32"], out["recompute"], out["bf16"])
    assert lprc == lp32
    for a, b in zip(stepsrc, steps32):
        # Recomputation reruns the same float32 ops in the same order: identical numbers.
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    for name in w32:
        assert (wrc[name] == w32[name]).all(), name
    # bf16 weights and activations: log-probs of O(5) magnitude within a few bf16 ulps.
    err = max(abs(x - y) for a, b in zip(lp16, lp32) for x, y in zip(a, b))
    assert 0 < err < 0.1
    assert steps16[1]["loss"] < steps16[0]["loss"]  # it trains
    assert steps16[0]["loss"] == pytest.approx(steps32[0]["loss"], rel=2e-2)
