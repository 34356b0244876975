"""The RL loop: `Trainer(cfg).train()`.

Per step, a straight line over one typed batch (`trainer.batch.StepBatch`):

    rank 0: prompts -> rollouts (n samples, tool turns, rewards) -> StepBatch (tensors, GRPO
            advantages) -> one shard per DP replica (mini-batch-major, token-balanced)
    each replica's ranks receive only their shard (`trainer.transport`)
    -> old log-probs (actor recompute, or the rollout's) -> mismatch IS weights
    -> mini-batch CTPO updates; loss statistics summed and reduced once per step
    -> weight resync to the servers -> periodic held-out eval -> metrics -> checkpoint

Colocated servers (`rollout.placement=colocated`, on the training GPUs) release their memory
after the rollouts and resume it for the weight resync (`RolloutDriver.release_memory`).

Resume: a run directory with `checkpoints/latest` continues from it (model, optimizer, data
position, RNG, step); metrics logged after that checkpoint by the killed run are dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from ctpo_megatron.algo import position_bucket_edges
from ctpo_megatron.config.schema import TrainConfig
from ctpo_megatron.config.store import save_config
from ctpo_megatron.data.prompts import load_prompts, train_sampler
from ctpo_megatron.parallel.cpu_mode import is_cpu_mode
from ctpo_megatron.trainer import checkpoint as ckpt
from ctpo_megatron.trainer.batch import StepBatch, mask_stale_tokens, rollout_metrics, shard, version_metrics
from ctpo_megatron.trainer.deadline import StopPlanner
from ctpo_megatron.trainer.metrics import MetricsSink, padding_metrics
from ctpo_megatron.trainer.timers import PhaseTimer, format_eta
from ctpo_megatron.trainer.transport import ShardTransport
from ctpo_megatron.trainer.update import attach_old_log_probs, make_loss_fn, run_updates

logger = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 999_983
"""Evaluation samples with the same seed every time, so accuracies are comparable."""


def check_policy_memory(cfg: TrainConfig, dims, *, gpu_memory_gib: float):
    """Estimates the policy's memory per GPU for `cfg` at the resolved `dims`, as the launcher's
    plan does (`cluster.train_memory.estimate_for_train_config`), against this GPU's
    `gpu_memory_gib`; raises ValueError with the breakdown when it cannot fit, so an oversized
    layout fails at start-up instead of out of memory mid-step. With colocated servers, also
    that their share fits beside what the trainer keeps resident while they generate."""
    from ctpo_megatron.cluster.memory import check_colocated_memory, check_memory
    from ctpo_megatron.cluster.train_memory import colocated_mem_fraction, estimate_for_train_config

    estimate = estimate_for_train_config(cfg, dims, gpu_memory_gib=gpu_memory_gib)
    check_memory(estimate)
    if colocated_mem_fraction(cfg):
        check_colocated_memory(estimate, colocated_mem_fraction(cfg))
    return estimate


def world_mean(metrics: dict[str, float]) -> dict[str, float]:
    """Key-wise mean over all ranks that have the key (ranks may report different keys)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(metrics)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, metrics)
    from ctpo_megatron.trainer.metrics import mean_metrics

    return mean_metrics(gathered)


