"""Builds tiny Qwen-style Hugging Face checkpoints (random weights) for local runs and tests."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class TinyModelConfig:
    """Shape of a tiny Qwen-style causal LM; sized so TP 2 and PP 2 both divide it."""

    arch: str = "qwen2"
    """HF architecture: `qwen2` (Qwen2ForCausalLM, qkv bias) or `qwen3` (Qwen3ForCausalLM, qk-norm)."""
    hidden_size: int = 128
    """Model width."""
    num_layers: int = 4
    """Transformer layers (divisible by the pipeline size)."""
    num_heads: int = 4
    """Attention heads (divisible by the tensor-parallel size)."""
    num_kv_heads: int = 2
    """Key/value heads for grouped-query attention (divisible by the tensor-parallel size)."""
    intermediate_size: int = 256
    """MLP width."""
    vocab_size: int = 128
    """Embedding rows; padded above the tokenizer's size to a multiple of 64 so TP splits evenly."""
    max_position_embeddings: int = 1024
    """Longest sequence (prompt + response) in tokens."""
    seed: int = 0
    """Seed of the random initialization."""

    def __post_init__(self) -> None:
        if self.arch not in ("qwen2", "qwen3"):
            raise ValueError(f"TinyModelConfig.arch={self.arch!r}: expected 'qwen2' or 'qwen3'")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"TinyModelConfig: num_heads={self.num_heads} does not divide "
                             f"hidden_size={self.hidden_size}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"TinyModelConfig: num_kv_heads={self.num_kv_heads} does not divide "
                             f"num_heads={self.num_heads}")


def hf_config(cfg: TinyModelConfig, *, eos_token_id: int, pad_token_id: int):
    """The `transformers` config object for `cfg`."""
    from transformers import Qwen2Config, Qwen3Config

    cls = Qwen2Config if cfg.arch == "qwen2" else Qwen3Config
    return cls(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        bos_token_id=None, torch_dtype="float32", use_cache=True)


def build_tiny_model(cfg: TinyModelConfig, *, eos_token_id: int, pad_token_id: int):
    """A randomly initialized HF causal LM (float32, eval mode off) for `cfg`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(hf_config(cfg, eos_token_id=eos_token_id,
                                                      pad_token_id=pad_token_id))
    return model.float()


def save_tiny_model(model, tokenizer, out_dir: str) -> str:
    """Saves `model` (safetensors) and `tokenizer` to `out_dir` as one HF checkpoint directory."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
