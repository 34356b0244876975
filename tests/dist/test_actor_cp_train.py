"""One CTPO train step at TP2 x CP2 x DP2 (8 ranks) equals the single-rank step, and
checkpoints reshard between CP 2 and CP 1 (both directions) with bit-exact weights."""

import pytest
import torch

from ctpo_megatron.parallel.spawn import run_on_ranks
from tests._tiny_hf import build_qwen3, hf_response_log_probs, random_samples

pytestmark = pytest.mark.dist


def _samples(model_dir):
    """8 ragged samples (one response of length 1), old log-probs = transformers' + noise so
    the CTPO ratios are not 1, advantages +-1, some tool-output tokens (mask 0)."""
    samples = random_samples(8, seed=5, max_len=14)
    samples[2]["response_ids"] = samples[2]["response_ids"][:1]
    gen = torch.Generator().manual_seed(6)
    for i, (s, lp) in enumerate(zip(samples, hf_response_log_probs(model_dir, samples))):
        r = len(s["response_ids"])
        mask = (torch.rand(r, generator=gen) > 0.2).float()
        mask[0] = 1.0
        s.update(old_log_probs=(lp + 0.3 * torch.randn(r, generator=gen)).tolist(),
                 advantages=[1.0 if i % 3 else -1.0] * r, response_mask=mask.tolist())
    return samples


def _loss(log_probs, batch):
    from ctpo_megatron.actor.context_parallel import context_parallel_policy_loss
    from ctpo_megatron.algo import PolicyLossConfig

    loss, _ = context_parallel_policy_loss(log_probs, batch, PolicyLossConfig(name="ctpo"))
    return loss, {"loss": loss.detach()}


def _weights(actor):
    return {k: v.numpy().copy() for k, v in actor.iter_hf_weights() if v is not None}


def _run(rank, world_size, model_dir, samples, tp, cp, save_dir, load_dir):
    """Train one step, save; then (optionally) load a checkpoint written under another layout."""
    from ctpo_megatron.actor import ActorConfig, PolicyActor
    from ctpo_megatron.parallel import ParallelDims

    cfg = ActorConfig(hf_model_dir=model_dir, dims=ParallelDims(tp=tp, cp=cp), lr=0.01, adam_eps=1e-3,
                      clip_grad=1.0, micro_batch_size=2, logprob_chunk_size=5)
    actor = PolicyActor(cfg)
    dp, dp_rank = actor.pgs.dp.size(), actor.pgs.dp.rank()
    share = samples[dp_rank * len(samples) // dp: (dp_rank + 1) * len(samples) // dp]
    result = actor.train_step(share, _loss)
    # each rank's loss is its share scaled by DP x CP (the loss contract): the mean is the whole loss
    loss = actor.reduce_sum(result.stats)["loss"] / actor.pgs.dp_cp.size()
    out = {"metrics": {"loss": loss, "grad_norm": result.grad_norm}}
    out["trained"] = _weights(actor)
    actor.save_checkpoint(save_dir, {"layout": f"tp{tp}cp{cp}"})
    if load_dir is not None:
        out["extra"] = actor.load_checkpoint(load_dir)
        out["loaded"] = _weights(actor)
    if cp > 1:  # the same ranks at CP 1 (TP2 x DP4) resume from this layout's checkpoint
        del actor
        back = PolicyActor(ActorConfig(hf_model_dir=model_dir, dims=ParallelDims(tp=tp, cp=1), lr=0.01))
        out["back_extra"] = back.load_checkpoint(save_dir)
        out["back"] = _weights(back)
    return out if rank == 0 else None


def test_tp2_cp2_dp2_ctpo_step_matches_single_rank_and_checkpoints_reshard(tmp_path):
    model_dir = str(build_qwen3(tmp_path / "qwen3", num_hidden_layers=2))
    samples = _samples(model_dir)
    ref = run_on_ranks(_run, 1, model_dir, samples, 1, 1, str(tmp_path / "ck1"), None, timeout=300)[0]
    par = run_on_ranks(_run, 8, model_dir, samples, 2, 2, str(tmp_path / "ck8"), str(tmp_path / "ck1"),
                       timeout=600)[0]
    for key in ("loss", "grad_norm"):
        assert par["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5, abs=1e-6), key
    assert ref["metrics"]["grad_norm"] > 0.05 and abs(ref["metrics"]["loss"]) > 1e-3
    from safetensors.torch import load_file

    before = load_file(f"{model_dir}/model.safetensors")
    assert max(abs(ref["trained"][k] - before[k].numpy()).max() for k in ref["trained"]) > 1e-3
    for name, want in ref["trained"].items():
        # one Adam step (lr/eps = 10): fp32 gradient differences of ~1e-8 move weights by ~1e-7
        torch.testing.assert_close(torch.from_numpy(par["trained"][name]), torch.from_numpy(want),
                                   rtol=0, atol=2e-6, msg=name)
    # CP 1 -> TP2 x CP2 x DP2 and TP2 x CP2 x DP2 -> TP2 x CP1 x DP4: the saved weights (and
    # optimizer state, loaded too), bit for bit.
    assert par["extra"] == {"layout": "tp1cp1"} and par["back_extra"] == {"layout": "tp2cp2"}
    for name in ref["trained"]:
        assert (par["loaded"][name] == ref["trained"][name]).all(), name
        assert (par["back"][name] == par["trained"][name]).all(), name
