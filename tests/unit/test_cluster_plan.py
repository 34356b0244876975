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
from ctpo_megatron.cluster.compose import load_launch_config
from ctpo_megatron.cluster.config import ClusterConfig
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


def launch(cluster: str = "qwen3_32b", cluster_overrides=(), overrides=("model.path=/ckpt/q",), **kwargs):
    """The plan as the launcher builds it: cluster settings and trainer overrides composed into
    one typed config, the trainer given the cluster selection and the overrides."""
    cfg, selection = load_launch_config(cluster, list(cluster_overrides), list(overrides))
    return build_plan(cfg, selection + list(overrides), **kwargs)


def test_paper_layout_on_twelve_nodes(paper_cfg):
    hosts = [f"gpu{i}" for i in range(12)]
    plan = build_plan(paper_cfg, ["trainer.total_steps=7"], hosts=hosts, job_id="4242", cwd="/runs")
    assert plan.train_hosts == hosts[:8] and plan.rollout_hosts == hosts[8:]
    assert plan.parallel == {"tp": 8, "pp": 2, "cp": 1, "dp": 4} and plan.world_size == 64
    assert (plan.master_addr, plan.master_port) == ("gpu0", 20000 + 4242)
    # 4 GPUs per SGLang server -> 2 servers per rollout node, ports spaced past SGLang's NCCL range
    assert plan.server_urls[:3] == ["http://gpu8:30000", "http://gpu8:31100", "http://gpu9:30000"]
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
    # the deadline: 32.8 B params x 14 bytes = 459 GB at 2 GB/s -> 230 s; warning lead 230 + 120 + 60
    assert "trainer.deadline.checkpoint_s=230" in tail and "trainer.deadline.margin_s=120" in tail
    assert plan.deadline["signal_before_end_s"] == 410
    assert not any(o.startswith("rollout.weight_sync.master_address") for o in tail)  # found at run time
    urls = next(o for o in tail if o.startswith("rollout.server_urls="))
    assert load_config([urls]).rollout.server_urls == plan.server_urls  # Hydra parses what we emit
    assert plan.memory["fits"] and plan.memory_what_ifs["with none of these"] > 80


def test_user_overrides_win_and_change_the_plan(paper_cfg):
    user = ["parallel.pp=4", "model.path=/ckpt/qwen3-32b"]
    plan = launch(cluster_overrides=["nodes=10", "rollout_nodes=2"], overrides=user,
                  hosts=[f"n{i}" for i in range(10)], job_id="1")
    assert plan.parallel == {"tp": 8, "pp": 4, "cp": 1, "dp": 2}
    keys = [override_key(o) for o in plan.train_overrides]
    assert len(keys) == len(set(keys)) and "parallel.pp=4" in plan.train_overrides
    # the trainer composes the same cluster section: the selection and the settings come along
    assert plan.train_overrides[-5:] == ["cluster=qwen3_32b", "cluster.nodes=10", "cluster.rollout_nodes=2", *user]


def test_context_parallel_layout_plans():
    cfg = load_config(["model.path=/ckpt/qwen3-32b", "parallel=tp8_pp2_cp2"])
    plan = build_plan(cfg, [])
    assert plan.parallel == {"tp": 8, "pp": 2, "cp": 2, "dp": 2} and plan.world_size == 64
    assert "parallel.cp=2" in plan.train_overrides
    assert "with cp=1 (same tp, pp, dp)" in plan.memory_what_ifs  # the estimate shows what CP saves


def test_errors_name_the_setting(paper_cfg):
    with pytest.raises(ValueError, match="cluster.nodes=12 but the allocation has 3"):
        build_plan(paper_cfg, [], hosts=["a", "b", "c"])
    with pytest.raises(ValueError, match="model.path"):  # a real allocation needs it; a dry run does not
        build_plan(load_config([]), [], hosts=[f"n{i}" for i in range(12)])
    with pytest.raises(ValueError, match="world size 40"):  # 5 training nodes x 8 GPUs vs tp*pp*cp=16
        launch(cluster_overrides=["nodes=9"])
    with pytest.raises(ValueError, match=r"algo.name='gspo'.*parallel.cp=2"):  # a loss CP cannot split
        launch(overrides=["model.path=/ckpt/qwen3-32b", "parallel=tp8_pp2_cp2", "algo.name=gspo"])
    with pytest.raises(ValueError, match="rollout_gpus_per_server"):
        ClusterConfig(rollout_gpus_per_server=3)
    with pytest.raises(ValueError, match="rollout_nodes"):
        ClusterConfig(nodes=2, rollout_nodes=2)
    with pytest.raises(ValueError, match=r"Key 'no_such_key' not in 'ClusterConfig'.*cluster keys: train_config"):
        load_launch_config("tiny", ["no_such_key=1"])
    with pytest.raises(ValueError, match=r"--cluster 'nope': no such file.*known: qwen3_14b"):
        load_launch_config("nope")
    with pytest.raises(ValueError, match="neither an option nor"):
        split_overrides(["--bogus"])
    with pytest.raises(ValueError, match="with --cluster NAME"):
        split_overrides(["cluster=tiny"])


