"""Model and parallel-layout settings (Hydra groups `model` and `parallel`)."""

from __future__ import annotations

from dataclasses import dataclass

from ctpo_megatron.parallel.dims import ParallelDims


@dataclass
class ModelConfig:
    """Which policy model is trained, and its architecture sizes.

    The sizes duplicate the HF `config.json` on purpose: the launcher's dry run and the start-up
    checks use them before the checkpoint is read; `check_against_hf` verifies they agree.
    """

    name: str = "tiny"
    """Short name used in logs and run directories (e.g. `qwen3_32b`)."""
    path: str = ""
    """Hugging Face checkpoint directory (config.json, safetensors, tokenizer) the run starts
    from. Empty for `model=tiny`: the tiny run builds and warm-starts its own checkpoint."""
    tokenizer_path: str = ""
    """Tokenizer directory; empty means `path`."""
    arch: str = "qwen2"
    """HF architecture family: `qwen2` (Qwen2/Qwen2.5) or `qwen3`."""
    num_layers: int = 4
    """Transformer layers (HF num_hidden_layers)."""
    hidden_size: int = 128
    """Model width (HF hidden_size)."""
    ffn_hidden_size: int = 256
    """MLP width (HF intermediate_size)."""
    num_attention_heads: int = 4
    """Query heads (HF num_attention_heads)."""
    head_dim: int = 0
    """Per-head width (HF head_dim; Megatron kv_channels); 0 means hidden_size / num_attention_heads."""
    num_query_groups: int = 2
    """Key/value heads (HF num_key_value_heads)."""
    vocab_size: int = 128
    """Embedding rows (HF vocab_size, already padded)."""
    max_position_embeddings: int = 1024
    """Longest sequence the model supports, tokens; prompt + response must fit."""
    dtype: str = "float32"
    """Parameter/compute dtype of the actor and the embedded servers: `float32` (CPU) or
    `bfloat16` (GPU). float16 is not supported (no loss scaling in the actor)."""
    recompute_activations: bool = False
    """Full activation recomputation in every layer (needed at 32B with 24k-token contexts)."""
    recompute_granularity: str = "full"
    """With recompute_activations: `full` (each layer re-run in backward, only its input kept) or
    `selective` (megatron re-runs core attention and the MLP only: more memory, less compute)."""
    allow_local_spec: bool = False
    """On a GPU without TransformerEngine, run megatron's local spec (unfused attention, a full
    [S, S] score matrix per layer) instead of refusing to start. Short sequences and tests only."""

    def __post_init__(self) -> None:
        if self.arch not in ("qwen2", "qwen3"):
            raise ValueError(f"model.arch={self.arch!r}: expected 'qwen2' or 'qwen3'")
        if self.recompute_granularity not in ("full", "selective"):
            raise ValueError(f"model.recompute_granularity={self.recompute_granularity!r}: expected "
                             "'full' or 'selective'")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.dtype={self.dtype!r}: expected float32 or bfloat16 (float16 "
                             "is not supported: the actor has no loss scaling)")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)!r} must be >= 1")
        if self.head_dim == 0 and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.num_attention_heads={self.num_attention_heads} does not divide "
                             f"model.hidden_size={self.hidden_size}; set model.head_dim")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"model.num_query_groups={self.num_query_groups} does not divide "
                             f"model.num_attention_heads={self.num_attention_heads}")

    def check_against_hf(self, hf_config) -> None:
        """Raises ValueError naming the field where `hf_config` (a transformers config) differs."""
        pairs = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
                 "ffn_hidden_size": "intermediate_size", "num_attention_heads": "num_attention_heads",
                 "num_query_groups": "num_key_value_heads", "vocab_size": "vocab_size",
                 "max_position_embeddings": "max_position_embeddings"}
        for ours, theirs in pairs.items():
            value = getattr(hf_config, theirs, None)
            if value is not None and value != getattr(self, ours):
                raise ValueError(f"model.{ours}={getattr(self, ours)} but the checkpoint's "
                                 f"config.json has {theirs}={value} (model.path={self.path!r})")


@dataclass
class ParallelConfig:
    """Parallel layout of the Megatron policy; world size = tp * pp * cp * dp."""

    tp: int = 1
    """Tensor-parallel size; divides attention heads, key/value heads and the vocabulary."""
    pp: int = 1
    """Pipeline-parallel size; divides the number of layers."""
    cp: int = 1
    """Context-parallel size (zigzag split of every sequence over 2*cp chunks)."""
    dp: int = -1
    """Data-parallel size; -1 derives it from the world size."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (shards layer-norm/dropout activations over TP; needs tp > 1)."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron DistributedOptimizer)."""

    def __post_init__(self) -> None:
        self.dims()  # validates the sizes
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tp > 1")

    def dims(self) -> ParallelDims:
        """The sizes as a `ParallelDims` (dp possibly still -1)."""
        return ParallelDims(tp=self.tp, pp=self.pp, cp=self.cp, dp=self.dp)

    def check(self, model: ModelConfig, world_size: int) -> ParallelDims:
        """Validates the layout against `model` and `world_size`; returns the resolved dims."""
        dims = self.dims().resolve(world_size)
        try:
            dims.check_model(num_attention_heads=model.num_attention_heads,
                             num_query_groups=model.num_query_groups, num_layers=model.num_layers,
                             vocab_size=model.vocab_size)
        except ValueError as e:
            raise ValueError(f"parallel.{e} (model={model.name})") from None
        return dims
