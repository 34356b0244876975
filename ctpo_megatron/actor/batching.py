"""The actor's input: a `TokenBatch` of ragged prompt/response sequences as padded tensors,
sliced into padded micro-batches for GPTModel.

Each sample is `prompt_ids + response_ids`, right-padded to the micro-batch's length S. With a
causal mask, right padding never changes the logits of real tokens, so no attention mask is
needed (nor with S rounded up to a multiple of TP for sequence parallelism: padded positions
come after every real token and are never scored). Only response tokens are scored: response
token j of sample i sits at position `P_i + j` and is predicted by the logits at position
`P_i + j - 1`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class TokenBatch:
    """N sequences (prompt + response) as right-padded tensors, plus per-response-token inputs.

    The trainer's step batch builds one per DP replica; `from_samples` converts the list-of-
    dicts form (tests, the log-prob CLI). Rows are independent: `rows(i, j)` is a view.
    """

    tokens: torch.Tensor
    """[N, L] int64 — prompt ids then response ids, right-padded with 0 (L >= longest row)."""
    prompt_lens: torch.Tensor
    """[N] int64 — P_i >= 1."""
    response_lens: torch.Tensor
    """[N] int64 — R_i >= 0."""
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)
    """name -> [N, R] float32 per response token (R >= max R_i, 0 past R_i): the loss's inputs
    (e.g. response_mask, old_log_probs, advantages, rollout_is_weights)."""

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        if self.tokens.dim() != 2 or self.prompt_lens.shape != (n,) or self.response_lens.shape != (n,):
            raise ValueError(f"TokenBatch: tokens {tuple(self.tokens.shape)}, prompt_lens "
                             f"{tuple(self.prompt_lens.shape)} and response_lens "
                             f"{tuple(self.response_lens.shape)} must be [N, L], [N], [N]")
        r = int(self.response_lens.max()) if n else 0
        for name, t in self.per_token.items():
            if t.dim() != 2 or t.shape[0] != n or t.shape[1] < r:
                raise ValueError(f"TokenBatch.per_token[{name!r}] has shape {tuple(t.shape)}, "
                                 f"expected [{n}, >= {r}] (one value per response token)")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """[N] int64 — P_i + R_i."""
        return self.prompt_lens + self.response_lens

    def rows(self, start: int, stop: int) -> TokenBatch:
        """Rows [start, stop) (views, no copy)."""
        return TokenBatch(self.tokens[start:stop], self.prompt_lens[start:stop],
                          self.response_lens[start:stop],
                          {k: v[start:stop] for k, v in self.per_token.items()})

    def select(self, index: torch.Tensor) -> TokenBatch:
        """Rows `index` ([k] int64), in that order (copies)."""
        return TokenBatch(self.tokens[index], self.prompt_lens[index], self.response_lens[index],
                          {k: v[index] for k, v in self.per_token.items()})

    def check(self, *, max_len: int, vocab_size: int) -> None:
        """Raises ValueError naming the first row that cannot be scored."""
        if len(self) == 0:
            raise ValueError("samples is empty: every DP rank needs at least one sample")
        bad = (self.prompt_lens < 1).nonzero()
        if bad.numel():
            raise ValueError(f"samples[{int(bad[0])}].prompt_ids is empty: the first response token "
                             "needs at least one token before it")
        lengths = self.lengths
        bad = (lengths > max_len).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"samples[{i}]: prompt {int(self.prompt_lens[i])} + response "
                             f"{int(self.response_lens[i])} tokens exceed max_position_embeddings={max_len}")
        real = torch.arange(self.tokens.shape[1]) < lengths[:, None]
        bad = (real & ((self.tokens < 0) | (self.tokens >= vocab_size))).any(-1).nonzero()
        if bad.numel():
            raise ValueError(f"samples[{int(bad[0])}]: token id out of range [0, {vocab_size})")

    @classmethod
    def from_samples(cls, samples: Sequence[Mapping], fields: Sequence[str] = ()) -> TokenBatch:
        """Packs dicts with `prompt_ids`, `response_ids` and the per-token `fields` ([R_i] each;
        a missing "response_mask" or "rollout_is_weights" defaults to ones)."""
        for i, s in enumerate(samples):
            for key in ("prompt_ids", "response_ids"):
                if key not in s:
                    raise ValueError(f"samples[{i}] has no {key!r}")
        n = len(samples)
        p_lens = [len(s["prompt_ids"]) for s in samples]
        r_lens = [len(s["response_ids"]) for s in samples]
        tokens = torch.zeros((n, max([p + r for p, r in zip(p_lens, r_lens)], default=1)), dtype=torch.int64)
        r_max = max(max(r_lens, default=1), 1)
        per_token = {name: torch.zeros((n, r_max), dtype=torch.float32) for name in fields}
        for i, s in enumerate(samples):
            ids = list(s["prompt_ids"]) + list(s["response_ids"])
            tokens[i, :len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
            for name in fields:
                value = s.get(name)
                if value is None and name in ("rollout_is_weights", "response_mask"):
                    value = torch.ones(r_lens[i])
                if value is None:
                    raise ValueError(f"samples[{i}] has no {name!r}")
                per_token[name][i, :r_lens[i]] = _as_float(value, name, i, r_lens[i])
        return cls(tokens, torch.tensor(p_lens, dtype=torch.int64),
                   torch.tensor(r_lens, dtype=torch.int64), per_token)


def _as_float(values, name: str, index: int, length: int) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if t.numel() != length:
        raise ValueError(f"samples[{index}].{name} has {t.numel()} values, expected {length} "
                         "(one per response token)")
    return t


@dataclass
class MicroBatch:
    """One padded micro-batch (b rows, possibly including empty filler rows)."""

    tokens: torch.Tensor
    """[b, S] int64 — prompt + response ids, right-padded with 0."""
    position_ids: torch.Tensor
    """[b, S] int64 — 0..S-1 per row."""
    rows: torch.Tensor
    """[M] int64 — flat index b_i * S + s of the logits row predicting each response token."""
    targets: torch.Tensor
    """[M] int64 — the response token ids, in sample order."""
    resp_row: torch.Tensor
    """[M] int64 — sample index (0..b-1) of each scored token."""
    resp_col: torch.Tensor
    """[M] int64 — position of each scored token within its response (0..R-1)."""
    response_lengths: list[int]
    """R_i per real sample."""
    fields: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-token training inputs, each [b, R] float32, R = max response length, padded with 0."""
    sample_index: torch.Tensor | None = None
    """[num_samples] int64 — the `TokenBatch` row of each sample (token-budget micro-batches
    are sorted by length; empty for a filler micro-batch); None: consecutive rows in order."""

    @property
    def computed_tokens(self) -> int:
        """Token positions the model runs for this micro-batch, padding included."""
        return self.tokens.numel()

    @property
    def num_samples(self) -> int:
        return len(self.response_lengths)

    @property
    def max_response_len(self) -> int:
        return max(self.response_lengths, default=0)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """[M] per scored token -> [b, R] padded with 0 (keeps autograd)."""
        out = values.new_zeros((self.tokens.shape[0], max(self.max_response_len, 1)))
        return out.index_put((self.resp_row, self.resp_col), values)