def test_cli_dry_run_sbatch_and_job(tmp_path, capsys):
    base = ["--cluster", "tiny", "--run-dir", str(tmp_path / "run"), "model.path=/ckpt/tiny",
            "cluster.rollout_port=31000", "trainer.total_steps=3"]
    assert cli.main(["--dry-run", *base]) == 0
    text = capsys.readouterr().out
    assert "world 2 = tp 2 x pp 1 x cp 1 x dp 1" in text and "http://node02:31000" in text
    assert "memory per GPU" in text
    assert cli.main(["--emit", "sbatch", "--partition", "gpu", "--time", "01:30:00", *base]) == 0
    sbatch = capsys.readouterr().out.split()
    assert "--nodes=3" in sbatch and "--gres=gpu:1" in sbatch and "--partition=gpu" in sbatch
    assert "--time=01:30:00" in sbatch  # a flag value is a quoted Hydra string, not a sexagesimal number
    assert "--requeue" in sbatch and "--signal=B:USR1@60" in sbatch  # tiny.yaml: fixed lead
    assert (tmp_path / "run" / "logs").is_dir()  # sbatch --output needs the directory
    assert cli.main(["--emit", "job", "--hosts", "x1,x2,x3", "--job-id", "9", "--restart", "2", *base]) == 0
    env = shell_vars(capsys.readouterr().out)
    log_dir = tmp_path / "run" / "logs" / "slurm-9-r2"
    assert env["CTPO_LOG_DIR"] == str(log_dir) and env["CTPO_TRAIN_NODES"] == "x1,x2"
    assert env["CTPO_ROLLOUT_NODES"] == "x3" and env["CTPO_MASTER_ADDR"] == "x1"
    plan = json.loads((log_dir / "plan.json").read_text())
    assert plan["servers"][0]["argv"][:2] == ["-m", "ctpo_megatron.rollout.serving.server"]
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
    plan = build_plan(load_config(["model.path=/ckpt/q"]), [], hosts=[f"h{i}" for i in range(12)])
    monkeypatch.setenv("SLURMD_NODENAME", "h9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    server = role.server_for_this_task(plan)
    assert server.url == "http://h9:31100" and role.visible_gpus_for(server) == "4,5,6,7"
    assert role.server_for_this_task(plan, 3) is server  # by index (one srun step per server)
    with pytest.raises(ValueError, match="planned on node 'h8', not on this node 'h9'"):
        role.server_for_this_task(plan, 0)
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
    assert mounts == [f"{REPO}:{REPO}", f"{run_dir}:{run_dir}", "/ckpt/tiny:/ckpt/tiny", "/data:/data"]
    assert env["CTPO_PY"] == "python"  # the image's interpreter, not this venv's
    assert env["CTPO_CONTAINER_NAME"] == "ctpo-dryrun"


def readme_dry_run_line() -> str:
    """The dry-run command exactly as README.md shows it (without its trailing comment)."""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("bash launch/ctpo_32b.sh --dry-run"):
            return line.split("#", 1)[0].strip()
    raise AssertionError("README.md shows no `bash launch/ctpo_32b.sh --dry-run` line")


def test_readme_dry_run_line_prints_the_plan():
    """The README's own line, as a new user types it (no model.path), prints the whole plan."""
    line = readme_dry_run_line()
    out = subprocess.run(shlex.split(line), cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CTPO_PYTHON": sys.executable})
    assert out.returncode == 0, f"{line!r} failed:\n{out.stdout}\n{out.stderr}"
    text = out.stdout
    assert "model    : (unset: pass model.path=<HF checkpoint dir> to submit)" in text
    assert "8 server(s) of TP 4" in text and "= 33 ranks" in text  # 1 + 8 x 4
    assert "master address: " in text and ("found at run time" in text or "pinned to" in text)
    assert "trainer also: CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_CUMEM_ENABLE=0" in text
    assert "unset (NCCL/Gloo choose): NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, NCCL_IB_HCA" in text
    assert "checkpoint ~459 GB -> ~230 s" in text and "USR1) 410 s before the end" in text
    assert "--signal=B:USR1@410" in text and "requeues only when steps remain" in text


def test_submit_needs_model_path(capsys):
    assert cli.main(["--emit", "sbatch"]) == 2  # what the launcher runs before sbatch
    assert "pass model.path=<HF checkpoint dir>" in capsys.readouterr().err


def test_server_ports_leave_room_for_sglang_nccl_ports(paper_cfg):
    plan = launch(cluster_overrides=["rollout_gpus_per_server=2"], hosts=[f"g{i}" for i in range(12)])  # 4 per node
    ports = sorted(s.port for s in plan.servers if s.host == "g8")
    assert len(ports) == 4 and all(b - a > 1000 for a, b in zip(ports, ports[1:]))
    with pytest.raises(ValueError, match="more than 1000 apart"):
        load_launch_config("qwen3_32b", ["rollout_port_stride=1"])
    with pytest.raises(ValueError, match="router_port=30500 lies in a server's port range"):
        load_launch_config("qwen3_32b", ["router_port=30500"])


def test_env_per_role_and_weight_sync_rule(paper_cfg, monkeypatch):
    distributed = ["model.path=/ckpt/q", "rollout.weight_sync.transport=distributed"]
    plan = launch(cluster_overrides=["env.NCCL_SOCKET_IFNAME=ib0", "env.NCCL_DEBUG=INFO"], overrides=distributed,
                  hosts=[f"h{i}" for i in range(12)])
    assert plan.env["trainer"] == {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_CUMEM_ENABLE": "0",
                                   "NCCL_SOCKET_IFNAME": "ib0", "NCCL_DEBUG": "INFO"}
    assert plan.env["rollout"] == {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_DEBUG": "INFO"}  # empty values: unset
    # a tensor-transport run without sequence parallelism needs neither automatic variable
    plain = launch("tiny", overrides=["model.path=/m", "rollout.weight_sync.transport=tensor"], hosts=["a", "b", "c"])
    assert "NCCL_CUMEM_ENABLE" not in plain.env["trainer"] and "CUDA_DEVICE_MAX_CONNECTIONS" not in plain.env["trainer"]
    # the user's value wins over an automatic one
    mine = launch(cluster_overrides=["env.NCCL_CUMEM_ENABLE=1"], overrides=distributed, hosts=[f"h{i}" for i in range(12)])
    assert mine.env["trainer"]["NCCL_CUMEM_ENABLE"] == "1"
    assert plan.weight_sync["group_world_size"] == 33 and plan.server_tp_size == 4
    # each server starts at the plan's TP size; the trainer reads it from the servers, so the
    # plan never configures it a second time; generation goes through the router
    for server in plan.servers:
        assert server.argv[server.argv.index("--tp-size") + 1] == "4"
    assert not any(o.startswith("rollout.weight_sync.server_tp_size=") for o in plan.train_overrides)
    assert f"rollout.router_url={plan.router_url}" in plan.train_overrides
    embedded = launch("tiny", ["rollout_gpus_per_node=2", "rollout_gpus_per_server=2"], ["model.path=/m"],
                      hosts=["a", "b", "c"])
    assert all(s.argv[s.argv.index("--tp-size") + 1] == "2" for s in embedded.servers) and embedded.servers
    pinned = launch(overrides=[*distributed, "rollout.weight_sync.master_address=127.0.0.1"],
                    hosts=[f"h{i}" for i in range(12)])
    assert any("would dial their own loopback" in w for w in pinned.warnings)
    # the role exports its environment before exec
    monkeypatch.delenv("NCCL_CUMEM_ENABLE", raising=False)
    assert role.export_role_env(plan, "trainer")["NCCL_CUMEM_ENABLE"] == "0"
    assert os.environ["NCCL_CUMEM_ENABLE"] == "0"
    with pytest.raises(ValueError, match="not an environment variable name"):
        load_launch_config("tiny", ["env.BAD-NAME=x"])


def test_srun_lines_per_server_and_container(tmp_path):
    """`ctpo_srun_role` as the job script calls it, with a recording `srun`: one step per server
    with --kill-on-bad-exit and its own log; container mode names the container per job, mounts
    no home and does not pass the host PYTHONPATH."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (stub / "srun").chmod(0o755)
    script = f"""
        set -euo pipefail
        CTPO_REPO={REPO}; source {REPO}/launch/_common.sh
        CTPO_PY=python CTPO_PLAN=/run/plan.json CTPO_CONTAINER_IMAGE=/img.sqsh CTPO_CONTAINER_NAME=ctpo-77
        CTPO_CONTAINER_MOUNTS=/ckpt:/ckpt,/data:/data PYTHONPATH=/host/site
        ctpo_srun_role rollout {tmp_path}/server-1.log n4 1 1 2 --gres=gpu:2 --kill-on-bad-exit=1 -- --server 1
        wait $CTPO_LAST_PID
    """
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PATH": f"{stub}:{os.environ['PATH']}",
                              "SRUN_ARGS": str(tmp_path / "args")})
    assert out.returncode == 0, out.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert "--kill-on-bad-exit=1" in args and "--nodelist=n4" in args and "--gres=gpu:2" in args
    assert "--container-name=ctpo-77" in args and "--no-container-mount-home" in args
    assert "--container-mounts=/ckpt:/ckpt,/data:/data" in args
    assert f"PYTHONPATH={REPO}" in args and not any("/host/site" in a for a in args)
    assert args[-4:] == ["--plan", "/run/plan.json", "--server", "1"]
    assert (tmp_path / "server-1.log").exists()


def test_colocated_plan_puts_the_servers_on_the_training_node(monkeypatch):
    """`ROLLOUT_PLACEMENT=colocated`: one node; each SGLang server on its GPUs of the training
    node with the memory saver and a lower --mem-fraction-static; the role finds its server
    there; anything but one node is refused with the settings named."""
    coloc = ["model.path=/ckpt/q", "rollout.placement=colocated", "rollout.weight_sync.transport=tensor"]
    one_node = ["nodes=1", "rollout_nodes=0"]
    plan = launch("qwen3_4b", one_node, coloc, hosts=["g0"], job_id="5")
    assert plan.train_hosts == ["g0"] and plan.rollout_hosts == [] and plan.colocated_mem_fraction == 0.5
    assert [s.host for s in plan.servers] == ["g0"] * 8 and plan.servers[7].gpu_slots == [7]
    argv = plan.servers[0].argv
    assert "--enable-memory-saver" in argv and argv[argv.index("--mem-fraction-static") + 1] == "0.5"
    assert plan.router_url == "http://g0:30080" and plan.rollout_memory["kv_tokens"] > 0
    assert "rollout.server_urls=['http://g0:30000'" in " ".join(plan.train_overrides)
    monkeypatch.setenv("SLURMD_NODENAME", "g0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert role.visible_gpus_for(role.server_for_this_task(plan, 3)) == "3"
    argv = launch("qwen3_4b", one_node, coloc + ["rollout.server_mem_fraction_static=0.35"], hosts=["g0"]).servers[0].argv
    assert argv[argv.index("--mem-fraction-static") + 1] == "0.35"
    # The plan (and --dry-run) refuses a share that cannot resume beside the resident trainer.
    with pytest.raises(ValueError, match=r"trainer keeps .* GiB per GPU .* set rollout.server_mem_fraction_static <="):
        launch("qwen3_4b", one_node, coloc + ["rollout.server_mem_fraction_static=0.99"], hosts=["g0"])
    with pytest.raises(ValueError, match=r"colocated runs on one node.*cluster.nodes=2, cluster.rollout_nodes=1"):
        launch("qwen3_4b", (), coloc, hosts=["g0", "g1"])
    separate = launch("qwen3_4b", hosts=["g0", "g1"])
    assert separate.colocated_mem_fraction == 0 and "--enable-memory-saver" not in separate.servers[0].argv


def test_launcher_script_colocated_dry_run():
    env = {**os.environ, "CTPO_PYTHON": sys.executable, "ROLLOUT_PLACEMENT": "colocated"}
    out = subprocess.run(["bash", str(REPO / "launch" / "ctpo_32b.sh"), "--dry-run", "--cluster", "qwen3_4b",
                          "model.path=/ckpt/q"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "1 node(s) x 8 GPU(s)" in out.stdout and "colocated on the training node's GPUs" in out.stdout
    assert "http://node00:37700  gpus 7" in out.stdout and "rollout.placement=colocated" in out.stdout
    bad = subprocess.run(["bash", str(REPO / "launch" / "ctpo_32b.sh"), "--dry-run"], capture_output=True,
                         text=True, timeout=120, env={**env, "ROLLOUT_PLACEMENT": "shared"})
    assert bad.returncode == 2 and "ROLLOUT_PLACEMENT=shared: expected separate or colocated" in bad.stderr
