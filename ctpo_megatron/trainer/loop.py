"""The RL loop: `Trainer(cfg).train()`.

Per step (rank 0 drives the rollouts; every rank trains):

    prompts --rank 0--> rollouts (n samples, tool turns, rewards) --broadcast--> every rank
    -> GRPO advantages -> old log-probs (actor recompute, or the rollout's)
    -> mismatch IS weights -> mini-batch CTPO updates (DP share per rank)
    -> weight resync to the servers -> periodic held-out eval -> metrics -> checkpoint

Resume: a run directory with `checkpoints/latest` continues from it (model, optimizer, data
position, RNG, step); metrics logged after that checkpoint by the killed run are dropped.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from ctpo_megatron.config.schema import TrainConfig
from ctpo_megatron.config.store import save_config
from ctpo_megatron.data.prompts import PromptSampler, load_prompts
from ctpo_megatron.parallel.cpu_mode import is_cpu_mode
from ctpo_megatron.trainer import checkpoint as ckpt
from ctpo_megatron.trainer.batch import (build_samples, compute_advantages, dp_shard, mini_batches,
                                         rollout_metrics)
from ctpo_megatron.trainer.deadline import StopPlanner
from ctpo_megatron.trainer.metrics import MetricsSink
from ctpo_megatron.trainer.timers import PhaseTimer, format_eta
from ctpo_megatron.trainer.update import (attach_old_log_probs, make_loss_fn, position_edges,
                                          run_updates)

logger = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 999_983
"""Evaluation samples with the same seed every time, so accuracies are comparable."""


def actor_config(cfg: TrainConfig, dims) -> Any:
    """The actor's settings: `cfg.actor` with the model path and parallel layout filled in."""
    import dataclasses

    return dataclasses.replace(cfg.actor, hf_model_dir=cfg.model.path, dims=dims,
                               params_dtype="float32" if cfg.model.dtype == "float32" else "bfloat16",
                               recompute=cfg.model.recompute_activations or cfg.actor.recompute,
                               allow_local_spec=cfg.model.allow_local_spec or cfg.actor.allow_local_spec,
                               recompute_granularity=(cfg.model.recompute_granularity
                                                      if cfg.model.recompute_activations
                                                      else cfg.actor.recompute_granularity),
                               use_distributed_optimizer=cfg.parallel.distributed_optimizer,
                               sequence_parallel=cfg.parallel.sequence_parallel,
                               temperature=cfg.rollout.temperature)


def check_policy_memory(cfg: TrainConfig, dims, *, gpu_memory_gib: float):
    """Estimates the policy's memory per GPU (`ctpo_megatron.cluster.memory`) for `cfg` at the
    resolved `dims`; raises ValueError with the breakdown when it cannot fit `gpu_memory_gib`,
    so an oversized layout fails at start-up instead of out of memory mid-step."""
    from ctpo_megatron.cluster.memory import check_memory
    from ctpo_megatron.cluster.plan import estimate_for_train_config

    estimate = estimate_for_train_config(cfg, dims, gpu_memory_gib=gpu_memory_gib,
                                         micro_batch=cfg.actor.micro_batch_size)
    check_memory(estimate)
    return estimate


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from global rank `src` on every rank (pickled; fine for a step's trajectories)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


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
        cfg.parallel.check_supported()
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
        self.actor = PolicyActor(actor_config(cfg, self.dims))
        self.dp_rank = self.actor.pgs.dp.rank()
        self.dp_size = self.actor.dp_size
        data = cfg.data
        keys = dict(prompt_key=data.prompt_key, ground_truth_key=data.ground_truth_key,
                    data_source_key=data.data_source_key)
        self.sampler = PromptSampler(load_prompts(data.train_files, **keys), seed=cfg.trainer.seed,
                                     shuffle=data.shuffle)
        val = load_prompts(data.val_files, **keys) if data.val_files else []
        self.val_prompts = val[:data.max_val_prompts] if data.max_val_prompts >= 0 else val
        self.edges = position_edges(cfg.rollout.max_response_len, cfg.trainer.clip_position_bins)
        self.loss_fn = make_loss_fn(cfg.algo, self.edges)
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
        """One RL step; returns its metrics (identical on every rank where it matters: rank 0)."""
        cfg, tc = self.cfg, self.cfg.trainer
        prompts = self.sampler.next_batch(tc.prompts_per_step)  # every rank: same data position
        with self.timer.phase("rollout"):
            payload = None
            if self.rank == 0:
                trajs = self.rollout.generate(prompts, cfg.rollout.n_samples,
                                              seed=tc.seed * 1_000_003 + self.step)
                payload = [t.to_dict() for t in trajs]
            trajs = broadcast_object(payload)
        metrics = rollout_metrics(trajs)
        advantages = compute_advantages(trajs, norm_by_std=tc.norm_adv_by_std)
        samples = build_samples(trajs, advantages)
        num_mb = tc.prompts_per_step // tc.mini_batch_prompts
        mine = [s for mb in mini_batches(samples, num_mb) for s in dp_shard(mb, self.dp_rank, self.dp_size)]
        with self.timer.phase("old_log_probs"):
            old = self.actor.compute_log_probs(mine) if tc.old_log_probs == "actor" else None
        local = attach_old_log_probs(mine, old, cfg.correction)
        with self.timer.phase("update"):
            metrics.update(run_updates(self.actor, samples, num_mini_batches=num_mb,
                                       epochs=tc.epochs_per_step, dp_rank=self.dp_rank,
                                       dp_size=self.dp_size, loss_fn=self.loss_fn, edges=self.edges))
        metrics.update(world_mean(local))
        if not self.stopper.skip_weight_sync(self.step):  # stopping after this step: save first
            with self.timer.phase("weight_sync"):
                metrics.update(self._sync_weights())
        tokens = sum(len(t["prompt_ids"]) + len(t["response_ids"]) for t in trajs)
        metrics["perf/tokens"] = float(tokens)
        metrics["data/epoch"] = float(self.sampler.epoch)
        metrics["data/offset"] = float(self.sampler.offset)
        return metrics

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
        trajs = [t.to_dict() for t in self.rollout.generate(
            self.val_prompts, tc.eval_samples, seed=tc.seed + EVAL_SEED_OFFSET,
            temperature=tc.eval_temperature)]
        metrics = rollout_metrics(trajs, prefix="eval/")
        by_source: dict[str, list[bool]] = {}
        for t in trajs:
            source = (t.get("metadata") or {}).get("data_source", "unknown")
            by_source.setdefault(source, []).append(bool(t["correct"]))
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
