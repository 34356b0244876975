"""`launch/ctpo_32b.sh` on a real Slurm: 3 fake nodes (2 training + 1 rollout), tiny configuration.

Checks that each role ran on the node the plan gave it (role logs record the Slurm node name),
that the trainer's process group spans both training nodes and reached the rollout server, that
the job completed, and that a second job on the same run directory resumes from the checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from ctpo_megatron.parallel.net import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "ctpo_32b.sh"
TRAIN_MODULE = "tests.slurm.probe_trainer"


def cluster_args(run_dir: Path) -> list[str]:
    """The tiny cluster config with ports free on this host and the probe trainer."""
    return ["--cluster", "tiny", "--run-dir", str(run_dir), f"cluster.rollout_port={free_port()}",
            f"cluster.master_port={free_port()}", f"cluster.train_module={TRAIN_MODULE}", "--time", "00:05:00"]


def submit(slurm, cwd: Path, *args: str) -> str:
    out = subprocess.run(["bash", str(LAUNCHER), *args], cwd=cwd, env=slurm.env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"launcher failed:\n{out.stdout}\n{out.stderr}"
    match = re.search(r"submitted job (\d+)", out.stdout)
    assert match, out.stdout
    return match.group(1)


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def job_fields(slurm, job: str) -> dict:
    text = slurm.run("scontrol", "show", "job", "-o", job).stdout
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def wait_for(predicate, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)


def wait_job(slurm, job: str, timeout: float = 150) -> dict:
    """Polls `scontrol show job` until the job reaches a final state; returns its fields."""
    deadline = time.monotonic() + timeout
    while True:
        fields = job_fields(slurm, job)
        if fields.get("JobState") in FINAL_STATES:
            return fields
        if time.monotonic() > deadline:
            slurm.run("scancel", job, check=False)
            raise AssertionError(f"job {job} still {fields.get('JobState')} after {timeout} s")
        time.sleep(0.5)


def role_headers(log: Path) -> list[dict]:
    rows = []
    for line in log.read_text().splitlines():
        if "[ctpo-role] role=" in line:
            rows.append(dict(kv.split("=", 1) for kv in line.split("[ctpo-role]", 1)[1].split() if "=" in kv))
    return rows


def test_launcher_places_roles_and_resumes(slurm_cluster, tiny_checkpoint, tmp_path):
    run_dir = tmp_path / "run"
    args = [*cluster_args(run_dir), f"model.path={tiny_checkpoint}"]

    job = submit(slurm_cluster, tmp_path, *args, "trainer.total_steps=1")
    fields = wait_job(slurm_cluster, job)
    logs = run_dir / "logs" / f"slurm-{job}"
    batch_out = (run_dir / "logs" / f"slurm-{job}.out")
    detail = f"\nbatch:\n{batch_out.read_text() if batch_out.exists() else '-'}"
    for name in ("trainer.log", "rollout.log"):
        if (logs / name).exists():
            detail += f"\n{name}:\n{(logs / name).read_text()[-3000:]}"
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", f"{fields}{detail}"

    plan = json.loads((logs / "plan.json").read_text())
    assert plan["train_hosts"] == slurm_cluster.names[:2] and plan["rollout_hosts"] == slurm_cluster.names[2:]
    rollout = [h for h in role_headers(logs / "rollout.log") if h["role"] == "rollout"]
    assert [h["node"] for h in rollout] == plan["rollout_hosts"], detail
    assert rollout[0]["gpus"] == "0"  # the fake gres GPU Slurm gave the step
    trainer = [h for h in role_headers(logs / "trainer.log") if h["role"] == "trainer"]
    assert sorted(h["node"] for h in trainer) == plan["train_hosts"], detail
    text = (logs / "trainer.log").read_text()
    # one process per training node, joined into one gloo group by the c10d rendezvous
    nodes_in_group = set(re.findall(r"rank \d/2 on node (\S+): all_reduce sum of ranks = 1", text))
    assert nodes_in_group == set(plan["train_hosts"]), detail
    assert f"rank 0 generated 4 tokens from http://{plan['rollout_hosts'][0]}:" in text, detail
    assert "[probe] step 1 done" in text and "resumed" not in text
    assert json.loads((run_dir / "checkpoints" / "latest" / "state.json").read_text()) == {"step": 1}

    job2 = submit(slurm_cluster, tmp_path, *args, "trainer.total_steps=2")
    fields2 = wait_job(slurm_cluster, job2)
    text2 = (run_dir / "logs" / f"slurm-{job2}" / "trainer.log").read_text()
    assert fields2["JobState"] == "COMPLETED" and fields2["ExitCode"] == "0:0", f"{fields2}\n{text2}"
    assert "resumed from step 1" in text2 and "[probe] step 2 done" in text2 and "step 1 done" not in text2
    assert json.loads((run_dir / "checkpoints" / "latest" / "state.json").read_text()) == {"step": 2}


def test_time_limit_warning_checkpoints_requeues_and_resumes(slurm_cluster, tiny_checkpoint, tmp_path):
    """USR1 to the batch shell (what `--signal=B:USR1@T` sends before the time limit): the job
    forwards SIGTERM to its steps, the trainer checkpoints, the job requeues itself and the
    next attempt resumes from that checkpoint and finishes."""
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, tmp_path, *cluster_args(run_dir), f"model.path={tiny_checkpoint}",
                 "trainer.total_steps=40")
    first = run_dir / "logs" / f"slurm-{job}" / "trainer.log"
    wait_for(lambda: first.exists() and "step 2 done" in first.read_text(), "step 2 of the first attempt", 120)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    fields = wait_job(slurm_cluster, job, timeout=200)
    batch = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    first_text = first.read_text()
    second = run_dir / "logs" / f"slurm-{job}-r1" / "trainer.log"
    detail = f"\nbatch:\n{batch}\nfirst:\n{first_text}\nsecond:\n{second.read_text() if second.exists() else '-'}"
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", f"{fields}{detail}"
    assert fields.get("Restarts") == "1", detail
    assert "SIGUSR1 received" in batch and "requeueing job" in batch, detail
    stopped = re.search(r"SIGTERM, checkpointed at step (\d+)", first_text)
    assert stopped, detail
    step = int(stopped.group(1))
    assert step < 40 and "step 40 done" not in first_text, detail
    second_text = second.read_text()
    assert f"resumed from step {step}" in second_text and "step 40 done" in second_text, detail
    assert f"step {step} done" not in second_text, detail  # no finished step is run twice
