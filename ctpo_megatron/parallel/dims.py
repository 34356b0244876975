"""Parallel sizes (TP x PP x CP x DP) and their validation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelDims:
    """Sizes of the parallel dimensions of the Megatron policy.

    Ranks are laid out by megatron's default order `tp-cp-ep-dp-pp` (TP fastest).
    """

    tp: int = 1
    """Tensor-parallel size: each layer's weights (and the vocabulary) split over tp ranks."""
    pp: int = 1
    """Pipeline-parallel size: layers split into pp stages."""
    cp: int = 1
    """Context-parallel size: each sequence split into 2*cp zigzag chunks over cp ranks."""
    dp: int = -1
    """Data-parallel size; -1 derives it from the world size in `resolve`."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name}={value!r}: must be a positive integer")
        if not isinstance(self.dp, int) or (self.dp < 1 and self.dp != -1):
            raise ValueError(f"parallel.dp={self.dp!r}: must be a positive integer or -1 (derive)")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    def resolve(self, world_size: int) -> "ParallelDims":
        """Returns a copy with dp derived from `world_size`, after checking the sizes fit."""
        mp = self.model_parallel_size
        if world_size % mp != 0:
            raise ValueError(
                f"Invalid parallel dims: world size {world_size} is not a multiple of "
                f"tp({self.tp}) * pp({self.pp}) * cp({self.cp}) = {mp}")
        dp = world_size // mp
        if self.dp != -1 and self.dp != dp:
            raise ValueError(
                f"Invalid parallel dims: tp({self.tp}) * pp({self.pp}) * cp({self.cp}) * "
                f"dp({self.dp}) = {mp * self.dp} != world size ({world_size})")
        return ParallelDims(tp=self.tp, pp=self.pp, cp=self.cp, dp=dp)

    def check_model(self, *, num_attention_heads: int, num_query_groups: int, num_layers: int,
                    vocab_size: int | None = None) -> None:
        """Raises ValueError naming the setting when the model cannot be split this way."""
        if num_attention_heads % self.tp:
            raise ValueError(f"tp={self.tp} does not divide num_attention_heads={num_attention_heads}")
        if num_query_groups % self.tp:
            raise ValueError(f"tp={self.tp} does not divide num_key_value_heads={num_query_groups}")
        if num_layers % self.pp:
            raise ValueError(f"pp={self.pp} does not divide num_hidden_layers={num_layers}")
        if vocab_size is not None and vocab_size % self.tp:
            raise ValueError(f"tp={self.tp} does not divide vocab_size={vocab_size} "
                             "(pad the vocabulary to a multiple of tp)")
