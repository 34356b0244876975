"""The launch plan: which node runs which role, rendezvous, the trainer's Hydra overrides.

`build_plan` is pure logic over the cluster config, the trainer's composed config and the
node list; `launch/ctpo_32b.sh` calls the CLI (`python -m ctpo_megatron.cluster.plan --help`)
to print the plan (`--dry-run`), to get its sbatch options, and inside the job to write the
plan that `python -m ctpo_megatron.cluster.role` executes on every node.

Layout: the first `nodes - rollout_nodes` hosts of the allocation train (the first of them is
the torchrun c10d rendezvous host), the remaining hosts run inference servers, each node
`gpus_per_node / rollout_gpus_per_server` of them on consecutive ports.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ctpo_megatron.cluster.config import ClusterConfig
from ctpo_megatron.cluster.memory import GIB, MemoryEstimate, estimate_memory, estimate_rollout_memory
from ctpo_megatron.cluster.model_dims import model_dims_of
from ctpo_megatron.parallel.dims import ParallelDims
from ctpo_megatron.rollout.launcher import (LaunchConfig, embedded_server_command, router_command,
                                            sglang_server_command)

if TYPE_CHECKING:  # the trainer's config pulls in torch; only the annotations need it here
    from ctpo_megatron.config.model import ModelConfig
    from ctpo_megatron.config.schema import TrainConfig

MASTER_PORT_BASE = 20000


@dataclass
class ServerSpec:
    """One inference server of the rollout role."""

    host: str
    """Node the server runs on."""
    local_index: int
    """Index of the server on its node (= the Slurm local task id of the rollout step)."""
    port: int
    """TCP port of the server."""
    gpu_slots: list[int]
    """Positions in the node's visible GPU list that this server uses."""
    argv: list[str]
    """Arguments after the Python interpreter (`-m module ...`)."""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class LaunchPlan:
    """Everything the job script and the role processes need; JSON-serializable via `to_dict`."""

    job_id: str
    hosts: list[str]
    train_hosts: list[str]
    rollout_hosts: list[str]
    placeholder_hosts: bool
    """True when no allocation exists yet (dry run): host names are stand-ins."""
    gpus_per_node: int
    master_addr: str
    master_port: int
    parallel: dict
    """Resolved sizes: tp, pp, cp, dp."""
    world_size: int
    model: str
    seq_len: int
    run_dir: str
    log_dir: str
    train_argv: list[str]
    """Arguments after the Python interpreter for each training node (torchrun)."""
    train_overrides: list[str]
    servers: list[ServerSpec] = field(default_factory=list)
    router_host: str = ""
    router_port: int = 0
    router_argv: list[str] = field(default_factory=list)
    startup_timeout_s: float = 0.0
    memory: dict = field(default_factory=dict)
    memory_text: str = ""
    memory_what_ifs: dict = field(default_factory=dict)
    """Total GiB per GPU with each memory-saving setting turned off (why the config fits)."""
    rollout_memory: dict = field(default_factory=dict)
    """Per-GPU weights and KV-cache capacity of one inference server (empty: no servers)."""

    @property
    def server_urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def router_url(self) -> str:
        return f"http://{self.router_host}:{self.router_port}" if self.router_host else ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LaunchPlan":
        data = dict(data)
        data["servers"] = [ServerSpec(**s) for s in data.get("servers", [])]
        return cls(**data)


def override_key(override: str) -> str:
    """`a.b=c` -> `a.b`; Hydra's `+`, `++` and `~` prefixes are dropped."""
    return override.split("=", 1)[0].lstrip("+~")


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """Splits launcher arguments into (cluster `KEY=VALUE` without prefix, trainer overrides)."""
    cluster, trainer = [], []
    for arg in args:
        if "=" not in arg:
            raise ValueError(f"argument {arg!r} is neither an option nor a Hydra override KEY=VALUE")
        if arg.startswith("cluster."):
            cluster.append(arg[len("cluster."):])
        else:
            trainer.append(arg)
    return cluster, trainer


