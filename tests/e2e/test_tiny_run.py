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


import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e._launch import (BUDGET_S, PROMPTS_PER_STEP, ROOT, STEPS, TIMEOUT_S, Launch, read_records, run_dir,
                               short_run_overrides)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S)]

KILL_AFTER_STEP = 5  # a checkpoint exists after step 4 (save_every=4); step 5 is logged past it
SUMMARY = re.compile(r"^held-out accuracy: (\d\.\d\d) -> (\d\.\d\d) \(step (\d+) -> step (\d+), ")


def test_tiny_run_learns_and_resumes_after_sigkill(tiny_init, tmp_path):
    deadline = time.monotonic() + BUDGET_S
    run = run_dir(tmp_path, tiny_init)
    first = Launch(short_run_overrides(), run, str(tmp_path / "first"))
    try:
        first.wait(deadline, until=lambda: any(r["step"] >= KILL_AFTER_STEP for r in read_records(run)))
        assert first.proc.poll() is None, f"training exited early:\n{first.logs()}"
    finally:
        first.kill()
    latest = open(os.path.join(run, "checkpoints", "latest")).read().strip()
    assert latest, "no complete checkpoint before the kill"
    killed = {r["step"]: r for r in read_records(run)}
    assert max(killed) >= KILL_AFTER_STEP

    second = Launch(short_run_overrides(), run, str(tmp_path / "second"))  # the same command resumes
    second.wait(deadline)
    logs = second.logs()
    assert second.proc.returncode == 0, logs
    assert re.search(r"resumed from \S+ at step 4 ", open(second.err_path).read()), logs

    records = read_records(run)
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
