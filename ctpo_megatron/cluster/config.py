"""Launcher settings (`configs/cluster/<name>.yaml`): nodes, roles, Slurm options, environment.

The trainer's own settings (model, parallel sizes, batch sizes) stay in the trainer's Hydra
config; this file only says how a job is laid out on a cluster. The YAML files override the
defaults below; `cluster.KEY=VALUE` arguments of the launcher override the YAML.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

ROLLOUT_BACKENDS = ("sglang", "embedded")
CLUSTER_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                  "configs", "cluster")


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
    signal_before_end_s: int = 300
    """Seconds before the time limit at which Slurm warns the job (USR1) so the trainer can
    checkpoint and the job requeue itself."""
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
    rollout_port: int = 30000
    """Port of the first server on each rollout node; the next servers use the following ports."""
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
    """Extra pyxis mounts `src:dst[,...]`; the repository and run directory are always mounted."""
    venv: str = ""
    """Virtual environment activated in the plain environment; empty: `<repo>/.venv` if present."""
    micro_batch: int = 1
    """Sequences per micro-batch, for the memory estimate."""
    logits_chunk_tokens: int = 4096
    """Tokens per log-prob chunk (0: unchunked), for the memory estimate."""
    memory_overhead_gib: float = 4.0
    """CUDA context, NCCL buffers and fragmentation allowance per GPU, GiB (memory estimate)."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"cluster.nodes={self.nodes} must be >= 1")
        if not 0 <= self.rollout_nodes < self.nodes:
            raise ValueError(f"cluster.rollout_nodes={self.rollout_nodes} must be in [0, nodes={self.nodes}): "
                             "at least one node trains")
        if self.gpus_per_node < 1:
            raise ValueError(f"cluster.gpus_per_node={self.gpus_per_node} must be >= 1")
        if self.rollout_backend not in ROLLOUT_BACKENDS:
            raise ValueError(f"cluster.rollout_backend={self.rollout_backend!r}: expected one of {ROLLOUT_BACKENDS}")
        if self.rollout_gpus_per_server < 1 or self.gpus_per_node % self.rollout_gpus_per_server:
            raise ValueError(f"cluster.rollout_gpus_per_server={self.rollout_gpus_per_server} must divide "
                             f"cluster.gpus_per_node={self.gpus_per_node}")
        for name in ("rollout_port", "router_port", "master_port"):
            port = getattr(self, name)
            if not (0 if name == "master_port" else 1) <= port <= 65535:
                raise ValueError(f"cluster.{name}={port} is not a TCP port")
        if self.signal_before_end_s < 0:
            raise ValueError(f"cluster.signal_before_end_s={self.signal_before_end_s} must be >= 0")
        if self.gpu_memory_gib <= 0 or self.micro_batch < 1 or self.logits_chunk_tokens < 0:
            raise ValueError("cluster.gpu_memory_gib must be > 0, cluster.micro_batch >= 1 and "
                             "cluster.logits_chunk_tokens >= 0")

    @property
    def train_nodes(self) -> int:
        return self.nodes - self.rollout_nodes

    @property
    def servers_per_node(self) -> int:
        return self.gpus_per_node // self.rollout_gpus_per_server


def cluster_config_path(name: str) -> str:
    """`name` as a file if it exists, else `configs/cluster/<name>.yaml`."""
    if os.path.isfile(name):
        return name
    path = os.path.join(CLUSTER_CONFIG_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(CLUSTER_CONFIG_DIR) if f.endswith(".yaml"))
        raise ValueError(f"--cluster {name!r}: no such file and no {path} (known: {', '.join(known)})")
    return path


def load_cluster_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> ClusterConfig:
    """Loads `configs/cluster/<name>.yaml` (or a YAML file) and applies `KEY=VALUE` overrides.

    Unknown keys raise ValueError naming the key and the file; `__post_init__` validates the result.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    path = cluster_config_path(name)
    base = OmegaConf.structured(ClusterConfig)
    try:
        merged = OmegaConf.merge(base, OmegaConf.load(path))
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, YAMLError) as e:
        known = ", ".join(f.name for f in fields(ClusterConfig))
        raise ValueError(f"cluster config {path} with overrides {list(overrides)}: {e}\n"
                         f"(known keys: {known})") from None
