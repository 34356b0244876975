"""Transformer shapes that drive the memory estimate: from the trainer's model config (and
its presets, `configs/model/*.yaml`) or a HF `config.json`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctpo_megatron.config.model import ModelConfig


@dataclass(frozen=True)
class ModelDims:
    """Shape of a dense decoder-only transformer (Llama/Qwen family, RMSNorm, RoPE, SwiGLU)."""

    hidden_size: int
    """Model width h."""
    num_layers: int
    """Transformer layers L."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (grouped-query attention); equal to num_attention_heads for MHA."""
    ffn_hidden_size: int
    """MLP inner width (the width of each of gate and up projections for a gated MLP)."""
    vocab_size: int
    """Embedding / output rows (already padded as the model stores them)."""
    head_dim: int = 0
    """Per-head width; 0 means hidden_size // num_attention_heads."""
    gated_mlp: bool = True
    """SwiGLU (gate, up, down: 3 matrices) when True; plain 2-matrix MLP otherwise."""
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2/2.5)."""
    qk_norm: bool = False
    """RMSNorm on queries and keys per head (Qwen3)."""
    tie_word_embeddings: bool = False
    """Output layer shares the embedding matrix (a copy still lives on the last PP stage)."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelDims.{name}={value!r}: must be a positive integer")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"ModelDims: num_query_groups={self.num_query_groups} does not divide "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim == 0 and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"ModelDims: num_attention_heads={self.num_attention_heads} does not "
                             f"divide hidden_size={self.hidden_size}; set head_dim explicitly")

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_width(self) -> int:
        """Width of the query projection output (heads x head_dim)."""
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_width(self) -> int:
        """Width of each of the key and value projection outputs."""
        return self.num_query_groups * self.kv_channels

    @property
    def params_per_layer(self) -> int:
        """Parameters of one transformer layer, unsharded."""
        h = self.hidden_size
        attn = h * self.q_width + 2 * h * self.kv_width + self.q_width * h
        if self.qkv_bias:
            attn += self.q_width + 2 * self.kv_width
        if self.qk_norm:
            attn += 2 * self.kv_channels
        mlp = (3 if self.gated_mlp else 2) * h * self.ffn_hidden_size
        return attn + mlp + 2 * h  # + the two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        """All parameters as the HF checkpoint stores them (tied output counted once)."""
        output = 0 if self.tie_word_embeddings else self.embedding_params
        return self.num_layers * self.params_per_layer + self.embedding_params + output + self.hidden_size


def model_dims_of(model_cfg: "ModelConfig") -> ModelDims:
    """ModelDims of the trainer's `ModelConfig` (Qwen2 family has qkv bias, Qwen3 qk-norm)."""
    return ModelDims(hidden_size=model_cfg.hidden_size, num_layers=model_cfg.num_layers,
                     num_attention_heads=model_cfg.num_attention_heads,
                     num_query_groups=model_cfg.num_query_groups, ffn_hidden_size=model_cfg.ffn_hidden_size,
                     vocab_size=model_cfg.vocab_size, head_dim=model_cfg.head_dim,
                     qkv_bias=model_cfg.arch == "qwen2", qk_norm=model_cfg.arch == "qwen3")


def _presets() -> dict[str, ModelDims]:
    """The model presets' shapes, read from the trainer's Hydra group `configs/model/*.yaml`
    into its `ModelConfig` (unset fields take its defaults): the shapes are written down once,
    there."""
    import yaml

    from ctpo_megatron.config.model import ModelConfig

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "configs", "model")
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".yaml"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                out[name[:-len(".yaml")]] = model_dims_of(ModelConfig(**(yaml.safe_load(f) or {})))
    return out


PRESETS: dict[str, ModelDims] = _presets()
"""Preset name (a `configs/model` file) -> shapes."""


def model_dims_from_hf_config(path: str | os.PathLike) -> ModelDims:
    """Reads a HF `config.json` (or the directory holding it) into ModelDims.

    Raises ValueError naming the file and the missing key when it is not a dense decoder config.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    try:
        heads = cfg["num_attention_heads"]
        model_type = cfg.get("model_type", "")
        return ModelDims(
            hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads, num_query_groups=cfg.get("num_key_value_heads", heads),
            ffn_hidden_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
            head_dim=cfg.get("head_dim") or 0,
            qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type.startswith("qwen3"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise ValueError(f"{path}: missing key {e.args[0]!r}; expected a dense decoder-only HF config") from None
