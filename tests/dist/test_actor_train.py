"""PolicyActor.train_step: one step on TP2 x PP2 x DP2 (8 ranks) equals the single-rank step."""

import pytest
import torch

from ctpo_megatron.parallel.spawn import run_on_ranks
from tests._tiny_hf import build_qwen3, random_samples

pytestmark = pytest.mark.dist


def nll_loss(log_probs, batch):
    """Token-mean NLL over the whole mini-batch (normalized as the actor's contract says), and
    its sums: the rank's share of the mini-batch loss, log-prob total, tokens."""
    mask = batch["response_mask"]
    loss = -(log_probs * mask).sum() / batch["global_num_tokens"] * batch["dp_size"]
    return loss, {"loss": loss.detach() / batch["dp_size"],
                  "log_prob_sum": (log_probs * mask).sum().detach(), "tokens": mask.sum()}


def train(actor, samples):
    """One update with `nll_loss`; its sums reduced over ranks: the mini-batch loss, the
    token-mean log-prob and the grad norm, on every rank."""
    result = actor.train_step(samples, nll_loss)
    sums = actor.reduce_sum(result.stats)
    return {"loss": sums["loss"], "mean_log_prob": sums["log_prob_sum"] / sums["tokens"],
            "grad_norm": result.grad_norm}


def _samples():
    samples = random_samples(8, seed=3)
    gen = torch.Generator().manual_seed(4)
    for s in samples:
        r = len(s["response_ids"])
        mask = (torch.rand(r, generator=gen) > 0.25).float()  # some tool-output tokens
        s.update(response_mask=mask.tolist(), old_log_probs=[0.0] * r, advantages=[1.0] * r)
    return samples


def _train(rank, world_size, model_dir, tp, pp, out_path):
    from ctpo_megatron.actor import ActorConfig, PolicyActor
    from ctpo_megatron.parallel import ParallelDims

    cfg = ActorConfig(hf_model_dir=model_dir, dims=ParallelDims(tp=tp, pp=pp), lr=0.01,
                      adam_eps=1e-3, clip_grad=1.0, micro_batch_size=2, logprob_chunk_size=5)
    actor = PolicyActor(cfg)
    samples = _samples()
    dp, dp_rank = actor.pgs.dp.size(), actor.pgs.dp.rank()
    share = samples[dp_rank * len(samples) // dp: (dp_rank + 1) * len(samples) // dp]
    metrics = train(actor, share)
    weights = {name: t.clone() for name, t in actor.iter_hf_weights() if t is not None}
    if rank == 0:
        torch.save(weights, out_path)
    return metrics


def test_tp2_pp2_dp2_step_matches_single_rank(tmp_path):
    model_dir = str(build_qwen3(tmp_path / "qwen3"))
    ref = run_on_ranks(_train, 1, model_dir, 1, 1, str(tmp_path / "ref.pt"), timeout=300)[0]
    par = run_on_ranks(_train, 8, model_dir, 2, 2, str(tmp_path / "par.pt"), timeout=400)
    for m in par:  # every rank reports the same reduced metrics
        for key in ("loss", "grad_norm", "mean_log_prob"):
            # fp32 sums in a different order over TP/DP: a few ulps.
            assert m[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    assert ref["grad_norm"] > 1.0  # so the clip (1.0) really acted
    w_ref, w_par = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "par.pt")
    assert w_ref.keys() == w_par.keys()
    from safetensors.torch import load_file

    before = load_file(f"{model_dir}/model.safetensors")
    moved = max((w_ref[k] - before[k]).abs().max().item() for k in w_ref)
    assert moved > 1e-3  # the step changed the weights
    for name in w_ref:
        # One Adam step, update = lr * g / (|g| + eps): gradients that differ by fp32 summation
        # order (~1e-8) move by at most lr/eps times that.
        torch.testing.assert_close(w_par[name], w_ref[name], rtol=0, atol=2e-6, msg=name)
