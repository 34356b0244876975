"""`launch/ctpo_32b.sh` on a real Slurm: 3 fake nodes (2 training + 1 rollout), tiny configuration.

The real trainer (`python -m ctpo_megatron.train`, Megatron in CPU mode at TP 2 across the two
training nodes) and one embedded rollout server on the third node: each role ran on the node the
plan gave it (role logs record the Slurm node name), the trainer reached the rollout server and
pushed weights to it, and the job completed with a checkpoint. Then the time-limit path: USR1 ->
the trainer checkpoints after its step -> requeue -> the next attempt resumes from it and
completes (a resubmitted job resumes the same way: same command, same run directory).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.local_slurm import quiet_port


pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "ctpo_32b.sh"
# the smallest real training step: 2 prompts x 2 samples, one update, a checkpoint every step
TINY_STEP = ["trainer.prompts_per_step=2", "trainer.mini_batch_prompts=2", "rollout.n_samples=2",
             "trainer.eval_every=0", "trainer.save_every=1"]


def cluster_args(run_dir: Path, inputs: dict[str, str]) -> list[str]:
    """The tiny cluster config with ports free on this host."""
    return ["--cluster", "tiny", "--run-dir", str(run_dir), "--time", "00:05:00",
            f"cluster.rollout_port={quiet_port()}", f"cluster.master_port={quiet_port()}",
            f"model.path={inputs['model']}",
            f"data.train_files=[{inputs['train']}]", f"data.val_files=[{inputs['val']}]"]


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


def test_launcher_places_roles_and_trains(slurm_cluster, tiny_inputs, tmp_path):
    run_dir = tmp_path / "run"
    args = [*cluster_args(run_dir, tiny_inputs), *TINY_STEP]

    job = submit(slurm_cluster, tmp_path, *args, "trainer.total_steps=1")
    fields = wait_job(slurm_cluster, job, timeout=240)
    logs = run_dir / "logs" / f"slurm-{job}"
    batch_out = run_dir / "logs" / f"slurm-{job}.out"
    detail = f"\nbatch:\n{batch_out.read_text() if batch_out.exists() else '-'}"
    for name in ("trainer.log", "rollout.log"):
        if (logs / name).exists():
            detail += f"\n{name}:\n{(logs / name).read_text()[-4000:]}"
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", f"{fields}{detail}"

    plan = json.loads((logs / "plan.json").read_text())
    assert plan["train_hosts"] == slurm_cluster.names[:2] and plan["rollout_hosts"] == slurm_cluster.names[2:]
    rollout = [h for h in role_headers(logs / "rollout.log") if h["role"] == "rollout"]
    assert [h["node"] for h in rollout] == plan["rollout_hosts"], detail
    assert rollout[0]["gpus"] == "0"  # the fake gres GPU Slurm gave the step
    trainer = [h for h in role_headers(logs / "trainer.log") if h["role"] == "trainer"]
    assert sorted(h["node"] for h in trainer) == plan["train_hosts"], detail
    text = (logs / "trainer.log").read_text()
    # torchrun's c10d rendezvous joined one process per training node: world 2 = tp 2
    assert "world size 2 = tp 2 x pp 1 x cp 1 x dp 1" in text, detail
    url = f"http://{plan['rollout_hosts'][0]}:{plan['servers'][0]['port']}"
    assert f"using external rollout servers ['{url}']" in text, detail
    assert re.search(r"weight sync \(\w+\) version step_1", text), detail  # pushed weights to the server
    assert "step 1/1" in text and "resumed from" not in text, detail
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("step", 0) for m in metrics) == 1
    assert (run_dir / "checkpoints" / "latest").exists(), detail
    # resuming from it in a new job attempt: test_time_limit_warning_checkpoints_requeues_and_resumes


def test_time_limit_warning_checkpoints_requeues_and_resumes(slurm_cluster, tiny_inputs, tmp_path):
    """USR1 to the batch shell (what `--signal=B:USR1@T` sends before the time limit): the job
    asks the trainer to stop (SIGUSR1 to its step; torchrun's agent ignores it), the trainer
    checkpoints after its current step, the job requeues itself, and the next attempt resumes
    from that checkpoint and finishes."""
    run_dir = tmp_path / "run"
    no_periodic_saves = [o for o in TINY_STEP if not o.startswith("trainer.save_every")]
    job = submit(slurm_cluster, tmp_path, *cluster_args(run_dir, tiny_inputs), *no_periodic_saves,
                 "trainer.save_every=0", "trainer.total_steps=8")
    first = run_dir / "logs" / f"slurm-{job}" / "trainer.log"
    wait_for(lambda: first.exists() and "step 2/8" in first.read_text(), "step 2 of the first attempt", 200)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    fields = wait_job(slurm_cluster, job, timeout=300)
    batch = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    first_text = first.read_text()
    second = run_dir / "logs" / f"slurm-{job}-r1" / "trainer.log"
    second_text = second.read_text() if second.exists() else "-"
    detail = f"\nbatch:\n{batch}\nfirst:\n{first_text[-4000:]}\nsecond:\n{second_text[-4000:]}"
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", f"{fields}{detail}"
    assert fields.get("Restarts") == "1", detail
    assert "SIGUSR1 received: the trainer checkpoints" in batch and "requeueing job" in batch, detail
    stopped = re.search(r"stopping after step (\d+) on request", first_text)
    assert stopped, detail
    step = int(stopped.group(1))
    assert 2 <= step < 8 and f"checkpoint saved at step {step}" in first_text, detail
    assert re.search(rf"resumed from \S+ at step {step}\b", second_text) and "step 8/8" in second_text, detail
    assert f"step {step}/8" not in second_text, detail  # no finished step is trained twice
