"""The trainer's stop planning: the job's end, step/checkpoint estimates, signals, status.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from ctpo_megatron.trainer import deadline as dl
from ctpo_megatron.trainer.deadline import DeadlineConfig, StopPlanner


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in dl.STOP_SIGNALS}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def planner(tmp_path, clock, end, total=10, **cfg):
    cfg = DeadlineConfig(**{"margin_s": 10.0, "checkpoint_s": 30.0, "refresh_s": 0.0, **cfg})
    return StopPlanner(cfg, run_dir=str(tmp_path), total_steps=total, rank=0, clock=clock,
                       job_end=lambda: end, agree=lambda flag: flag)


def test_stops_before_a_step_that_cannot_finish(tmp_path, restore_signals, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    clock = Clock()
    p = planner(tmp_path, clock, end=1000.0 + 200)
    assert dl.read_status(str(tmp_path))["state"] == "running"
    # step 1: 20 s -> 180 s left >= 20 + 30 (first checkpoint: the configured guess) + 10
    clock.t += 20
    assert not p.skip_weight_sync(1) and not p.should_stop(1, 20.0)
    # a checkpoint measured at 0 s does not lower the estimate below what was measured
    clock.t += 40
    assert not p.should_stop(2, 40.0)  # 140 s left >= max(20, 40) + 30 + 10
    clock.t += 25
    assert not p.should_stop(3, 25.0)  # 115 s left >= 40 + 30 + 10 (max of the last 3 steps)
    clock.t += 20
    assert not p.skip_weight_sync(4)  # 95 s left >= 80: the sync of step 4 is still worth it
    assert p.should_stop(4, 20.0) is False  # 95 >= 80
    clock.t += 20  # 75 s left < 40 + 30 + 10: step 6 would not fit -> skip step 5's sync, save, stop
    assert p.skip_weight_sync(5) and p.stopping
    assert "ends in 75 s" in p.reason and "checkpoint ~30 s" in p.reason
    assert p.should_stop(5, 20.0)
    p.finish(5)
    status = dl.read_status(str(tmp_path))
    assert status["state"] == "stopped" and status["step"] == 5 and status["attempt"] == "77-2"
    assert status["step_s"] == 25.0  # the most of the last 3 steps (25, 20, 20)
    assert dl.work_remains(str(tmp_path), "77-2") and not dl.work_remains(str(tmp_path), "77-1")


def test_estimates_carry_to_the_next_attempt_and_checkpoints_are_timed(tmp_path, restore_signals):
    clock = Clock()
    p = planner(tmp_path, clock, end=None)  # no deadline: never stops on time
    with p.checkpointing():
        pass
    assert p.checkpoint_estimate < 1.0 and not p.should_stop(1, 500.0)
    p.finish(1)
    nxt = planner(tmp_path, clock, end=1000.0 + 400)
    assert nxt.step_estimate == 500.0  # the previous attempt's step time, before any step here
    assert nxt.skip_weight_sync(1)     # 400 s left < 500 + ckpt + 10


def test_signal_skips_the_sync_and_stops_except_on_the_last_step(tmp_path, restore_signals):
    p = planner(tmp_path, Clock(), end=None, total=3)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert p.signal == signal.SIGUSR1
    assert not p.skip_weight_sync(3)  # the last step syncs (its evaluation uses the servers)
    assert p.skip_weight_sync(2) and p.should_stop(2, 1.0) and p.reason == f"signal {int(signal.SIGUSR1)}"
    p.finish(3)
    assert dl.read_status(str(tmp_path))["state"] == "finished"
    assert not dl.work_remains(str(tmp_path), "")  # a finished run does not requeue


def test_crashed_attempt_is_not_requeued(tmp_path, restore_signals, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    planner(tmp_path, Clock(), end=None)  # started, never finished: status stays `running`
    rc = subprocess.run([sys.executable, "-m", "ctpo_megatron.trainer.deadline", "--work-remains",
                         str(tmp_path), "--attempt", "5-0"], capture_output=True, text=True)
    assert rc.returncode == 1 and '"state": "running"' in rc.stdout


def test_slurm_job_end_from_squeue_then_env(tmp_path):
    squeue = tmp_path / "squeue"
    squeue.write_text("#!/bin/sh\n[ \"$5\" = 42 ] && echo 2030-01-02T03:04:05\n")
    squeue.chmod(0o755)
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_END_TIME": "1234", "PATH": os.environ["PATH"]}
    import datetime

    assert dl.slurm_job_end(env, squeue=str(squeue)) == datetime.datetime(2030, 1, 2, 3, 4, 5).timestamp()
    assert dl.slurm_job_end({**env, "SLURM_JOB_ID": "43"}, squeue=str(squeue)) == 1234.0  # squeue: nothing
    assert dl.slurm_job_end({"SLURM_JOB_ID": "42"}, squeue=str(tmp_path / "missing")) is None
    # no squeue in the container: what the job script read outside it
    assert dl.slurm_job_end({"SLURM_JOB_ID": "42", "CTPO_JOB_END": "1700000000"},
                            squeue=str(tmp_path / "missing")) == 1700000000.0
    assert dl.slurm_job_end({}) is None
    assert dl.parse_end_time("Unknown", what="x") is None
    with pytest.raises(ValueError, match="trainer.deadline.end_time='soon'"):
        DeadlineConfig(end_time="soon")
    with pytest.raises(ValueError, match="margin_s"):
        DeadlineConfig(margin_s=-1)


def test_configured_end_time_wins(tmp_path, restore_signals):
    cfg = DeadlineConfig(end_time="1100", margin_s=0, checkpoint_s=50)
    p = StopPlanner(cfg, run_dir=str(tmp_path), total_steps=5, rank=0, clock=Clock(1000.0),
                    job_end=lambda: 10_000.0, agree=lambda flag: flag)
    assert p.job_end() == 1100.0 and p.should_stop(1, 60.0)  # 100 s left < 60 + 50
    assert json.loads((tmp_path / dl.STATUS_FILE).read_text())["state"] == "running"
