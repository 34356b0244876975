"""The tiny run end to end through `launch/ctpo_tiny.sh` itself (README's first command, with
its documented step-count and other Hydra overrides): warm start, then CTPO through the real
pipeline (Megatron actor at TP 2 on 2 gloo ranks, the embedded rollout server over HTTP,
sandboxed tool calls, weight resync, csrc kernels), killed with SIGKILL after a checkpoint and
resumed by rerunning the same command, which then draws the plots and prints the summary.

Asserts: the resumed run continues from the checkpoint as if never stopped (the step redone
after the kill reproduces the killed run's metrics; no step logged twice; data position
continuous), held-out accuracy rises by a clear margin over the warm-started policy, and the
launcher's last line is `held-out accuracy: a -> b` with the logged values. Fixed seeds
throughout. Every wait has a deadline inside the test's timeout; a failure shows the logs.
"""

import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e._trainer import run_trainer, trainer_command

# Deadlines inside the timeout: the shared setup (<= SETUP_S, run in the first test's item) plus
# one test's BUDGET_S stays below TIMEOUT_S, so a slow run fails here with its logs attached.
TIMEOUT_S, SETUP_S, BUDGET_S = 1700, 600, 1000
pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The README's command for the tiny run; tests/unit/test_readme.py checks it is still there.
TINY_COMMAND = ["bash", "launch/ctpo_tiny.sh"]
STEPS = 12
PROMPTS_PER_STEP = 16
KILL_AFTER_STEP = 5  # a checkpoint exists after step 4 (save_every=4); step 5 is logged past it
SUMMARY = re.compile(r"^held-out accuracy: (\d\.\d\d) -> (\d\.\d\d) \(step (\d+) -> step (\d+), ")


def _overrides() -> list[str]:
    return [f"trainer.total_steps={STEPS}", f"trainer.prompts_per_step={PROMPTS_PER_STEP}",
            "trainer.eval_every=100", "trainer.save_every=4", "data.max_val_prompts=32",
            "trainer.dump_every=6"]


def _records(run: str) -> list[dict]:
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


def _server_pids(log_text: str) -> list[int]:
    return [int(p) for p in re.findall(r"started server\d+ \(pid (\d+)\)", log_text)]