def estimate_for_train_config(train_cfg: "TrainConfig", dims: ParallelDims, *,
                              gpu_memory_gib: float = 80.0, micro_batch: int = 1,
                              logits_chunk_tokens: int = 4096, overhead_gib: float = 4.0,
                              **changes) -> MemoryEstimate:
    """Memory per GPU of the trainer's config (`TrainConfig`) at resolved `dims` (ParallelDims).

    Sequence length = rollout.max_prompt_len + rollout.max_response_len; full recompute when
    model.recompute_activations or actor.recompute (as the trainer). `changes` override `estimate_memory` keywords (what-ifs).
    The trainer's start-up validation can call this directly.
    """
    kwargs = dict(seq_len=train_cfg.rollout.max_prompt_len + train_cfg.rollout.max_response_len,
                  micro_batch=micro_batch,
                  recompute="full" if train_cfg.model.recompute_activations or train_cfg.actor.recompute else "none",
                  distributed_optimizer=train_cfg.parallel.distributed_optimizer,
                  sequence_parallel=train_cfg.parallel.sequence_parallel,
                  logits_chunk_tokens=logits_chunk_tokens, gpu_memory_gib=gpu_memory_gib,
                  overhead_gib=overhead_gib)
    kwargs.update(changes)
    return estimate_memory(model_dims_of(train_cfg.model), dims, **kwargs)


def memory_what_ifs(train_cfg: "TrainConfig", dims: ParallelDims, **kwargs) -> dict[str, float]:
    """Total GiB per GPU with each memory-saving setting of the config turned off in turn."""
    out = {}
    if train_cfg.model.recompute_activations:
        out["without activation recompute"] = estimate_for_train_config(train_cfg, dims, **kwargs,
                                                                         recompute="none").total
    if train_cfg.parallel.distributed_optimizer:
        out["without distributed optimizer"] = estimate_for_train_config(
            train_cfg, dims, **kwargs, distributed_optimizer=False).total
    if kwargs.get("logits_chunk_tokens"):
        out["without logits chunking"] = estimate_for_train_config(
            train_cfg, dims, **{**kwargs, "logits_chunk_tokens": 0}).total
    if train_cfg.parallel.sequence_parallel and dims.tp > 1:
        out["without sequence parallel"] = estimate_for_train_config(
            train_cfg, dims, **kwargs, sequence_parallel=False).total
    if dims.cp > 1:
        out["with cp=1 (same tp, pp, dp)"] = estimate_for_train_config(
            train_cfg, ParallelDims(tp=dims.tp, pp=dims.pp, cp=1, dp=dims.dp), **kwargs).total
    if train_cfg.model.recompute_activations and train_cfg.parallel.distributed_optimizer:
        out["with none of these"] = estimate_for_train_config(
            train_cfg, ParallelDims(tp=dims.tp, pp=dims.pp, cp=1, dp=dims.dp),
            **{**kwargs, "logits_chunk_tokens": 0}, recompute="none", distributed_optimizer=False,
            sequence_parallel=False).total
    return {name: total / GIB for name, total in out.items()}


def _rollout_argv(cluster: ClusterConfig, model_path: str, port: int, number: int) -> list[str]:
    # The rollout launcher's own command builders; server index 0 because the role narrows
    # CUDA_VISIBLE_DEVICES to this server's GPUs. `number` (global server index) seeds it.
    cfg = LaunchConfig(model_path=model_path, backend=cluster.rollout_backend, host="0.0.0.0",
                       tp_size=cluster.rollout_gpus_per_server, seed=number, extra_args=list(cluster.rollout_args))
    build = sglang_server_command if cluster.rollout_backend == "sglang" else embedded_server_command
    return build(cfg, 0, port)[1:]  # drop the interpreter: the role process supplies its own


def _dedupe(generated: list[str], user: list[str]) -> list[str]:
    taken = {override_key(o) for o in user}
    return [o for o in generated if override_key(o) not in taken]


