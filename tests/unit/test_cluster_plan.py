"""Launch plan: node split, rendezvous, trainer overrides, CLI outputs, role selection, health wait."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from ctpo_megatron.cluster import cli, role
from ctpo_megatron.cluster.config import ClusterConfig, load_cluster_config
from ctpo_megatron.cluster.plan import build_plan, override_key, split_overrides
from ctpo_megatron.config.store import load_config
from ctpo_megatron.parallel.net import free_port

REPO = Path(__file__).resolve().parents[2]


def shell_vars(text: str) -> dict[str, str]:
    """KEY=value lines as bash's `eval` would assign them."""
    out = {}
    for line in text.splitlines():
        key, value = line.split("=", 1)
        out[key] = " ".join(shlex.split(value))
    return out


@pytest.fixture(scope="module")
def paper_cfg():
    return load_config(["model.path=/ckpt/qwen3-32b"])


def test_paper_layout_on_twelve_nodes(paper_cfg):
    cluster = load_cluster_config("qwen3_32b")
    hosts = [f"gpu{i}" for i in range(12)]
    plan = build_plan(cluster, paper_cfg, ["trainer.total_steps=7"], hosts=hosts, job_id="4242", cwd="/runs")
    assert plan.train_hosts == hosts[:8] and plan.rollout_hosts == hosts[8:]
    assert plan.parallel == {"tp": 8, "pp": 2, "cp": 1, "dp": 4} and plan.world_size == 64
    assert (plan.master_addr, plan.master_port) == ("gpu0", 20000 + 4242)
    # 4 GPUs per SGLang server -> 2 servers per rollout node on consecutive ports
    assert plan.server_urls[:3] == ["http://gpu8:30000", "http://gpu8:30001", "http://gpu9:30000"]
    assert [s.gpu_slots for s in plan.servers[:2]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert plan.router_url == "http://gpu8:30080"
    argv = plan.train_argv
    assert argv[:2] == ["-m", "torch.distributed.run"]
    assert argv[argv.index("--nnodes") + 1] == "8" and argv[argv.index("--nproc-per-node") + 1] == "8"
    assert argv[argv.index("--rdzv-endpoint") + 1] == "gpu0:24242"
    assert argv[argv.index("--rdzv-id") + 1] == "4242"
    tail = argv[argv.index("-m", 2) + 1:]
    assert tail[0] == "ctpo_megatron.train" and "--config-name" not in tail
    assert "parallel.tp=8" in tail and "model=qwen3_32b" in tail and "trainer.run_dir=/runs/runs/ctpo" in tail
    assert tail[-1] == "trainer.total_steps=7"  # the user's overrides come last
    urls = next(o for o in tail if o.startswith("rollout.server_urls="))
    assert load_config([urls]).rollout.server_urls == plan.server_urls  # Hydra parses what we emit
    assert plan.memory["fits"] and plan.memory_what_ifs["with none of these"] > 80


def test_user_overrides_win_and_change_the_plan(paper_cfg):
    cluster = load_cluster_config("qwen3_32b", ["nodes=10", "rollout_nodes=2"])
    user = ["parallel.pp=4", "model.path=/ckpt/qwen3-32b"]
    cfg = load_config(user)
    plan = build_plan(cluster, cfg, user, hosts=[f"n{i}" for i in range(10)], job_id="1")
    assert plan.parallel == {"tp": 8, "pp": 4, "cp": 1, "dp": 2}
    keys = [override_key(o) for o in plan.train_overrides]
    assert len(keys) == len(set(keys)) and "parallel.pp=4" in plan.train_overrides


def test_errors_name_the_setting(paper_cfg):
    cluster = load_cluster_config("qwen3_32b")
    with pytest.raises(ValueError, match="cluster.nodes=12 but the allocation has 3"):
        build_plan(cluster, paper_cfg, [], hosts=["a", "b", "c"])
    with pytest.raises(ValueError, match="model.path"):
        build_plan(cluster, load_config([]), [])
    with pytest.raises(ValueError, match="world size 40"):  # 5 training nodes x 8 GPUs vs tp*pp*cp=16
        build_plan(load_cluster_config("qwen3_32b", ["nodes=9"]), paper_cfg, [])
    with pytest.raises(ValueError, match="parallel.cp=2: context parallelism is not supported"):
        build_plan(cluster, load_config(["model.path=/ckpt/qwen3-32b", "parallel=tp8_pp2_cp2"]), [])
    with pytest.raises(ValueError, match="rollout_gpus_per_server"):
        ClusterConfig(rollout_gpus_per_server=3)
    with pytest.raises(ValueError, match="rollout_nodes"):
        ClusterConfig(nodes=2, rollout_nodes=2)
    with pytest.raises(ValueError, match="no_such_key"):
        load_cluster_config("tiny", ["no_such_key=1"])
    with pytest.raises(ValueError, match="neither an option nor"):
        split_overrides(["--bogus"])


def test_cli_dry_run_sbatch_and_job(tmp_path, capsys):
    base = ["--cluster", "tiny", "--run-dir", str(tmp_path / "run"), "model.path=/ckpt/tiny",
            "cluster.rollout_port=31000", "trainer.total_steps=3"]
    assert cli.main(["--dry-run", *base]) == 0
    text = capsys.readouterr().out
    assert "world 2 = tp 2 x pp 1 x cp 1 x dp 1" in text and "http://node02:31000" in text
    assert "memory per GPU" in text
    assert cli.main(["--emit", "sbatch", "--partition", "gpu", *base]) == 0
    sbatch = capsys.readouterr().out.split()
    assert "--nodes=3" in sbatch and "--gres=gpu:1" in sbatch and "--partition=gpu" in sbatch
    assert "--requeue" in sbatch and "--signal=B:USR1@60" in sbatch
    assert (tmp_path / "run" / "logs").is_dir()  # sbatch --output needs the directory
    assert cli.main(["--emit", "job", "--hosts", "x1,x2,x3", "--job-id", "9", "--restart", "2", *base]) == 0
    env = shell_vars(capsys.readouterr().out)
    log_dir = tmp_path / "run" / "logs" / "slurm-9-r2"
    assert env["CTPO_LOG_DIR"] == str(log_dir) and env["CTPO_TRAIN_NODES"] == "x1,x2"
    assert env["CTPO_ROLLOUT_NODES"] == "x3" and env["CTPO_MASTER_ADDR"] == "x1"
    plan = json.loads((log_dir / "plan.json").read_text())
    assert plan["servers"][0]["argv"][:2] == ["-m", "ctpo_megatron.rollout.server"]
    assert cli.main(["--emit", "job", "--hosts", "x1,x2", *base]) == 2  # 2 hosts for 3 nodes
    assert "cluster.nodes=3" in capsys.readouterr().err


def test_launcher_script_dry_run_and_help():
    out = subprocess.run(["bash", str(REPO / "launch" / "ctpo_32b.sh"), "--dry-run", "--nodes", "20",
                          "model.path=/ckpt/q"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CTPO_PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    assert "trainer  : 16 node(s)" in out.stdout and "dp 8" in out.stdout
    help_out = subprocess.run(["bash", str(REPO / "launch" / "ctpo_32b.sh"), "--help"], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "CTPO_PYTHON": sys.executable})
    assert help_out.returncode == 0 and "usage: bash launch/ctpo_32b.sh" in help_out.stdout


def test_role_picks_its_server_and_gpus(tmp_path, monkeypatch):
    cluster = load_cluster_config("qwen3_32b")
    plan = build_plan(cluster, load_config(["model.path=/ckpt/q"]), [], hosts=[f"h{i}" for i in range(12)])
    monkeypatch.setenv("SLURMD_NODENAME", "h9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    server = role.server_for_this_task(plan)
    assert server.url == "http://h9:30001" and role.visible_gpus_for(server) == "4,5,6,7"
    monkeypatch.setenv("SLURMD_NODENAME", "h0")  # a training node has no server
    with pytest.raises(ValueError, match="no rollout server planned for node 'h0'"):
        role.server_for_this_task(plan)


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_wait_for_servers_real_http():
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        role.wait_for_servers([f"http://127.0.0.1:{server.server_port}"], timeout_s=10, poll_s=0.05)
        dead = f"http://127.0.0.1:{free_port()}"
        with pytest.raises(TimeoutError, match=dead):
            role.wait_for_servers([dead], timeout_s=0.3, poll_s=0.05)
        exited = subprocess.Popen([sys.executable, "-c", "pass"])
        exited.wait()
        with pytest.raises(RuntimeError, match="exited before"):
            role.wait_for_servers([dead], timeout_s=30, watch_pid=exited.pid, poll_s=0.05)
    finally:
        server.shutdown()


def test_container_environment_mounts_repo_and_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(["--emit", "job", "--cluster", "tiny", "--hosts", "a,b,c", "--run-dir", str(run_dir),
                     "--container-image", "/images/ctpo-pytorch.sqsh", "--container-mounts", "/data:/data",
                     "model.path=/ckpt/tiny"]) == 0
    env = shell_vars(capsys.readouterr().out)
    assert env["CTPO_CONTAINER_IMAGE"] == "/images/ctpo-pytorch.sqsh"
    mounts = env["CTPO_CONTAINER_MOUNTS"].split(",")
    assert mounts == [f"{REPO}:{REPO}", f"{run_dir}:{run_dir}", "/data:/data"]
    assert env["CTPO_PY"] == "python"  # the image's interpreter, not this venv's