class Launch:
    """One `bash launch/ctpo_tiny.sh ...` (or `command`) in its own session, output in log files."""

    def __init__(self, args: list[str], run: str, logs: str, command: list[str] = TINY_COMMAND):
        self.out_path, self.err_path = f"{logs}.out", f"{logs}.err"
        env = {**os.environ, "RUN_DIR": run, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(command + args, cwd=ROOT, env=env, stdout=out, stderr=err,
                                         start_new_session=True)

    def logs(self, chars: int = 6000) -> str:
        text = [f"--- {path} (last {chars} chars) ---\n{open(path).read()[-chars:]}"
                for path in (self.out_path, self.err_path)]
        return "\n".join(text)

    def wait(self, deadline: float, until=None) -> None:
        """Until it exits (or `until()` holds); past `deadline` it is killed and the test fails."""
        while self.proc.poll() is None and not (until and until()):
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"launcher still running at its deadline:\n{self.logs()}")
            time.sleep(0.5)

    def complete(self) -> str:
        """Waits for it to exit within the test's budget (always cleaned up after) and checks it
        succeeded; its logs."""
        try:
            self.wait(time.monotonic() + BUDGET_S)
        finally:
            self.kill()
        text = self.logs()
        assert self.proc.returncode == 0, text
        return text

    def kill(self) -> None:
        """SIGKILL the launcher's session (no handler runs) and the rollout server's own session."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        for pid in _server_pids(open(self.err_path).read() + open(self.out_path).read()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny") / "init")
    subprocess.run([sys.executable, "-m", "ctpo_megatron.data.tiny_setup", out], cwd=ROOT,
                   check=True, timeout=SETUP_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


def _run_dir(tmp_path, tiny_init) -> str:
    """A run directory whose init/ (model, data) the launcher finds complete and reuses."""
    run = str(tmp_path / "run")
    shutil.copytree(tiny_init, os.path.join(run, "init"))
    return run


def test_tiny_run_learns_and_resumes_after_sigkill(tiny_init, tmp_path):
    deadline = time.monotonic() + BUDGET_S
    run = _run_dir(tmp_path, tiny_init)
    first = Launch(_overrides(), run, str(tmp_path / "first"))
    try:
        first.wait(deadline, until=lambda: any(r["step"] >= KILL_AFTER_STEP for r in _records(run)))
        assert first.proc.poll() is None, f"training exited early:\n{first.logs()}"
    finally:
        first.kill()
    latest = open(os.path.join(run, "checkpoints", "latest")).read().strip()
    assert latest, "no complete checkpoint before the kill"
    killed = {r["step"]: r for r in _records(run)}
    assert max(killed) >= KILL_AFTER_STEP

    second = Launch(_overrides(), run, str(tmp_path / "second"))  # the same command resumes
    second.wait(deadline)
    logs = second.logs()
    assert second.proc.returncode == 0, logs
    assert re.search(r"resumed from \S+ at step 4 ", open(second.err_path).read()), logs

    records = _records(run)
    # "As if never stopped": step 5 is redone from the step-4 checkpoint with the same weights,
    # optimizer state, prompts and sampling seeds, so it reproduces the killed run's step 5.
    redone = records[KILL_AFTER_STEP]
    assert redone["data/offset"] == killed[KILL_AFTER_STEP]["data/offset"]
    for key in ("reward/mean", "response_length/mean", "tool/use_rate"):
        assert redone[key] == killed[KILL_AFTER_STEP][key], key
    assert redone["actor/loss"] == pytest.approx(killed[KILL_AFTER_STEP]["actor/loss"], rel=1e-4, abs=1e-6)
    steps = [r["step"] for r in records]
    assert steps == list(range(STEPS + 1)), f"steps logged twice or lost: {steps}"
    # The data position continues where the checkpoint left it: PROMPTS_PER_STEP per step.
    assert [r["data/offset"] for r in records[1:]] == [PROMPTS_PER_STEP * s for s in range(1, STEPS + 1)]
    before, after = records[0]["eval/accuracy"], records[-1]["eval/accuracy"]
    print(f"held-out accuracy: {before:.2f} -> {after:.2f}")
    assert 0.0 < before < 0.6, f"warm start should be imperfect, got {before}"
    assert after >= before + 0.15, f"held-out accuracy did not rise clearly: {before} -> {after}"
    for key in ("actor/clipfrac_high", "actor/clipfrac_low", "actor/clipfrac_dual", "actor/is_ratio_p50",
                "mismatch/rollout_is_mean", "time/rollout", "time/old_log_probs", "time/update",
                "time/weight_sync", "tool/use_rate", "response_length/mean", "weight_sync/bytes"):
        assert key in records[-1], key
    assert any(k.startswith("clip_rate_by_pos/") for k in records[-1])
    # Per-token dumps (TP rank 0 of each DP rank: rank 0 only at TP 2) and the figures drawn from them.
    from ctpo_megatron.plot import plot_run
    from ctpo_megatron.trainer.dumps import load_token_dumps

    dumps = sorted(f for f in os.listdir(os.path.join(run, "token_dumps")) if f.endswith(".npz"))
    assert dumps == ["step_0000006_rank_0.npz", "step_0000012_rank_0.npz"]  # a kill may leave a .tmp
    dump = load_token_dumps(run)
    assert int(dump["step"]) == 12 and len(dump["log_ratio"]) == dump["row_offsets"][-1] > 0
    pngs = plot_run(run)
    assert {os.path.basename(p) for p in pngs} >= {"logratio_std.png", "clip_rate_exact.png"}

    # The launcher's promised ending: the plots, then `held-out accuracy: <before> -> <after>`.
    out_lines = open(second.out_path).read().strip().splitlines()
    summary = SUMMARY.match(out_lines[-1])
    assert summary, logs
    assert summary.groups() == (f"{before:.2f}", f"{after:.2f}", "0", str(STEPS)), out_lines[-1]
    for name in ("reward.png", "clip_by_position.png", "ratio.png"):
        assert os.path.join(run, "plots", name) in out_lines, logs
    _run_readme_after_training(run, tmp_path, deadline)


def _readme_command(prefix: str) -> str:
    from tests.unit.test_readme import readme_commands

    found = [c for c in readme_commands() if c.startswith(prefix)]
    assert len(found) == 1, f"README.md should show one command starting {prefix!r}: {found}"
    return found[0]


def _run_readme_after_training(run: str, tmp_path, deadline: float) -> None:
    """README's "After training" commands as written, on this run: `runs/tiny` is the run
    directory and the server port a free one (the only substitutions). Export the latest
    checkpoint, serve the export with the embedded server, score 8 tool-using samples."""
    from ctpo_megatron.parallel.net import free_port

    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    port = str(free_port())

    def argv(command: str) -> list[str]:
        words = shlex.split(command.replace("runs/tiny", run))
        return [sys.executable if w == "python" else w for w in words]

    export = subprocess.run(argv(_readme_command("python -m ctpo_megatron.export ")), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=max(deadline - time.monotonic(), 1))
    assert export.returncode == 0, export.stdout[-3000:] + export.stderr[-3000:]
    assert os.path.exists(os.path.join(run, "hf", "config.json")), os.listdir(os.path.join(run, "hf"))
    serve = argv(_readme_command("python -m ctpo_megatron.rollout.serving.server ").replace("30000", port))
    server_log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(serve, cwd=ROOT, env=env, stdout=server_log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        agent_cmd = argv(_readme_command("python -m ctpo_megatron.rollout.agent ").replace("30000", port))
        while True:  # the agent needs a listening server: retry until it answers or the deadline
            agent = subprocess.run(agent_cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                   timeout=max(deadline - time.monotonic(), 1))
            if agent.returncode == 0 or server.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        logs = agent.stderr[-3000:] + open(tmp_path / "server.log").read()[-3000:]
        assert agent.returncode == 0, logs
        rows = [json.loads(line) for line in agent.stdout.splitlines() if line.startswith("{")]
        assert len(rows) == 8 and all(isinstance(r["correct"], bool) for r in rows), logs
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        server_log.close()


def test_pp2_grpo_with_rollout_log_probs(tiny_init, tmp_path):
    """The other paths through a step: PP 2 with token-budget micro-batches (megatron's
    variable_seq_lengths), the GRPO baseline, the engine's log-probs as old log-probs (no
    mismatch correction), the `disk` weight transport."""
    run = _run_dir(tmp_path, tiny_init)
    launch = Launch(_overrides() + [
        "parallel=pp2", "algo=grpo", "trainer.old_log_probs=rollout", "correction.enabled=false",
        "rollout.weight_sync.transport=disk", "trainer.total_steps=2", "trainer.eval_every=0",
        "actor.micro_batch_tokens=256"],
        run, str(tmp_path / "launch"))
    logs = launch.complete()
    records = _records(run)
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


# The synchronous run that the other layouts and the asynchronous run are compared with. It is
# recorded on this machine, not kept in the repo: the rollouts sample from a model warm-started by
# 400 SFT steps, so every sampled token depends on the CPU's float kernels, and a recording
# from one machine type fails on another.
REFERENCE_ARGS = ["parallel=tp1", "trainer.total_steps=3", "trainer.prompts_per_step=4",
                  "trainer.mini_batch_prompts=2", "trainer.eval_every=3", "trainer.eval_samples=2",
                  "data.max_val_prompts=8", "trainer.save_every=0", "trainer.tensorboard=false",
                  "rollout.n_samples=4", "actor.micro_batch_size=2"]
ROLLOUT_KEYS = ("reward/", "eval/", "accuracy", "response_length/", "generated_tokens/", "tool/", "boxed_rate",
                "data/", "sampling/")
"""Values that depend only on the rollouts (and so on the weights the servers hold)."""


def _rollout_values(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.startswith(ROLLOUT_KEYS)}


@pytest.fixture(scope="module")
def sync_reference(tiny_init, tmp_path_factory) -> list[dict]:
    """The records of the synchronous run of REFERENCE_ARGS: TP 1 x DP 2 on 2 ranks, 3 steps of
    2 updates x 2 micro-batches, held-out evaluation at steps 0 and 3."""
    run = str(tmp_path_factory.mktemp("sync") / "run")
    done = run_trainer(run, f"{tiny_init}/model", f"{tiny_init}/train.parquet", f"{tiny_init}/val.parquet",
                       REFERENCE_ARGS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    records = _records(run)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    return records


def test_tp2_run_equals_the_dp2_run(tiny_init, sync_reference, tmp_path):
    """The same run at TP 2 x DP 1 (one replica gets the whole step batch) and at TP 1 x DP 2
    (each replica gets its shard of it) gives the same rollouts, rewards, held-out results and
    data position at every step, and the same loss statistics, losses and gradient norms to
    1e-4 (the layouts sum in different orders, and the embedded server's log-probs vary by
    ~1e-7 with how requests happen to be batched, which moves the IS weights by as much). A
    replica that trained on the wrong shard, or twice on one, changes the loss and grad norm."""
    run = str(tmp_path / "run")
    done = run_trainer(run, f"{tiny_init}/model", f"{tiny_init}/train.parquet", f"{tiny_init}/val.parquet",
                       [a for a in REFERENCE_ARGS if not a.startswith("parallel=")] + ["parallel=tp2"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    records = _records(run)
    assert "world size 2 = tp 2 x pp 1 x cp 1 x dp 1" in open(os.path.join(run, "train.log")).read()
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for ref, new in zip(sync_reference, records):
        assert _rollout_values(new) == _rollout_values(ref), ref["step"]
        actor = [k for k in ref if k.startswith(("actor/", "clip_rate_by_pos/"))]
        assert actor or not ref["step"]
        for key in actor:
            # A ratio within ~1e-7 of a histogram bin edge may land in the next bin (2^-10 wide).
            rel = 3e-3 if key.startswith(("actor/is_ratio_p", "actor/la_scale_p")) else 1e-4
            assert new[key] == pytest.approx(ref[key], rel=rel, abs=1e-6), (ref["step"], key)
        if ref["step"]:
            assert new["staleness/0"] == 1.0 and new["staleness/max"] == 0.0  # synchronous


def test_rollouts_run_one_step_ahead(tiny_init, sync_reference, tmp_path):
    """rollout.max_staleness=1: step s+1's rollouts are generated while step s trains. Step 1
    matches the synchronous run (same weights, same seed); later steps train on tokens at most
    one version old; the data position advances exactly as in the synchronous run."""
    run = str(tmp_path / "run")
    done = run_trainer(run, f"{tiny_init}/model", f"{tiny_init}/train.parquet", f"{tiny_init}/val.parquet",
                       [*REFERENCE_ARGS, "rollout.max_staleness=1"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    records = _records(run)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert _rollout_values(records[1]) == _rollout_values(sync_reference[1])
    assert records[1]["actor/loss"] == pytest.approx(sync_reference[1]["actor/loss"], rel=1e-4)
    for r, ref in zip(records[1:], sync_reference[1:]):
        assert r["data/offset"] == ref["data/offset"]
        assert r["staleness/max"] <= 1.0 and "rollout/partial" in r and 0 <= r["perf/trainer_idle_frac"] <= 1
    assert records[1]["staleness/0"] == 1.0  # generated with the initial weights for step 1
    # generation of step s+1 starts as step s starts training, before its weights reach the
    # servers: some of those tokens come from the previous version
    assert max(records[2]["staleness/mean"], records[3]["staleness/mean"]) > 0


def test_async_dynamic_sampling_resumes_exactly_after_sigkill(tiny_init, tmp_path):
    """rollout.max_staleness=1 with dynamic sampling: the producer over-samples ahead. Killed
    with SIGKILL after step 3 (checkpoint after step 2; step 4's rollouts in flight) and rerun:
    every step is logged once, and the data position advances by exactly the prompts each step
    drew (none skipped or repeated across the kill), tokens at most one version old."""
    deadline = time.monotonic() + BUDGET_S
    run = str(tmp_path / "run")
    replaced = ("trainer.total_steps=", "trainer.eval_every=", "trainer.save_every=")
    args = [a for a in REFERENCE_ARGS if not a.startswith(replaced)] + [
        "trainer.total_steps=4", "trainer.eval_every=0", "trainer.save_every=2", "rollout.max_staleness=1",
        "rollout.filter_zero_variance_groups=true", "rollout.max_sampling_rounds=3"]
    cmd = trainer_command(run, f"{tiny_init}/model", f"{tiny_init}/train.parquet", f"{tiny_init}/val.parquet", args)
    first = Launch([], run, str(tmp_path / "first"), command=cmd)
    try:
        first.wait(deadline, until=lambda: any(r["step"] >= 3 for r in _records(run)))
        assert first.proc.poll() is None, f"training exited early:\n{first.logs()}"
    finally:
        first.kill()
    killed = _records(run)
    second = Launch([], run, str(tmp_path / "second"), command=cmd)
    second.wait(deadline)
    assert second.proc.returncode == 0, second.logs()
    assert re.search(r"resumed from \S+ at step 2 ", open(second.err_path).read()), second.logs()
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[:2] == killed[:2]  # the checkpointed steps stay; 3 is redone
    offset = 0.0
    for r in records:
        assert r["data/offset"] - offset == r["sampling/groups_drawn"] >= 4, (r["step"], offset)
        offset = r["data/offset"]
        assert r["staleness/max"] <= 1.0 and r["stale/tokens"] == 0.0 and "rollout/partial" in r
    assert sum(r["sampling/groups_dropped"] for r in records) > 0  # it did over-sample
