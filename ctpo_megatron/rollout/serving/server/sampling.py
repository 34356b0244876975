"""Sampling parameters and the per-step sampler of the embedded server, with SGLang's semantics.

Normalization and range checks follow SGLang 0.5.23 `srt/sampling/sampling_params.py`
(`__post_init__` / `verify`, same messages); the sampler follows its torch sampling path
(`top_k_top_p_min_p_sampling_from_probs_torch`). Returned log-probs, like SGLang's
(`layers/sampler.py`):

* output tokens: `log_softmax(logits / temperature)[token]` in float32, the temperature-scaled
  distribution *before* top-k / top-p / min-p truncation (not renormalized after it). For a
  greedy request (temperature < 1e-6, which SGLang turns into top_k = 1, temperature = 1) this
  is `log_softmax(logits)[token]`. A trainer reproduces them with
  `log_softmax(logits.float() / temperature)` gathered at the sampled ids.
* input (prompt) tokens: `log_softmax(logits)[next token]`, no temperature (SGLang's input
  logprob path ignores it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SAMPLING_EPS = 1e-6
TOP_K_ALL = 1 << 30

# Keys whose non-default values need a tokenizer or logit processors this server does not have.
_UNSUPPORTED_DEFAULTS = {
    "stop": None, "stop_regex": None, "json_schema": None, "regex": None, "ebnf": None,
    "structural_tag": None, "frequency_penalty": 0.0, "presence_penalty": 0.0,
    "repetition_penalty": 1.0, "logit_bias": {}, "custom_params": None, "beam_width": None,
    "watermark": None, "choice": [],
}


@dataclass
class SamplingParams:
    """Normalized sampling parameters of one request (SGLang defaults)."""

    max_new_tokens: int | None = 128
    """Tokens to generate at most; None = until the model's context length."""
    min_new_tokens: int = 0
    """Stop tokens are masked out until this many tokens are generated."""
    temperature: float = 1.0
    """Softmax temperature; [0, 1e-6) means greedy (turned into top_k = 1, temperature = 1)."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]."""
    top_k: int = TOP_K_ALL
    """Keep the k most likely tokens; -1 (the whole vocabulary) becomes TOP_K_ALL."""
    min_p: float = 0.0
    """Drop tokens with prob < min_p * max prob; in [0, 1]."""
    n: int = 1
    """Samples per prompt."""
    stop_token_ids: frozenset[int] = frozenset()
    """Extra token ids that finish the request (the matched id stays in output_ids)."""
    ignore_eos: bool = False
    """Do not stop at the model's EOS ids."""
    sampling_seed: int | None = None
    """Per-request seed: same seed + same prompt + same weights = same tokens."""
    stream_interval: int | None = None
    """Tokens between streamed chunks (None = the server's default, 1)."""

    @property
    def greedy(self) -> bool:
        return self.top_k == 1

    @classmethod
    def from_json(cls, raw: dict | None) -> "SamplingParams":
        """Builds from a contract-checked `sampling_params` object; ValueError on bad ranges."""
        raw = dict(raw or {})
        for key, default in _UNSUPPORTED_DEFAULTS.items():
            value = raw.get(key)
            if value is not None and value != default:
                raise ValueError(f"sampling_params.{key}={value!r} is not supported by the embedded "
                                 "CPU server (token-in/token-out, no logit processors)")

        def get(key, default):
            value = raw.get(key)
            return default if value is None else value

        params = cls(
            max_new_tokens=raw.get("max_new_tokens", 128),
            min_new_tokens=get("min_new_tokens", 0), temperature=float(get("temperature", 1.0)),
            top_p=float(get("top_p", 1.0)), top_k=get("top_k", -1), min_p=float(get("min_p", 0.0)),
            n=get("n", 1), stop_token_ids=frozenset(raw.get("stop_token_ids") or ()),
            ignore_eos=get("ignore_eos", False), sampling_seed=raw.get("sampling_seed"),
            stream_interval=raw.get("stream_interval"))
        if 0 <= params.temperature < SAMPLING_EPS:
            params.temperature, params.top_k = 1.0, 1
        if params.top_k == -1:
            params.top_k = TOP_K_ALL
        params.verify()
        return params

    def verify(self) -> None:
        """SGLang's range checks, with its messages."""
        if not math.isfinite(self.temperature) or self.temperature < 0.0:
            raise ValueError(f"temperature must be a non-negative finite number, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.top_k < 1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if not 0 <= self.min_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}.")
        if self.max_new_tokens is not None:
            if self.max_new_tokens < 0:
                raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
            if not self.min_new_tokens <= self.max_new_tokens:
                raise ValueError(f"min_new_tokens must be in [0, max_new_tokens({self.max_new_tokens})], "
                                 f"got {self.min_new_tokens}.")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                banned: frozenset[int] = frozenset()) -> tuple[int, float]:
    """Samples one token for one sequence and returns `(token_id, log_prob)`.

    logits: [V] float32 — next-token logits of this sequence (full vocabulary).
    banned: token ids masked to -inf first (stop tokens before min_new_tokens).
    The log-prob is that of the sampled token under `log_softmax(logits / temperature)`
    (see the module docstring), computed in float32.
    """
    logits = logits.float()
    if banned:
        logits = logits.clone()
        logits[list(banned)] = float("-inf")
    if params.greedy:
        token = int(torch.argmax(logits))
        return token, float(torch.log_softmax(logits, dim=-1)[token])
    log_probs = torch.log_softmax(logits / params.temperature, dim=-1)
    probs = log_probs.exp()
    probs_sort, probs_idx = probs.sort(descending=True)
    # SGLang's torch path: drop a token when the mass strictly before it already exceeds top_p,
    # then everything past rank top_k, then everything under min_p * the top probability.
    cum = probs_sort.cumsum(0)
    probs_sort = probs_sort.masked_fill((cum - probs_sort) > params.top_p, 0.0)
    if params.top_k < probs_sort.numel():
        probs_sort[params.top_k:] = 0.0
    if params.min_p > 0.0:
        probs_sort = probs_sort.masked_fill(probs_sort < probs_sort[0] * params.min_p, 0.0)
    choice = torch.multinomial(probs_sort / probs_sort.sum(), 1, generator=generator)
    token = int(probs_idx[choice])
    return token, float(log_probs[token])


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
                banned: list[frozenset[int]]) -> list[tuple[int, float]]:
    """`sample_next` for every row of a decode step, with the same tokens and log-probs bit for
    bit, at a fraction of the CPU: rows that share their sampling parameters (and mask nothing)
    take the softmax, sort and truncation together; only the seeded draw stays per row (each
    request has its own generator).

    logits: [B, V] float32 — row i is the next-token logits of the request behind params[i],
    generators[i] and banned[i].
    """
    out: list[tuple[int, float] | None] = [None] * len(params)
    groups: dict[tuple[float, float, int, float], list[int]] = {}
    for i, (p, ban) in enumerate(zip(params, banned)):
        if ban or p.greedy:
            out[i] = sample_next(logits[i], p, generators[i], ban)
        else:
            groups.setdefault((p.temperature, p.top_p, p.top_k, p.min_p), []).append(i)
    for (temperature, top_p, top_k, min_p), rows in groups.items():
        log_probs = torch.log_softmax(logits[rows].float() / temperature, dim=-1)
        probs_sort, probs_idx = log_probs.exp().sort(dim=-1, descending=True)
        cum = probs_sort.cumsum(-1)
        probs_sort = probs_sort.masked_fill((cum - probs_sort) > top_p, 0.0)
        if top_k < probs_sort.shape[-1]:
            probs_sort[:, top_k:] = 0.0
        if min_p > 0.0:
            probs_sort = probs_sort.masked_fill(probs_sort < probs_sort[:, :1] * min_p, 0.0)
        for g, i in enumerate(rows):
            row = probs_sort[g]
            choice = torch.multinomial(row / row.sum(), 1, generator=generators[i])
            token = int(probs_idx[g, choice])
            out[i] = (token, float(log_probs[g, token]))
    return out  # type: ignore[return-value]
