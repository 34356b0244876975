"""The launch plan: which node runs which role, rendezvous, the trainer's Hydra overrides.

`build_plan` is pure logic over the trainer's composed config (its `cluster` section is the
layout) and the node list; `launch/ctpo_32b.sh` calls the CLI (`python -m ctpo_megatron.cluster.plan --help`)
to print the plan (`--dry-run`), to get its sbatch options, and inside the job to write the
plan that `python -m ctpo_megatron.cluster.role` executes on every node.

Layout: the first `nodes - rollout_nodes` hosts of the allocation train (the first of them is
the torchrun c10d rendezvous host), the remaining hosts run inference servers, each node
`rollout GPUs / rollout_gpus_per_server` of them, `rollout_port_stride` ports apart. With
`rollout.placement=colocated` the job is one node: the servers run on the training node's GPUs
with SGLang's memory saver and a lower `--mem-fraction-static`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ctpo_megatron.cluster.config import REPO_ROOT, ClusterConfig
from ctpo_megatron.cluster.memory import check_colocated_memory, estimate_rollout_memory
from ctpo_megatron.cluster.model_dims import model_dims_of
from ctpo_megatron.cluster.train_memory import colocated_mem_fraction, estimate_for_train_config, memory_what_ifs
from ctpo_megatron.parallel.dims import ParallelDims
from ctpo_megatron.rollout.serving.launcher import (LaunchConfig, embedded_server_command,
                                            router_command, sglang_server_command)

if TYPE_CHECKING:  # the trainer's config pulls in torch; only the annotations need it here
    from ctpo_megatron.config.schema import TrainConfig

MASTER_PORT_BASE = 20000
CHECKPOINT_BYTES_PER_PARAM = 14
"""bf16 weights (2) + the distributed optimizer's fp32 master weights and Adam m, v (12)."""
SIGNAL_SLACK_S = 60
"""Slurm checks time limits (and sends `--signal`) about every 30 s: the warning can come late."""
UNSET_MODEL = "<model.path unset>"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
    index: int = 0
    """Global index of the server (its log file, its `role rollout --server` argument)."""

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
    model_path: str = ""
    """`model.path` ('' in a dry run without one)."""
    server_tp_size: int = 1
    """GPUs (tensor-parallel ranks) of each server."""
    weight_sync: dict = field(default_factory=dict)
    """transport, master_address (the rule), master_port, ranks in the group."""
    env: dict = field(default_factory=dict)
    """Environment per role (`trainer`, `rollout`, `router`), exported by `role` before exec."""
    deadline: dict = field(default_factory=dict)
    """checkpoint_bytes, checkpoint_s (first estimate), margin_s, signal_before_end_s."""
    container_mounts: list[str] = field(default_factory=list)
    """pyxis mounts `src:dst` of every role (container mode)."""
    warnings: list[str] = field(default_factory=list)
    """Settings that will not work on a real cluster (printed by the dry run and the job)."""
    colocated_mem_fraction: float = 0.0
    """`rollout.placement=colocated`: the servers' --mem-fraction-static (0: separate nodes)."""

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
        if override_key(arg) == "cluster":
            raise ValueError(f"{arg!r}: choose the cluster config with --cluster NAME|FILE")
        if arg.startswith("cluster."):
            cluster.append(arg[len("cluster."):])
        else:
            trainer.append(arg)
    return cluster, trainer


