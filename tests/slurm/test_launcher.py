"""`launch/ctpo_32b.sh` on a real Slurm whose 4 fake nodes are 4 hosts (own network namespace,
address and host name each): 2 training nodes (the real trainer, Megatron in CPU mode at TP 2,
under torchrun spanning both) + 2 rollout nodes (one embedded server of `SERVER_TP` ranks each,
behind the real sglang-router), `distributed` weight sync. One job, two attempts:

1. placement: every role ran on the node the plan gave it, in that node's namespace;
2. a rollout server is SIGKILLed mid-run: the launcher reports it, the next weight sync leaves it
   out, training goes on (the time from the kill to the next finished step is printed);
3. the job's time limit is cut short: the trainer sees the new end (squeue), skips the weight
   sync of its last step, checkpoints and exits cleanly; the job requeues itself because steps
   remain;
4. attempt 2 resumes from that checkpoint, finishes, and does not requeue (it is done):
   every step 1..N trained exactly once.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.local_slurm import quiet_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "ctpo_32b.sh"
SERVER_TP = 2
"""Ranks (fake GPUs) of each embedded server: `--tp-size 2`, two weight-update ranks each."""
TRANSPORT = "distributed"
TOTAL_STEPS = 16
# the smallest real training step: 2 prompts x 2 samples, one update; checkpoints only at the stop
TINY_STEP = ["trainer.prompts_per_step=2", "trainer.mini_batch_prompts=2", "rollout.n_samples=2",
             "trainer.eval_every=0", "trainer.save_every=0"]
MARGIN_S = 100
"""trainer.deadline.margin_s: once the limit is cut to 60-120 s ahead, no further step fits."""


def cluster_args(run_dir: Path, inputs: dict[str, str]) -> list[str]:
    """4 nodes of the tiny config with ports free on this host."""
    server_port = quiet_port()
    router_port = quiet_port()
    while server_port <= router_port <= server_port + 1000:  # SGLang's NCCL range of the server
        router_port = quiet_port()
    return ["--cluster", "tiny", "--nodes", "4", "--rollout-nodes", "2", "--run-dir", str(run_dir),
            "--time", "00:10:00", f"cluster.rollout_gpus_per_node={SERVER_TP}",
            f"cluster.rollout_gpus_per_server={SERVER_TP}", "cluster.router=true",
            f"cluster.router_port={router_port}", f"cluster.rollout_port={server_port}",
            f"cluster.master_port={quiet_port()}", "cluster.signal_before_end_s=20",
            f"cluster.deadline_margin_s={MARGIN_S}", "trainer.deadline.refresh_s=1",
            f"rollout.weight_sync.transport={TRANSPORT}", f"model.path={inputs['model']}",
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


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


class Job:
    """The submitted job's files; `detail()` is the failure message's evidence."""

    def __init__(self, slurm, run_dir: Path, job: str):
        self.slurm, self.run_dir, self.id = slurm, run_dir, job
        self.batch = run_dir / "logs" / f"slurm-{job}.out"

    def logs(self, restart: int = 0) -> Path:
        return self.run_dir / "logs" / (f"slurm-{self.id}" + (f"-r{restart}" if restart else ""))

    def detail(self) -> str:
        out = [f"\nbatch:\n{read(self.batch)}"]
        for restart in (0, 1):
            for name in ("trainer.log", "server-0.log", "server-1.log", "router.log", "rollout.log"):
                text = read(self.logs(restart) / name)
                if text:
                    out.append(f"\n{self.logs(restart).name}/{name}:\n{text[-3000:]}")
        return "".join(out)

    def wait_for(self, predicate, what: str, timeout: float, poll_s: float = 0.3) -> None:
        """Polls `predicate` every `poll_s`; the job's state (scontrol) at most once a second."""
        deadline = time.monotonic() + timeout
        checked = 0.0
        while not predicate():
            if time.monotonic() - checked >= 1.0:
                checked = time.monotonic()
                fields = job_fields(self.slurm, self.id)
                if fields.get("JobState") in FINAL_STATES:
                    raise AssertionError(f"job ended ({fields.get('JobState')}) while waiting for {what}{self.detail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}{self.detail()}")
            time.sleep(poll_s)

    def steps_done(self, restart: int = 0) -> list[int]:
        return [int(s) for s in re.findall(rf"step (\d+)/{TOTAL_STEPS} \|", read(self.logs(restart) / "trainer.log"))]


