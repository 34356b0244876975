"""Host-to-device copies of micro-batches (pinned, non-blocking on CUDA) and the loss's
statistics without host syncs on a GPU."""

from __future__ import annotations

import pytest
import torch

from ctpo_megatron.actor.batching import TokenBatch, build_micro_batch
from ctpo_megatron.actor.context_parallel import shard_micro_batch
from ctpo_megatron.actor.policy import PER_TOKEN_FIELDS
from ctpo_megatron.actor.schedule import micro_batch_to, pinned_copies


def _micro_batch():
    samples = [{"prompt_ids": [1, 2, 3], "response_ids": [4, 5, 6, 7], "advantages": [1.0] * 4,
                "old_log_probs": [-1.0] * 4},
               {"prompt_ids": [8], "response_ids": [9, 10, 11, 12, 13, 14, 15], "advantages": [-1.0] * 7,
                "old_log_probs": [-2.0] * 7}]
    return build_micro_batch(TokenBatch.from_samples(samples, PER_TOKEN_FIELDS), seq_multiple=4)


def test_pinned_non_blocking_copies_only_to_a_cuda_device():
    assert pinned_copies(torch.device("cuda", 0)) and pinned_copies(torch.device("cuda"))
    assert not pinned_copies(torch.device("cpu")) and not pinned_copies(torch.device("meta"))


def test_micro_batch_to_moves_every_tensor_and_is_a_no_op_in_place():
    mb = _micro_batch()
    assert micro_batch_to(mb, torch.device("cpu")) is mb  # CPU mode: nothing copied
    for batch in (mb, shard_micro_batch(mb, 2, 1)):  # a context-parallel part has more tensors
        moved = micro_batch_to(batch, torch.device("meta"))
        assert type(moved) is type(batch) and moved.response_lengths == batch.response_lengths
        tensors = [v for v in vars(moved).values() if torch.is_tensor(v)] + list(moved.fields.values())
        assert len(tensors) >= 6 + len(PER_TOKEN_FIELDS) and all(t.is_meta for t in tensors)
        assert all(not t.is_meta for t in vars(batch).values() if torch.is_tensor(t))  # the input is kept


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_micro_batch_copies_to_a_gpu_do_not_block():
    mb = _micro_batch()
    device = torch.device("cuda", torch.cuda.current_device())
    pinned = []
    original = torch.Tensor.pin_memory

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        pinned.append(out)
        return out

    torch.Tensor.pin_memory = spy
    try:
        torch.cuda.set_sync_debug_mode("error")  # a blocking copy raises
        moved = micro_batch_to(mb, device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.Tensor.pin_memory = original
    assert pinned and all(t.is_pinned() for t in pinned)
    assert moved.tokens.device == device and torch.equal(moved.tokens.cpu(), mb.tokens)
    assert all(torch.equal(moved.fields[k].cpu(), v) for k, v in mb.fields.items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_trainer_loss_and_its_sums_do_not_sync_a_gpu():
    from ctpo_megatron.algo import PolicyLossConfig, position_bucket_edges
    from ctpo_megatron.trainer.update import make_loss_fn

    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 256, generator=g)
    inputs = {"old_log_probs": lp + 0.05 * torch.randn(4, 256, generator=g),
              "advantages": torch.randn(4, 1, generator=g).expand(4, 256).contiguous(),
              "response_mask": (torch.rand(4, 256, generator=g) > 0.1).float(),
              "rollout_is_weights": torch.ones(4, 256)}
    inputs = {k: v.cuda() for k, v in inputs.items()}
    inputs.update(global_num_tokens=1000, dp_size=1)
    edges = position_bucket_edges(256, 16)
    for cfg in (PolicyLossConfig(), PolicyLossConfig(name="grpo")):
        loss_fn = make_loss_fn(cfg, edges)
        x = lp.cuda().requires_grad_(True)
        loss_fn(x, inputs)  # warm-up: kernels load, caches fill
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, sums = loss_fn(x, inputs)
            loss.backward()
            total = sums + sums
        finally:
            torch.cuda.set_sync_debug_mode("default")
        metrics = total.metrics(num_updates=2, bucket_edges=edges, adaptive_clip=cfg.adaptive_clip)
        assert metrics["valid_tokens"] == pytest.approx(float(inputs["response_mask"].sum()))
        assert metrics["is_ratio_min"] <= metrics["is_ratio_p50"] <= metrics["is_ratio_max"]
