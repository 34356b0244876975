"""Per-token ratio dumps for the paper's analysis figures (`python -m ctpo_megatron.plot`).

A dump is one compressed `.npz` file per (step, rank) under `<run_dir>/token_dumps/` holding,
for the valid (loss-mask 1) tokens of the sequences it keeps, flattened row after row:

  log_ratio      [N] float32  delta_t = clamp(log pi - log pi_old, -20, 20) of the token
  cum_log_ratio  [N] float32  s_t = sum_{j<=t, mask} delta_j (the cumprod variant's log ratio)
  position       [N] int32    tau_t: 1-indexed position among the sequence's valid tokens
                              (tool-output tokens do not advance it; the LA clip's t)
  token_index    [N] int32    0-indexed position in the response, tool tokens included
  advantage      [N] float32  the token's advantage
  row_offsets    [S+1] int64  tokens of kept sequence i are [row_offsets[i], row_offsets[i+1])
  step, rank     scalars

Size is bounded: when a call brings more than `max_tokens` valid tokens, whole sequences are
kept in a seeded random order until the budget is reached (every position stays represented
by the sequences that reach it). `TokenDumper.add` takes the loss function's tensors as they
are; the trainer calls it on the micro-batches of a dump step and `flush` after the update.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np
import torch

DUMP_DIR = "token_dumps"


def dump_path(run_dir: str, step: int, rank: int) -> str:
    """`<run_dir>/token_dumps/step_<step:07d>_rank_<rank>.npz`."""
    return os.path.join(run_dir, DUMP_DIR, f"step_{step:07d}_rank_{rank}.npz")


def token_arrays(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                 mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-token quantities of a dump from a loss call's inputs.

    log_probs, old_log_probs, advantages, mask: [B, T] (padded rows; mask 1 = generated).
    Returns [B, T] float64 tensors log_ratio, cum_log_ratio, position, mask, advantages
    (detached; values at invalid positions are meaningless and are dropped on writing).
    """
    from ctpo_megatron.algo.cumulative import masked_cumsum

    m = (mask > 0).to(torch.float64)
    delta = (log_probs.detach().to(torch.float64) - old_log_probs.detach().to(torch.float64)).clamp(-20, 20)
    cum, count = masked_cumsum(delta, m)
    return {"log_ratio": delta, "cum_log_ratio": cum, "position": count, "mask": m,
            "advantages": advantages.detach().to(torch.float64).expand_as(m)}


def write_token_dump(path: str, *, log_ratio: torch.Tensor, cum_log_ratio: torch.Tensor,
                     position: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                     step: int = 0, rank: int = 0, max_tokens: int = 2_000_000, seed: int = 0) -> str:
    """Writes the valid tokens of [B, T] tensors (see the module doc) to `path`, at most
    `max_tokens` of them (whole sequences, seeded choice); returns `path`."""
    shapes = {t.shape for t in (log_ratio, cum_log_ratio, position, mask, advantages)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"write_token_dump: expected equal [B, T] tensors, got shapes {sorted(map(tuple, shapes))}")
    if max_tokens < 1:
        raise ValueError(f"write_token_dump: max_tokens={max_tokens} must be >= 1")
    valid = (mask > 0).cpu().numpy()
    lengths = valid.sum(axis=1)
    order = np.random.default_rng(seed + 1_000_003 * step + rank).permutation(len(lengths))
    keep, total = [], 0
    for i in order:
        if lengths[i] == 0:
            continue
        if total + lengths[i] > max_tokens and keep:
            continue
        keep.append(i)
        total += int(lengths[i])
    keep.sort()
    sel = np.zeros_like(valid)
    sel[keep] = valid[keep]
    offsets = np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64)
    cols = np.broadcast_to(np.arange(valid.shape[1]), valid.shape)

    def pick(t: torch.Tensor, dtype) -> np.ndarray:
        return t.detach().cpu().numpy()[sel].astype(dtype)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"  # a file object: numpy appends no suffix; the glob never matches it
    with open(tmp, "wb") as f:
        np.savez_compressed(f, log_ratio=pick(log_ratio, np.float32), cum_log_ratio=pick(cum_log_ratio, np.float32),
                            position=pick(position, np.int32), token_index=cols[sel].astype(np.int32),
                            advantage=pick(advantages, np.float32), row_offsets=offsets,
                            step=np.int64(step), rank=np.int64(rank))
    os.replace(tmp, path)
    return path


