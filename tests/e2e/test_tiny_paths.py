"""The other paths through the tiny run's step, each launched as the README does
(`launch/ctpo_tiny.sh`, or the benchmark scripts that train the tiny run): PP 2 with token-budget
micro-batches, the GRPO baseline and the `disk` weight transport; and the smoke runs of
benchmarks/bench_step.py and benchmarks/bench_async.py at a tiny size.
"""

import glob
import os
import re
import shutil
import sys

import pytest

from tests.e2e._launch import TIMEOUT_S, Launch, read_records, run_dir, short_run_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S)]


def test_pp2_grpo_with_rollout_log_probs(tiny_init, tmp_path):
    """The other paths through a step: PP 2 with token-budget micro-batches (megatron's
    variable_seq_lengths), the GRPO baseline, the engine's log-probs as old log-probs (no
    mismatch correction), the `disk` weight transport."""
    run = run_dir(tmp_path, tiny_init)
    launch = Launch(short_run_overrides() + [
        "parallel=pp2", "algo=grpo", "trainer.old_log_probs=rollout", "correction.enabled=false",
        "rollout.weight_sync.transport=disk", "trainer.total_steps=2", "trainer.eval_every=0",
        "actor.micro_batch_tokens=256"],
        run, str(tmp_path / "launch"))
    logs = launch.complete()
    records = read_records(run)
    assert [r["step"] for r in records] == [1, 2], logs
    assert not any(k.startswith("mismatch/rollout_is") for k in records[-1])
    assert records[-1]["weight_sync/bytes"] > 0 and records[-1]["actor/valid_tokens"] > 0
    # the padding metric: every token computed is counted, none is useful twice
    assert 1.0 <= records[-1]["perf/padding_ratio"] < 2.0 and records[-1]["perf/actor_tokens_useful"] > 0
    assert os.path.isdir(os.path.join(run, "weight_sync"))


def _bench_stdout(script: str, args: list[str], run: str, logs: str) -> tuple[str, str]:
    """Runs benchmarks/`script` to completion (within the test's budget); (stdout, logs)."""
    bench = Launch(args, run, logs, command=[sys.executable, f"benchmarks/{script}"])
    text = bench.complete()
    return open(bench.out_path).read(), text


def test_bench_step_smoke(tiny_init, tmp_path):
    """benchmarks/bench_step.py at a tiny size (2 steps of 8 prompts: the tiny config's mini-batch)
    prints its CTPO-vs-GRPO ratio line."""
    out = tmp_path / "bench"
    shutil.copytree(tiny_init, out / "init")  # the benchmark reuses a complete OUT/init
    stdout, logs = _bench_stdout("bench_step.py", ["--steps", "2", "--prompts-per-step", "8", "--reps", "5",
                                                   "--out", str(out)], str(out), str(tmp_path / "bench"))
    assert re.search(r"^loss per step .*: ctpo [\d.]+ ms, grpo [\d.]+ ms, ratio [\d.]+x$", stdout, re.M), logs
    assert re.search(r"^CTPO loss overhead vs GRPO: -?[\d.]+% of the step time", stdout, re.M), logs


def test_bench_async_smoke(tiny_init, tmp_path):
    """benchmarks/bench_async.py at a tiny size (3 steps of 8 prompts, one epoch, one pair of
    runs, 1 ms simulated decode) with the trainer on one rank (`--trainer-ranks 1`; the default
    two-rank layout is what every other e2e run uses) prints its layout, the sync run's R and T,
    the server's simulated-decode figures, both runs' rows and the step-time ratio; both runs
    trained with that many ranks."""
    ranks = 1
    out = str(tmp_path / "bench")
    stdout, logs = _bench_stdout("bench_async.py", ["--steps", "3", "--prompts-per-step", "8", "--repeats", "1",
                                                    "--epochs", "1", "--decode-delay", "0.001", "--init", tiny_init,
                                                    "--trainer-ranks", str(ranks), "--out", out],
                                 out, str(tmp_path / "bench_async"))
    assert re.search(rf"^tiny run, trainer {ranks} rank\(s\) \(parallel=tp{ranks}\), ", stdout, re.M), logs
    train_logs = sorted(glob.glob(os.path.join(out, "k[01]_*", "train.log")))
    assert len(train_logs) == 2, train_logs
    for path in train_logs:
        assert f"world size {ranks} = tp {ranks} x pp 1 x cp 1 x dp 1" in open(path).read(), path
    assert re.search(r"^sync run: rollout R [\d.]+ s, training T [\d.]+ s ", stdout, re.M), logs
    # The server logged its simulated-decode summary (read back from its log): real steps ran.
    compute = re.search(r"^server decode compute ([\d.]+) ms/step \(sync\)", stdout, re.M)
    assert compute and float(compute.group(1)) > 0, logs
    for k in (0, 1):
        assert re.search(rf"^{k} +[\d.]+ +[\d.]+ +[\d.]+ +\d+% +[\d.]+ ", stdout, re.M), logs
    assert re.search(r"^step time ratio \(max_staleness=1 / 0\): [\d.]+$", stdout, re.M), logs
