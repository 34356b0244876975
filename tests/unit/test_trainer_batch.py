"""Trainer step pieces on real tensors: advantages, sharding, old log-probs + IS weights, the
loss closure (real policy_loss) and clip rate by position, checkpoint glue."""

import os

import pytest
import torch

from ctpo_megatron.algo import PolicyLossConfig, RolloutCorrectionConfig, policy_loss
from ctpo_megatron.trainer import checkpoint as ckpt
from ctpo_megatron.trainer.batch import (build_samples, compute_advantages, dp_shard, mini_batches,
                                         rollout_metrics)
from ctpo_megatron.trainer.loop import progress_line
from ctpo_megatron.trainer.update import (attach_old_log_probs, make_loss_fn, position_edges,
                                          position_metrics)


def _traj(prompt_index, sample_index, reward, n_resp=5, tool=False):
    mask = [1, 1, 0, 0, 1][:n_resp] if tool else [1] * n_resp
    return {"prompt_ids": [1, 2, 3], "response_ids": list(range(4, 4 + n_resp)),
            "loss_mask": mask, "rollout_log_probs": [-0.5 * m for m in mask],
            "reward": reward, "correct": reward > 0, "has_boxed": True, "prompt_index": prompt_index,
            "sample_index": sample_index, "tool_calls": int(tool), "tool_errors": 0,
            "tool_timeouts": 0, "num_turns": 1 + int(tool), "finish_reason": "stop"}


def test_grpo_advantages_per_group():
    trajs = [_traj(0, 0, 1.0), _traj(0, 1, 0.0), _traj(1, 0, 1.0), _traj(1, 1, 1.0)]
    adv = compute_advantages(trajs)
    assert adv[0] > 0 > adv[1] and adv[0] == pytest.approx(-adv[1])
    assert adv[2] == 0 and adv[3] == 0  # all-correct group: no signal
    samples = build_samples(trajs, adv)
    assert samples[1]["response_mask"] == [1] * 5 and samples[0]["advantage"] == pytest.approx(float(adv[0]))