def build_micro_batch(batch: TokenBatch, *, seq_len: int | None = None, batch_size: int | None = None,
                      seq_multiple: int = 1) -> MicroBatch:
    """Pads the rows of `batch` to [batch_size, seq_len] (defaults: len(batch), longest row),
    with seq_len rounded up to a multiple of `seq_multiple` (TP under sequence parallelism).
    Every `batch.per_token` field becomes a [b, R] tensor, R = the longest response here."""
    n = len(batch)
    b = batch_size or n
    lengths = batch.lengths
    longest = int(lengths.max()) if n else 0
    s_len = seq_len or max(longest, 1)
    s_len = -(-s_len // max(seq_multiple, 1)) * max(seq_multiple, 1)
    if b < n or s_len < longest:
        raise ValueError(f"micro-batch of {n} samples (longest {longest}) does not fit [{b}, {s_len}]")
    tokens = torch.zeros((b, s_len), dtype=torch.int64)
    width = min(s_len, batch.tokens.shape[1])
    tokens[:n, :width] = batch.tokens[:, :width]
    resp_lens = batch.response_lens.tolist()
    r_max = max(max(resp_lens, default=1), 1)
    resp_row = torch.repeat_interleave(torch.arange(n), batch.response_lens)
    # Column of each scored token within its response: 0..R_i-1 per row.
    starts = torch.cumsum(batch.response_lens, 0) - batch.response_lens
    resp_col = torch.arange(resp_row.numel()) - starts[resp_row]
    pos = batch.prompt_lens[resp_row] + resp_col  # position of the token in the sequence
    fields = {}
    for name, t in batch.per_token.items():
        padded = torch.zeros((b, r_max), dtype=torch.float32)
        padded[:n] = t[:, :r_max].to(torch.float32)
        fields[name] = padded
    return MicroBatch(tokens=tokens, position_ids=torch.arange(s_len).expand(b, s_len).contiguous(),
                      rows=resp_row * s_len + pos - 1, targets=tokens[resp_row, pos],
                      resp_row=resp_row, resp_col=resp_col, response_lengths=resp_lens, fields=fields)
