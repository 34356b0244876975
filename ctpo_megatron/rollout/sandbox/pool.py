"""`SandboxPool`: many sandboxed runs at once, from threads or asyncio."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future, ThreadPoolExecutor

from ctpo_megatron.rollout.sandbox.config import SandboxConfig, SandboxResult
from ctpo_megatron.rollout.sandbox.runner import run_code

logger = logging.getLogger(__name__)


class SandboxPool:
    """Runs up to `max_workers` sandboxes concurrently.

    Each run is its own process tree (see `run_code`); the pool only bounds concurrency with
    a thread pool whose threads block in `run_code`. Use as a context manager or call
    `close()`.
    """

    def __init__(self, max_workers: int = 8, config: SandboxConfig | None = None,
                 default_timeout: float = 10.0) -> None:
        if max_workers <= 0:
            raise ValueError(f"SandboxPool: max_workers must be > 0, got {max_workers}")
        self.config = config or SandboxConfig()
        if max_workers > self.config.uid_slots:
            raise ValueError(f"SandboxPool: max_workers={max_workers} exceeds "
                             f"SandboxConfig.uid_slots={self.config.uid_slots}")
        self.default_timeout = default_timeout
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sandbox")

    def submit(self, code: str, timeout: float | None = None) -> Future[SandboxResult]:
        """Schedules one run; returns a concurrent.futures.Future of its result."""
        return self._executor.submit(run_code, code, timeout or self.default_timeout, self.config)

    async def run(self, code: str, timeout: float | None = None) -> SandboxResult:
        """Awaitable run on the pool's threads (does not block the event loop)."""
        return await asyncio.wrap_future(self.submit(code, timeout))

    def map(self, codes: list[str], timeout: float | None = None) -> list[SandboxResult]:
        """Runs all `codes` concurrently; results in input order."""
        futures = [self.submit(c, timeout) for c in codes]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Waits for running sandboxes and stops the worker threads."""
        self._executor.shutdown(wait=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
