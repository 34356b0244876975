"""Launcher settings, the `cluster` section of the trainer's config: nodes, roles, Slurm
options, environment.

`ClusterConfig` is one section of `TrainConfig` (Hydra group `cluster`, `configs/cluster/*.yaml`),
so the launcher and `python -m ctpo_megatron.train ... cluster.KEY=VALUE` read the same typed,
validated values. It only says how a job is laid out on a cluster: the trainer's own settings
(model, parallel sizes, micro-batch size, recompute, log-prob chunking) stay in their sections,
and the launcher's memory estimate reads those (`cluster.train_memory`). `cluster.compose`
composes the trainer's config the way the launcher does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

ROLLOUT_BACKENDS = ("sglang", "embedded")
SGLANG_NCCL_PORT_SPAN = 1000
"""SGLang picks its NCCL port in port+100..port+1000 of its HTTP port."""
DEFAULT_ENV = {"NCCL_SOCKET_IFNAME": "", "GLOO_SOCKET_IFNAME": "", "NCCL_IB_HCA": "", "NCCL_DEBUG": "WARN"}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER_CONFIG_DIR = os.path.join(REPO_ROOT, "configs", "cluster")
REMOVED_SETTINGS = {
    "micro_batch": "actor.micro_batch_size",
    "logits_chunk_tokens": "actor.logprob_chunk_size",
}
"""Former cluster settings -> the trainer setting that replaces them (the memory estimate reads
the trainer's own values, so the estimate and the run cannot disagree)."""


@dataclass
class ClusterConfig:
    """How one CTPO job is spread over Slurm nodes. Defaults: Qwen3-32B on 12 nodes of 8 H100s."""

    train_config: str = "config"
    """Trainer Hydra config name (`configs/<name>.yaml`), e.g. `config` (paper) or `tiny`."""
    nodes: int = 12
    """Nodes of the job, training plus rollout."""
    rollout_nodes: int = 4
    """Nodes running inference servers; the other `nodes - rollout_nodes` train."""
    gpus_per_node: int = 8
    """GPUs per node (gres `gpu`); one trainer process per GPU."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU, GiB: the memory estimate is checked against it."""
    partition: str = ""
    """Slurm partition (`--partition`); empty: the cluster's default."""
    account: str = ""
    """Slurm account (`--account`); empty: the user's default."""
    time: str = "24:00:00"
    """Wall-clock limit of one job attempt (`--time`), e.g. `04:00:00`."""
    job_name: str = "ctpo"
    """Slurm job name."""
    requeue: bool = True
    """Submit with `--requeue` and requeue the job at the time limit; the trainer resumes from
    `trainer.run_dir/checkpoints/latest`."""
    signal_before_end_s: int = -1
    """Seconds before the time limit at which Slurm warns the batch shell (`--signal=B:USR1@T`;
    the trainer then stops after its current step, checkpoints, and the job requeues). -1: sized
    from the checkpoint: estimated checkpoint time + `deadline_margin_s` + 60 s (Slurm checks time
    limits about every 30 s, so the warning can come late). 0: no warning. The trainer normally
    stops earlier by itself: it knows the job's end and its step and checkpoint times."""
    checkpoint_write_gbps: float = 2.0
    """Write bandwidth of the run directory's file system for one checkpoint, GB/s: sizes the
    trainer's first checkpoint-time estimate (`trainer.deadline.checkpoint_s`) and the warning."""
    deadline_margin_s: float = 120.0
    """Seconds kept free before the job's end (`trainer.deadline.margin_s`): a step starts only if
    it and a checkpoint fit with this much to spare."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra sbatch options passed as they are, e.g. `["--exclusive", "--qos=high"]`."""
    run_dir: str = ""
    """Run directory; empty: the trainer config's `trainer.run_dir`. Relative paths are taken
    from the submit directory."""
    master_port: int = 0
    """Rendezvous port of the trainer's torchrun c10d store; 0: 20000 + job id mod 10000 (below
    the usual ephemeral range, distinct for concurrent jobs)."""
    train_module: str = "ctpo_megatron.train"
    """Python module the trainer role runs under torchrun."""
    train_overrides: list[str] = field(default_factory=list)
    """Hydra overrides always passed to the trainer, before the user's own."""
    rollout_backend: str = "sglang"
    """Inference servers on the rollout nodes: `sglang` (GPU) or `embedded` (our server; CPU tests)."""
    rollout_gpus_per_server: int = 4
    """GPUs (SGLang tensor-parallel size) of one inference server; divides gpus_per_node."""
    rollout_gpus_per_node: int = 0
    """GPUs used on each rollout node; 0: `gpus_per_node`. (Differs only on test clusters whose
    fake rollout nodes carry servers of another TP size than the trainer's GPUs per node.)"""
    rollout_port: int = 30000
    """Port of the first server on each rollout node; server i of a node uses
    `rollout_port + i * rollout_port_stride`."""
    rollout_port_stride: int = 1100
    """Distance between the ports of two servers on one node. SGLang takes its NCCL port from
    port+100..port+1000, so anything <= 1000 lets one server's NCCL port hit another server."""
    rollout_args: list[str] = field(default_factory=list)
    """Extra command-line arguments of every inference server."""
    rollout_startup_timeout_s: float = 1800.0
    """How long the trainer waits for every server's /health before the job fails, seconds."""
    router: bool = True
    """Start an sglang-router over all servers on the first rollout node (sglang backend only)."""
    router_port: int = 30080
    """Port of the router."""
    container_image: str = ""
    """Container image for every role (pyxis `--container-image`); empty: plain environment."""
    container_mounts: str = ""
    """Extra pyxis mounts `src:dst[,...]`. Always mounted at the same path: the repository, the
    run directory, `model.path` / `model.tokenizer_path` and the folders of the data files. The
    home directory is never mounted (`--no-container-mount-home`) and the host `PYTHONPATH` is
    replaced by the repository; one named container per job (`--container-name`) is imported
    once per node and reused by every step."""
    env: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ENV))
    """Environment of every role (exported in every srun step, printed in the plan). An empty
    value leaves the variable unset (NCCL/Gloo then pick an interface themselves). Set
    `cluster.env.NCCL_SOCKET_IFNAME=ib0`, `cluster.env.NCCL_IB_HCA=mlx5_0,mlx5_1`, ... for your
    network. Added automatically unless set here: `CUDA_DEVICE_MAX_CONNECTIONS=1` for the trainer
    with tp > 1 and sequence parallelism (Megatron's communication/compute overlap needs it);
    `NCCL_CUMEM_ENABLE=0` for the trainer with `distributed` weight sync (SGLang runs with it;
    the trainer side of the group SGLang joins must match)."""
    venv: str = ""
    """Virtual environment activated in the plain environment; empty: `<repo>/.venv` if present."""
    memory_overhead_gib: float = 4.0
    """CUDA context, NCCL buffers and fragmentation allowance per GPU, GiB (memory estimate of
    the launcher's plan and of the trainer's start-up check)."""
    micro_batch: Optional[int] = None
    """Removed: the memory estimate reads `actor.micro_batch_size`. Setting it is an error."""
    logits_chunk_tokens: Optional[int] = None
    """Removed: the memory estimate reads `actor.logprob_chunk_size`. Setting it is an error."""

    def __post_init__(self) -> None:
        for name, replacement in REMOVED_SETTINGS.items():
            if getattr(self, name) is not None:
                raise ValueError(f"cluster.{name}={getattr(self, name)} was removed: the memory estimate "
                                 f"reads the trainer's own {replacement}; set {replacement} instead")
        if self.nodes < 1:
            raise ValueError(f"cluster.nodes={self.nodes} must be >= 1")
        if not 0 <= self.rollout_nodes < self.nodes:
            raise ValueError(f"cluster.rollout_nodes={self.rollout_nodes} must be in [0, nodes={self.nodes}): "
                             "at least one node trains")
        if self.gpus_per_node < 1:
            raise ValueError(f"cluster.gpus_per_node={self.gpus_per_node} must be >= 1")
        if self.rollout_backend not in ROLLOUT_BACKENDS:
            raise ValueError(f"cluster.rollout_backend={self.rollout_backend!r}: expected one of {ROLLOUT_BACKENDS}")
        if self.rollout_gpus_per_node < 0:
            raise ValueError(f"cluster.rollout_gpus_per_node={self.rollout_gpus_per_node} must be >= 0")
        if self.rollout_gpus_per_server < 1 or self.rollout_gpus % self.rollout_gpus_per_server:
            raise ValueError(f"cluster.rollout_gpus_per_server={self.rollout_gpus_per_server} must divide "
                             f"the GPUs of a rollout node ({self.rollout_gpus}: cluster.rollout_gpus_per_node "
                             "or cluster.gpus_per_node)")
        if self.rollout_port_stride <= SGLANG_NCCL_PORT_SPAN and self.servers_per_node > 1:
            raise ValueError(f"cluster.rollout_port_stride={self.rollout_port_stride}: servers on one node "
                             f"need ports more than {SGLANG_NCCL_PORT_SPAN} apart (SGLang takes its NCCL "
                             "port from port+100..port+1000)")
        last = self.rollout_port + (self.servers_per_node - 1) * self.rollout_port_stride + SGLANG_NCCL_PORT_SPAN
        if last > 65535:
            raise ValueError(f"cluster.rollout_port={self.rollout_port}: the last server's NCCL port range "
                             f"ends at {last} > 65535")
        if self.router and any(p == self.router_port or p + 100 <= self.router_port <= p + SGLANG_NCCL_PORT_SPAN
                               for p in self.server_ports):
            raise ValueError(f"cluster.router_port={self.router_port} lies in a server's port range "
                             f"(servers at {self.server_ports}, each with NCCL on port+100..+{SGLANG_NCCL_PORT_SPAN})")
        if self.checkpoint_write_gbps <= 0 or self.deadline_margin_s < 0 or self.signal_before_end_s < -1:
            raise ValueError("cluster.checkpoint_write_gbps must be > 0, cluster.deadline_margin_s >= 0 "
                             "and cluster.signal_before_end_s >= -1 (-1: sized from the checkpoint)")
        for key in self.env:
            if not key or not key.replace("_", "").isalnum() or key[0].isdigit():
                raise ValueError(f"cluster.env: {key!r} is not an environment variable name")
        for name in ("rollout_port", "router_port", "master_port"):
            port = getattr(self, name)
            if not (0 if name == "master_port" else 1) <= port <= 65535:
                raise ValueError(f"cluster.{name}={port} is not a TCP port")
        if self.gpu_memory_gib <= 0 or self.memory_overhead_gib < 0:
            raise ValueError(f"cluster.gpu_memory_gib={self.gpu_memory_gib} must be > 0 and "
                             f"cluster.memory_overhead_gib={self.memory_overhead_gib} >= 0")

    @property
    def train_nodes(self) -> int:
        return self.nodes - self.rollout_nodes

    @property
    def rollout_gpus(self) -> int:
        """GPUs of one rollout node."""
        return self.rollout_gpus_per_node or self.gpus_per_node

    @property
    def servers_per_node(self) -> int:
        return self.rollout_gpus // self.rollout_gpus_per_server

    @property
    def server_ports(self) -> list[int]:
        """Ports of the servers of one rollout node."""
        return [self.rollout_port + i * self.rollout_port_stride for i in range(self.servers_per_node)]
