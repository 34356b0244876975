"""Tiny Hugging Face causal LMs with random weights, saved with `save_pretrained`, for tests.

Shared by the actor, weight-sync and trainer tests. Every builder is deterministic in `seed`.
Sizes are chosen so TP 2 and PP 2 split them (heads, KV groups, layers even) and the vocabulary
is not a multiple of 128, so megatron's vocabulary padding is exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VOCAB = 200
_COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
               num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6)


def _save(model, out_dir: str | Path, seed: int, dtype: torch.dtype) -> Path:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            # Norm weights near 1, everything else small, as a trained model would have.
            if p.dim() == 1 and "bias" not in _:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    model = model.to(dtype)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_llama(out_dir: str | Path, *, seed: int = 0, tied: bool = True, num_kv_heads: int = 2,
                dtype: torch.dtype = torch.float32, rope_scaling: dict | None = None,
                **overrides) -> Path:
    """Llama (GQA by default, tied embeddings by default); returns out_dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(_COMMON, num_key_value_heads=num_kv_heads, tie_word_embeddings=tied,
                  rope_theta=10000.0)
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    cfg = LlamaConfig(**{**kwargs, **overrides})
    return _save(LlamaForCausalLM(cfg), out_dir, seed, dtype)


def build_qwen2(out_dir: str | Path, *, seed: int = 1, tied: bool = False, num_kv_heads: int = 2,
                dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Qwen2 (QKV bias, GQA, untied by default); returns out_dir."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**{**_COMMON, "num_key_value_heads": num_kv_heads, "tie_word_embeddings": tied,
                         "rope_theta": 100000.0, **overrides})
    return _save(Qwen2ForCausalLM(cfg), out_dir, seed, dtype)


def build_qwen3(out_dir: str | Path, *, seed: int = 2, tied: bool = True, num_kv_heads: int = 2,
                head_dim: int = 24, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Qwen3 (QK RMSNorm, no bias, head_dim != hidden/heads, GQA, tied); returns out_dir."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**{**_COMMON, "num_key_value_heads": num_kv_heads, "head_dim": head_dim,
                         "tie_word_embeddings": tied, "rope_theta": 1000000.0, **overrides})
    return _save(Qwen3ForCausalLM(cfg), out_dir, seed, dtype)


BUILDERS = {"llama": build_llama, "qwen2": build_qwen2, "qwen3": build_qwen3}


def hf_response_log_probs(model_dir: str | Path, samples: list[dict], *,
                          temperature: float = 1.0, with_entropy: bool = False):
    """transformers' own float32 log-probs of each sample's response tokens: list of [R_i]
    (and, with_entropy, a second list of [R_i] entropies)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out, entropies = [], []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([list(s["prompt_ids"]) + list(s["response_ids"])])
            logits = model(ids).logits[0].float() / temperature
            lp = torch.log_softmax(logits, dim=-1)
            p = len(s["prompt_ids"])
            targets = ids[0, p:]
            scored = lp[p - 1: ids.shape[1] - 1]
            out.append(scored.gather(-1, targets[:, None])[:, 0])
            entropies.append(-(scored.exp() * scored).sum(-1))
    return (out, entropies) if with_entropy else out


def random_samples(n: int, *, seed: int = 0, vocab: int = TINY_VOCAB, min_len: int = 3,
                   max_len: int = 20) -> list[dict]:
    """Ragged prompt/response pairs of token ids."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        p = int(torch.randint(min_len, max_len, (1,), generator=gen))
        r = int(torch.randint(min_len, max_len, (1,), generator=gen))
        samples.append({"prompt_ids": torch.randint(0, vocab, (p,), generator=gen).tolist(),
                        "response_ids": torch.randint(0, vocab, (r,), generator=gen).tolist()})
    return samples
