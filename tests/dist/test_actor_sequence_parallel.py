"""Megatron sequence parallelism in the policy actor (TP2): log-probs and one train step equal
the same actor without it, on ragged batches whose lengths are not multiples of TP."""

import numpy as np
import pytest
import torch

from ctpo_megatron.parallel.spawn import run_on_ranks
from tests._tiny_hf import build_qwen3, hf_response_log_probs, random_samples
from tests.dist.test_actor_train import train

pytestmark = pytest.mark.dist


def _samples():
    samples = random_samples(5, seed=11)
    gen = torch.Generator().manual_seed(12)
    for s in samples:
        r = len(s["response_ids"])
        s.update(response_mask=(torch.rand(r, generator=gen) > 0.25).float().tolist(),
                 old_log_probs=[0.0] * r, advantages=[1.0] * r)
    return samples


def _run(rank, world_size, model_dir, samples):
    from ctpo_megatron.actor import ActorConfig, PolicyActor
    from ctpo_megatron.parallel import ParallelDims

    out = {}
    for sp in (False, True):
        # Micro-batches of 2 with odd longest lengths: SP pads each to a multiple of TP.
        cfg = ActorConfig(hf_model_dir=model_dir, dims=ParallelDims(tp=2), sequence_parallel=sp,
                          micro_batch_size=2, logprob_chunk_size=7, lr=0.01, adam_eps=1e-3)
        actor = PolicyActor(cfg)
        assert actor.tf_config.sequence_parallel is sp
        seen = []  # the sequence length the first decoder layer sees: S / tp under SP
        hook = actor.model[0].module.decoder.layers[0].register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append(int((args[0] if args else kwargs["hidden_states"]).shape[0])),
            with_kwargs=True)
        lps, ents = actor.compute_log_probs(samples, with_entropy=True)
        hook.remove()
        metrics = train(actor, samples)
        weights = {name: t.numpy().copy() for name, t in actor.iter_hf_weights() if t is not None}
        out[sp] = dict(lps=[t.numpy() for t in lps], ents=[t.numpy() for t in ents], seen=seen,
                       loss=metrics["loss"], grad_norm=metrics["grad_norm"],
                       weights=weights if rank == 0 else None)
    return out


def test_sequence_parallel_matches_tp_only(tmp_path):
    model_dir = str(build_qwen3(tmp_path / "qwen3"))
    samples = _samples()
    totals = [len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples]
    # micro-batches [0:2], [2:4], [4:5]: every longest length odd -> SP pads all of them
    assert all(max(totals[i:i + 2]) % 2 for i in range(0, len(totals), 2)), totals
    res = run_on_ranks(_run, 2, model_dir, samples, timeout=300)
    hf = [t.numpy() for t in hf_response_log_probs(model_dir, samples)]
    for rank_out in res:
        off, on = rank_out[False], rank_out[True]
        # SP is really on: the decoder sees half of each (padded) micro-batch's sequence.
        padded = [max(totals[i:i + 2]) + 1 for i in range(0, len(totals), 2)]
        assert on["seen"] == [s // 2 for s in padded] and off["seen"] == [max(totals[i:i + 2])
                                                                         for i in range(0, len(totals), 2)]
        for a, b, ref in zip(on["lps"], off["lps"], hf):
            assert a.shape == b.shape == ref.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
            np.testing.assert_allclose(a, ref, rtol=0, atol=1e-5)
        for a, b in zip(on["ents"], off["ents"]):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        assert on["loss"] == pytest.approx(off["loss"], rel=1e-6)
        assert on["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-5)
    w_off, w_on = res[0][False]["weights"], res[0][True]["weights"]
    assert w_off.keys() == w_on.keys()
    from safetensors.numpy import load_file

    before = load_file(f"{model_dir}/model.safetensors")
    assert max(np.abs(w_off[k] - before[k]).max() for k in w_off) > 1e-3  # the step moved weights
    for name in w_off:
        # Norm-weight gradients are summed over TP in a different order under SP: a few ulps,
        # which one Adam step (lr / eps = 10) turns into at most ~1e-6.
        np.testing.assert_allclose(w_on[name], w_off[name], rtol=0, atol=2e-6, err_msg=name)


def test_sequence_parallel_needs_tp():
    from ctpo_megatron.actor import ActorConfig
    from ctpo_megatron.models.config import transformer_config
    from ctpo_megatron.parallel import ParallelDims

    with pytest.raises(ValueError, match="sequence_parallel=True needs tp > 1"):
        ActorConfig(dims=ParallelDims(tp=1), sequence_parallel=True)
    with pytest.raises(ValueError, match="sequence_parallel=True needs tensor parallelism"):
        transformer_config(None, ParallelDims(tp=1), sequence_parallel=True)
