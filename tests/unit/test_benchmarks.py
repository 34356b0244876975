"""Every benchmark runs at a tiny size and prints its ratio line (a smoke run: the numbers at
these sizes mean nothing, but a benchmark that no longer runs, or no longer prints its ratio
against the baseline measured in the same run, fails here).

bench_step.py and bench_async.py train the tiny run, so their smoke runs live in
tests/e2e/test_tiny_paths.py, which has the tiny model and data at hand.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM = r"\d+(?:\.\d+)?(?:e[-+]\d+)?"

SMOKE = {  # script -> (tiny arguments, the ratio line)
    "bench_cp_cumsum.py": (["--cp", "2", "--batch", "2", "--seqlen", "64", "--reps", "5"],
                           rf"^\s+2\s+[\d,]+\s+[\d,]+\s+{NUM}\s+{NUM} \({NUM}\)\s+{NUM} \({NUM}\)\s+{NUM}\s+{NUM}$"),
    "bench_cp_actor.py": (["--seqlen", "64", "--loss-tokens", "256", "--reps", "1"],
                          rf"^\s+ratio cp2/cp1 = {NUM}\s"),
    "bench_ctpo_loss.py": (["--reps", "5", "--shapes", "2x64", "--clip", "plain"],
                           rf"^\s+2x64\s.*\s{NUM}x \({NUM}x\)\s"),
    "bench_policy_loss.py": (["--reps", "1", "--shapes", "2x64"],
                             rf"^\s+2x64(\s+{NUM}){{4}}\s+{NUM}x(\s+-?{NUM}%){{2}}$"),
    "bench_logprobs.py": (["--tokens", "64", "--vocab", "512", "--tp", "2", "--reps", "1", "--chunk", "32"],
                          rf"^\s+2\s+fwd\+bwd(\s+{NUM}){{7}}$"),
    "bench_padding.py": (["--trajectories", "32", "--dp", "2", "--budget", "4096", "--forward-samples", "4",
                          "--scale", "128", "--reps", "1"],
                         rf"^\s+time ratio budget/fixed-pp = {NUM}\s+packed/fixed-pp = {NUM}$"),
    "bench_prefix_affinity.py": (["--servers", "2", "--prompts", "2", "--samples", "2", "--turns", "2",
                                  "--prompt-len", "16", "--reps", "5"],
                                 rf"^\s+hash\s+hit rate {NUM} of ideal\s+\(x{NUM} vs none\)$"),
    "bench_sandbox.py": (["--reps", "3", "--runs", "4", "--workers", "2"], rf"\| ratio {NUM}x$"),
    "bench_weight_sync.py": (["--hidden", "64", "--layers", "1", "--vocab", "256", "--reps", "5", "--bucket-mb", "1"],
                             rf"^sync distributed:flattened_bucket\s*: .* ratio vs raw\s+{NUM}$"),
}


def test_every_benchmark_has_a_smoke_run():
    scripts = {f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if re.match(r"bench_\w+\.py$", f)}
    assert scripts == set(SMOKE) | {"bench_step.py", "bench_async.py"}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_prints_its_ratio(script):
    args, ratio_line = SMOKE[script]
    out = subprocess.run([sys.executable, os.path.join("benchmarks", script), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    match = re.search(ratio_line, out.stdout, re.M)
    assert match, f"no ratio line in:\n{out.stdout}"
    print(match.group(0))
