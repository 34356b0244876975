"""Per-GPU memory estimate of the Megatron policy for a model shape and TP x PP x CP x DP.

The model (all byte counts per GPU, for the most loaded pipeline stage):

* weights     P_stage * 2                 bf16 parameters of this stage's shard
* grads       P_stage * grad_bytes        megatron's main-grad buffer (fp32 by default)
* optimizer   P_stage * 12 / (dp * cp)    fp32 master copy + Adam m and v; the distributed
                                          optimizer shards them over the DP x CP group
                                          (megatron's `intra_dp_cp_group`); 12 * P_stage without it
* activations tokens * bytes/token/layer  bf16 tensors autograd keeps for backward (below)
* logits      chunk * V/tp * 10           bf16 logits + fp32 upcast + fp32 softmax of the
                                          vocab-parallel log-prob, for one chunk of tokens
* logits kept tokens * V/tp * 4           the output layer's bf16 logits of the whole
                                          micro-batch, kept for backward, and their bf16
                                          gradient (last stage only; chunking does not shrink them)
* weight sync bucket_bytes                one weight-sync bucket staged on the GPU (full bf16
                                          tensors gathered over TP before each push to the servers)
* overhead    fixed                       CUDA context, NCCL buffers, allocator fragmentation

P_stage = layers/pp * (layer matrices / tp + norms) + embedding/tp (first stage) + output/tp
(last stage). Tokens per GPU per micro-batch = seq_len * micro_batch / cp (CP splits the
sequence). With sequence parallelism (on whenever tp > 1) the residual-stream tensors are split
over tp as well. Flash attention keeps no [s, s] tensors, so per layer and token the bf16 tensors
saved for backward are: the layer input and the pre-MLP residual (2h each), the two norm
outputs (2h each), q/k/v (q + 2kv), the attention output (q), the gate/up outputs (2 ffn) and
the SwiGLU output (ffn): `2 * (4h + 2q + 2kv + 3ffn)` bytes, plus fp32 softmax statistics per
head. "selective" is megatron's selective recompute of `SELECTIVE_RECOMPUTE_MODULES`: core
attention (which flash attention already does not store) and the MLP, so the gate/up and SwiGLU
outputs (3 ffn) are not kept, and one layer's MLP is re-run at a time in backward. "full" recompute keeps each layer's input and
re-runs one layer at a time in backward. Under the 1F1B schedule pipeline stage i holds
min(pp - i, micro-batches) micro-batches in flight.
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass

from ctpo_megatron.cluster.model_dims import ModelDims
from ctpo_megatron.parallel.dims import ParallelDims

GIB = 1024 ** 3
RECOMPUTE_MODES = ("none", "selective", "full")
PARAM_BYTES = 2  # bf16 parameters
OPTIMIZER_BYTES = 12  # fp32 master param + Adam exp_avg + exp_avg_sq
LOGIT_ENTRY_BYTES = 10  # bf16 logits + fp32 upcast + fp32 softmax kept for backward
KEPT_LOGIT_BYTES = 4  # the micro-batch's bf16 logits saved for backward + their bf16 gradient
WEIGHT_SYNC_BUCKET_BYTES = 512 << 20  # rollout.weight_sync.bucket_bytes' default
SELECTIVE_RECOMPUTE_MODULES = ("core_attn", "mlp")
"""megatron `recompute_modules` of "selective" recompute (models.config.transformer_config; with
TE "core_attn" is left out: its flash attention keeps no [S, S] scores to save)."""
SOFTMAX_STAT_BYTES = 4  # flash attention's fp32 log-sum-exp per head and token


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU on the most loaded pipeline stage (fields are bytes unless named otherwise)."""

    weights: int
    """bf16 parameters of this GPU's shard."""
    grads: int
    """Gradient buffer (fp32 main grads by default)."""
    optimizer: int
    """fp32 master weights + Adam moments (sharded over DP x CP with the distributed optimizer)."""
    activations: int
    """Tensors saved for backward, all in-flight micro-batches of this stage."""
    logits: int
    """Vocab-parallel logits and log-softmax temporaries for one chunk (last stage only)."""
    logits_kept: int
    """The micro-batch's bf16 logits kept for backward plus their bf16 gradient (last stage)."""
    weight_sync: int
    """One weight-sync bucket staged on the GPU."""
    overhead: int
    """CUDA context, communication buffers, allocator fragmentation (fixed allowance)."""
    params_per_gpu: int
    """Parameters held by one GPU of this stage."""
    tokens_per_gpu: int
    """Tokens of one micro-batch on one GPU (seq_len * micro_batch / cp, or the token budget / cp)."""
    layers_per_stage: int
    """Transformer layers in one pipeline stage."""
    in_flight_microbatches: int
    """Micro-batches whose activations this stage holds at once (1F1B)."""
    stage: int
    """Pipeline stage these numbers belong to (the most loaded one)."""
    gpu_memory: int
    """Memory of one GPU the estimate is compared against."""

    @property
    def total(self) -> int:
        return (self.weights + self.grads + self.optimizer + self.activations + self.logits
                + self.logits_kept + self.weight_sync + self.overhead)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "fits": self.fits}

    def format(self) -> str:
        """A human-readable breakdown in GiB, one component per line."""
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", 1024 ** 2)
        rows = [("weights (bf16)", self.weights), ("grads", self.grads), ("optimizer", self.optimizer),
                ("activations", self.activations), ("logits chunk", self.logits),
                ("logits kept", self.logits_kept), ("weight sync", self.weight_sync),
                ("overhead", self.overhead)]
        lines = [f"  {name:<16}{value / scale:8.2f} {unit}" for name, value in rows]
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  {'total':<16}{self.total / scale:8.2f} {unit} of {self.gpu_memory / GIB:.0f} GiB: {verdict}")
        lines.append(f"  (pipeline stage {self.stage}: {self.layers_per_stage} layers, "
                     f"{self.params_per_gpu / 1e9:.3f} B params/GPU, {self.tokens_per_gpu} tokens/GPU "
                     f"per micro-batch, {self.in_flight_microbatches} micro-batch(es) in flight)")
        return "\n".join(lines)