class Trainer:
    """Owns the actor, (on rank 0) the rollout driver and metrics sink, and the loop state."""

    def __init__(self, cfg: TrainConfig) -> None:
        from ctpo_megatron.actor.policy import PolicyActor
        from ctpo_megatron.parallel.state import init_distributed

        self.cfg = cfg
        self.run_dir = cfg.trainer.run_dir
        # Every check that can fail on bad settings runs before the first collective.
        cfg.check_inputs()
        self.rank, self.world_size = init_distributed(timeout_minutes=cfg.trainer.collective_timeout_minutes)
        self.stopper = StopPlanner(cfg.trainer.deadline, run_dir=self.run_dir, total_steps=cfg.trainer.total_steps,
                                   rank=self.rank)  # signals, the job's end, when to stop
        self.dims = cfg.validate(self.world_size)
        self._check_model_config()
        if torch.cuda.is_available() and not is_cpu_mode():
            gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
            estimate = check_policy_memory(cfg, self.dims, gpu_memory_gib=gib)
            if self.rank == 0:
                logger.info("estimated memory per GPU:\n%s", estimate.format())
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
            logger.info("run dir %s; world size %d = tp %d x pp %d x cp %d x dp %d", self.run_dir,
                        self.world_size, self.dims.tp, self.dims.pp, self.dims.cp, self.dims.dp)
        self.actor = PolicyActor(cfg.actor_config(self.dims))
        self.dp_rank = self.actor.pgs.dp.rank()
        self.dp_size = self.actor.dp_size
        data = cfg.data
        keys = dict(prompt_key=data.prompt_key, ground_truth_key=data.ground_truth_key,
                    data_source_key=data.data_source_key)
        self.sampler = train_sampler(data, cfg.trainer.seed)
        val = load_prompts(data.val_files, **keys) if data.val_files else []
        self.val_prompts = val[:data.max_val_prompts] if data.max_val_prompts >= 0 else val
        self.edges = position_bucket_edges(cfg.rollout.max_response_len, cfg.trainer.clip_position_bins)
        self.loss_fn = make_loss_fn(cfg.algo, self.edges)
        from ctpo_megatron.actor.schedule import model_device

        self.transport = ShardTransport(self.dp_rank, [f.name for f in dataclasses.fields(StepBatch)],
                                        model_device())
        from ctpo_megatron.trainer.dumps import TokenDumper  # per-token ratio dumps (plot figures)
        self.dumper = TokenDumper(self.run_dir, cfg.trainer.dump_every, cfg.trainer.dump_max_tokens,
                                  rank=self.rank, enabled=self.actor.pgs.tp.rank() == 0 and self.dims.cp == 1)
        if self.dims.cp > 1 and cfg.trainer.dump_every and self.rank == 0:
            # The dumps' prefix sums and positions assume whole responses per rank.
            logger.warning("trainer.dump_every=%d: per-token dumps are off under context parallelism "
                           "(parallel.cp=%d); run with parallel.cp=1 to write them", cfg.trainer.dump_every,
                           self.dims.cp)
        self.loss_fn = self.dumper.wrap(self.loss_fn)
        self.step = 0
        self.timer = PhaseTimer()
        self._resume()
        self.rollout = None
        self.sink = None
        if self.rank == 0:
            from ctpo_megatron.trainer.rollout_driver import RolloutDriver

            self.rollout = RolloutDriver(cfg, run_dir=self.run_dir)
            from ctpo_megatron.rollout.sandbox.selftest import self_test
            logger.info(self_test(self.rollout.sandbox.config).summary())  # what isolates tool code here
            self.sink = MetricsSink.from_config(cfg, resume_step=self.step + 1 if self.step else 0)
        if self.step:
            self._sync_weights()  # the servers started from the base model
        self.producer = None
        if self.rank == 0 and cfg.rollout.max_staleness > 0:
            from ctpo_megatron.trainer.producer import ProducerSpec, RolloutProducer

            self.producer = RolloutProducer(ProducerSpec(
                config=cfg, server_urls=list(self.rollout.urls), router_url=self.rollout.router_url,
                first_step=self.step + 1, last_step=cfg.trainer.total_steps,
                data_position=self.sampler.state_dict(), max_staleness=cfg.rollout.max_staleness))

    # ---------------------------------------------------------------- set-up
    def _check_model_config(self) -> None:
        from transformers import AutoConfig

        self.cfg.model.check_against_hf(AutoConfig.from_pretrained(self.cfg.model.path))

    def _resume(self) -> None:
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is None:
            return
        extra = self.actor.load_checkpoint(ckpt.checkpoint_root(self.run_dir))
        if "trainer" not in extra:
            raise RuntimeError(f"checkpoint {latest} has no trainer state (not written by this trainer?)")
        state = extra["trainer"]
        ckpt.restore_rank_rng(latest, self.rank)
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["data"])
        logger.info("resumed from %s at step %d (data epoch %d, offset %d)", latest, self.step,
                    self.sampler.epoch, self.sampler.offset)

    # ---------------------------------------------------------------- loop
    def train(self) -> None:
        tc = self.cfg.trainer
        if self.step == 0 and tc.eval_every > 0 and self.val_prompts:
            self._log(0, self.evaluate())
        start_step, start_time = self.step, time.monotonic()
        while self.step < tc.total_steps:
            self.step += 1
            step_start = time.monotonic()
            metrics = self.train_step()
            last = self.step == tc.total_steps
            if self.val_prompts and tc.eval_every > 0 and (self.step % tc.eval_every == 0 or last) \
                    and not self.stopper.stopping:  # a stopping step kept the servers' old weights
                with self.timer.phase("eval"):
                    metrics.update(self.evaluate())
            metrics.update(self.timer.pop())
            metrics["time/step"] = time.monotonic() - step_start
            if "perf/tokens" in metrics:
                metrics["perf/tokens_per_s"] = metrics["perf/tokens"] / metrics["time/step"]
            if "time/rollout" in metrics:  # the trainer waits on rollouts: idle GPUs
                metrics["perf/trainer_idle_frac"] = metrics["time/rollout"] / metrics["time/step"]
            self._log(self.step, metrics)
            if self.rank == 0 and (self.step % tc.log_every == 0 or last):
                done = self.step - start_step
                eta = (time.monotonic() - start_time) / done * (tc.total_steps - self.step)
                logger.info(progress_line(self.step, tc.total_steps, metrics, eta))
            stop = self.stopper.should_stop(self.step, metrics["time/step"])
            if last or stop or (tc.save_every > 0 and self.step % tc.save_every == 0):
                with self.stopper.checkpointing():
                    self.save()
            if stop and not last:
                logger.warning("stopping after step %d on request; rerun the same command to resume",
                               self.step)
                break
        self.stopper.finish(self.step)

    def train_step(self) -> dict[str, float]:
        """One RL step; returns its metrics (complete on rank 0)."""
        cfg, tc = self.cfg, self.cfg.trainer
        num_mb = tc.prompts_per_step // tc.mini_batch_prompts
        prompts = self.sampler.next_batch(tc.prompts_per_step)  # every rank: same data position
        metrics: dict[str, float] = {}
        shards = None
        with self.timer.phase("rollout"):
            if self.rank == 0:
                trajs, generated, sampling = self._rollouts(prompts)
                self.rollout.release_memory()  # colocated: the GPUs are the trainer's until the resync
                metrics.update(rollout_metrics(generated))
                metrics.update(sampling)
                batch = StepBatch.from_trajectories(trajs, norm_adv_by_std=tc.norm_adv_by_std)
                metrics["perf/tokens"] = float(batch.num_tokens)
                # The servers hold the weights of the previous step (version step - 1).
                metrics.update(version_metrics(batch, self.step - 1))
                metrics.update(mask_stale_tokens(batch, self.step - 1, cfg.rollout.max_staleness,
                                                 cfg.rollout.stale_policy))
                shards = [s.to_tensors() for s in shard(batch, num_mb, self.dp_size)]
            mine = StepBatch.from_tensors(self.transport.exchange(shards))
            if cfg.rollout.filter_zero_variance_groups:
                self._share_data_position()  # rank 0 may have drawn extra prompts
        with self.timer.phase("old_log_probs"):
            old = self.actor.score(mine.token_batch()) if tc.old_log_probs == "actor" else None
        mismatch = attach_old_log_probs(mine, old, cfg.correction)
        self.dumper.begin(self.step)
        with self.timer.phase("update"):
            metrics.update(run_updates(self.actor, mine, num_mini_batches=num_mb,
                                       epochs=tc.epochs_per_step, loss_fn=self.loss_fn,
                                       cfg=cfg.algo, edges=self.edges))
        self.dumper.flush()
        metrics.update(world_mean({**mismatch, **self.actor.pop_token_counts()}))
        metrics.update(padding_metrics(metrics))  # tokens computed per useful token
        if not self.stopper.skip_weight_sync(self.step):  # stopping after this step: save first
            with self.timer.phase("weight_sync"):
                metrics.update(self._sync_weights())
        metrics["data/epoch"] = float(self.sampler.epoch)
        metrics["data/offset"] = float(self.sampler.offset)
        return metrics

    def _rollouts(self, prompts: list) -> tuple[list, list, dict[str, float]]:
        """Rank 0: the step's scored trajectories (n per prompt, prompt-major), every trajectory
        generated (for the rollout metrics), and the dynamic-sampling metrics."""
        if self.producer is None:
            return self.rollout.generate_step(self.step, prompts, self.sampler)
        ready = self.producer.take(self.step, prompts)  # generated while earlier steps trained
        # The producer may have drawn more prompts (dynamic sampling): its position is the step's.
        self.sampler.load_state_dict(ready.data_position)
        self.rollout.client.stats.update(ready.client_stats)  # reported with the weight sync
        return ready.result

    def _share_data_position(self) -> None:
        """Every rank takes rank 0's data position (epoch, offset): one small broadcast."""
        if not dist.is_initialized() or self.world_size == 1:
            return
        from ctpo_megatron.actor.schedule import model_device

        pos = torch.tensor([self.sampler.epoch, self.sampler.offset], dtype=torch.int64, device=model_device())
        dist.broadcast(pos, src=0)
        epoch, offset = pos.tolist()
        if (epoch, offset) != (self.sampler.epoch, self.sampler.offset):
            self.sampler.load_state_dict({**self.sampler.state_dict(), "epoch": epoch, "offset": offset})

    def _sync_weights(self) -> dict[str, float]:
        """Pushes the actor's weights to the servers as version `step_<n>` (all ranks iterate)."""
        version = f"step_{self.step}"
        weights = self.actor.iter_hf_weights()
        if self.rank == 0:
            out = self.rollout.update_weights(weights, version)
            return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}
        for _ in weights:
            pass
        return {}

    def evaluate(self) -> dict[str, float]:
        """mean@k accuracy on the held-out prompts (rank 0; other ranks return {})."""
        if self.rank != 0:
            return {}
        tc = self.cfg.trainer
        # With a producer, its requests for the next steps run on the same servers meanwhile.
        trajs = self.rollout.generate(self.val_prompts, tc.eval_samples, seed=tc.seed + EVAL_SEED_OFFSET,
                                      temperature=tc.eval_temperature)
        metrics = rollout_metrics(trajs, prefix="eval/")
        from ctpo_megatron.evaluate import eval_metrics  # mean@k / best@k / maj@k, overall and per source
        metrics.update(eval_metrics([t.to_dict() for t in trajs], tc.eval_samples))  # it reads dicts
        by_source: dict[str, list[bool]] = {}
        for t in trajs:
            source = (t.metadata or {}).get("data_source", "unknown")
            by_source.setdefault(source, []).append(bool(t.correct))
        if len(by_source) > 1:
            for source, hits in by_source.items():
                metrics[f"eval/accuracy/{source}"] = sum(hits) / len(hits)
        logger.info("held-out accuracy (mean@%d over %d prompts): %.3f", tc.eval_samples,
                    len(self.val_prompts), metrics["eval/accuracy"])
        return metrics

    # ---------------------------------------------------------------- state
    def save(self) -> None:
        """Checkpoint after the current step (all ranks); `latest` moves once it is complete."""
        state = {"step": self.step, "data": self.sampler.state_dict()}
        with self.timer.phase("checkpoint"):
            path = self.actor.save_checkpoint(ckpt.checkpoint_root(self.run_dir), {"trainer": state})
            # RNG after `latest` moved: a kill in between only loses RNG continuity (warned at resume).
            ckpt.save_rank_rng(path, self.rank)
            if dist.is_initialized():
                dist.barrier()
            if self.rank == 0:
                ckpt.prune_checkpoints(self.run_dir, self.cfg.trainer.keep_checkpoints)
        logger.info("checkpoint saved at step %d: %s", self.step, path)

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        if self.sink is not None:
            self.sink.log(step, metrics)

    def close(self) -> None:
        """Stops servers and flushes metrics (rank 0); safe after a failure."""
        try:
            if self.producer is not None:
                self.producer.close()
            if self.rollout is not None:
                self.rollout.close()
        finally:
            if self.sink is not None:
                self.sink.close()


def progress_line(step: int, total: int, m: dict[str, float], eta_s: float) -> str:
    """`step 3/40 | reward 0.41 | acc 0.40 | loss 0.012 | clip 0.020 | 12.3s/step | ETA 7m20s`."""
    parts = [f"step {step}/{total}", f"reward {m.get('reward/mean', float('nan')):.3f}"]
    if "eval/accuracy" in m:
        parts.append(f"held-out acc {m['eval/accuracy']:.3f}")
    for key, label, fmt in (("actor/loss", "loss", "{:.4f}"), ("actor/clipfrac_total", "clip", "{:.3f}"),
                            ("tool/use_rate", "tool use", "{:.2f}"),
                            ("response_length/mean", "len", "{:.0f}")):
        if key in m:
            parts.append(f"{label} {fmt.format(m[key])}")
    parts.append(f"{m.get('time/step', 0.0):.1f}s/step")
    parts.append(f"ETA {format_eta(eta_s)}")
    return " | ".join(parts)
