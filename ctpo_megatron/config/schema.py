"""The top-level training config: one dataclass tree, registered in Hydra's ConfigStore.

The dataclasses are the single source of truth (defaults = the paper's setup); the YAML files
under `configs/` only override fields. `python -m ctpo_megatron.train` converts the composed
DictConfig once with `OmegaConf.to_object`, which runs every `__post_init__` check; below the
entry point code sees only these typed objects.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ctpo_megatron.actor.config import ActorConfig
from ctpo_megatron.algo.config import PolicyLossConfig
from ctpo_megatron.algo.correction import RolloutCorrectionConfig
from ctpo_megatron.cluster.config import ClusterConfig
from ctpo_megatron.config.data import DataConfig
from ctpo_megatron.config.model import ModelConfig, ParallelConfig
from ctpo_megatron.config.rollout import RolloutConfig
from ctpo_megatron.config.trainer import TrainerConfig
from ctpo_megatron.parallel.dims import ParallelDims


@dataclass
class TrainConfig:
    """Everything a CTPO run needs. Hydra groups: model, parallel, algo, rollout, data, cluster."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model (group `model`: tiny, qwen3_14b, qwen3_32b, qwen2.5_32b)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP x PP x CP x DP layout of the Megatron policy (group `parallel`)."""
    algo: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    """Policy loss: CTPO or a baseline (group `algo`: ctpo, ctpo_geomean, grpo, gspo, ...)."""
    correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    """Rollout/trainer mismatch correction (truncated sequence-level IS at 5.0 by default)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Servers, sampling, tool turns, weight sync (group `rollout`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and held-out prompt sets (group `data`)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The RL loop: batch sizes, schedule, evaluation, checkpoints, logging."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """Megatron policy: optimizer (lr 1e-6, Adam, grad clip), micro-batch size, log-prob chunking.
    `actor.hf_model_dir`, `actor.dims`, `actor.params_dtype`, `actor.temperature`,
    `actor.use_distributed_optimizer` and `actor.sequence_parallel` are derived from model,
    parallel and rollout (`actor_config`); setting one of them to another value is an error."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Slurm layout of the job (group `cluster`: nodes, roles, Slurm options, environment),
    composed by the launcher (`bash launch/ctpo_32b.sh`) with the rest of this config and passed
    to the trainer with the same overrides. The trainer reads `cluster.memory_overhead_gib` for
    its start-up memory check; the memory estimate reads the model/parallel/actor settings."""

    def __post_init__(self) -> None:
        budget = self.rollout.max_prompt_len + self.rollout.max_response_len
        if budget > self.model.max_position_embeddings:
            raise ValueError(
                f"rollout.max_prompt_len ({self.rollout.max_prompt_len}) + rollout.max_response_len "
                f"({self.rollout.max_response_len}) = {budget} exceeds the context of model "
                f"{self.model.name}: model.max_position_embeddings={self.model.max_position_embeddings}")
        if self.correction.enabled and self.trainer.old_log_probs == "rollout":
            raise ValueError("correction.enabled=true needs trainer.old_log_probs=actor: with the "
                             "rollout's log-probs as old log-probs there is no mismatch to correct "
                             "(set correction.enabled=false)")
        from ctpo_megatron.actor.context_parallel import check_context_parallel_loss

        check_context_parallel_loss(self.algo, self.parallel.cp)  # a loss CP can split, or a clear error
        self._check_derived()

    def derived_actor_fields(self) -> dict[str, tuple[Any, str]]:
        """actor field -> (value derived from the other sections, the setting it comes from)."""
        return {
            "hf_model_dir": (self.model.path, "model.path"),
            "dims": (self.parallel.dims(), "parallel.tp/pp/cp/dp"),
            "params_dtype": (self.model.dtype, "model.dtype"),
            "use_distributed_optimizer": (self.parallel.distributed_optimizer, "parallel.distributed_optimizer"),
            "sequence_parallel": (self.parallel.sequence_parallel, "parallel.sequence_parallel"),
            "temperature": (self.rollout.temperature, "rollout.temperature"),
        }

    def _check_derived(self) -> None:
        defaults = ActorConfig()
        for name, (value, source) in self.derived_actor_fields().items():
            given = getattr(self.actor, name)
            if given != getattr(defaults, name) and given != value:
                raise ValueError(f"actor.{name}={given!r} conflicts with {source}: it is derived from "
                                 f"{source} ({value!r}); set {source} instead")

    def actor_config(self, dims: ParallelDims) -> ActorConfig:
        """The actor's settings: `actor` with the derived fields computed (`dims`: the resolved
        parallel sizes), and activation recomputation on if model or actor asks for it."""
        derived = {name: value for name, (value, _) in self.derived_actor_fields().items()}
        derived["dims"] = dims
        by_model = self.model.recompute_activations
        return dataclasses.replace(self.actor, **derived,
                                   recompute=by_model or self.actor.recompute,
                                   recompute_granularity=(self.model.recompute_granularity if by_model
                                                          else self.actor.recompute_granularity),
                                   allow_local_spec=self.model.allow_local_spec or self.actor.allow_local_spec)

    def check_inputs(self) -> None:
        """Start-up checks of the files the run reads (model checkpoint, prompt files) and of the
        packages the chosen loggers need.

        Raises ValueError naming the setting when a path is empty or missing.
        """
        if not self.model.path:
            raise ValueError(f"model.path is empty: pass model.path=<HF checkpoint dir> for model "
                             f"{self.model.name} (the tiny launcher builds one for model=tiny)")
        if not os.path.isfile(os.path.join(self.model.path, "config.json")):
            raise ValueError(f"model.path={self.model.path!r} has no config.json (not a Hugging Face "
                             "checkpoint directory)")
        self.trainer.check_loggers_installed()
        if not self.data.train_files:
            raise ValueError("data.train_files is empty: pass data.train_files=[a.parquet,...]")
        for name in ("train_files", "val_files"):
            for path in getattr(self.data, name):
                if not os.path.isfile(path):
                    raise ValueError(f"data.{name}: {path!r} does not exist")

    def validate(self, world_size: int) -> ParallelDims:
        """Start-up checks that need the world size; returns the resolved parallel dims.

        Raises ValueError naming the settings (TP x PP x CP x DP vs world size, TP vs heads,
        PP vs layers, DP vs batch sizes) before any collective runs.
        """
        dims = self.parallel.check(self.model, world_size)
        per_update = self.trainer.mini_batch_prompts * self.rollout.n_samples
        if per_update % dims.dp:
            raise ValueError(
                f"trainer.mini_batch_prompts ({self.trainer.mini_batch_prompts}) x rollout.n_samples "
                f"({self.rollout.n_samples}) = {per_update} trajectories per update is not divisible "
                f"by the data-parallel size dp={dims.dp} (world size {world_size} / "
                f"(tp {dims.tp} x pp {dims.pp} x cp {dims.cp}))")
        return dims
