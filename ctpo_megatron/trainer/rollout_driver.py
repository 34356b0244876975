"""Rank 0's side of the rollouts: inference servers, the agent loop, weight resync.

With `rollout.server_urls` set the trainer uses those servers (started by the Slurm launcher);
otherwise it starts `rollout.num_servers` servers itself (embedded CPU server, or SGLang) and
stops them at exit. Generation (`RolloutGenerator`) runs on one persistent asyncio loop owned by
this object.

With `rollout.placement=colocated` the servers share the training GPUs: `release_memory()`
frees their memory before the trainer trains, and `update_weights` resumes the weights,
pushes the new ones, then resumes the KV cache (and CUDA graphs), so at no time do the
servers' weights, their KV cache and the trainer's step all hold memory at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ctpo_megatron.config.schema import TrainConfig
from ctpo_megatron.data.prompts import Prompt
from ctpo_megatron.rollout.serving.launcher import COLOCATED_MEM_FRACTION, LaunchConfig, ServerGroup

logger = logging.getLogger(__name__)

RESUME_FIRST = ["weights"]
"""Resumed before the weight push (it writes into them)."""
RESUME_AFTER = ["kv_cache", "cuda_graph"]
"""Resumed after the push: the KV cache is not needed until the next generation."""


def server_launch_config(cfg: TrainConfig, run_dir: str, *, gpus: int | None = None) -> LaunchConfig:
    """What the trainer launches when `rollout.server_urls` is empty. Colocated SGLang servers
    get the memory saver and a lower `--mem-fraction-static`, and must fit GPUs [0, n * tp) of
    this node (`gpus`: its GPU count; None: torch's). Server TP: `weight_sync.server_tp_size`."""
    rc = cfg.rollout
    colocated = rc.placement == "colocated"
    tp_size = rc.weight_sync.server_tp_size or 1
    mem_fraction = rc.server_mem_fraction_static
    if colocated and rc.server_backend == "sglang":
        rc.check_colocated_gpus(tp_size, torch.cuda.device_count() if gpus is None else gpus)
        mem_fraction = mem_fraction or COLOCATED_MEM_FRACTION
    return LaunchConfig(model_path=cfg.model.path, backend=rc.server_backend, num_servers=rc.num_servers,
                        seed=cfg.trainer.seed, tp_size=tp_size, log_dir=os.path.join(run_dir, "logs"),
                        dtype="float32" if cfg.model.dtype == "float32" else "bfloat16",
                        max_batch_size=max(1, min(rc.max_concurrency, 256)), router=rc.router,
                        enable_memory_saver=colocated, mem_fraction_static=mem_fraction)


class RolloutGenerator:
    """Scored trajectories from running servers: the agent loop (HTTP client, chat template,
    sandboxed tools, reward) on one persistent asyncio loop owned by this object.

    Built in the trainer (inside `RolloutDriver`) and, with `rollout.max_staleness` >= 1, a
    second one from the same config in the rollout producer's process (`trainer.producer`).
    """

    def __init__(self, cfg: TrainConfig, urls: Sequence[str], *, router_url: str | None = None) -> None:
        from transformers import AutoTokenizer

        from ctpo_megatron.rollout.agent.config import AgentConfig
        from ctpo_megatron.rollout.serving.client import SGLangClient
        from ctpo_megatron.rollout.sandbox import SandboxPool

        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.client = SGLangClient(list(urls), timeout_s=cfg.rollout.request_timeout_s, router_url=router_url)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.path)
        self.agent_cfg = AgentConfig.from_rollout_config(cfg.rollout)
        self.sandbox = SandboxPool(max_workers=self.agent_cfg.sandbox_workers, config=self.agent_cfg.sandbox,
                                   default_timeout=self.agent_cfg.tool_timeout_s)

    def generate(self, prompts: Sequence[Prompt], n_samples: int, *, seed: int,
                 temperature: float | None = None) -> list[Any]:
        """`n_samples` scored trajectories per prompt (prompt-major order), sampled with `seed`."""
        from ctpo_megatron.rollout.agent.loop import run_agent_batch

        overrides: dict[str, Any] = {"seed": seed}
        if temperature is not None:
            overrides["temperature"] = temperature
        agent_cfg = dataclasses.replace(self.agent_cfg, **overrides)
        return self.loop.run_until_complete(run_agent_batch(
            self.client, [p.messages for p in prompts], agent_cfg, tokenizer=self.tokenizer,
            n_samples=n_samples, ground_truths=[p.ground_truth for p in prompts],
            metadata=[{"uid": p.uid, "data_source": p.data_source} for p in prompts],
            sandbox=self.sandbox))

    def generate_step(self, step: int, prompts: list[Prompt], sampler: Any) -> tuple[list, list, dict[str, float]]:
        """Training step `step`'s rollouts of `prompts`: (the scored trajectories, n per prompt,
        prompt-major; every trajectory generated, for the rollout metrics; the dynamic-sampling
        metrics). With `rollout.filter_zero_variance_groups` more prompts are drawn from
        `sampler` (the trainer's, or the producer's own when generating ahead)."""
        cfg, tc = self.cfg, self.cfg.trainer
        if not cfg.rollout.filter_zero_variance_groups:
            trajs = self.generate(prompts, cfg.rollout.n_samples, seed=step_seed(tc.seed, step))
            return trajs, trajs, {}
        from ctpo_megatron.trainer.sampling import fill_informative_groups

        return fill_informative_groups(
            lambda batch, round_index: self.generate(batch, cfg.rollout.n_samples,
                                                     seed=step_seed(tc.seed, step, round_index)),
            sampler, prompts, target=tc.prompts_per_step, max_rounds=cfg.rollout.max_sampling_rounds)

    def take_stats(self) -> dict[str, int]:
        """The client's request counts (requests, retried, failed) since the last call."""
        return self.client.take_stats()

    def _run(self, make_coro: Callable[[], Any]) -> Any:
        """Runs `make_coro()` on this object's event loop."""
        return self.loop.run_until_complete(make_coro())

    def close(self) -> None:
        """Closes the client and the sandboxes (not the servers)."""
        try:
            self.loop.run_until_complete(self.client.close())
            self.sandbox.close()
        finally:
            self.loop.close()


