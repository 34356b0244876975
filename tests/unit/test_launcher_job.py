"""The job side of `launch/ctpo_32b.sh` (inside an allocation) with recording stand-ins for `srun`
and `scontrol`: one step per server, a server that dies is reported while the trainer runs, and
the job requeues only when the trainer reports a clean stop with steps left.

The stand-in `srun` runs each role on this host: a server answers GET /health on its planned
port (server 1 dies once the trainer runs, as a crash would), the trainer writes the `status.json`
a real trainer writes and exits 0. The real Slurm run is tests/slurm/test_launcher.py.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SRUN = r'''#!{python}
import http.server, json, os, socket, sys, threading, time
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(" ".join(args) + "\n")
role = args[args.index("ctpo_megatron.cluster.role") + 1]
plan = json.load(open(args[args.index("--plan") + 1]))
if role == "rollout":
    index = int(args[args.index("--server") + 1])

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", plan["servers"][index]["port"]), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    if index == 1:  # dies once the trainer runs, as a crash would
        while not os.path.exists(os.environ["STUB_LOG"] + ".trainer"):
            time.sleep(0.1)
        os._exit(9)
    time.sleep(120)
elif role == "trainer":
    open(os.environ["STUB_LOG"] + ".trainer", "w").close()
    for _ in range(300):  # until server 1 is gone (its port refuses), so its death precedes ours
        try:
            socket.create_connection(("127.0.0.1", plan["servers"][1]["port"]), timeout=1).close()
            time.sleep(0.1)
        except OSError:
            break
    time.sleep(0.5)
    state = os.environ["STUB_TRAINER_STATE"]
    status = {{"state": state, "step": 3 if state == "stopped" else 8, "total_steps": 8,
               "attempt": "77-0", "reason": "test", "job_end": os.environ.get("CTPO_JOB_END")}}
    with open(os.path.join(plan["run_dir"], "status.json"), "w") as f:
        json.dump(status, f)
'''

SQUEUE = "#!/bin/sh\necho 2030-01-02T03:04:05\n"

SCONTROL = r'''#!/bin/sh
echo "$@" >> "$STUB_LOG"
case "$1" in
  show) printf '127.0.0.1\n127.0.0.1\n127.0.0.1\n' ;;
esac
'''


def free_port_pair(stride: int = 1100) -> int:
    """A port p with p and p + stride both free (the two servers of one node)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + stride > 65000:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + stride))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


@pytest.mark.parametrize("trainer_state, requeued", [("stopped", True), ("finished", False)])
def test_job_reports_dead_server_and_requeues_only_when_steps_remain(tmp_path, trainer_state, requeued):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(SCONTROL)
    (bin_dir / "squeue").write_text(SQUEUE)
    for stub in ("srun", "scontrol", "squeue"):
        (bin_dir / stub).chmod(0o755)
    run_dir = tmp_path / "run"
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CTPO_PYTHON": sys.executable,
           "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "x[1-3]", "SLURM_CPUS_ON_NODE": "2",
           "STUB_LOG": str(log), "STUB_TRAINER_STATE": trainer_state}
    env.pop("SLURM_RESTART_COUNT", None)
    env.pop("CTPO_REPO", None)
    out = subprocess.run(["bash", str(REPO / "launch" / "ctpo_32b.sh"), "--cluster", "tiny", "--run-dir",
                          str(run_dir), "model.path=/ckpt/tiny", "cluster.rollout_gpus_per_node=2",
                          f"cluster.rollout_port={free_port_pair()}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    calls = log.read_text().splitlines()
    servers = [c for c in calls if " rollout " in c]
    assert len(servers) == 2 and all("--kill-on-bad-exit=1" in c for c in servers), calls
    plan = json.loads((run_dir / "logs" / "slurm-77" / "plan.json").read_text())
    dead = "http://{host}:{port}".format(**plan["servers"][1])
    assert f"rollout server 1 ({dead}) exited with rc 9" in text, text
    assert "[ctpo] trainer exited with rc 0" in text
    assert (f"work remains: {'yes' if requeued else 'no'}") in text, text
    assert ("requeue 77" in calls) is requeued, calls
    # the job's end reaches the trainer's environment (for containers without squeue)
    job_end = json.loads((run_dir / "status.json").read_text())["job_end"]
    assert int(job_end) == int(datetime.datetime(2030, 1, 2, 3, 4, 5).timestamp())