def role_env(cluster: ClusterConfig, train_cfg: "TrainConfig", dims: ParallelDims, has_servers: bool
             ) -> dict[str, dict[str, str]]:
    """Environment of each role: `cluster.env` (empty values: unset) over the automatic ones."""
    base = {k: str(v) for k, v in cluster.env.items() if str(v)}
    auto: dict[str, str] = {}
    if dims.tp > 1 and train_cfg.parallel.sequence_parallel:
        auto["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"  # Megatron's TP/SP overlap orders kernels by it
    if has_servers and train_cfg.rollout.weight_sync.transport == "distributed":
        auto["NCCL_CUMEM_ENABLE"] = "0"  # SGLang sets it; both sides of one communicator must agree
    return {"trainer": {**auto, **base}, "rollout": dict(base), "router": dict(base)}


def weight_sync_info(cluster: ClusterConfig, train_cfg: "TrainConfig", servers: list[ServerSpec]
                     ) -> tuple[dict, list[str]]:
    """How weights reach the servers, as the plan prints it; plus warnings for settings that
    cannot work across nodes."""
    ws = train_cfg.rollout.weight_sync
    warnings = []
    info = {"transport": ws.transport, "server_tp_size": cluster.rollout_gpus_per_server,
            "servers": len(servers), "group_world_size": 1 + len(servers) * cluster.rollout_gpus_per_server}
    if ws.transport == "distributed":
        pinned = ws.master_address not in ("auto", "")
        info["master_address"] = (
            f"pinned to {ws.master_address} (rollout.weight_sync.master_address)" if pinned else
            "found at run time: trainer global rank 0 (on whichever training node torchrun puts it) "
            "uses the address of its interface that routes to the servers")
        info["master_port"] = ws.master_port or "a free port on trainer rank 0's node"
        if pinned and ws.master_address in LOOPBACK and servers:
            warnings.append(f"rollout.weight_sync.master_address={ws.master_address}: the servers run on other "
                            "nodes and would dial their own loopback; use auto")
    configured = ws.server_tp_size
    if servers and configured is not None and configured != cluster.rollout_gpus_per_server:
        warnings.append(f"rollout.weight_sync.server_tp_size={configured} but the servers run TP "
                        f"{cluster.rollout_gpus_per_server} (cluster.rollout_gpus_per_server): leave it unset, "
                        "the trainer reads each server's tp_size")
    return info, warnings


def deadline_settings(cluster: ClusterConfig, train_cfg: "TrainConfig") -> dict:
    """Checkpoint size and time estimate, the trainer's margin, the lead of Slurm's warning."""
    params = model_dims_of(train_cfg.model).total_params
    ckpt_bytes = params * CHECKPOINT_BYTES_PER_PARAM
    ckpt_s = math.ceil(ckpt_bytes / (cluster.checkpoint_write_gbps * 1e9))
    lead = cluster.signal_before_end_s
    if lead < 0:
        lead = math.ceil(ckpt_s + cluster.deadline_margin_s + SIGNAL_SLACK_S)
    return {"checkpoint_bytes": ckpt_bytes, "checkpoint_s": ckpt_s, "margin_s": cluster.deadline_margin_s,
            "signal_before_end_s": lead if cluster.requeue else 0, "write_gbps": cluster.checkpoint_write_gbps}


def container_mounts(cluster: ClusterConfig, train_cfg: "TrainConfig", run_dir: str, repo: str) -> list[str]:
    """`src:dst` mounts (same path inside): repository, run dir, model, tokenizer, data folders,
    then `cluster.container_mounts`. A path inside an already mounted one is skipped."""
    paths = [repo, run_dir, train_cfg.model.path, train_cfg.model.tokenizer_path,
             *(os.path.dirname(f) for f in (*train_cfg.data.train_files, *train_cfg.data.val_files))]
    mounted: list[str] = []
    for path in paths:
        if not path or not os.path.isabs(path):  # a hub id or an unset path
            continue
        path = os.path.normpath(path)
        if any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounted):
            continue
        mounted.append(path)
    out = [f"{m}:{m}" for m in mounted]
    if cluster.container_mounts:
        out += [m for m in cluster.container_mounts.split(",") if m]
    return out