def test_mini_batches_and_dp_shards_partition_the_step():
    trajs = [_traj(i // 4, i % 4, float(i % 2), n_resp=1 + i % 5) for i in range(16)]
    samples = build_samples(trajs, compute_advantages(trajs))
    mbs = mini_batches(samples, 2)
    assert [len(mb) for mb in mbs] == [8, 8]
    for mb in mbs:
        shards = [dp_shard(mb, r, 2) for r in range(2)]
        assert sorted(id(s) for sh in shards for s in sh) == sorted(id(s) for s in mb)
        assert len(shards[0]) == len(shards[1]) == 4
        loads = [sum(len(s["response_ids"]) + 3 for s in sh) for sh in shards]
        assert abs(loads[0] - loads[1]) <= 5  # balanced within one sample's length
    with pytest.raises(ValueError, match="cannot be split into 3"):
        mini_batches(samples, 3)
    with pytest.raises(ValueError, match="not divisible by dp=3"):
        dp_shard(samples, 0, 3)


def test_old_log_probs_and_sequence_is_weights():
    trajs = [_traj(0, 0, 1.0, tool=True), _traj(0, 1, 0.0)]
    samples = build_samples(trajs, compute_advantages(trajs))
    old = [torch.tensor([-0.4, -0.4, 0.0, 0.0, -0.4]), torch.full((5,), -0.5)]
    metrics = attach_old_log_probs(samples, old, RolloutCorrectionConfig(threshold=5.0))
    # sequence level: exp(sum over generated tokens of old - rollout) = exp(3 * 0.1)
    w0 = samples[0]["rollout_is_weights"]
    assert w0[0] == pytest.approx(torch.exp(torch.tensor(0.3)).item(), rel=1e-6) and w0[2] == 0.0
    assert samples[1]["rollout_is_weights"] == pytest.approx([1.0] * 5)
    assert samples[0]["advantages"] == [samples[0]["advantage"]] * 5
    assert metrics["mismatch/abs_log_prob_diff_max"] == pytest.approx(0.1, rel=1e-5)
    rollout_only = build_samples(trajs, compute_advantages(trajs))
    assert attach_old_log_probs(rollout_only, None, RolloutCorrectionConfig()) == {}
    assert rollout_only[0]["old_log_probs"] == rollout_only[0]["rollout_log_probs"]
    assert rollout_only[0]["rollout_is_weights"] == [1.0] * 5


def test_loss_fn_matches_policy_loss_and_counts_clips_by_position():
    torch.manual_seed(0)
    cfg = PolicyLossConfig()
    b, r = 4, 40
    old = -torch.rand(b, r)
    log_probs = (old + 0.05 * torch.randn(b, r)).requires_grad_()
    mask = torch.ones(b, r)
    mask[0, 30:] = 0
    batch = {"old_log_probs": old, "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None].expand(b, r),
             "response_mask": mask, "rollout_is_weights": torch.ones(b, r),
             "global_num_tokens": int(mask.sum()), "dp_size": 1}
    edges = position_edges(r, 16)
    assert edges == [1, 2, 4, 8, 16, 32]
    loss, metrics = make_loss_fn(cfg, edges)(log_probs, batch)
    ref, ref_metrics = policy_loss(log_probs, old, batch["advantages"], mask, cfg,
                                   rollout_is_weights=batch["rollout_is_weights"],
                                   batch_num_tokens=batch["global_num_tokens"], dp_size=1)
    assert torch.equal(loss, ref)
    assert metrics["clipfrac_total"] == ref_metrics["clipfrac_total"]
    assert sum(metrics[f"_clip_pos_tokens/{k}"] for k in range(len(edges))) == mask.sum()
    clipped = sum(metrics[f"_clip_pos_clipped/{k}"] for k in range(len(edges)))
    assert clipped == pytest.approx(ref_metrics["clip_count_total"])
    rates = position_metrics(metrics, edges)
    assert not any(k.startswith("_") for k in rates)
    assert set(k for k in rates if k.startswith("clip_rate_by_pos/")) == {
        "clip_rate_by_pos/1-1", "clip_rate_by_pos/2-3", "clip_rate_by_pos/4-7",
        "clip_rate_by_pos/8-15", "clip_rate_by_pos/16-31", "clip_rate_by_pos/32+"}
    # the cumulative ratio drifts with position, so late tokens clip more than the first
    assert rates["clip_rate_by_pos/16-31"] > rates["clip_rate_by_pos/1-1"]
    loss.backward()
    assert log_probs.grad is not None and torch.isfinite(log_probs.grad).all()


def test_rollout_metrics():
    trajs = [_traj(0, 0, 1.0, tool=True), _traj(0, 1, 0.0), _traj(1, 0, 0.0), _traj(1, 1, 0.0)]
    m = rollout_metrics(trajs, prefix="eval/")
    assert m["eval/reward/mean"] == 0.25 and m["eval/accuracy"] == 0.25
    assert m["eval/tool/use_rate"] == 0.25 and m["eval/reward/solved_none_frac"] == 0.5
    assert m["eval/generated_tokens/mean"] == pytest.approx((3 + 5 * 3) / 4)


def test_progress_line():
    line = progress_line(3, 40, {"reward/mean": 0.41, "eval/accuracy": 0.4, "time/step": 12.3,
                                 "actor/loss": 0.01}, eta_s=440)
    assert line == ("step 3/40 | reward 0.410 | held-out acc 0.400 | loss 0.0100 | 12.3s/step | "
                    "ETA 7m20s")


def test_checkpoint_latest_rng_and_prune(tmp_path):
    run = str(tmp_path)
    root = ckpt.checkpoint_root(run)
    assert ckpt.latest_checkpoint(run) is None
    for step in (1, 2, 3):
        d = os.path.join(root, f"step_{step}")
        os.makedirs(d)
        os.utime(d, (step, step))
    os.symlink("step_2", os.path.join(root, "latest"))
    assert ckpt.latest_checkpoint(run) == os.path.realpath(os.path.join(root, "step_2"))
    torch.manual_seed(7)
    ckpt.save_rank_rng(os.path.join(root, "step_2"), rank=0)
    expected = torch.rand(3)
    torch.manual_seed(8)
    assert ckpt.restore_rank_rng(os.path.join(root, "step_2"), rank=0)
    assert torch.equal(torch.rand(3), expected)
    assert not ckpt.restore_rank_rng(os.path.join(root, "step_2"), rank=1)
    for step in (1, 2, 3):
        os.utime(os.path.join(root, f"step_{step}"), (step, step))
    removed = ckpt.prune_checkpoints(run, keep=2)
    # step_3 is newer than `latest` (left by a killed save): deleted; step_1 is kept as the 2nd
    assert [os.path.basename(p) for p in removed] == ["step_3"]
    removed = ckpt.prune_checkpoints(run, keep=1)
    assert [os.path.basename(p) for p in removed] == ["step_1"]
    assert os.listdir(root) == ["step_2", "latest"] or sorted(os.listdir(root)) == ["latest", "step_2"]
    os.remove(os.path.join(root, "latest"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_2\n")
    assert ckpt.latest_checkpoint(run) == os.path.join(root, "step_2")
