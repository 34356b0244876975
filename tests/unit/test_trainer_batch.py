"""Trainer step pieces on real tensors: the step batch (advantages, sharding, transport),
old log-probs + IS weights, the loss closure (real policy_loss) and its additive statistics
with clip rate by position, checkpoint glue."""

import os

import pytest
import torch

from ctpo_megatron.actor.batching import build_micro_batch
from ctpo_megatron.algo import LossSums, PolicyLossConfig, RolloutCorrectionConfig, policy_loss, position_bucket_edges
from ctpo_megatron.parallel.spawn import run_on_ranks
from ctpo_megatron.rollout.agent.trajectory import Trajectory
from ctpo_megatron.trainer import checkpoint as ckpt
from ctpo_megatron.trainer.batch import (StepBatch, mask_stale_tokens, plan_shards, rollout_metrics, shard,
                                         version_metrics)
from ctpo_megatron.trainer.loop import progress_line
from ctpo_megatron.trainer.update import attach_old_log_probs, make_loss_fn
from tests.unit._shard_exchange import exchange


def _traj(prompt_index, sample_index, reward, n_resp=5, tool=False, version="step_3"):
    mask = [1, 1, 0, 0, 1][:n_resp] if tool else [1] * n_resp
    return Trajectory(prompt_ids=[1, 2, 3], response_ids=list(range(4, 4 + n_resp)), loss_mask=mask,
                      rollout_log_probs=[-0.5 * m for m in mask], reward=reward, correct=reward > 0,
                      has_boxed=True, prompt_index=prompt_index, sample_index=sample_index,
                      tool_calls=int(tool), tool_errors=0, tool_timeouts=0, num_turns=1 + int(tool),
                      finish_reason="stop", weight_versions=[version])


