"""Rollout settings (Hydra group `rollout`): servers, sampling, tool turns, weight sync."""

from __future__ import annotations

from dataclasses import dataclass, field

from ctpo_megatron.rollout.agent.config import AgentOptions
from ctpo_megatron.rollout.weight_sync.base import WeightSyncConfig


@dataclass
class RolloutConfig:
    """How trajectories are generated. Defaults are the paper's setup."""

    server_urls: list[str] = field(default_factory=list)
    """External SGLang servers (or a router) as `http://host:port`. Empty: the trainer starts
    `num_servers` embedded servers itself and stops them at exit."""
    router_url: str = ""
    """SGLang router in front of `server_urls` (`http://host:port`): generation goes through it
    (cache-aware routing keeps a prompt's samples and turns on one server); weight updates
    still go to each server. Empty: the client pins each prompt to a server by hash."""
    router: bool = False
    """When the trainer starts the servers itself: start an SGLang router in front of them too
    (needs the `sglang-router` package)."""
    num_servers: int = 1
    """Embedded servers to start when `server_urls` is empty."""
    server_backend: str = "embedded"
    """What the trainer launches when `server_urls` is empty: `embedded` (our CPU/GPU HTTP
    server speaking SGLang's API) or `sglang` (a real SGLang server; needs CUDA)."""
    placement: str = "separate"
    """Where the servers run. `separate`: on their own GPUs (other nodes, or `server_urls`).
    `colocated`: on the training GPUs, taking turns with the trainer: after each step's
    rollouts the trainer asks them to release their memory (SGLang's memory saver), trains,
    asks them to resume, then pushes the new weights (`weight_sync.transport=tensor`, SGLang's
    per-TP-rank format, CUDA IPC handles on GPU). See docs/rollout_servers.md, "Colocated"."""
    server_mem_fraction_static: float | None = None
    """SGLang `--mem-fraction-static` of the servers the trainer starts (None: SGLang's own
    choice, or 0.5 with `placement=colocated`, where the trainer's weights stay on the GPU)."""
    n_samples: int = 8
    """Responses sampled per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = -1
    """Top-k sampling (-1: off)."""
    max_prompt_len: int = 16384
    """Longest prompt, tokens; longer prompts are skipped with a warning."""
    max_response_len: int = 8192
    """Response budget per trajectory, tokens: generated tokens plus inserted tool output."""
    max_tool_turns: int = 5
    """Tool calls per trajectory; after that the model must answer."""
    tool_timeout_s: float = 10.0
    """Wall-clock limit of one sandboxed code run, seconds."""
    max_concurrency: int = 256
    """Trajectories in flight at once across all servers."""
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    """How new weights reach the servers after each step: transport (`distributed` broadcast,
    `tensor` HTTP buckets, `disk`), bucket size, pause mode (see `rollout.weight_sync`).
    Relative `disk_dir` paths are placed in the run directory."""
    request_timeout_s: float = 600.0
    """HTTP timeout of one generate request, seconds."""
    filter_zero_variance_groups: bool = False
    """Dynamic sampling: drop groups whose n rewards are all equal (zero advantage) and draw
    more prompts until the step has `trainer.prompts_per_step` informative groups (see
    `trainer.sampling`). Costs extra rollouts; metrics `sampling/*` count them."""
    max_staleness: int = 0
    """Asynchronous rollouts: generate the rollouts of up to this many future steps while a
    step trains, in a child process of rank 0 (see `trainer.producer`). 0: the synchronous
    step (rollouts of step s use the weights of step s - 1). k >= 1: tokens are at most k
    weight versions old; a weight update reaches the servers mid-generation (partial
    rollouts), each token keeping its behaviour log-prob and weight version. Works with
    `filter_zero_variance_groups` (the producer over-samples ahead). Also the bound of
    `stale_policy`."""
    stale_policy: str = "mask"
    """Generated tokens more than `max_staleness` weight versions behind the weights being
    trained: `mask` takes those tokens out of the loss (the trajectory's newer tokens stay),
    `drop` takes the whole trajectory out (its group's advantages unchanged). Counted in
    `stale/*`. The producer keeps tokens within the bound, so this acts only when a weight
    sync did not advance the servers' version (a failed or skipped sync)."""
    max_sampling_rounds: int = 8
    """Rounds of drawing with `filter_zero_variance_groups` before the step is topped up with
    uninformative groups."""
    agent: AgentOptions = field(default_factory=AgentOptions)
    """Conversation layout (inline / the reference's tool turns), system prompt, thinking,
    accepted fences, tool-output cut, reward rule (see `rollout.agent.config.AgentOptions`)."""

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"rollout.n_samples={self.n_samples} must be >= 1")
        if not self.server_urls and self.num_servers < 1:
            raise ValueError("rollout.num_servers must be >= 1 when rollout.server_urls is empty")
        for url in list(self.server_urls) + ([self.router_url] if self.router_url else []):
            if not str(url).startswith(("http://", "https://")):
                raise ValueError(f"rollout.server_urls: {url!r} is not an http(s):// URL")
        if self.server_backend not in ("embedded", "sglang"):
            raise ValueError(f"rollout.server_backend={self.server_backend!r}: expected embedded or sglang")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature={self.temperature} must be > 0 (RL samples)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p={self.top_p} must be in (0, 1]")
        for name in ("max_prompt_len", "max_response_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name}={getattr(self, name)} must be >= 1")
        if self.max_staleness < 0:
            raise ValueError(f"rollout.max_staleness={self.max_staleness} must be >= 0")
        if self.stale_policy not in ("mask", "drop"):
            raise ValueError(f"rollout.stale_policy={self.stale_policy!r}: expected mask or drop")
        if self.max_sampling_rounds < 1:
            raise ValueError(f"rollout.max_sampling_rounds={self.max_sampling_rounds} must be >= 1")
        if self.max_tool_turns < 0:
            raise ValueError(f"rollout.max_tool_turns={self.max_tool_turns} must be >= 0")
        if self.server_mem_fraction_static is not None and not 0 < self.server_mem_fraction_static < 1:
            raise ValueError(f"rollout.server_mem_fraction_static={self.server_mem_fraction_static} "
                             "must be in (0, 1) or null")
        self._check_placement()

    def _check_placement(self) -> None:
        if self.placement not in ("separate", "colocated"):
            raise ValueError(f"rollout.placement={self.placement!r}: expected separate or colocated")
        if self.placement != "colocated":
            return
        if self.max_staleness:
            raise ValueError(f"rollout.placement=colocated cannot run rollouts ahead "
                             f"(rollout.max_staleness={self.max_staleness}): the servers' memory is "
                             "released while the trainer trains; set rollout.max_staleness=0")
        ws = self.weight_sync
        if ws.transport != "tensor" or ws.tensor_encoding != "sglang":
            raise ValueError(f"rollout.placement=colocated pushes weights by handle on the shared "
                             f"GPUs: set rollout.weight_sync.transport=tensor (got {ws.transport!r}) "
                             f"and rollout.weight_sync.tensor_encoding=sglang (got {ws.tensor_encoding!r})")

    def check_colocated_gpus(self, tp_size: int, gpus: int) -> None:
        """Colocated servers the trainer starts take GPUs [0, num_servers * tp_size) of the
        training node: ValueError naming the settings when they do not fit its `gpus`."""
        need = self.num_servers * tp_size
        if need > gpus:
            raise ValueError(f"rollout.placement=colocated: rollout.num_servers={self.num_servers} x server "
                             f"TP {tp_size} (rollout.weight_sync.server_tp_size) = {need} GPUs, but the "
                             f"training node has {gpus}; lower one of them")
