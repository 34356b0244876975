"""Hugging Face config -> megatron-core `TransformerConfig` for the supported decoder families.

Supported: Llama (incl. Llama-3 RoPE scaling), Qwen2/Qwen2.5 (QKV bias), Qwen3 (QK RMSNorm, no
bias), with grouped-query attention and tied or untied embeddings. Anything else fails with a
`ValueError` naming the architecture or setting, before any collective runs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from ctpo_megatron.parallel.dims import ParallelDims

logger = logging.getLogger(__name__)

# HF architecture name -> family. The families differ only in biases and QK norm.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
CP_COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")
"""TransformerEngine's context-parallel communication schemes (megatron `cp_comm_type`)."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """What the builder and the checkpoint converter need to know about one HF model."""

    family: str
    """One of `ARCHITECTURES`' values: llama, qwen2, qwen3."""
    num_layers: int
    """Decoder layers in the whole model (all PP stages)."""
    hidden_size: int
    """H: model width."""
    ffn_hidden_size: int
    """Intermediate size of the gated MLP (gate and up projections each have this many rows)."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (GQA groups); equals num_attention_heads without GQA."""
    head_dim: int
    """Per-head channels (`kv_channels` in megatron)."""
    vocab_size: int
    """V: the tokenizer's vocabulary as stored in the HF checkpoint."""
    padded_vocab_size: int
    """Vocabulary padded to a multiple of make_vocab_size_divisible_by * tp; rows past
    `vocab_size` are zero and masked out of log-probs."""
    tie_word_embeddings: bool
    """Whether lm_head shares the input embedding matrix."""
    qkv_bias: bool
    """Whether q/k/v projections have a bias (Qwen2)."""
    qk_layernorm: bool
    """Whether queries and keys are RMS-normalized per head before RoPE (Qwen3)."""
    norm_eps: float
    """RMSNorm epsilon."""
    max_position_embeddings: int
    """Longest sequence the RoPE tables are built for."""
    rope_theta: float
    """RoPE base."""
    rope_inv_freq: torch.Tensor
    """[head_dim / 2] float32 — RoPE inverse frequencies computed the way transformers does,
    scaling included; loaded into megatron's rotary module after it is built."""


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default) if getattr(cfg, name, None) is not None else default


def _rope_parameters(hf_config: Any) -> dict:
    """Returns transformers-5 style `rope_parameters` also for 4.x configs (rope_theta/rope_scaling)."""
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        return dict(params)
    scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    scaling.setdefault("rope_theta", _get(hf_config, "rope_theta", 10000.0))
    return scaling