@dataclass
class TokenDumper:
    """Collects the loss inputs of a step's micro-batches and writes them as one dump.

    every: dump every this many steps (0: never). max_tokens: budget per file.
    """

    run_dir: str
    every: int = 0
    max_tokens: int = 2_000_000
    rank: int = 0
    enabled: bool = True
    """False on ranks whose loss inputs duplicate another's (tensor-parallel ranks > 0)."""

    def __post_init__(self) -> None:
        self._rows: list[dict[str, torch.Tensor]] = []
        self.step = 0

    def active(self, step: int) -> bool:
        """Whether `step` is a dump step (on this rank)."""
        return self.enabled and self.every > 0 and step % self.every == 0

    def wrap(self, loss_fn):
        """`loss_fn(log_probs, batch)` that also records its inputs on dump steps."""
        def dumping_loss_fn(log_probs: torch.Tensor, batch: dict):
            if self.active(self.step):
                self.add(log_probs, batch["old_log_probs"], batch["advantages"], batch["response_mask"])
            return loss_fn(log_probs, batch)

        return dumping_loss_fn

    def begin(self, step: int) -> None:
        """Starts collecting for `step` (no-op collection when it is not a dump step)."""
        self.step = step
        self._rows = []

    def add(self, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
            mask: torch.Tensor) -> None:
        """Records one loss call's [b, T] inputs (detached, moved to CPU)."""
        if self.active(self.step):
            # float32 on the host: a step's rows are held until `flush` (a few hundred MB at most).
            arrays = token_arrays(log_probs, old_log_probs, advantages, mask)
            self._rows.append({k: v.to("cpu", torch.float32) for k, v in arrays.items()})

    def flush(self) -> str | None:
        """Writes the collected rows (padded to one width); returns the path, or None."""
        if not self._rows:
            return None
        width = max(r["mask"].shape[1] for r in self._rows)
        cat = {k: torch.cat([torch.nn.functional.pad(r[k], (0, width - r[k].shape[1])) for r in self._rows])
               for k in self._rows[0]}
        self._rows = []
        return write_token_dump(dump_path(self.run_dir, self.step, self.rank), log_ratio=cat["log_ratio"],
                                cum_log_ratio=cat["cum_log_ratio"], position=cat["position"], mask=cat["mask"],
                                advantages=cat["advantages"], step=self.step, rank=self.rank,
                                max_tokens=self.max_tokens)


def load_token_dumps(run_dir: str, step: int | None = None) -> dict[str, np.ndarray]:
    """Concatenates the dumps of `step` (None: the latest dumped step) over ranks: the arrays
    of the module doc (row_offsets re-based), plus `step`."""
    files = sorted(glob.glob(os.path.join(run_dir, DUMP_DIR, "step_*_rank_*.npz")))
    if not files:
        raise FileNotFoundError(f"no token dumps under {os.path.join(run_dir, DUMP_DIR)}")
    steps = sorted({int(os.path.basename(f).split("_")[1]) for f in files})
    step = steps[-1] if step is None else step
    files = [f for f in files if int(os.path.basename(f).split("_")[1]) == step]
    if not files:
        raise FileNotFoundError(f"no token dumps for step {step} (dumped steps: {steps})")
    parts = [dict(np.load(f)) for f in files]
    out = {k: np.concatenate([p[k] for p in parts]) for k in
           ("log_ratio", "cum_log_ratio", "position", "token_index", "advantage")}
    offsets, base = [np.zeros(1, np.int64)], 0
    for p in parts:
        offsets.append(p["row_offsets"][1:] + base)
        base += int(p["row_offsets"][-1])
    out["row_offsets"] = np.concatenate(offsets)
    out["step"] = np.int64(step)
    return out