def step_seed(seed: int, step: int, round_index: int = 0) -> int:
    """The sampling seed of training step `step` (round 0; dynamic sampling's later rounds use
    others): the same whether the step is generated in time or ahead."""
    return seed * 1_000_003 + step + 100_003 * round_index


class RolloutDriver(RolloutGenerator):
    """Starts (or finds) the servers, generates scored trajectories for prompts and pushes new
    weights to the servers."""

    def __init__(self, cfg: TrainConfig, *, run_dir: str) -> None:
        self.servers = None
        rc = cfg.rollout
        router_url = rc.router_url or None
        if rc.server_urls:
            urls = list(rc.server_urls)
            logger.info("using external rollout servers %s%s", urls,
                        f" behind router {router_url}" if router_url else "")
        else:
            launch = server_launch_config(cfg, run_dir)
            self.servers = ServerGroup(launch)
            logger.info("starting %d %s rollout server(s)", rc.num_servers, rc.server_backend)
            self.servers.start()
            urls = self.servers.worker_urls
            router_url = self.servers.router_url
        self.urls = urls
        self.worker_urls = urls
        self.router_url = router_url
        self.run_dir = run_dir
        try:
            super().__init__(cfg, urls, router_url=router_url)
        except BaseException:
            if self.servers is not None:
                self.servers.stop()
            raise
        self.weight_sync = None
        self.colocated = rc.placement == "colocated"
        self.released = False
        """The servers' memory is released (colocated, between rollouts and the weight push)."""

    def release_memory(self) -> None:
        """Colocated: every server frees its weights, KV cache and CUDA graphs (SGLang's memory
        saver), so the trainer has the GPUs for its step. Servers must be idle (they are: the
        step's rollouts are complete). No-op for separate servers."""
        if not self.colocated or self.released:
            return
        self._run(lambda: self.client.release_memory_occupation(None))
        self.released = True

    def _resume(self, tags: list[str]) -> None:
        self._run(lambda: self.client.resume_memory_occupation(tags))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> dict[str, float]:
        """Pushes `(hf_name, full tensor)` pairs to every healthy server as weight `version`;
        returns the transport's metrics (bytes, seconds, throughput) and the rollout client's
        request counts since the last sync (requests, retried, lost, healthy servers).

        A server that stopped answering is dropped first (the group is formed again without
        it). If one dies during the sync, the error is logged, the rest of `named_tensors` is
        still consumed (the other trainer ranks gather it with rank 0) and the next sync goes
        to the survivors; their weights are then a mix until that sync (the version is not
        advanced), which the rollout log-probs account for.
        """
        from ctpo_megatron.rollout.weight_sync import WeightSyncError, make_weight_updater

        alive = self.alive_servers()
        if not alive:
            raise RuntimeError(f"no rollout server is healthy: {self.worker_urls}")
        if self.weight_sync is None:
            sync_cfg = self.cfg.rollout.weight_sync
            if not os.path.isabs(sync_cfg.disk_dir):
                sync_cfg = dataclasses.replace(sync_cfg, disk_dir=os.path.join(self.run_dir, sync_cfg.disk_dir))
            if sync_cfg.disk_config_dir is None:
                sync_cfg = dataclasses.replace(sync_cfg, disk_config_dir=self.cfg.model.path)
            self.weight_sync = make_weight_updater(sync_cfg)
            # Updates go to each server directly (a router does not forward them).
            self.weight_sync.connect(alive)
        elif self.weight_sync.retarget(alive):
            logger.warning("weight sync now targets %d healthy server(s) of %d: %s", len(alive),
                           len(self.worker_urls), alive)
        tensors = iter(named_tensors)
        failed = 0.0
        released, self.released = self.released, False
        if released:  # colocated: the push writes into the resumed weights
            self._resume(RESUME_FIRST)
        try:
            self.weight_sync.update(tensors, version)
        except WeightSyncError as e:
            for _ in tensors:  # the other ranks gather the rest with us
                pass
            survivors = self.alive_servers()
            if sorted(survivors) == sorted(self.weight_sync.urls) or not survivors:
                raise
            logger.error("weight sync of %s failed (%s); %d server(s) left, they get the next one",
                         version, e, len(survivors))
            self.weight_sync.retarget(survivors)
            failed = 1.0
        if released:  # the next rollouts need the KV cache (and CUDA graphs) again
            self._resume(RESUME_AFTER)
        metrics = dict(self.weight_sync.metrics())
        metrics["weight_sync/failed"] = failed
        stats = self.client.take_stats()
        metrics.update({"rollout/requests": float(stats["requests"]),
                        "rollout/retried_requests": float(stats["retried"]),
                        "rollout/lost_requests": float(stats["failed"]),
                        "rollout/healthy_servers": float(len(self.weight_sync.urls))})
        return metrics

    def alive_servers(self) -> list[str]:
        """The servers answering `/health` now."""
        health = self._run(self.client.health)
        return [u for u in self.client.urls if health.get(u)]

    def close(self) -> None:
        """Stops the servers this driver started and closes the client and sandboxes."""
        try:
            if self.weight_sync is not None:
                self.weight_sync.close()
            super().close()
        finally:
            if self.servers is not None:
                self.servers.stop()
