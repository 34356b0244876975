"""Builds the megatron-core `GPTModel` chunk of this pipeline stage from a `ModelSpec`.

The layer spec is TransformerEngine's when megatron's own TE extension
(`megatron.core.extensions.transformer_engine`) loads with TE behind it and a GPU runs the
model; megatron's local spec (pure torch) otherwise. On a GPU the local spec is refused unless
asked for (`allow_local_spec`): its unfused attention holds a full [S, S] score matrix per
layer (~20 GB at 24k tokens), so a silent fallback would only fail later, out of memory. That
choice is made here and nowhere else (`choose_layer_spec`, a pure function), and logged with
the TE version at start-up. Under context parallelism (CP > 1) TE's attention runs CP itself
(`TransformerConfig.cp_comm_type`); the local spec's attention refuses CP, so its core attention
is swapped for `models.cp_attention.ContextParallelDotProductAttention` (exact, K/V all-gathered
over CP).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import torch

from ctpo_megatron.models.config import ModelSpec
from ctpo_megatron.parallel.cpu_mode import is_cpu_mode

logger = logging.getLogger(__name__)

TE_EXTENSION = "megatron.core.extensions.transformer_engine"
"""megatron's TE wrapper module: the TE layer spec needs it, not just `transformer_engine`."""
TE_SPEC, LOCAL_SPEC = "transformer_engine", "local"


@dataclass(frozen=True)
class TEStatus:
    """Whether megatron can build TransformerEngine layers in this process."""

    available: bool
    """megatron's TE extension imported and found TE (`HAVE_TE`)."""
    version: str | None
    """TransformerEngine's version when available."""
    reason: str
    """Why TE is not available ("" when it is)."""