def _rollout_argv(cluster: ClusterConfig, model_path: str, port: int, number: int,
                  colocated_mem_fraction: float = 0.0) -> list[str]:
    # The rollout launcher's own command builders; server index 0 because the role narrows
    # CUDA_VISIBLE_DEVICES to this server's GPUs. `number` (global server index) seeds it.
    # Colocated: the memory saver, and a share of the GPU beside the trainer's weights.
    cfg = LaunchConfig(model_path=model_path, backend=cluster.rollout_backend, host="0.0.0.0",
                       tp_size=cluster.rollout_gpus_per_server, seed=number, extra_args=list(cluster.rollout_args),
                       enable_memory_saver=colocated_mem_fraction > 0,
                       mem_fraction_static=colocated_mem_fraction or None)
    build = sglang_server_command if cluster.rollout_backend == "sglang" else embedded_server_command
    return build(cfg, 0, port)[1:]  # drop the interpreter: the role process supplies its own


def _colocated_mem_fraction(cluster: ClusterConfig, train_cfg: "TrainConfig") -> float:
    """0 for separate rollout nodes; with `rollout.placement=colocated` the servers'
    --mem-fraction-static, after checking the layout is one node (the trainer hands the
    weights to the servers by CUDA IPC handle, which does not cross nodes)."""
    if train_cfg.rollout.placement != "colocated":
        return 0.0
    if cluster.nodes != 1 or cluster.rollout_nodes != 0:
        raise ValueError(f"rollout.placement=colocated runs on one node, servers beside the trainer: got "
                         f"cluster.nodes={cluster.nodes}, cluster.rollout_nodes={cluster.rollout_nodes} "
                         "(pass --nodes 1 --rollout-nodes 0)")
    return colocated_mem_fraction(train_cfg)


def _dedupe(generated: list[str], user: list[str]) -> list[str]:
    taken = {override_key(o) for o in user}
    return [o for o in generated if override_key(o) not in taken]


