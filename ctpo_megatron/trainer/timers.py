"""Wall-clock phase timers for the step-time breakdown (`time/<phase>` metrics)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class PhaseTimer:
    """Accumulates seconds per named phase within one step; `pop()` returns and resets them."""

    def __init__(self) -> None:
        self._totals: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the enclosed block and adds it to phase `name`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._totals[name] = self._totals.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """{`time/<phase>`: seconds} of everything timed since the last pop."""
        out = {f"time/{k}": v for k, v in self._totals.items()}
        self._totals = {}
        return out


def format_eta(seconds: float) -> str:
    """`1h02m`, `3m05s` or `42s`."""
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"
