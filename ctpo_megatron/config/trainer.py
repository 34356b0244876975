"""Settings of the RL loop itself (Hydra group-less `trainer` section)."""

from __future__ import annotations

from dataclasses import dataclass

OLD_LOG_PROB_SOURCES = ("actor", "rollout")


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
    tensorboard: bool = True
    """Also write metrics as TensorBoard events (metrics.jsonl is always written)."""
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
        for name in ("eval_every", "save_every", "epochs_per_step", "eval_samples", "log_every",
                     "keep_checkpoints", "clip_position_bins", "collective_timeout_minutes", "dump_every",
                     "dump_max_tokens"):
            if getattr(self, name) < 0 or (name not in ("eval_every", "save_every", "dump_every")
                                           and getattr(self, name) < 1):
                raise ValueError(f"trainer.{name}={getattr(self, name)} is out of range")

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per RL step."""
        return self.epochs_per_step * self.prompts_per_step // self.mini_batch_prompts
