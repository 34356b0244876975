"""Process-wide logging setup: INFO on rank 0, WARNING elsewhere, a `[rank r]` prefix."""

from __future__ import annotations

import logging
import os
import sys

_WARNED: set[str] = set()


def init_logging(rank: int | None = None, level: int | None = None) -> None:
    """Configures the root logger once per process.

    rank: this process's global rank (default: $RANK or 0). Rank 0 logs INFO, others WARNING,
    unless `level` is given.
    """
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if level is None:
        level = logging.INFO if rank == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[%(asctime)s rank {rank}] %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def warn_once(logger: logging.Logger, message: str) -> None:
    """Logs `message` as a warning the first time it is seen in this process."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)