def build_plan(train_cfg: "TrainConfig", user_overrides: list[str], *,
               hosts: list[str] | None = None, job_id: str = "dryrun", restart: int = 0,
               cwd: str | None = None) -> LaunchPlan:
    """Lays the job out on `hosts` (None: placeholder names for a dry run).

    train_cfg: the trainer's composed `TrainConfig` (with `user_overrides` applied; its
    `cluster` section is the layout, see `cluster.compose.load_launch_config`).
    user_overrides: the Hydra overrides the trainer gets after the launcher's own and
    `cluster.train_overrides` (the cluster selection, then the user's); they win over the
    launcher's own.
    Raises ValueError naming the setting when the sizes, node list or paths do not fit.
    """
    cluster = train_cfg.cluster
    placeholder = hosts is None
    hosts = [f"node{i:02d}" for i in range(cluster.nodes)] if placeholder else list(hosts)
    if len(hosts) != cluster.nodes:
        raise ValueError(f"cluster.nodes={cluster.nodes} but the allocation has {len(hosts)} node(s): "
                         f"{','.join(hosts)} (pass --nodes {len(hosts)})")
    train_hosts, rollout_hosts = hosts[:cluster.train_nodes], hosts[cluster.train_nodes:]
    colocated = _colocated_mem_fraction(cluster, train_cfg)
    server_hosts = train_hosts if colocated else rollout_hosts
    world = cluster.train_nodes * cluster.gpus_per_node
    dims = train_cfg.validate(world)
    model_path = train_cfg.model.path
    if server_hosts and not model_path and not placeholder:
        raise ValueError(f"cluster.rollout_nodes={cluster.rollout_nodes}: the inference servers load the "
                         "checkpoint, pass model.path=<HF checkpoint dir>")
    cwd = cwd or os.getcwd()
    run_dir = os.path.normpath(os.path.join(cwd, cluster.run_dir or train_cfg.trainer.run_dir))
    attempt = f"slurm-{job_id}" + (f"-r{restart}" if restart else "")
    per_node, gpus, ports = cluster.servers_per_node, cluster.rollout_gpus_per_server, cluster.server_ports
    servers = [ServerSpec(host=h, local_index=i, port=ports[i], gpu_slots=list(range(i * gpus, (i + 1) * gpus)),
                          argv=_rollout_argv(cluster, model_path or UNSET_MODEL, ports[i], n * per_node + i,
                                             colocated),
                          index=n * per_node + i)
               for n, h in enumerate(server_hosts) for i in range(per_node)]
    router = cluster.router and bool(servers)
    router_url = f"http://{server_hosts[0]}:{cluster.router_port}" if router else ""
    master_port = cluster.master_port or MASTER_PORT_BASE + (int(job_id) % 10000 if job_id.isdigit() else 0)

    generated = [f"model={train_cfg.model.name}", f"parallel.tp={dims.tp}", f"parallel.pp={dims.pp}",
                 f"parallel.cp={dims.cp}", f"trainer.run_dir={run_dir}"]
    if servers:
        generated.append("rollout.server_urls=[" + ",".join(f"'{s.url}'" for s in servers) + "]")
        if router:  # generation goes through the router; weight updates still go to each server
            generated.append(f"rollout.router_url={router_url}")
    deadline = deadline_settings(cluster, train_cfg)
    generated += [f"trainer.deadline.checkpoint_s={deadline['checkpoint_s']}",
                  f"trainer.deadline.margin_s={deadline['margin_s']:g}"]
    user = list(cluster.train_overrides) + list(user_overrides)
    overrides = _dedupe(generated, user) + user
    config_args = [] if cluster.train_config == "config" else ["--config-name", cluster.train_config]
    train_argv = ["-m", "torch.distributed.run", "--nnodes", str(len(train_hosts)),
                  "--nproc-per-node", str(cluster.gpus_per_node), "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"{train_hosts[0]}:{master_port}", "--rdzv-id", str(job_id),
                  "--max-restarts", "0", "-m", cluster.train_module, *config_args, *overrides]

    estimate = estimate_for_train_config(train_cfg, dims)  # the trainer's start-up check computes the same
    if colocated:
        check_colocated_memory(estimate, colocated)
    sync_info, warnings = weight_sync_info(cluster, train_cfg, servers)
    if placeholder and not model_path:
        warnings.append("model.path is unset: pass model.path=<HF checkpoint dir> to submit")
    rollout_memory = {}
    if servers:
        rollout_memory = asdict(estimate_rollout_memory(model_dims_of(train_cfg.model), gpus,
                                                        gpu_memory_gib=cluster.gpu_memory_gib,
                                                        **({"mem_fraction": colocated} if colocated else {})))
    return LaunchPlan(
        job_id=str(job_id), hosts=hosts, train_hosts=train_hosts, rollout_hosts=rollout_hosts,
        placeholder_hosts=placeholder, gpus_per_node=cluster.gpus_per_node, master_addr=train_hosts[0],
        master_port=master_port, parallel={"tp": dims.tp, "pp": dims.pp, "cp": dims.cp, "dp": dims.dp},
        world_size=world, model=train_cfg.model.name,
        seq_len=train_cfg.rollout.max_prompt_len + train_cfg.rollout.max_response_len,
        run_dir=run_dir, log_dir=os.path.join(run_dir, "logs", attempt), train_argv=train_argv,
        train_overrides=overrides, servers=servers,
        router_host=server_hosts[0] if router else "", router_port=cluster.router_port if router else 0,
        router_argv=router_command(LaunchConfig(model_path=model_path or UNSET_MODEL, host="0.0.0.0"),
                                   [s.url for s in servers], cluster.router_port)[1:] if router else [],
        startup_timeout_s=cluster.rollout_startup_timeout_s, memory=estimate.as_dict(),
        memory_text=estimate.format(), memory_what_ifs=memory_what_ifs(train_cfg, dims),
        rollout_memory=rollout_memory, model_path=model_path, server_tp_size=gpus, weight_sync=sync_info,
        env=role_env(cluster, train_cfg, dims, bool(servers)), deadline=deadline,
        container_mounts=container_mounts(cluster, train_cfg, run_dir, REPO_ROOT) if cluster.container_image else [],
        warnings=warnings, colocated_mem_fraction=colocated)


if __name__ == "__main__":
    import sys

    from ctpo_megatron.cluster.cli import main

    sys.exit(main())
