"""HF Llama/Qwen2/Qwen3 models on megatron-core: config conversion, GPTModel building and
HF safetensors <-> TP/PP shard conversion."""

from ctpo_megatron.models.builder import build_gpt_model, layer_spec
from ctpo_megatron.models.config import ModelSpec, model_spec_from_hf, transformer_config
from ctpo_megatron.models.hf_io import (
    export_hf_checkpoint, iter_hf_weights, load_hf_weights, unwrap_model,
)

__all__ = ["ModelSpec", "build_gpt_model", "export_hf_checkpoint", "iter_hf_weights",
           "layer_spec", "load_hf_weights", "model_spec_from_hf", "transformer_config",
           "unwrap_model"]
