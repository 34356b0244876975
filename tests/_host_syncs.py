"""Counting the host syncs a piece of code would cause on a GPU, on any device.

On a CPU nothing synchronizes, so `count_host_syncs` records, through a torch function mode,
the operations that need a device value on the host or give a data-dependent shape:
`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `int()` / `float()` / `bool()` /
`operator.index` of a tensor, `nonzero`, `masked_select`, `unique`, boolean-mask indexing,
`repeat_interleave` without `output_size`, `bincount`. On CUDA,
`torch.cuda.set_sync_debug_mode` checks the real syncs instead.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

SYNCING = frozenset({"item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__",
                     "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
                     "bincount"})


def _data_dependent_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in items)


def sync_name(func, args, kwargs) -> str | None:
    """The name of the sync `func(*args, **kwargs)` would cause, or None."""
    name = getattr(func, "__name__", "")
    if name in SYNCING:
        return name
    if name in ("__getitem__", "index") and len(args) > 1 and _data_dependent_index(args[1]):
        return "boolean-mask indexing"
    if name == "repeat_interleave" and kwargs.get("output_size") is None:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if args else None)
        if torch.is_tensor(repeats) and repeats.numel() > 1:
            return "repeat_interleave"
    return None


class SyncCounter(TorchFunctionMode):
    """Active as a torch function mode: `events` lists (operation, innermost caller outside
    torch) of every sync seen; `pause()` excepts a block."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self.paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = None if self.paused else sync_name(func, args, kwargs)
        if name is not None:
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                      and f.name != "__torch_function__"]  # other modes (CPU mode) too
            where = f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
            self.events.append((name, where))
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Not counted inside (e.g. once-per-step work the caller allows)."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


@contextlib.contextmanager
def count_host_syncs() -> Iterator[SyncCounter]:
    """Counts while active; yields the `SyncCounter` (read `.events` afterwards)."""
    with SyncCounter() as counter:
        yield counter
