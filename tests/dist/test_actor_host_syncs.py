"""No host sync per micro-batch inside the forward/backward schedule of a real train step.

One rank, a tiny Qwen3 on megatron-core (CPU), the trainer's CTPO loss closure with its
`LossSums` (trainer.update.make_loss_fn), 4 micro-batches. `tests/_host_syncs.py` counts the
Python-level operations that would sync a GPU while megatron's schedule runs (the gradient
finalization at its end, once per step, excepted); a `.item()` added to the loss must show up
once per micro-batch.
"""

from __future__ import annotations

import pytest
import torch

from ctpo_megatron.parallel.spawn import run_on_ranks
from tests._tiny_hf import build_qwen3, random_samples

pytestmark = pytest.mark.dist

MICRO_BATCHES = 4


def _samples():
    samples = random_samples(2 * MICRO_BATCHES, seed=5)
    gen = torch.Generator().manual_seed(6)
    for i, s in enumerate(samples):
        r = len(s["response_ids"])
        s.update(response_mask=(torch.rand(r, generator=gen) > 0.2).float().tolist(),
                 old_log_probs=(-1.0 - 0.1 * torch.rand(r, generator=gen)).tolist(),
                 advantages=[1.0 if i % 2 else -1.0] * r)
    return samples


def _step_syncs(rank, world_size, model_dir):
    from ctpo_megatron.actor import ActorConfig, PolicyActor, policy
    from ctpo_megatron.algo import PolicyLossConfig, position_bucket_edges
    from ctpo_megatron.trainer.update import make_loss_fn
    from tests._host_syncs import count_host_syncs

    actor = PolicyActor(ActorConfig(hf_model_dir=model_dir, micro_batch_size=2, logprob_chunk_size=16))
    edges = position_bucket_edges(64, 16)
    loss_fn = make_loss_fn(PolicyLossConfig(), edges)
    real_schedule = policy.run_schedule
    counted = {}

    def counting_schedule(*args, **kwargs):
        finalize = actor.tf_config.finalize_model_grads_func
        with count_host_syncs() as counter:
            def finalize_once_per_step(*a, **k):
                with counter.pause():
                    return finalize(*a, **k)
            actor.tf_config.finalize_model_grads_func = finalize_once_per_step
            try:
                return real_schedule(*args, **kwargs)
            finally:
                actor.tf_config.finalize_model_grads_func = finalize
                counted["events"] = counter.events

    def loss_with_item(log_probs, inputs):
        loss, sums = loss_fn(log_probs, inputs)
        loss.item()  # what the test must catch
        return loss, sums

    policy.run_schedule = counting_schedule
    out = {}
    for name, fn in (("plain", loss_fn), ("with_item", loss_with_item)):
        result = actor.train_step(_samples(), fn, global_num_tokens=10_000)
        assert result.stats is not None and result.update_successful
        out[name] = counted["events"]
    return out


def test_no_host_sync_per_micro_batch_inside_the_schedule(tmp_path):
    model_dir = str(build_qwen3(tmp_path / "qwen3"))
    events = run_on_ranks(_step_syncs, 1, model_dir, timeout=300)[0]
    assert events["plain"] == [], "\n".join(f"{op} at {where}" for op, where in events["plain"])
    # The counter sees a sync added to the loss, once per micro-batch.
    assert [op for op, _ in events["with_item"]] == ["item"] * MICRO_BATCHES, events["with_item"]
    assert all("loss_with_item" in where for _, where in events["with_item"])