def test_grpo_advantages_per_group():
    trajs = [_traj(0, 0, 1.0), _traj(0, 1, 0.0), _traj(1, 0, 1.0), _traj(1, 1, 1.0, tool=True)]
    batch = StepBatch.from_trajectories(trajs)
    adv = batch.advantages
    assert adv[0] > 0 > adv[1] and adv[0] == pytest.approx(-adv[1])
    assert adv[2] == 0 and adv[3] == 0  # all-correct group: no signal
    assert batch.response_mask[1].tolist() == [1] * 5 and batch.tokens[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    # per-token weight versions: the sampling version at generated tokens, -1 at tool output
    assert batch.versions[3].tolist() == [3, 3, -1, -1, 3]
    assert batch.positions[3].tolist() == [1, 2, 2, 2, 3]


def test_mini_batches_and_dp_shards_partition_the_step():
    trajs = [_traj(i // 4, i % 4, float(i % 2), n_resp=1 + i % 5) for i in range(16)]
    batch = StepBatch.from_trajectories(trajs)
    plans = plan_shards(batch, 2, 2)
    assert [len(p) for p in plans] == [8, 8]
    for k in range(2):  # mini-batch-major: each shard holds half of every mini-batch, in order
        parts = [p[4 * k:4 * (k + 1)] for p in plans]
        assert sorted(torch.cat(parts).tolist()) == list(range(8 * k, 8 * k + 8))
        assert all(part.tolist() == sorted(part.tolist()) for part in parts)
        loads = [int((batch.prompt_lens + batch.response_lens)[part].sum()) for part in parts]
        assert abs(loads[0] - loads[1]) <= 5  # balanced within one sample's length
    shards = shard(batch, 2, 2)
    assert shards[1].mini_batch_tokens.tolist() == [int(batch.response_mask[:8].sum()),
                                                    int(batch.response_mask[8:].sum())]
    assert torch.equal(shards[1].advantages, batch.advantages[plans[1]])
    assert shards[0].response_mask.shape[1] == int(batch.response_lens[plans[0]].max())
    with pytest.raises(ValueError, match="cannot be split into 3"):
        plan_shards(batch, 3, 1)
    with pytest.raises(ValueError, match="not divisible by dp=3"):
        plan_shards(batch, 1, 3)


def test_each_replica_receives_only_its_shard():
    got = run_on_ranks(exchange, 3, timeout=120)
    assert got[0] == {"a": [[0, 1, 2], [3, 4, 5]], "b": [0.5]}
    assert got[1] == got[2] == {"b": [1.5, 2.5], "a": [0, 1, 2, 3]}


def test_old_log_probs_and_sequence_is_weights():
    trajs = [_traj(0, 0, 1.0, tool=True), _traj(0, 1, 0.0)]
    batch = StepBatch.from_trajectories(trajs)
    old = torch.stack([torch.tensor([-0.4, -0.4, 0.0, 0.0, -0.4]), torch.full((5,), -0.5)])
    metrics = attach_old_log_probs(batch, old, RolloutCorrectionConfig(threshold=5.0))
    # sequence level: exp(sum over generated tokens of old - rollout) = exp(3 * 0.1)
    w0 = batch.is_weights[0].tolist()
    assert w0[0] == pytest.approx(torch.exp(torch.tensor(0.3)).item(), rel=1e-6) and w0[2] == 0.0
    assert batch.is_weights[1].tolist() == pytest.approx([1.0] * 5)
    inputs = batch.token_batch().per_token
    assert inputs["advantages"][0].tolist() == [float(batch.advantages[0])] * 5
    assert metrics["mismatch/abs_log_prob_diff_max"] == pytest.approx(0.1, rel=1e-5)
    rollout_only = StepBatch.from_trajectories(trajs)
    assert attach_old_log_probs(rollout_only, None, RolloutCorrectionConfig()) == {}
    assert torch.equal(rollout_only.old_log_probs, rollout_only.rollout_log_probs)
    assert rollout_only.is_weights[0].tolist() == [1.0] * 5


def _loss_inputs(b=4, r=40, seed=0):
    torch.manual_seed(seed)
    old = -torch.rand(b, r)
    log_probs = (old + 0.05 * torch.randn(b, r)).requires_grad_()
    mask = torch.ones(b, r)
    mask[0, 30:] = 0
    mask[1, 5:9] = 0  # tool output: does not advance the generated-token position
    inputs = {"old_log_probs": old, "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None].expand(b, r),
              "response_mask": mask, "rollout_is_weights": torch.ones(b, r),
              "global_num_tokens": int(mask.sum()), "dp_size": 1}
    return log_probs, inputs


def test_loss_fn_matches_policy_loss_and_counts_clips_by_position():
    cfg = PolicyLossConfig()
    log_probs, batch = _loss_inputs()
    mask, r = batch["response_mask"], log_probs.shape[1]
    edges = position_bucket_edges(r, 16)
    assert edges == [1, 2, 4, 8, 16, 32] and position_bucket_edges(r, 3) == [1, 2, 4]
    loss, sums = make_loss_fn(cfg, edges)(log_probs, batch)
    ref, ref_metrics = policy_loss(log_probs, batch["old_log_probs"], batch["advantages"], mask, cfg,
                                   rollout_is_weights=batch["rollout_is_weights"],
                                   batch_num_tokens=batch["global_num_tokens"], dp_size=1)
    assert torch.equal(loss, ref)
    rates = sums.metrics(num_updates=1, bucket_edges=edges, adaptive_clip=True)
    # one micro-batch: the sums reproduce policy_metrics
    for key, value in ref_metrics.items():
        assert rates[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert rates["loss"] == pytest.approx(float(ref.detach()))
    assert int(sums.position_tokens.sum()) == mask.sum()
    assert int(sums.position_clipped.sum()) == pytest.approx(ref_metrics["clip_count_total"])
    assert set(k for k in rates if k.startswith("clip_rate_by_pos/")) == {
        "clip_rate_by_pos/1-1", "clip_rate_by_pos/2-3", "clip_rate_by_pos/4-7",
        "clip_rate_by_pos/8-15", "clip_rate_by_pos/16-31", "clip_rate_by_pos/32+"}
    # the cumulative ratio drifts with position, so late tokens clip more than the first
    assert rates["clip_rate_by_pos/16-31"] > rates["clip_rate_by_pos/1-1"]
    loss.backward()
    assert log_probs.grad is not None and torch.isfinite(log_probs.grad).all()


def test_loss_sums_add_over_micro_batches_and_round_trip_through_vectors():
    cfg = PolicyLossConfig()
    log_probs, batch = _loss_inputs()
    edges = position_bucket_edges(40, 16)
    loss_fn = make_loss_fn(cfg, edges)
    _, whole = loss_fn(log_probs, batch)
    halves = [loss_fn(log_probs[i:i + 2], {k: (v[i:i + 2] if torch.is_tensor(v) else v) for k, v in batch.items()})[1]
              for i in (0, 2)]
    total = halves[0] + halves[1]
    for name in ("loss", "tokens", "clip", "pg_clipped", "kl", "ratio_sum", "position_clipped",
                 "position_tokens", "ratio_max", "ratio_neg_min", "la_scale_max"):
        torch.testing.assert_close(getattr(total, name), getattr(whole, name), rtol=1e-6, atol=1e-9)  # float32 loss
    # histograms add exactly: the quantiles of the summed halves are the whole batch's
    assert torch.equal(total.ratio_hist, whole.ratio_hist) and torch.equal(total.la_scale_hist, whole.la_scale_hist)
    m_total = total.metrics(num_updates=1, bucket_edges=edges, adaptive_clip=True)
    m_whole = whole.metrics(num_updates=1, bucket_edges=edges, adaptive_clip=True)
    for key in ("is_ratio_p25", "is_ratio_p50", "is_ratio_p99", "la_scale_p50"):
        assert m_total[key] == pytest.approx(m_whole[key], rel=1e-12), key
    sums, maxes = total.to_vectors()
    back = total.from_vectors(sums, maxes)
    assert back.metrics(num_updates=2, bucket_edges=edges, adaptive_clip=True) == \
        total.metrics(num_updates=2, bucket_edges=edges, adaptive_clip=True)


def test_loss_sums_refuse_other_layouts_with_a_clear_error():
    """Sums of other position buckets do not add (no silent broadcast), vectors of another
    length do not load, and an unknown statistic is named."""
    cfg = PolicyLossConfig()
    log_probs, batch = _loss_inputs()
    _, six = make_loss_fn(cfg, position_bucket_edges(40, 16))(log_probs, batch)
    _, three = make_loss_fn(cfg, position_bucket_edges(40, 3))(log_probs, batch)
    assert six.position_tokens.shape == (6,) and three.position_tokens.shape == (3,)
    with pytest.raises(ValueError, match="cannot add sums of .* entries"):
        six + three
    sums, maxes = three.to_vectors()
    with pytest.raises(ValueError, match=r"from_vectors: got \[\d+\] and \[4\], expected"):
        six.from_vectors(sums, maxes)
    with pytest.raises(AttributeError, match="no statistic 'ratio_p50'"):
        six.field("ratio_p50")
    with pytest.raises(ValueError, match="not a loss_stats layout"):
        LossSums(six.loss, six.sums[:-1], six.maxima).position_tokens


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


def test_mixed_version_trajectories_use_each_tokens_own_behaviour_log_prob():
    """A trajectory sampled across a weight update keeps each token's behaviour log-prob and
    version through the step batch, the shard and the micro-batch; the CTPO loss then equals
    a float64 reference built token by token from those log-probs."""
    cfg = PolicyLossConfig()
    behaviour = [[-0.9, -1.1, 0.0, -0.4, -0.7, -1.3], [-0.2, -0.6, -0.5, -0.8]]
    masks = [[1, 1, 0, 1, 1, 1], [1, 1, 1, 1]]
    versions = [[4, 4, 4, 5, 5, 5], [5, 5, 5, 5]]  # the first spans the update 4 -> 5
    trajs = [Trajectory(prompt_ids=[1, 2], response_ids=[3] * len(m), loss_mask=m, rollout_log_probs=lp,
                        token_versions=v, reward=float(i), prompt_index=0, sample_index=i,
                        weight_versions=["step_4", "step_5"][i:])
             for i, (lp, m, v) in enumerate(zip(behaviour, masks, versions))]
    batch = StepBatch.from_trajectories(trajs)
    assert batch.versions.tolist() == [[4, 4, -1, 5, 5, 5], [5, 5, 5, 5, -1, -1]]
    part = shard(batch, 1, 1)[0]
    attach_old_log_probs(part, None, RolloutCorrectionConfig(enabled=False))  # behaviour = rollout
    mb = build_micro_batch(part.token_batch())
    current = torch.tensor([[-0.8, -1.0, 0.0, -0.5, -0.6, -1.2], [-0.3, -0.5, -0.45, -0.9, 0, 0]])
    loss, _ = make_loss_fn(cfg, [1, 2, 4])(current, {**mb.fields, "global_num_tokens": 8, "dp_size": 1})

    def reference(old_rows):  # float64, token by token (the formulas of algo/ctpo.py)
        total = 0.0
        for i, (old, mask) in enumerate(zip(old_rows, masks)):
            adv = float(batch.advantages[i])
            cum, n = 0.0, 0
            for t, m in enumerate(mask):
                if not m:
                    continue
                d = float(current[i, t]) - old[t]
                cum, n = cum + d, n + 1
                x, g = min(cum, 10.0), n ** cfg.la_power
                r = torch.exp(torch.tensor(x, dtype=torch.float64))
                r_hat = torch.exp(torch.tensor(x, dtype=torch.float64).clamp(-cfg.la_clip_low * g, cfg.la_clip_high * g))
                l = max(-adv * r, -adv * r_hat)
                if adv < 0:
                    l = min(l, -adv * torch.exp(torch.tensor(cfg.la_clip_c * g, dtype=torch.float64)))
                total += float(l)
        return total / 8

    assert float(loss) == pytest.approx(reference(behaviour), rel=1e-6)
    # one log-prob per trajectory (the last version's for every token) would be another loss
    stale = [[row[-1] if m else 0.0 for m in mask] for row, mask in zip(behaviour, masks)]
    assert abs(reference(stale) - reference(behaviour)) > 1e-3
    assert version_metrics(batch, 5) == pytest.approx({
        "staleness/mean": 2 / 9, "staleness/max": 1.0, "staleness/0": 7 / 9, "staleness/1": 2 / 9,
        "tokens_per_version/4": 2.0, "tokens_per_version/5": 7.0, "rollout/partial": 1.0})


@pytest.mark.parametrize("policy", ["mask", "drop"])
def test_stale_tokens_are_masked_or_their_trajectories_dropped(policy):
    """Tokens more than max_staleness versions behind the trained weights leave the loss: only
    them (mask) or their whole trajectory (drop); rows, advantages and versions stay, and the
    mini-batch token counts (the loss's denominators) follow the mask."""
    masks = [[1, 1, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1]]
    versions = [[2, 3, 3, 4, 4], [4, 4, 4, 4], [3, 3, 4]]  # row 0 spans two updates
    trajs = [Trajectory(prompt_ids=[1], response_ids=[5] * len(m), loss_mask=m, rollout_log_probs=[-0.5] * len(m),
                        token_versions=v, reward=float(i % 2), prompt_index=i // 2, sample_index=i % 2)
             for i, (m, v) in enumerate(zip(masks, versions))]
    batch = StepBatch.from_trajectories(trajs)
    advantages, before = batch.advantages.clone(), batch.versions.clone()
    metrics = mask_stale_tokens(batch, policy_version=4, max_staleness=1, policy=policy)
    kept = {"mask": [[0, 1, 0, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]],
            "drop": [[0, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]}[policy]
    assert batch.response_mask.tolist() == kept
    assert metrics == {"stale/tokens": 1.0, "stale/masked_tokens": 1.0 if policy == "mask" else 4.0,
                       "stale/dropped_trajectories": float(policy == "drop")}
    assert torch.equal(batch.advantages, advantages) and torch.equal(batch.versions, before)
    assert shard(batch, 1, 1)[0].mini_batch_tokens.tolist() == [sum(map(sum, kept))]
    assert mask_stale_tokens(batch, 4, 2, policy)["stale/tokens"] == 0.0  # within a bound of 2
    with pytest.raises(ValueError, match="rollout.stale_policy"):
        mask_stale_tokens(batch, 4, 1, "ignore")


def test_dynamic_sampling_keeps_drawing_until_the_groups_are_informative():
    from ctpo_megatron.data.prompts import Prompt, PromptSampler
    from ctpo_megatron.trainer.sampling import fill_informative_groups

    prompts = [Prompt(uid=str(i), messages=[], ground_truth=str(i)) for i in range(40)]
    sampler = PromptSampler(prompts, seed=0, shuffle=False)
    calls = []

    def generate(batch, round_index):  # prompts with uid % 3 == 0 get all-equal rewards
        calls.append([p.uid for p in batch])
        return [_traj(i, k, float(k % 2) if int(p.uid) % 3 else 1.0, n_resp=2)
                for i, p in enumerate(batch) for k in range(2)]

    first = sampler.next_batch(6)  # uids 0..5: 0 and 3 uninformative
    kept, generated, metrics = fill_informative_groups(generate, sampler, first, target=6, max_rounds=8)
    assert calls == [["0", "1", "2", "3", "4", "5"], ["6", "7"], ["8"]]  # draws only what is missing
    assert [t.prompt_index for t in kept] == [i for i in range(6) for _ in range(2)]
    assert all(max(g) > min(g) for g in zip(*[iter(t.reward for t in kept)] * 2))
    assert metrics == {"sampling/groups_drawn": 9.0, "sampling/groups_dropped": 3.0,
                       "sampling/rounds": 3.0, "sampling/topped_up": 0.0}
    assert len(generated) == 18 and sampler.offset == 9  # the data position counts every draw
    kept, _, metrics = fill_informative_groups(generate, sampler, sampler.next_batch(3), target=3, max_rounds=1)
    assert metrics["sampling/topped_up"] == 1.0 and len(kept) == 6  # uid 9 uninformative, kept anyway