def build_plan(cluster: ClusterConfig, train_cfg: "TrainConfig", user_overrides: list[str], *,
               hosts: list[str] | None = None, job_id: str = "dryrun", restart: int = 0,
               cwd: str | None = None) -> LaunchPlan:
    """Lays the job out on `hosts` (None: placeholder names for a dry run).

    train_cfg: the trainer's composed `TrainConfig` (with `user_overrides` applied).
    user_overrides: the user's trainer Hydra overrides; they win over the launcher's own.
    Raises ValueError naming the setting when the sizes, node list or paths do not fit.
    """
    placeholder = hosts is None
    hosts = [f"node{i:02d}" for i in range(cluster.nodes)] if placeholder else list(hosts)
    if len(hosts) != cluster.nodes:
        raise ValueError(f"cluster.nodes={cluster.nodes} but the allocation has {len(hosts)} node(s): "
                         f"{','.join(hosts)} (pass --nodes {len(hosts)})")
    train_hosts, rollout_hosts = hosts[:cluster.train_nodes], hosts[cluster.train_nodes:]
    world = cluster.train_nodes * cluster.gpus_per_node
    dims = train_cfg.validate(world)
    model_path = train_cfg.model.path
    if rollout_hosts and not model_path:
        raise ValueError(f"cluster.rollout_nodes={cluster.rollout_nodes}: the inference servers load the "
                         "checkpoint, pass model.path=<HF checkpoint dir>")
    cwd = cwd or os.getcwd()
    run_dir = os.path.normpath(os.path.join(cwd, cluster.run_dir or train_cfg.trainer.run_dir))
    attempt = f"slurm-{job_id}" + (f"-r{restart}" if restart else "")
    per_node, gpus = cluster.servers_per_node, cluster.rollout_gpus_per_server
    servers = [ServerSpec(host=h, local_index=i, port=cluster.rollout_port + i,
                          gpu_slots=list(range(i * gpus, (i + 1) * gpus)),
                          argv=_rollout_argv(cluster, model_path, cluster.rollout_port + i, n * per_node + i))
               for n, h in enumerate(rollout_hosts) for i in range(per_node)]
    router = cluster.router and cluster.rollout_backend == "sglang" and bool(servers)
    master_port = cluster.master_port or MASTER_PORT_BASE + (int(job_id) % 10000 if job_id.isdigit() else 0)

    generated = [f"model={train_cfg.model.name}", f"parallel.tp={dims.tp}", f"parallel.pp={dims.pp}",
                 f"parallel.cp={dims.cp}", f"trainer.run_dir={run_dir}"]
    if servers:
        generated.append("rollout.server_urls=[" + ",".join(f"'{s.url}'" for s in servers) + "]")
    user = list(cluster.train_overrides) + list(user_overrides)
    overrides = _dedupe(generated, user) + user
    config_args = [] if cluster.train_config == "config" else ["--config-name", cluster.train_config]
    train_argv = ["-m", "torch.distributed.run", "--nnodes", str(len(train_hosts)),
                  "--nproc-per-node", str(cluster.gpus_per_node), "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"{train_hosts[0]}:{master_port}", "--rdzv-id", str(job_id),
                  "--max-restarts", "0", "-m", cluster.train_module, *config_args, *overrides]

    mem_kwargs = dict(gpu_memory_gib=cluster.gpu_memory_gib, micro_batch=cluster.micro_batch,
                      logits_chunk_tokens=cluster.logits_chunk_tokens, overhead_gib=cluster.memory_overhead_gib)
    estimate = estimate_for_train_config(train_cfg, dims, **mem_kwargs)
    rollout_memory = {}
    if servers:
        rollout_memory = asdict(estimate_rollout_memory(model_dims_of(train_cfg.model), gpus,
                                                        gpu_memory_gib=cluster.gpu_memory_gib))
    return LaunchPlan(
        job_id=str(job_id), hosts=hosts, train_hosts=train_hosts, rollout_hosts=rollout_hosts,
        placeholder_hosts=placeholder, gpus_per_node=cluster.gpus_per_node, master_addr=train_hosts[0],
        master_port=master_port, parallel={"tp": dims.tp, "pp": dims.pp, "cp": dims.cp, "dp": dims.dp},
        world_size=world, model=train_cfg.model.name,
        seq_len=train_cfg.rollout.max_prompt_len + train_cfg.rollout.max_response_len,
        run_dir=run_dir, log_dir=os.path.join(run_dir, "logs", attempt), train_argv=train_argv,
        train_overrides=overrides, servers=servers,
        router_host=rollout_hosts[0] if router else "", router_port=cluster.router_port if router else 0,
        router_argv=router_command(LaunchConfig(model_path=model_path, host="0.0.0.0"),
                                   [s.url for s in servers], cluster.router_port)[1:] if router else [],
        startup_timeout_s=cluster.rollout_startup_timeout_s, memory=estimate.as_dict(),
        memory_text=estimate.format(), memory_what_ifs=memory_what_ifs(train_cfg, dims, **mem_kwargs),
        rollout_memory=rollout_memory)


if __name__ == "__main__":
    import sys

    from ctpo_megatron.cluster.cli import main

    sys.exit(main())