def role_headers(log: Path) -> list[dict]:
    rows = []
    for line in read(log).splitlines():
        if "[ctpo-role] role=" in line:
            rows.append(dict(kv.split("=", 1) for kv in line.split("[ctpo-role]", 1)[1].split() if "=" in kv))
    return rows


def server_pid(slurm, node: str) -> int:
    """Pid of the embedded server process running in `node`'s namespace."""
    for pid in slurm.namespace_pids(node):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ctpo_megatron.rollout.serving.server" in cmdline and b"-m" in cmdline:
            return pid
    raise AssertionError(f"no rollout server process in namespace {node}")


def test_cluster_run_survives_a_server_kill_and_a_time_limit(slurm_cluster, tiny_inputs, tmp_path):
    run_dir = tmp_path / "run"
    job = Job(slurm_cluster, run_dir, submit(slurm_cluster, tmp_path, *cluster_args(run_dir, tiny_inputs),
                                             *TINY_STEP, f"trainer.total_steps={TOTAL_STEPS}"))
    trainer_log = job.logs() / "trainer.log"

    # 1. placement, each role in its own node's namespace
    job.wait_for(lambda: job.steps_done(), "step 1 of attempt 1", 600)
    plan = json.loads((job.logs() / "plan.json").read_text())
    names = slurm_cluster.names
    assert plan["train_hosts"] == names[:2] and plan["rollout_hosts"] == names[2:], job.detail()
    assert [s["host"] for s in plan["servers"]] == names[2:] and plan["server_tp_size"] == SERVER_TP
    router_url = f"http://{names[2]}:{plan['router_port']}"
    assert plan["router_host"] == names[2]
    for i, server in enumerate(plan["servers"]):
        rows = [h for h in role_headers(job.logs() / f"server-{i}.log") if h["role"] == "rollout"]
        assert [(h["node"], h["host"]) for h in rows] == [(server["host"], server["host"])], job.detail()
        assert rows[0]["gpus"] == ",".join(str(g) for g in range(SERVER_TP))  # Slurm's fake GPUs, narrowed
    trainers = [h for h in role_headers(trainer_log) if h["role"] == "trainer"]
    assert sorted((h["node"], h["host"]) for h in trainers) == [(n, n) for n in names[:2]], job.detail()
    assert [h["node"] for h in role_headers(job.logs() / "router.log") if h["role"] == "router"] == [names[2]]
    text = read(trainer_log)
    assert "world size 2 = tp 2 x pp 1 x cp 1 x dp 1" in text, job.detail()  # torchrun across both nodes
    assert re.search(rf"weight sync \({TRANSPORT}\) version step_1", text), job.detail()
    # each server reported its own TP size: trainer rank 0 + 2 servers x SERVER_TP ranks
    tp_list = ", ".join([str(SERVER_TP)] * 2)
    assert f"2 servers (TP [{tp_list}]), world size {1 + 2 * SERVER_TP}" in text, job.detail()
    assert f"behind router {router_url}" in text, job.detail()  # generation goes through the router
    assert f"rollout.router_url={router_url}" in plan["train_overrides"], plan["train_overrides"]
    assert not any(o.startswith("rollout.weight_sync.server_tp_size=") for o in plan["train_overrides"])

    # 2. a server dies mid-run (SIGKILL, as a crash): reported by the launcher, training goes on.
    # Killed as soon as a step is logged: the next step's rollout starts right after its log line
    # (rollout -> update -> weight sync -> log), so the kill usually lands inside a rollout.
    logged = max(job.steps_done())
    job.wait_for(lambda: max(job.steps_done()) > logged, f"a step after step {logged}", 300, poll_s=0.02)
    before = max(job.steps_done())
    killed_at, killed_wall = time.monotonic(), time.time()
    os.kill(server_pid(slurm_cluster, names[3]), signal.SIGKILL)
    job.wait_for(lambda: max(job.steps_done()) > before, f"a step after step {before}", 300)
    next_step_s = time.monotonic() - killed_at
    job.wait_for(lambda: max(job.steps_done()) > before + 1, f"two more steps after step {before}", 300)
    # the launcher polls its server steps every 2 s: two tiny steps can finish before it reports
    report = re.compile(rf"\[ctpo\] (\S+) rollout server 1 \(http://{names[3]}:\d+\) exited with rc")
    job.wait_for(lambda: report.search(read(job.batch)), "the launcher's report of the dead server", 60)
    noticed = report.search(read(job.batch))
    # the next weight sync left the dead server out (dropped before it, or after it failed)
    assert re.search(r"weight sync now targets 1 healthy server\(s\) of 2|weight sync of \S+ failed .* 1 server\(s\) "
                     r"left", read(trainer_log)), job.detail()
    noticed_s = datetime.datetime.fromisoformat(noticed.group(1).replace("Z", "+00:00")).timestamp() - killed_wall
    rollout = {m["step"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if "rollout/requests" in m}
    # requests of the dead server were retried on the other one, none lost
    assert all(m["rollout/lost_requests"] == 0 for m in rollout.values()), rollout
    # a kill inside a rollout: the router's sends to the dead server fail and it re-sends them
    # (so the client sees no error); between rollouts nothing was in flight
    router_log = re.sub(r"\x1b\[[0-9;]*m", "", read(job.logs() / "router.log"))  # its log is colored
    router_resent = len(set(re.findall(rf'request_id="([^"]+)".*Failed to send .*worker_url=http://{names[3]}:',
                                       router_log)))
    print(f"\n[figure] server killed after step {before}: the launcher reported it after {noticed_s:.0f} s "
          f"(1 s clock resolution), step {before + 1} finished {next_step_s:.1f} s after the kill; "
          f"its rollout: {rollout[before + 1]['rollout/requests']:.0f} requests, "
          f"{router_resent} in flight on the dead server re-sent by the router, "
          f"{rollout[before + 1]['rollout/retried_requests']:.0f} retried by the client, none lost")

    # 3. the time limit is cut to 1-2 minutes ahead: the trainer stops and the job requeues
    hours, minutes, _ = job_fields(slurm_cluster, job.id)["RunTime"].split("-")[-1].split(":")
    slurm_cluster.run("scontrol", "update", f"JobId={job.id}", f"TimeLimit={60 * int(hours) + int(minutes) + 2}")
    job.wait_for(lambda: job_fields(slurm_cluster, job.id).get("Restarts") == "1", "the requeue", 240)
    # attempt 2 gets room to finish (the trainer re-reads the end before each step)
    slurm_cluster.run("scontrol", "update", f"JobId={job.id}", "TimeLimit=10")
    deadline = time.monotonic() + 300
    while (fields := job_fields(slurm_cluster, job.id)).get("JobState") not in FINAL_STATES:
        assert time.monotonic() < deadline, f"job still {fields.get('JobState')}{job.detail()}"
        time.sleep(0.5)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", f"{fields}{job.detail()}"
    assert fields["Restarts"] == "1", job.detail()  # the finished attempt did not requeue again

    first, second = read(trainer_log), read(job.logs(1) / "trainer.log")
    stop = re.search(r"stopping: the job ends in \d+ s; another step needs", first)
    assert stop, job.detail()
    saved = re.search(r"checkpoint saved at step (\d+)", first)
    assert saved, job.detail()
    step = int(saved.group(1))
    assert f"stopping after step {step} on request" in first
    # once the stop was decided no weight sync ran (a stop known before a step's sync skips it)
    assert "weight sync (" not in first[stop.start():], job.detail()
    assert "steps remain: requeueing job" in read(job.batch), job.detail()
    assert re.search(rf"resumed from \S+ at step {step}\b", second), job.detail()
    assert f"version step_{step}" in second  # the fresh servers get the checkpoint's weights
    assert f"world size {1 + 2 * SERVER_TP}" in second, job.detail()  # both servers are back in the group
    # no step lost, none done twice
    assert job.steps_done(0) == list(range(1, step + 1)), job.detail()
    assert job.steps_done(1) == list(range(step + 1, TOTAL_STEPS + 1)), job.detail()
    metrics = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if "step" in json.loads(line)]
    assert sorted(metrics) == list(range(1, TOTAL_STEPS + 1)), metrics
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == TOTAL_STEPS
