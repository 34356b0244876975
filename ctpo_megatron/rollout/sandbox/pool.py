"""`SandboxPool`: many sandboxed runs at once, from threads or asyncio."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future, ThreadPoolExecutor

from ctpo_megatron.rollout.sandbox.config import SandboxConfig, SandboxResult, SandboxSetupError
from ctpo_megatron.rollout.sandbox.runner import run_code

logger = logging.getLogger(__name__)


class SandboxPool:
    """Runs up to `max_workers` sandboxes concurrently.

    Each run is its own process tree (see `run_code`); the pool only bounds concurrency with
    a thread pool whose threads block in `run_code`. Use as a context manager or call
    `close()`.

    Failures: a host that cannot build the sandbox at all fails here, at construction
    (`check`: one trial run, SandboxSetupError). Afterwards a run never raises because of the
    code, and a host-side failure of one run (e.g. fork refused) is logged and returned as a
    failed result (`SandboxResult.error` set, exit_code 1, the reason in stderr), so one sample
    cannot fail a whole rollout batch.
    """

    def __init__(self, max_workers: int = 8, config: SandboxConfig | None = None,
                 default_timeout: float = 10.0, check: bool = True) -> None:
        if max_workers <= 0:
            raise ValueError(f"SandboxPool: max_workers must be > 0, got {max_workers}")
        self.config = config or SandboxConfig()
        if max_workers > self.config.uid_slots:
            raise ValueError(f"SandboxPool: max_workers={max_workers} exceeds "
                             f"SandboxConfig.uid_slots={self.config.uid_slots}")
        self.default_timeout = self.config.check_timeout(default_timeout, "SandboxPool(default_timeout)")
        if check:
            self.check()
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sandbox")

    def check(self) -> None:
        """One trial run; SandboxSetupError when this host cannot build the sandbox."""
        res = run_code("print('ok')", timeout=min(60.0, self.config.max_timeout_s), config=self.config)
        if res.stdout != "ok\n" or res.exit_code != 0:
            raise SandboxSetupError(f"sandbox: the trial run failed (exit {res.exit_code}, timed out "
                                    f"{res.timed_out}): {res.stderr[-2000:]}")

    def submit(self, code: str, timeout: float | None = None) -> Future[SandboxResult]:
        """Schedules one run; returns a concurrent.futures.Future of its result.
        timeout: seconds (None: the pool's default); ValueError unless finite and in
        (0, SandboxConfig.max_timeout_s]."""
        t = self.default_timeout if timeout is None else self.config.check_timeout(timeout, "SandboxPool.submit")
        return self._executor.submit(self._run, code, t)

    def _run(self, code: str, timeout: float) -> SandboxResult:
        try:
            return run_code(code, timeout, self.config)
        except (SandboxSetupError, OSError) as e:
            logger.error("sandbox: a run failed on the host side; reported as a failed run: %s", e)
            return SandboxResult(stdout="", stderr=f"[sandbox] the sandbox failed: {e}\n", exit_code=1,
                                 timed_out=False, error=str(e))

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
