"""Configuration of the Megatron policy actor."""

from __future__ import annotations

from dataclasses import dataclass, field

from ctpo_megatron.parallel.dims import ParallelDims


@dataclass
class ActorConfig:
    """What `PolicyActor` builds: model, parallel layout, optimizer and batching."""

    hf_model_dir: str = ""
    """HF checkpoint directory (config.json + safetensors) the policy starts from."""
    dims: ParallelDims = field(default_factory=ParallelDims)
    """Parallel sizes; dp=-1 derives DP from the world size."""
    params_dtype: str = "float32"
    """Model parameter dtype: "float32" or "bfloat16" (bf16 keeps fp32 main params and grads
    in the optimizer)."""
    lr: float = 1e-6
    """Learning rate (constant unless the trainer calls `PolicyActor.set_lr`)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam (beta1, beta2)."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    optimizer: str = "adam"
    """"adam" or "sgd" (SGD with momentum `sgd_momentum`; needs use_distributed_optimizer=False)."""
    sgd_momentum: float = 0.0
    """SGD momentum when optimizer="sgd"."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    micro_batch_size: int = 1
    """Samples per micro-batch in the forward/backward schedule (when micro_batch_tokens is 0)."""
    micro_batch_tokens: int = 0
    """Token budget per micro-batch (0: fixed micro-batches of micro_batch_size samples, under
    PP all padded to the share's longest sample). > 0: the share's samples sorted by length
    fill micro-batches while samples x own longest (padded; packed: sum of lengths) stays within
    it, each padded only to its own longest; a longer sample runs alone. Under PP megatron then
    exchanges each micro-batch's shape (variable_seq_lengths). See `actor/token_budget.py`."""
    pack_sequences: bool = False
    """With micro_batch_tokens: pack each micro-batch's samples into one row without padding
    (THD + PackedSeqParams on TransformerEngine; a block-diagonal causal mask on CPU). Not with
    context parallelism, not on a GPU without TransformerEngine."""
    temperature: float = 1.0
    """Sampling temperature the log-probs are computed at (logits / temperature)."""
    logprob_chunk_size: int = 1024
    """Tokens per chunk in the vocab-parallel log-prob/entropy kernel (bounds fp32
    temporaries to chunk x V/tp)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over DP (megatron DistributedOptimizer)."""
    seed: int = 1234
    """Seed of megatron's model-parallel RNG tracker."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: activations outside the TP regions (norms, residuals,
    dropout) are split over TP along the sequence (activation memory / tp there). Needs
    dims.tp > 1; micro-batches are right-padded to a multiple of tp (padding is never scored)."""
    cp_comm_type: str = "p2p"
    """Under context parallelism (dims.cp > 1) on TransformerEngine: how its attention exchanges
    K/V ("p2p", "all_gather", "a2a", "a2a+p2p"). Megatron's local spec (no TE) always uses the
    exact all-gather attention of `models.cp_attention`."""
    recompute: bool = False
    """Activation recomputation in backward (less memory, more compute), of the kind below."""
    recompute_granularity: str = "full"
    """With recompute: "full" (every layer re-run, only its input kept; ~1/3 more compute) or
    "selective" (megatron re-runs core attention and the MLP only)."""
    make_vocab_size_divisible_by: int = 128
    """The vocabulary is padded to a multiple of this times tp; padded entries are masked out."""
    allow_local_spec: bool = False
    """Run megatron's local (pure torch) layer spec on a GPU when TransformerEngine is missing,
    instead of refusing to start (`models.builder.choose_layer_spec`). CPU mode always runs it."""
    transformer_overrides: dict = field(default_factory=dict)
    """Rarely used megatron TransformerConfig fields, applied last (names are validated)."""

    def __post_init__(self) -> None:
        if isinstance(self.dims, dict):
            self.dims = ParallelDims(**self.dims)
        if self.params_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"actor.params_dtype={self.params_dtype!r}: expected float32 or bfloat16")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"actor.optimizer={self.optimizer!r}: expected adam or sgd")
        if self.optimizer == "sgd" and self.use_distributed_optimizer:
            raise ValueError("actor.optimizer='sgd' needs actor.use_distributed_optimizer=False "
                             "(megatron's DistributedOptimizer only wraps Adam)")
        for name in ("micro_batch_size", "logprob_chunk_size", "make_vocab_size_divisible_by"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"actor.{name}={getattr(self, name)!r}: must be >= 1")
        if self.micro_batch_tokens is None:  # YAML `null`: the fixed micro-batches
            self.micro_batch_tokens = 0
        if int(self.micro_batch_tokens) < 0:
            raise ValueError(f"actor.micro_batch_tokens={self.micro_batch_tokens!r}: must be >= 0 "
                             "(0: fixed micro-batches of actor.micro_batch_size samples)")
        if self.pack_sequences and not self.micro_batch_tokens:
            raise ValueError("actor.pack_sequences=true needs actor.micro_batch_tokens > 0 (the "
                             "tokens of one packed row)")
        if self.pack_sequences and self.dims.cp != 1:
            raise ValueError(f"actor.pack_sequences=true is not supported under context parallelism "
                             f"(parallel.cp={self.dims.cp}): the zigzag split needs padded rows; "
                             "set actor.pack_sequences=false (the token budget still applies)")
        if self.sequence_parallel and self.dims.tp < 2:
            raise ValueError(f"actor.sequence_parallel=True needs tp > 1 (parallel.tp={self.dims.tp}); "
                             "set parallel.sequence_parallel=false")
        if self.recompute_granularity not in ("full", "selective"):
            raise ValueError(f"actor.recompute_granularity={self.recompute_granularity!r}: expected "
                             "'full' or 'selective'")
        from ctpo_megatron.models.config import CP_COMM_TYPES

        if self.cp_comm_type not in CP_COMM_TYPES:
            raise ValueError(f"actor.cp_comm_type={self.cp_comm_type!r}: expected one of {CP_COMM_TYPES}")
        if self.temperature <= 0:
            raise ValueError(f"actor.temperature={self.temperature!r}: must be > 0")
        if self.lr < 0 or self.clip_grad < 0 or self.weight_decay < 0:
            raise ValueError("actor.lr, actor.clip_grad and actor.weight_decay must be >= 0")
        if len(tuple(self.adam_betas)) != 2:
            raise ValueError(f"actor.adam_betas={self.adam_betas!r}: expected (beta1, beta2)")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
