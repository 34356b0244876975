"""Run a function on N local ranks (gloo, CPU mode when no GPU) and collect the results.

Used by the multi-process tests and by local tools. Every rank's traceback is propagated to the
caller, and a hard timeout kills the whole group, so a hung collective fails instead of hanging.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable

from ctpo_megatron.parallel.net import free_port


class RankError(RuntimeError):
    """One or more ranks failed; the message holds every failing rank's traceback."""


def _worker(rank: int, world_size: int, port: int, env: dict[str, str], fn: Callable,
            args: tuple, results: "mp.Queue") -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        from ctpo_megatron.parallel.state import destroy_parallel, init_distributed

        init_distributed(timeout_minutes=5)
        try:
            value = fn(rank, world_size, *args)
        finally:
            destroy_parallel()
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        results.put((rank, False, traceback.format_exc()))


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0,
                 env: dict[str, str] | None = None) -> list[Any]:
    """Runs `fn(rank, world_size, *args)` on `world_size` spawned processes.

    torch.distributed is initialized (gloo in CPU mode) before `fn` runs and destroyed after.
    `fn` and `args` must be picklable (module-level function). Returns the per-rank return
    values ordered by rank. Raises RankError with every failing rank's traceback, or
    TimeoutError after `timeout` seconds (all processes are killed either way).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    # Not daemonic: ranks may start processes of their own (megatron's dist-checkpoint writer
    # starts a multiprocessing Manager). The finally block below kills them on any exit.
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, env, fn, args, results),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        while len(values) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"run_on_ranks({getattr(fn, '__name__', fn)}, world_size={world_size}) "
                    f"timed out after {timeout:.0f}s; ranks done: {sorted(values)}, "
                    f"failed: {sorted(errors)}" + _format_errors(errors))
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and p.exitcode not in (0, None)
                        and r not in values and r not in errors]
                for r in dead:
                    # Give a late traceback a moment to arrive before reporting a bare exit code.
                    errors[r] = f"process exited with code {procs[r].exitcode} without a result"
                if errors:
                    # A failed rank usually leaves its peers blocked in a collective.
                    _drain(results, values, errors, grace=2.0)
                    break
                continue
            (values if ok else errors)[rank] = value
            if errors:
                _drain(results, values, errors, grace=2.0)
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
    if errors:
        raise RankError(f"{len(errors)} of {world_size} ranks failed" + _format_errors(errors))
    return [values[r] for r in range(world_size)]


def _drain(results: "mp.Queue", values: dict, errors: dict, grace: float) -> None:
    end = time.monotonic() + grace
    while time.monotonic() < end:
        try:
            rank, ok, value = results.get(timeout=max(0.05, end - time.monotonic()))
        except queue.Empty:
            return
        (values if ok else errors)[rank] = value


def _format_errors(errors: dict[int, str]) -> str:
    return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