def _rope_inv_freq(hf_config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    params = _rope_parameters(hf_config)
    rope_type = params.get("rope_type", "default")
    base = float(params.get("rope_theta", 10000.0))
    partial = float(_get(hf_config, "partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial}: only full rotary embeddings are supported")
    if rope_type == "default":
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        return inv_freq, base
    if rope_type == "dynamic":
        raise ValueError("rope_scaling type 'dynamic' changes frequencies at run time; not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_scaling type {rope_type!r} is unknown to this transformers version")
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    if not math.isclose(float(attention_scaling), 1.0):
        # megatron's rotary module has no cos/sin post-scaling (used by yarn/longrope).
        raise ValueError(f"rope_scaling type {rope_type!r} scales attention by {attention_scaling}; "
                         "not supported")
    return inv_freq.float(), base


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int) -> int:
    """Megatron's padding rule: round up to a multiple of divisible_by * tp."""
    multiple = max(divisible_by, 1) * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def model_spec_from_hf(hf_config: Any, dims: ParallelDims, *,
                       make_vocab_size_divisible_by: int = 128) -> ModelSpec:
    """Reads an HF `PretrainedConfig` and checks it can be split as `dims` asks.

    Raises ValueError naming the architecture or the setting that does not fit.
    """
    archs = list(_get(hf_config, "architectures", []) or [])
    family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if family is None:
        model_type = _get(hf_config, "model_type", "?")
        raise ValueError(f"unsupported architecture {archs or model_type!r}: supported are "
                         f"{sorted(ARCHITECTURES)}")
    if family == "llama" and (_get(hf_config, "attention_bias", False) or _get(hf_config, "mlp_bias", False)):
        raise ValueError("Llama with attention_bias/mlp_bias=True is not supported")
    act = _get(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r}: only 'silu' (SwiGLU MLP) is supported")
    heads = int(hf_config.num_attention_heads)
    groups = int(_get(hf_config, "num_key_value_heads", heads))
    head_dim = int(_get(hf_config, "head_dim", hf_config.hidden_size // heads))
    layers = int(hf_config.num_hidden_layers)
    dims.check_model(num_attention_heads=heads, num_query_groups=groups, num_layers=layers)
    if family == "qwen3" and _get(hf_config, "attention_bias", False):
        raise ValueError("Qwen3 with attention_bias=True is not supported")
    if family in ("qwen2", "qwen3") and _get(hf_config, "use_sliding_window", False):
        raise ValueError(f"{family} use_sliding_window=True is not supported")
    inv_freq, base = _rope_inv_freq(hf_config, head_dim)
    vocab = int(hf_config.vocab_size)
    return ModelSpec(
        family=family, num_layers=layers, hidden_size=int(hf_config.hidden_size),
        ffn_hidden_size=int(hf_config.intermediate_size), num_attention_heads=heads,
        num_query_groups=groups, head_dim=head_dim, vocab_size=vocab,
        padded_vocab_size=padded_vocab_size(vocab, dims.tp, make_vocab_size_divisible_by),
        tie_word_embeddings=bool(_get(hf_config, "tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_layernorm=family == "qwen3", norm_eps=float(_get(hf_config, "rms_norm_eps", 1e-6)),
        max_position_embeddings=int(_get(hf_config, "max_position_embeddings", 4096)),
        rope_theta=base, rope_inv_freq=inv_freq)


def have_wgrad_accumulation_kernel() -> bool:
    """Whether APEX's `fused_weight_gradient_mlp_cuda` imports: megatron's own linear layers (the
    output layer, also under the TE spec) refuse gradient-accumulation fusion without it."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or built for another torch
        return False
    return True


def fusion_flags(*, use_te: bool, have_wgrad_kernel: bool) -> dict[str, bool]:
    """megatron's kernel-fusion switches for this run. Pure.

    With TransformerEngine (GPU) the SwiGLU (`bias_activation_fusion`, bias-free) and RoPE
    fusions are on, and gradient accumulation into the fp32 main grads is fused into the
    weight-gradient GEMM when APEX's kernel is there too. The local spec (CPU mode, tests) has
    none of these kernels, so all are off.
    """
    return dict(bias_activation_fusion=use_te, apply_rope_fusion=use_te,
                gradient_accumulation_fusion=use_te and have_wgrad_kernel,
                bias_dropout_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False)


def transformer_config(spec: ModelSpec, dims: ParallelDims, *, params_dtype: str = "float32",
                       recompute: bool | str = False, sequence_parallel: bool = False,
                       cp_comm_type: str = "p2p", overrides: dict | None = None,
                       use_te: bool = False):
    """Builds megatron's `TransformerConfig` for `spec` under the parallel sizes `dims`.

    params_dtype: "float32" | "bfloat16" | "float16"; bf16/fp16 set megatron's mixed-precision
    flags (fp32 main params live in the optimizer). recompute: True / "full": full activation
    recomputation of every layer (uniform, 1 layer per checkpoint); "selective": megatron's
    selective recompute of core attention and the MLP
    (`cluster.memory.SELECTIVE_RECOMPUTE_MODULES`); False / "none": none. sequence_parallel: megatron sequence
    parallelism (needs dims.tp > 1; every micro-batch's sequence length must then be a multiple
    of tp). cp_comm_type: how TransformerEngine's attention exchanges K/V under context
    parallelism ("p2p", "all_gather", "a2a", "a2a+p2p"; only read when dims.cp > 1 and TE runs:
    megatron's local spec uses the all-gather attention of `models.cp_attention`).
    use_te: the TE layer spec will be built (`models.builder.resolve_use_te`): turns the
    fusions of `fusion_flags` on.
    overrides: rarely used TransformerConfig
    fields, applied last; unknown names raise ValueError.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    if params_dtype not in _DTYPES:
        raise ValueError(f"params_dtype={params_dtype!r}: expected one of {sorted(_DTYPES)}")
    dtype = _DTYPES[params_dtype]
    if sequence_parallel and dims.tp < 2:
        raise ValueError(f"sequence_parallel=True needs tensor parallelism (tp={dims.tp}); "
                         "it splits the sequence over the TP ranks")
    kwargs: dict[str, Any] = dict(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size, num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups, kv_channels=spec.head_dim,
        normalization="RMSNorm", layernorm_epsilon=spec.norm_eps, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias, qk_layernorm=spec.qk_layernorm,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=dims.tp, pipeline_model_parallel_size=dims.pp,
        context_parallel_size=dims.cp, sequence_parallel=bool(sequence_parallel),
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, autocast_dtype=dtype,
        # Softmax and residual math in fp32 keeps bf16 log-probs close to the rollout engine's.
        attention_softmax_in_fp32=True, fp32_residual_connection=False,
        **fusion_flags(use_te=use_te, have_wgrad_kernel=use_te and have_wgrad_accumulation_kernel()),
    )
    if dims.cp > 1:
        if cp_comm_type not in CP_COMM_TYPES:
            raise ValueError(f"cp_comm_type={cp_comm_type!r}: expected one of {CP_COMM_TYPES}")
        kwargs["cp_comm_type"] = cp_comm_type
    if recompute not in (True, False, "full", "selective", "none"):
        raise ValueError(f"recompute={recompute!r}: expected True/'full', 'selective' or False/'none'")
    if recompute in (True, "full"):
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        from ctpo_megatron.cluster.memory import SELECTIVE_RECOMPUTE_MODULES

        # TE's flash attention stores no [S, S] scores: re-running it would only cost time.
        modules = [m for m in SELECTIVE_RECOMPUTE_MODULES if not (use_te and m == "core_attn")]
        kwargs.update(recompute_granularity="selective", recompute_modules=modules)
    for name, value in (overrides or {}).items():
        if name not in TransformerConfig.__dataclass_fields__:
            raise ValueError(f"transformer_overrides: {name!r} is not a TransformerConfig field")
        kwargs[name] = value
    return TransformerConfig(**kwargs)
