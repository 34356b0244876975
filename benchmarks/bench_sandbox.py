"""Sandbox cost: isolated `run_code` vs a bare `python -c` subprocess, and pool throughput.

    python benchmarks/bench_sandbox.py [--reps 7] [--runs 32] [--workers 8]

Prints the median of `--reps` repetitions for each case and the ratios:
  cpu      : CPU time of the child processes of one run, sandboxed vs bare `python -I`
  latency  : one run of a small program, sandboxed vs bare subprocess (isolation overhead)
  pool     : `--runs` programs that each sleep 0.2 s, SandboxPool(--workers) vs one after another
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from ctpo_megatron.rollout.sandbox import SandboxPool, run_code
from ctpo_megatron.rollout.sandbox.selftest import self_test

PROGRAM = "import math\nprint(sum(math.sqrt(i) for i in range(10000)))"
SLEEPER = "import time\ntime.sleep(0.2)\nprint('done')"


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _median_cost(fn, reps: int) -> tuple[float, float]:
    """Medians over `reps` calls of `fn`: (wall seconds, CPU seconds of its child processes)."""
    fn()  # warm-up (page cache, first import)
    times, cpus = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), _children_cpu_s()
        fn()
        times.append(time.perf_counter() - t)
        cpus.append(_children_cpu_s() - c)
    return statistics.median(times), statistics.median(cpus)


def _median_s(fn, reps: int) -> float:
    return _median_cost(fn, reps)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7, help="repetitions per case (median reported)")
    parser.add_argument("--runs", type=int, default=32, help="programs per pool measurement")
    parser.add_argument("--workers", type=int, default=8, help="SandboxPool workers")
    args = parser.parse_args()

    print(f"python {platform.python_version()}  cpus {os.cpu_count()}  uid {os.geteuid()}  "
          f"kernel {platform.release()}")
    print(self_test().summary())  # what the measured runs pay for
    bare, bare_cpu = _median_cost(lambda: subprocess.run([sys.executable, "-I", "-c", PROGRAM], capture_output=True,
                                                         check=True), args.reps)
    boxed, boxed_cpu = _median_cost(lambda: run_code(PROGRAM, timeout=10), args.reps)
    isolation = run_code("pass").isolation
    print(f"cpu      bare subprocess {bare_cpu * 1e3:7.1f} ms | run_code ({isolation}) {boxed_cpu * 1e3:7.1f} ms "
          f"(CPU time of the child processes per run)")
    print(f"latency  bare subprocess {bare * 1e3:7.1f} ms | run_code ({isolation}) {boxed * 1e3:7.1f} ms "
          f"| ratio {boxed / bare:.2f}x")

    serial = _median_s(lambda: [run_code(SLEEPER) for _ in range(args.runs // 4)], max(1, args.reps // 2)) * 4
    with SandboxPool(max_workers=args.workers) as pool:
        pooled = _median_s(lambda: pool.map([SLEEPER] * args.runs), args.reps)
    print(f"pool     {args.runs} x sleep(0.2): sequential {serial:6.2f} s (extrapolated from "
          f"{args.runs // 4}) | pool({args.workers}) {pooled:6.2f} s | speedup {serial / pooled:.1f}x "
          f"| {args.runs / pooled:.1f} runs/s")


if __name__ == "__main__":
    main()
