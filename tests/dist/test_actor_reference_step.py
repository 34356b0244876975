"""One CTPO train step of the Megatron actor (one rank, 3 micro-batches) against an independent
reference: the Hugging Face model, the CTPO-LA loss written out plainly from its definition
(docs/algo.md), torch.optim.Adam and torch's clip_grad_norm_.

The other train-step tests compare the actor with itself under another layout, which a
layout-independent bug (loss normalization, micro-batch scaling, clipping, the optimizer)
passes. Adam's first step is update = lr * g / (|g| + eps); with eps comparable to |g| the
update is proportional to the gradient, so a gradient-scale error shows in the weights.
"""

from __future__ import annotations

import pytest
import torch

from ctpo_megatron.parallel.spawn import run_on_ranks
from tests._tiny_hf import build_qwen3, random_samples

pytestmark = pytest.mark.dist

LR, EPS, BETAS, CLIP = 1e-2, 1e-3, (0.9, 0.999), 0.4
LA_LOW, LA_HIGH, LA_C, LA_POWER = 0.025, 0.05, 0.05, 0.5  # PolicyLossConfig() defaults (CTPO-LA)


def plain_ctpo_loss(logp, old, adv, mask):
    """CTPO-LA (cumprod), token-mean, written out from the definition; [B, R] each."""
    delta = (logp - old).clamp(-20, 20) * mask
    s = delta.cumsum(-1).detach()  # the prefix sum carries no gradient
    x = (s + logp - logp.detach()).clamp(max=10)  # gradient through the current token only
    tau = mask.cumsum(-1).clamp(min=1)
    g = tau ** LA_POWER
    ratio = torch.exp(x)
    clipped = torch.exp(torch.maximum(torch.minimum(x, LA_HIGH * g), -LA_LOW * g))
    dual = torch.exp(LA_C * g)
    pg = torch.maximum(-adv * ratio, -adv * clipped)
    pg = torch.where(adv < 0, torch.minimum(-adv * dual, pg), pg)
    pg = torch.where(mask > 0, pg, torch.zeros_like(pg))
    return (pg * mask).sum() / mask.sum().clamp(min=1)


def _response_log_probs(model, samples):
    """[B, R] float32 log-probs of each response token under the HF model (0-padded)."""
    width = max(len(s["response_ids"]) for s in samples)
    out = torch.zeros(len(samples), width)
    rows = []
    for s in samples:
        ids = torch.tensor(s["prompt_ids"] + s["response_ids"])[None]
        logits = model(ids).logits[0].float()
        p = len(s["prompt_ids"])
        lp = torch.log_softmax(logits[p - 1:-1], -1).gather(-1, torch.tensor(s["response_ids"])[:, None])[:, 0]
        rows.append(lp)
    for i, lp in enumerate(rows):
        out[i, :len(lp)] = lp
    return out, rows


def _pad(samples, key):
    width = max(len(s["response_ids"]) for s in samples)
    return torch.tensor([s[key] + [0.0] * (width - len(s[key])) for s in samples])


def _samples(model_dir):
    from transformers import AutoModelForCausalLM

    samples = random_samples(6, seed=7)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        _, rows = _response_log_probs(model, samples)
    gen = torch.Generator().manual_seed(8)
    for s, lp in zip(samples, rows):
        r = len(s["response_ids"])
        mask = (torch.rand(r, generator=gen) > 0.2).float()  # tool-output tokens inside
        old = lp + 0.3 * torch.randn(r, generator=gen)  # ratios away from 1: some tokens clip
        adv = float(torch.randn(1, generator=gen))
        s.update(response_mask=mask.tolist(), old_log_probs=old.tolist(), advantages=[adv] * r,
                 rollout_is_weights=[1.0] * r)
    return samples


def _actor_step(rank, world_size, model_dir, samples, out_path):
    from ctpo_megatron.actor import ActorConfig, PolicyActor
    from ctpo_megatron.algo import PolicyLossConfig
    from ctpo_megatron.parallel import ParallelDims
    from ctpo_megatron.trainer.update import make_loss_fn

    cfg = ActorConfig(hf_model_dir=model_dir, dims=ParallelDims(tp=1, pp=1), lr=LR, adam_eps=EPS,
                      adam_betas=BETAS, clip_grad=CLIP, micro_batch_size=2)
    actor = PolicyActor(cfg)
    loss_cfg = PolicyLossConfig()
    result = actor.train_step(samples, make_loss_fn(loss_cfg, [1, 2, 4]))
    metrics = actor.reduce_sum(result.stats).metrics(num_updates=1, bucket_edges=[1, 2, 4],
                                                     adaptive_clip=loss_cfg.adaptive_clip)
    metrics["grad_norm"] = result.grad_norm
    torch.save({name: t.clone() for name, t in actor.iter_hf_weights() if t is not None}, out_path)
    return metrics


def test_actor_step_equals_hf_adam_reference(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = str(build_qwen3(tmp_path / "qwen3"))
    samples = _samples(model_dir)
    metrics = run_on_ranks(_actor_step, 1, model_dir, samples, str(tmp_path / "actor.pt"), timeout=300)[0]

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    logp, _ = _response_log_probs(model, samples)
    loss = plain_ctpo_loss(logp, _pad(samples, "old_log_probs"), _pad(samples, "advantages"),
                           _pad(samples, "response_mask"))
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()

    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    assert metrics["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-4)
    assert grad_norm.item() > 2 * CLIP  # so the clipping acted
    ours = torch.load(tmp_path / "actor.pt")
    reference = model.state_dict()
    assert set(ours) <= set(reference) and "model.layers.0.self_attn.q_proj.weight" in ours
    moved = max((reference[k] - before[k]).abs().max().item() for k in ours)
    assert moved > 1e-3
    worst = max((ours[k] - reference[k]).abs().max().item() for k in ours)
    print(f"largest update {moved:.2e}, largest difference from the reference {worst:.2e}")
    for name in ours:
        # Observed 1.2e-7 (float32 sums in another order; the step itself moves weights by up
        # to 1e-2): 1e-6 leaves an 8x margin. A scale error before the clip shows in the loss
        # and grad_norm checks above, one between tokens or layers in the weights.
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-6, msg=name)
