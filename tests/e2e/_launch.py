"""Shared by the tiny-run e2e modules: the launcher run in its own session with its logs in
files, the run's metrics records, and the deadlines every wait keeps."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from ctpo_megatron.trainer.metrics import read_metrics
from tests.e2e._trainer import ROOT

# Deadlines inside the timeout: the shared warm start (<= SETUP_S, built in the first test that
# asks for it; another worker waits for it as long) plus one test's BUDGET_S stays below
# TIMEOUT_S, so a slow run fails with its logs attached.
TIMEOUT_S, SETUP_S, BUDGET_S = 1700, 600, 1000
# The README's command for the tiny run; tests/unit/test_readme.py checks it is still there.
TINY_COMMAND = ["bash", "launch/ctpo_tiny.sh"]
STEPS = 12
PROMPTS_PER_STEP = 16


def short_run_overrides() -> list[str]:
    """Hydra overrides for a short tiny run that checkpoints and dumps tokens: STEPS steps of
    PROMPTS_PER_STEP prompts, a checkpoint every 4 steps, token dumps every 6, 32 held-out prompts
    scored before the first and after the last step."""
    return [f"trainer.total_steps={STEPS}", f"trainer.prompts_per_step={PROMPTS_PER_STEP}",
            "trainer.eval_every=100", "trainer.save_every=4", "data.max_val_prompts=32",
            "trainer.dump_every=6"]


def read_records(run: str) -> list[dict]:
    """The run's metrics.jsonl records so far (a line being written is left out)."""
    path = os.path.join(run, "metrics.jsonl")
    return read_metrics(path) if os.path.exists(path) else []


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


def run_dir(tmp_path, tiny_init: str) -> str:
    """A run directory whose init/ (model, data) the launcher finds complete and reuses."""
    run = str(tmp_path / "run")
    shutil.copytree(tiny_init, os.path.join(run, "init"))
    return run
