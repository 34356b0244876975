"""Prompt-set settings (Hydra group `data`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    """Training and held-out prompt sets: parquet or jsonl, verl-style rows accepted as they are."""

    train_files: list[str] = field(default_factory=list)
    """Training prompt files (.parquet / .jsonl). Empty for `data=tiny_arith`: generated in the run dir."""
    val_files: list[str] = field(default_factory=list)
    """Held-out prompt files for the periodic evaluation."""
    prompt_key: str = "prompt"
    """Column with the prompt: a list of chat messages ({role, content}) or a plain string."""
    ground_truth_key: str = "reward_model.ground_truth"
    """Dotted path of the ground-truth answer inside a row (verl: reward_model.ground_truth)."""
    data_source_key: str = "data_source"
    """Column naming the dataset a row comes from (metrics are also reported per source)."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch (seeded by trainer.seed and the epoch)."""
    max_val_prompts: int = -1
    """Evaluate on at most this many held-out prompts (-1: all)."""
    synthetic_train_size: int = 2000
    """`data=tiny_arith` only: number of generated training problems."""
    synthetic_val_size: int = 64
    """`data=tiny_arith` only: number of generated held-out problems (disjoint from training)."""

    def __post_init__(self) -> None:
        for name in ("train_files", "val_files"):
            for path in getattr(self, name):
                if not str(path).endswith((".parquet", ".jsonl", ".json")):
                    raise ValueError(f"data.{name}: {path!r} is not a .parquet or .jsonl file")