def transformer_engine_status() -> TEStatus:
    """Imports megatron's TE extension (never `transformer_engine` alone: TE can import while
    megatron's wrappers do not, and the TE spec then fails with a NameError mid-build)."""
    try:
        ext = importlib.import_module(TE_EXTENSION)
    except Exception as e:  # noqa: BLE001 - a half-installed TE raises assorted errors
        return TEStatus(False, None, f"{TE_EXTENSION} failed to import: {type(e).__name__}: {e}")
    if not getattr(ext, "HAVE_TE", False):
        return TEStatus(False, None, f"{TE_EXTENSION} imported but found no transformer_engine "
                                     "(HAVE_TE=False)")
    version = getattr(getattr(ext, "te", None), "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("transformer-engine")
        except Exception:  # noqa: BLE001 - the version is informative only
            version = "unknown"
    return TEStatus(True, str(version), "")


def choose_layer_spec(*, cuda: bool, te: TEStatus, allow_local_spec: bool) -> str:
    """Which layer spec to build: `TE_SPEC` or `LOCAL_SPEC`. Pure.

    cuda: the model runs on a GPU (not CPU mode). On a GPU without TE the local spec is
    refused (RuntimeError saying why TE is missing) unless `allow_local_spec`.
    """
    if not cuda:
        return LOCAL_SPEC  # TE needs a GPU; CPU mode always runs the local spec
    if te.available:
        return TE_SPEC
    if allow_local_spec:
        return LOCAL_SPEC
    raise RuntimeError(
        f"TransformerEngine is not usable on this GPU run ({te.reason}); megatron's local spec "
        "would run unfused attention with a full [S, S] score matrix per layer. Install "
        "transformer-engine, or set model.allow_local_spec=true to run the local spec anyway "
        "(short sequences, tests)")


def runs_on_cuda() -> bool:
    """Whether megatron runs this process's model on a GPU (CUDA present and not CPU mode)."""
    return torch.cuda.is_available() and not is_cpu_mode()


def resolve_use_te(*, allow_local_spec: bool = False) -> bool:
    """Detects TE, applies `choose_layer_spec` and logs the choice; returns whether to use TE."""
    te = transformer_engine_status()
    cuda = runs_on_cuda()
    chosen = choose_layer_spec(cuda=cuda, te=te, allow_local_spec=allow_local_spec)
    logger.info("layer spec: %s (device=%s, TransformerEngine %s)", chosen,
                "cuda" if cuda else "cpu", te.version if te.available else f"absent: {te.reason}")
    return chosen == TE_SPEC


def have_transformer_engine() -> bool:
    """Whether megatron's TE extension is usable and a GPU is there to run it."""
    return runs_on_cuda() and transformer_engine_status().available


def layer_spec(spec: ModelSpec, *, use_te: bool | None = None):
    """Returns megatron's GPT layer `ModuleSpec`: TE if available (or `use_te`), else local."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = have_transformer_engine()
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_layernorm)
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=spec.qk_layernorm,
                                                    normalization="RMSNorm")


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm for megatron's local spec under sequence parallelism.

    megatron's `WrappedTorchNorm` refuses `sequence_parallel`; the math is the same here, and the
    weight carries megatron's `sequence_parallel` attribute so `finalize_model_grads` sums its
    gradient over TP (each TP rank saw only its slice of the sequence).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(normalized_shape=hidden_size, eps=eps)
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))


def _local_spec_for_context_parallel(layer):
    """A copy of the local layer spec whose core attention runs under context parallelism."""
    import copy

    from ctpo_megatron.models.cp_attention import ContextParallelDotProductAttention

    layer = copy.deepcopy(layer)
    attention = getattr(getattr(layer.submodules, "self_attention", None), "submodules", None)
    if attention is None or not hasattr(attention, "core_attention"):
        raise RuntimeError("megatron's local layer spec has no self_attention.core_attention to "
                           "replace for context parallelism")
    attention.core_attention = ContextParallelDotProductAttention
    return layer


def _local_spec_for_sequence_parallel(layer, config, pgs):
    """The local layer spec with every torch norm swapped for `SequenceParallelRMSNorm`, wrapped
    in block submodules so the final norm is swapped too."""
    import copy

    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules, get_num_layers_to_build,
    )

    layer = copy.deepcopy(layer)

    def swap(obj, depth=0):
        subs = getattr(obj, "submodules", None)
        if subs is None or depth > 4:
            return
        for name in vars(subs):
            value = getattr(subs, name)
            if value is WrappedTorchNorm:
                setattr(subs, name, SequenceParallelRMSNorm)
            elif hasattr(value, "submodules"):
                swap(value, depth + 1)

    swap(layer)
    num_layers = get_num_layers_to_build(config, None, pgs.pp.rank())
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers,
                                      layer_norm=SequenceParallelRMSNorm)


def build_gpt_model(spec: ModelSpec, config, pgs, *, use_te: bool | None = None,
                    allow_local_spec: bool = False):
    """Builds the GPTModel chunk for this rank's PP stage (pre_process on the first stage,
    post_process on the last), with RoPE frequencies taken from the HF config.

    config: megatron TransformerConfig (see `transformer_config`). pgs: ProcessGroupCollection.
    use_te: None detects TE (`resolve_use_te`, which refuses the local spec on a GPU unless
    `allow_local_spec`).
    Weights are randomly initialized; load them with `hf_io.load_hf_weights`. The output layer
    returns vocab-parallel logits `[b, s, V_pad / tp]` when called without labels.
    """
    from megatron.core.models.gpt import GPTModel

    pp_rank, pp_size = pgs.pp.rank(), pgs.pp.size()
    if use_te is None:
        use_te = resolve_use_te(allow_local_spec=allow_local_spec)
    block_spec = layer_spec(spec, use_te=use_te)
    if config.context_parallel_size > 1 and not use_te:
        block_spec = _local_spec_for_context_parallel(block_spec)
    if config.sequence_parallel and not use_te:
        block_spec = _local_spec_for_sequence_parallel(block_spec, config, pgs)
    model = GPTModel(
        config=config, transformer_layer_spec=block_spec,
        vocab_size=spec.padded_vocab_size, max_sequence_length=spec.max_position_embeddings,
        pre_process=pp_rank == 0, post_process=pp_rank == pp_size - 1,
        parallel_output=True, share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope", rotary_base=int(spec.rope_theta), pg_collection=pgs)
    set_rope_inv_freq(model, spec)
    model.ctpo_model_spec = spec  # read back by hf_io when converting to/from HF tensors
    return model


def set_rope_inv_freq(model: torch.nn.Module, spec: ModelSpec) -> None:
    """Replaces megatron's RoPE frequencies with transformers' (covers llama3/linear scaling)."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None:
        raise RuntimeError("GPTModel has no rotary_pos_emb; expected position_embedding_type='rope'")
    if tuple(rope.inv_freq.shape) != tuple(spec.rope_inv_freq.shape):
        raise ValueError(f"rope inv_freq shape {tuple(spec.rope_inv_freq.shape)} does not match "
                         f"megatron's {tuple(rope.inv_freq.shape)} (head_dim={spec.head_dim})")
    rope.inv_freq = spec.rope_inv_freq.to(device=rope.inv_freq.device, dtype=rope.inv_freq.dtype)
    rope.forward.cache_clear()  # forward is lru_cached on the sequence length
