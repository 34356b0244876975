"""The embedded server's TP rank structure, as SGLang has it for weight updates.

An SGLang server started with `--tp-size N` is N ranks: each joins the weight-update group at
`rank_offset + tp_rank`, receives every broadcast, and decodes its own entry
(`serialized_named_tensors[tp_rank]`) of a tensor update. The embedded server keeps one model
(rank 0 serves generation); ranks 1..N-1 are threads that do exactly the communication and
decoding a real rank does and keep a digest of what they received, so a wrong world size,
rank offset or entry count fails here as it would against SGLang, and tests can check that
every rank got every byte (`/server_info` `tp_ranks`).
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order (any dtype, bf16 included)."""
    return memoryview(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


@dataclass
class RankRecord:
    """What one TP rank received in the current (or last) weight-update session."""

    tp_rank: int
    received_bytes: int = 0
    tensors: int = 0
    digest: "hashlib._Hash | None" = None
    """sha256 of every received byte in order; only with digests on (it costs a pass over the data)."""

    def add(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            if self.digest is not None:
                self.digest.update(tensor_bytes(t))
            self.received_bytes += t.numel() * t.element_size()
            self.tensors += 1

    def as_dict(self) -> dict:
        return {"tp_rank": self.tp_rank, "received_bytes": self.received_bytes, "tensors": self.tensors,
                "sha256": self.digest.hexdigest() if self.digest is not None else None}


class TPRanks:
    """The N ranks of one server: run a function on all of them at once, record receipts."""

    def __init__(self, tp_size: int, digests: bool = False):
        if tp_size < 1:
            raise ValueError(f"--tp-size must be >= 1, got {tp_size}")
        self.size = tp_size
        self.digests = digests
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """A new weight-update session starts."""
        with self._lock:
            self.records = [RankRecord(r, digest=hashlib.sha256() if self.digests else None)
                            for r in range(self.size)]

    def record(self, tp_rank: int, tensors: list[torch.Tensor]) -> None:
        with self._lock:
            self.records[tp_rank].add(tensors)

    def run(self, fn: Callable[[int], T]) -> list[T]:
        """`fn(tp_rank)` on every rank concurrently (collectives need all ranks at once);
        raises the first error after every rank returned. Fresh threads each call: a receive
        stuck in an abandoned group must not hold back the next group's join."""
        pool = ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="tp-rank")
        futures = [pool.submit(fn, r) for r in range(self.size)]
        pool.shutdown(wait=False)
        results, errors = [], []
        for fut in futures:
            try:
                results.append(fut.result())
            except Exception as e:  # noqa: BLE001 - re-raised below, after every rank settled
                errors.append(e)
        if errors:
            raise errors[0]
        return results

    def as_list(self) -> list[dict]:
        with self._lock:
            return [r.as_dict() for r in self.records]