def _layer_params_per_gpu(model: ModelDims, tp: int) -> int:
    # norm weights are replicated over TP; every matrix (and the qkv bias) is split
    norms = 2 * model.hidden_size + (2 * model.kv_channels if model.qk_norm else 0)
    return (model.params_per_layer - norms) // tp + norms


def _mlp_activation_bytes_per_token(model: ModelDims, tp: int) -> float:
    return 2 * (3 if model.gated_mlp else 2) * model.ffn_hidden_size / tp  # gate/up + SwiGLU out


def _layer_activation_bytes_per_token(model: ModelDims, tp: int, sequence_parallel: bool) -> float:
    h, q, kv = model.hidden_size, model.q_width, model.kv_width
    residual = 2 * 4 * h / (tp if sequence_parallel else 1)  # inputs, pre-MLP residual, 2 norm outs
    attention = 2 * (2 * q + 2 * kv) / tp + SOFTMAX_STAT_BYTES * model.num_attention_heads / tp
    return residual + attention + _mlp_activation_bytes_per_token(model, tp)


def estimate_memory(model_dims: ModelDims, parallel: ParallelDims, seq_len: int, micro_batch: int = 1, *,
                    recompute: str = "full", distributed_optimizer: bool = True,
                    logits_chunk_tokens: int = 0, num_microbatches: int | None = None,
                    sequence_parallel: bool | None = None, grad_bytes: int = 4,
                    weight_sync_bucket_bytes: int = WEIGHT_SYNC_BUCKET_BYTES,
                    gpu_memory_gib: float = 80.0, overhead_gib: float = 4.0,
                    micro_batch_tokens: int = 0) -> MemoryEstimate:
    """Estimates training memory per GPU for the most loaded pipeline stage.

    model_dims: the transformer shape. parallel: TP/PP/CP/DP sizes with dp resolved (>= 1).
    seq_len: tokens per sequence (prompt + response, e.g. 24576 = 16k + 8k). micro_batch:
    sequences per micro-batch. recompute: "none" | "selective" | "full" (see module docstring).
    logits_chunk_tokens: tokens per log-prob chunk; 0 = the whole micro-batch at once.
    num_microbatches: micro-batches per step (bounds the 1F1B in-flight count); None = >= pp.
    sequence_parallel: defaults to tp > 1. grad_bytes: 4 (fp32 main grads) or 2.
    weight_sync_bucket_bytes: one weight-sync bucket (`rollout.weight_sync.bucket_bytes`).
    micro_batch_tokens: the actor's token budget per micro-batch (`actor.micro_batch_tokens`);
    > 0 replaces micro_batch: a micro-batch holds at most max(budget, seq_len) tokens (a sample
    longer than the budget runs alone), split over CP.
    Raises ValueError naming the setting on invalid input.
    """
    if parallel.dp < 1:
        raise ValueError(f"parallel.dp={parallel.dp}: resolve it from the world size before estimating memory")
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={recompute!r}: expected one of {RECOMPUTE_MODES}")
    for name, value in (("seq_len", seq_len), ("micro_batch", micro_batch)):
        if value < 1:
            raise ValueError(f"{name}={value}: must be a positive integer")
    if seq_len % (2 * parallel.cp) and parallel.cp > 1:
        raise ValueError(f"seq_len={seq_len} is not divisible by 2*cp={2 * parallel.cp} "
                         "(context parallelism splits each sequence into 2*cp chunks)")
    if weight_sync_bucket_bytes < 0:
        raise ValueError(f"weight_sync_bucket_bytes={weight_sync_bucket_bytes}: must be >= 0")
    if micro_batch_tokens < 0:
        raise ValueError(f"micro_batch_tokens={micro_batch_tokens}: must be >= 0 (0 = micro_batch sequences)")
    if logits_chunk_tokens < 0:
        raise ValueError(f"logits_chunk_tokens={logits_chunk_tokens}: must be >= 0 (0 = unchunked)")
    parallel.check_model(num_attention_heads=model_dims.num_attention_heads,
                         num_query_groups=model_dims.num_query_groups, num_layers=model_dims.num_layers)
    tp, pp = parallel.tp, parallel.pp
    sp = tp > 1 if sequence_parallel is None else sequence_parallel
    layers = model_dims.num_layers // pp
    if micro_batch_tokens:
        tokens = -(-max(micro_batch_tokens, seq_len) // parallel.cp)
    else:
        tokens = seq_len * micro_batch // parallel.cp
    layer_act = _layer_activation_bytes_per_token(model_dims, tp, sp)
    mlp_act = _mlp_activation_bytes_per_token(model_dims, tp)
    layer_input = 2 * model_dims.hidden_size / (tp if sp else 1)
    vocab_shard = -(-model_dims.vocab_size // tp)
    opt_shards = parallel.dp * parallel.cp if distributed_optimizer else 1
    max_in_flight = pp if num_microbatches is None else min(pp, num_microbatches)

    best = None
    for stage in range(pp):
        first, last = stage == 0, stage == pp - 1
        params = layers * _layer_params_per_gpu(model_dims, tp)
        params += vocab_shard * model_dims.hidden_size * (int(first) + int(last))
        params += model_dims.hidden_size if last else 0  # final norm
        in_flight = max(1, min(max_in_flight, pp - stage))
        if recompute == "full":
            act = layers * layer_input * tokens * in_flight + layer_act * tokens
        elif recompute == "selective":  # MLP internals re-run one layer at a time in backward
            act = layers * (layer_act - mlp_act) * tokens * in_flight + mlp_act * tokens
        else:
            act = layers * layer_act * tokens * in_flight
        logit_tokens = min(logits_chunk_tokens, tokens) if logits_chunk_tokens else tokens
        estimate = MemoryEstimate(
            weights=params * PARAM_BYTES, grads=params * grad_bytes,
            optimizer=params * OPTIMIZER_BYTES // opt_shards, activations=int(act),
            logits=logit_tokens * vocab_shard * LOGIT_ENTRY_BYTES if last else 0,
            logits_kept=tokens * vocab_shard * KEPT_LOGIT_BYTES if last else 0,
            weight_sync=weight_sync_bucket_bytes,
            overhead=int(overhead_gib * GIB), params_per_gpu=params, tokens_per_gpu=tokens,
            layers_per_stage=layers, in_flight_microbatches=in_flight, stage=stage,
            gpu_memory=int(gpu_memory_gib * GIB))
        if best is None or estimate.total > best.total:
            best = estimate
    return best


def check_memory(estimate: MemoryEstimate, *, what: str = "the policy") -> None:
    """Raises ValueError with the breakdown when `estimate` does not fit the GPU."""
    if not estimate.fits:
        raise ValueError(f"{what} needs an estimated {estimate.total / GIB:.1f} GiB per GPU, more than "
                         f"{estimate.gpu_memory / GIB:.0f} GiB; raise parallel.tp/pp/cp, enable full "
                         f"recompute or chunk the logits:\n{estimate.format()}")


def check_colocated_memory(estimate: MemoryEstimate, mem_fraction: float) -> None:
    """Raises ValueError when servers colocated with the trainer (`rollout.placement=colocated`)
    cannot resume beside it: while they generate, the trainer keeps its weights, gradient
    buffers and optimizer state (and the fixed allowance) on the GPU, and each server takes
    `mem_fraction` (--mem-fraction-static) of it. During the update the servers have released
    their share (SGLang's memory saver), so the peak of `estimate` is checked by `check_memory`."""
    resident = estimate.weights + estimate.grads + estimate.optimizer + estimate.overhead
    servers = int(mem_fraction * estimate.gpu_memory)
    if resident + servers > estimate.gpu_memory:
        most = max(0.0, math.floor(100 * (1.0 - resident / estimate.gpu_memory)) / 100)  # a share that fits
        raise ValueError(
            f"rollout.placement=colocated: while the servers generate, the trainer keeps {resident / GIB:.1f} GiB "
            f"per GPU (weights, gradient buffers, optimizer state, allowance) and the servers take "
            f"--mem-fraction-static {mem_fraction:g} x {estimate.gpu_memory / GIB:.0f} GiB = {servers / GIB:.1f} GiB: "
            f"more than the GPU's {estimate.gpu_memory / GIB:.0f} GiB; set rollout.server_mem_fraction_static "
            f"<= {most:.2f}, or raise parallel.tp/pp or use the distributed optimizer")


@dataclass(frozen=True)
class RolloutMemory:
    """Per-GPU memory of one inference server (SGLang-style: weights + a static KV-cache pool)."""

    weights: int
    """bf16 weights per GPU (every matrix, embeddings included, split over the server's TP)."""
    kv_bytes_per_token: int
    """bf16 K and V of one token over all layers, on one GPU (KV heads split over TP, replicated
    when TP exceeds the number of KV heads)."""
    kv_tokens: int
    """Tokens the KV pool holds: (mem_fraction * GPU memory - weights) / kv_bytes_per_token."""


def estimate_rollout_memory(model_dims: ModelDims, tp: int, *, gpu_memory_gib: float = 80.0,
                            mem_fraction: float = 0.85) -> RolloutMemory:
    """Weights and KV-cache capacity of an inference server at tensor-parallel size `tp`.

    mem_fraction: share of GPU memory for weights + KV pool (SGLang's --mem-fraction-static).
    Raises ValueError when the weights alone exceed that share.
    """
    if tp < 1 or not 0 < mem_fraction <= 1:
        raise ValueError(f"tp={tp} must be >= 1 and mem_fraction={mem_fraction} in (0, 1]")
    weights = model_dims.total_params * PARAM_BYTES // tp
    kv_heads_per_gpu = -(-model_dims.num_query_groups // tp)
    kv_per_token = 2 * model_dims.num_layers * kv_heads_per_gpu * model_dims.kv_channels * PARAM_BYTES
    room = int(mem_fraction * gpu_memory_gib * GIB) - weights
    if room <= 0:
        raise ValueError(f"rollout server at tp={tp}: weights need {weights / GIB:.1f} GiB per GPU, more than "
                         f"mem_fraction {mem_fraction} x {gpu_memory_gib:.0f} GiB; raise "
                         "cluster.rollout_gpus_per_server")
    return RolloutMemory(weights=weights, kv_bytes_per_token=kv_per_token, kv_tokens=room // kv_per_token)
