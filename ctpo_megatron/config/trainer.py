"""Settings of the RL loop itself (Hydra group-less `trainer` section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ctpo_megatron.trainer.deadline import DeadlineConfig

OLD_LOG_PROB_SOURCES = ("actor", "rollout")
LOGGERS = ("jsonl", "tensorboard", "wandb")
WANDB_MODES = ("", "online", "offline", "disabled")


@dataclass
class WandbConfig:
    """Weights & Biases run settings (used when `trainer.loggers` lists `wandb`)."""

    project: str = "ctpo"
    """W&B project."""
    entity: str = ""
    """W&B team or user; empty: the default entity of the logged-in account."""
    name: str = ""
    """Run name shown in W&B; empty: the run directory's name."""
    group: str = ""
    """Run group (e.g. one per sweep or per model size)."""
    tags: list[str] = field(default_factory=list)
    """Run tags."""
    mode: str = ""
    """`online`, `offline` (no network: sync later with `wandb sync RUN_DIR/wandb/offline-run-*`)
    or `disabled`; empty: $WANDB_MODE, else online."""
    log_plots: bool = True
    """At the end of the run, also log the PNG plots of `python -m ctpo_megatron.plot` as images."""

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(f"trainer.wandb.mode={self.mode!r}: expected one of online, offline, "
                             "disabled (or empty)")


@dataclass
class TrainerConfig:
    """Step sizes, schedule, evaluation, checkpoints. Paper defaults."""

    run_dir: str = "runs/ctpo"
    """Directory of this run: resolved config, metrics.jsonl, TensorBoard events, checkpoints,
    plots. A run restarted with the same run_dir resumes from `checkpoints/latest`."""
    total_steps: int = 200
    """RL steps (each: rollouts for `prompts_per_step` prompts, then the updates)."""
    prompts_per_step: int = 512
    """Prompts per RL step (x rollout.n_samples trajectories)."""
    mini_batch_prompts: int = 32
    """Prompts per optimizer update; prompts_per_step / mini_batch_prompts updates per step."""
    epochs_per_step: int = 1
    """Passes over the step's trajectories (PPO epochs)."""
    old_log_probs: str = "actor"
    """Old log-probs of the ratio: `actor` (recomputed by the trainer before the updates) or
    `rollout` (the inference engine's sampling log-probs; skips one forward pass)."""
    norm_adv_by_std: bool = True
    """GRPO: divide the group-centered reward by the group std (false: Dr.GRPO)."""
    seed: int = 1
    """Seed of data order, sampling seeds and every RNG the trainer owns."""
    eval_every: int = 10
    """Evaluate on the held-out set every this many steps (0: never); also before step 1 and
    after the last step."""
    eval_samples: int = 4
    """k of mean@k: responses per held-out prompt; accuracy is the mean over all of them."""
    eval_temperature: float = 1.0
    """Sampling temperature of the evaluation."""
    save_every: int = 10
    """Checkpoint every this many steps (and after the last); 0: only after the last."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (older ones are deleted after a newer one is complete)."""
    log_every: int = 1
    """Log a progress line every this many steps."""
    loggers: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    """Where step metrics go: `jsonl` (`metrics.jsonl`, always needed: resume and the plots read
    it), `tensorboard` (`RUN_DIR/tensorboard/`), `wandb` (Weights & Biases, see `wandb`; needs
    the `wandb` package). E.g. `trainer.loggers=[jsonl,tensorboard,wandb]`."""
    tensorboard: Optional[bool] = None
    """Older switch for the TensorBoard logger, kept for existing command lines: true/false
    adds/removes `tensorboard` in `loggers`; null (default): `loggers` decides."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases project, run name, group, tags, mode (with `wandb` in `loggers`)."""
    clip_position_bins: int = 16
    """Token-position bins of the clip-rate-by-position metric."""
    dump_every: int = 0
    """Write per-token log-ratio dumps (`<run_dir>/token_dumps/`, read by
    `python -m ctpo_megatron.plot`) every this many steps (0: never)."""
    dump_max_tokens: int = 2_000_000
    """Most tokens per dump file (whole sequences kept, seeded choice): ~20 MB compressed."""
    collective_timeout_minutes: int = 120
    """Timeout of torch.distributed collectives, minutes. Ranks other than 0 wait in a
    broadcast while rank 0 runs a step's rollouts, so it must exceed the longest rollout."""
    deadline: DeadlineConfig = field(default_factory=DeadlineConfig)
    """When to stop before the job's end (Slurm time limit or a configured end): see
    `ctpo_megatron.trainer.deadline`."""

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"trainer.total_steps={self.total_steps} must be >= 1")
        if self.prompts_per_step < 1 or self.mini_batch_prompts < 1:
            raise ValueError("trainer.prompts_per_step and trainer.mini_batch_prompts must be >= 1")
        if self.prompts_per_step % self.mini_batch_prompts:
            raise ValueError(f"trainer.mini_batch_prompts={self.mini_batch_prompts} does not divide "
                             f"trainer.prompts_per_step={self.prompts_per_step}")
        if self.old_log_probs not in OLD_LOG_PROB_SOURCES:
            raise ValueError(f"trainer.old_log_probs={self.old_log_probs!r}: expected one of "
                             f"{OLD_LOG_PROB_SOURCES}")
        self._check_loggers()
        for name in ("eval_every", "save_every", "epochs_per_step", "eval_samples", "log_every",
                     "keep_checkpoints", "clip_position_bins", "collective_timeout_minutes", "dump_every",
                     "dump_max_tokens"):
            if getattr(self, name) < 0 or (name not in ("eval_every", "save_every", "dump_every")
                                           and getattr(self, name) < 1):
                raise ValueError(f"trainer.{name}={getattr(self, name)} is out of range")

    def _check_loggers(self) -> None:
        self.loggers = list(self.loggers)
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            raise ValueError(f"trainer.loggers: unknown {unknown}; expected some of {list(LOGGERS)}")
        if "jsonl" not in self.loggers:
            raise ValueError(f"trainer.loggers={self.loggers} must include jsonl: resuming and the "
                             "plots read metrics.jsonl")
        if self.tensorboard is not None:  # the older boolean switch wins where it is set
            if self.tensorboard and "tensorboard" not in self.loggers:
                self.loggers.append("tensorboard")
            elif not self.tensorboard and "tensorboard" in self.loggers:
                self.loggers.remove("tensorboard")
        # `tensorboard` itself stays as given: OmegaConf builds the schema from a default
        # instance, so a value set here would become the default of every config.

    def check_loggers_installed(self) -> None:
        """Raises ValueError when a logger in `loggers` needs a package that is not installed."""
        import importlib.util

        if "wandb" in self.loggers and importlib.util.find_spec("wandb") is None:
            raise ValueError("trainer.loggers includes wandb, but the wandb package is not "
                             "installed: pip install wandb (or the ctpo_megatron[wandb] extra), "
                             "or drop wandb from trainer.loggers")

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per RL step."""
        return self.epochs_per_step * self.prompts_per_step // self.mini_batch_prompts
