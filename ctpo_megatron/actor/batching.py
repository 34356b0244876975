"""Turning ragged prompt/response samples into padded micro-batches for GPTModel.

Each sample is `prompt_ids + response_ids`, right-padded to the micro-batch's length S. With a
causal mask, right padding never changes the logits of real tokens, so no attention mask is
needed (nor with S rounded up to a multiple of TP for sequence parallelism: padded positions
come after every real token and are never scored). Only response tokens are scored: response token j of sample i sits at position
`P_i + j` and is predicted by the logits at position `P_i + j - 1`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

PER_TOKEN_FIELDS = ("old_log_probs", "advantages", "response_mask", "rollout_is_weights")


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

    def split(self, padded: torch.Tensor) -> list[torch.Tensor]:
        """[b, R] padded -> list of [R_i] for the real samples."""
        return [padded[i, :n] for i, n in enumerate(self.response_lengths)]


def check_sample(sample: dict, index: int, *, max_len: int, vocab_size: int) -> None:
    """Raises ValueError naming the sample and field when it cannot be scored."""
    for key in ("prompt_ids", "response_ids"):
        if key not in sample:
            raise ValueError(f"samples[{index}] has no {key!r}")
    p, r = len(sample["prompt_ids"]), len(sample["response_ids"])
    if p < 1:
        raise ValueError(f"samples[{index}].prompt_ids is empty: the first response token "
                         "needs at least one token before it")
    if p + r > max_len:
        raise ValueError(f"samples[{index}]: prompt {p} + response {r} tokens exceed "
                         f"max_position_embeddings={max_len}")
    ids = list(sample["prompt_ids"]) + list(sample["response_ids"])
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        raise ValueError(f"samples[{index}]: token id out of range [0, {vocab_size})")


def _as_float(values, name: str, index: int, length: int) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if t.numel() != length:
        raise ValueError(f"samples[{index}].{name} has {t.numel()} values, expected {length} "
                         "(one per response token)")
    return t


def build_micro_batch(samples: Sequence[dict], *, seq_len: int | None = None,
                      batch_size: int | None = None, fields: Sequence[str] = (),
                      first_index: int = 0, seq_multiple: int = 1) -> MicroBatch:
    """Pads `samples` to [batch_size, seq_len] (defaults: len(samples), longest sample), with
    seq_len rounded up to a multiple of `seq_multiple` (TP under sequence parallelism).

    fields: per-response-token keys to collect into [b, R] float32 tensors; a missing
    "rollout_is_weights" defaults to ones, a missing "response_mask" to ones.
    first_index: index of samples[0] in the caller's list, for error messages.
    """
    b = batch_size or len(samples)
    lengths = [len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples]
    s_len = seq_len or max(lengths, default=1)
    s_len = -(-s_len // max(seq_multiple, 1)) * max(seq_multiple, 1)
    if b < len(samples) or s_len < max(lengths, default=0):
        raise ValueError(f"micro-batch of {len(samples)} samples (longest {max(lengths)}) does "
                         f"not fit [{b}, {s_len}]")
    tokens = torch.zeros((b, s_len), dtype=torch.int64)
    rows, targets, resp_row, resp_col = [], [], [], []
    resp_lens = [len(s["response_ids"]) for s in samples]
    r_max = max(max(resp_lens, default=1), 1)
    padded = {name: torch.zeros((b, r_max), dtype=torch.float32) for name in fields}
    for i, s in enumerate(samples):
        ids = torch.as_tensor(list(s["prompt_ids"]) + list(s["response_ids"]), dtype=torch.int64)
        tokens[i, : ids.numel()] = ids
        p, r = len(s["prompt_ids"]), resp_lens[i]
        rows.append(i * s_len + torch.arange(p - 1, p - 1 + r))
        targets.append(ids[p:])
        resp_row.append(torch.full((r,), i, dtype=torch.int64))
        resp_col.append(torch.arange(r))
        for name in fields:
            value = s.get(name)
            if value is None and name in ("rollout_is_weights", "response_mask"):
                value = torch.ones(r)
            if value is None:
                raise ValueError(f"samples[{first_index + i}] has no {name!r}")
            padded[name][i, :r] = _as_float(value, name, first_index + i, r)
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.int64)  # noqa: E731
    position_ids = torch.arange(s_len).expand(b, s_len).contiguous()
    return MicroBatch(tokens=tokens, position_ids=position_ids, rows=cat(rows),
                      targets=cat(targets), resp_row=cat(resp_row), resp_col=cat(resp_col),
                      response_lengths=resp_lens, fields=padded)
