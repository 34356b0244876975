"""The tiny run end to end, shortened: warm start, then CTPO through the real pipeline
(Megatron actor at TP 2 on 2 gloo ranks, the embedded rollout server over HTTP, sandboxed tool
calls, weight resync, csrc kernels), killed with SIGKILL after a checkpoint and resumed.

Asserts: the resumed run continues from the checkpoint as if never stopped (the step redone
after the kill reproduces the killed run's metrics; no step logged twice; data position
continuous), and held-out accuracy rises by a clear margin over the warm-started policy.
Fixed seeds throughout.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 12
PROMPTS_PER_STEP = 16
KILL_AFTER_STEP = 5  # a checkpoint exists after step 4 (save_every=4); step 5 is logged past it


def _train_cmd(init: str, run: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "ctpo_megatron.train", "--config-name", "tiny",
            f"trainer.run_dir={run}", f"model.path={init}/model",
            f"data.train_files=[{init}/train.parquet]", f"data.val_files=[{init}/val.parquet]",
            f"trainer.total_steps={STEPS}", f"trainer.prompts_per_step={PROMPTS_PER_STEP}",
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


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny") / "init")
    subprocess.run([sys.executable, "-m", "ctpo_megatron.data.tiny_setup", out], cwd=ROOT,
                   check=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


def test_tiny_run_learns_and_resumes_after_sigkill(tiny_init, tmp_path):
    run = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log1 = tmp_path / "first.log"
    with open(log1, "w") as log:
        proc = subprocess.Popen(_train_cmd(tiny_init, run), cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not any(r["step"] >= KILL_AFTER_STEP for r in _records(run)):
            assert proc.poll() is None, f"training exited early:\n{log1.read_text()[-5000:]}"
            assert time.monotonic() < deadline, f"no step {KILL_AFTER_STEP} in time:\n{log1.read_text()[-5000:]}"
            time.sleep(0.5)
    finally:
        _kill_group(proc)  # SIGKILL: no handler runs, no cleanup
        for pid in _server_pids(log1.read_text()):  # the server runs in its own session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    latest = open(os.path.join(run, "checkpoints", "latest")).read().strip()
    assert latest, "no complete checkpoint before the kill"
    killed = {r["step"]: r for r in _records(run)}
    assert max(killed) >= KILL_AFTER_STEP

    second = subprocess.run(_train_cmd(tiny_init, run), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    assert re.search(r"resumed from \S+ at step 4 ", second.stderr), second.stderr[-3000:]

    records = _records(run)
    # "As if never stopped": step 5 is redone from the step-4 checkpoint with the same weights,
    # optimizer state, prompts and sampling seeds, so it reproduces the killed run's step 5.
    redone = records[KILL_AFTER_STEP]
    for key in ("reward/mean", "response_length/mean", "tool/use_rate", "data/offset"):
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


def test_pp2_grpo_with_rollout_log_probs(tiny_init, tmp_path):
    """The other paths through a step: PP 2, the GRPO baseline, the engine's log-probs as old
    log-probs (no mismatch correction), the `disk` weight transport."""
    run = str(tmp_path / "run")
    cmd = _train_cmd(tiny_init, run) + [
        "parallel=pp2", "algo=grpo", "trainer.old_log_probs=rollout", "correction.enabled=false",
        "rollout.weight_sync.transport=disk", "trainer.total_steps=2", "trainer.eval_every=0"]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2]
    assert not any(k.startswith("mismatch/rollout_is") for k in records[-1])
    assert records[-1]["weight_sync/bytes"] > 0 and records[-1]["actor/valid_tokens"] > 0
    assert os.path.isdir(os.path.join(run, "weight_sync"))
