"""Runs one role of a launch plan on this node: `python -m ctpo_megatron.cluster.role ROLE --plan FILE`.

Roles: `trainer` (torchrun, one per training node), `rollout --server I` (inference server I of
the plan, one srun step per server, on its GPU slots), `router` (sglang-router), `wait` (blocks
until every server answers /health, run by the job script before the trainer).
Each role first prints one header line (role, Slurm node, host, job, task, GPUs) and one line
with the environment it adds (`cluster.env` and the automatic NCCL settings), so the role logs
record where and how it ran, then replaces itself with the role's process so signals reach it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request

from ctpo_megatron.cluster.plan import LaunchPlan, ServerSpec

ROLES = ("trainer", "rollout", "router", "wait")


def node_name() -> str:
    """Slurm's name of this node (fake nodes on one host differ only there), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def load_plan(path: str) -> LaunchPlan:
    with open(path) as f:
        return LaunchPlan.from_dict(json.load(f))


def header(role: str, **extra) -> str:
    fields = {"role": role, "node": node_name(), "host": socket.gethostname(),
              "job": os.environ.get("SLURM_JOB_ID", "-"), "task": os.environ.get("SLURM_PROCID", "-"),
              "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "-"), **extra}
    return "[ctpo-role] " + " ".join(f"{k}={v}" for k, v in fields.items())


def server_for_this_task(plan: LaunchPlan, index: int | None = None) -> ServerSpec:
    """Server `index` of the plan (checked to be planned on this node), or, without an index,
    the server of this node's Slurm local task id."""
    node = node_name()
    if index is not None:
        if not 0 <= index < len(plan.servers):
            raise ValueError(f"--server {index}: the plan has {len(plan.servers)} server(s)")
        server = plan.servers[index]
        if server.host != node:
            raise ValueError(f"server {index} ({server.url}) is planned on node {server.host!r}, not on "
                             f"this node {node!r}")
        return server
    local = int(os.environ.get("SLURM_LOCALID", "0"))
    for server in plan.servers:
        if server.host == node and server.local_index == local:
            return server
    raise ValueError(f"no rollout server planned for node {node!r} local task {local} "
                     f"(planned: {[(s.host, s.local_index) for s in plan.servers]})")


def export_role_env(plan: LaunchPlan, role: str) -> dict[str, str]:
    """Sets the plan's environment of `role` in os.environ (inherited through exec); returns it."""
    env = dict(plan.env.get(role, {}))
    os.environ.update(env)
    return env


def visible_gpus_for(server: ServerSpec) -> str | None:
    """CUDA_VISIBLE_DEVICES for `server`: its slots of the devices Slurm gave the step."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return None
    devices = visible.split(",")
    if max(server.gpu_slots) >= len(devices):
        raise ValueError(f"server {server.url} wants GPU slots {server.gpu_slots} but the step sees only "
                         f"CUDA_VISIBLE_DEVICES={visible}")
    return ",".join(devices[i] for i in server.gpu_slots)


def wait_for_servers(urls: list[str], timeout_s: float, *, watch_pid: int | list[int] = 0,
                     poll_s: float = 1.0) -> None:
    """Polls GET <url>/health until every server answers 200.

    Raises TimeoutError naming the servers still down after `timeout_s`, or RuntimeError when
    a process of `watch_pid` (the servers' srun steps) exits first.
    """
    watch = [watch_pid] if isinstance(watch_pid, int) else list(watch_pid)
    pending = list(urls)
    deadline = time.monotonic() + timeout_s
    while pending:
        for url in list(pending):
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if response.status == 200:
                        pending.remove(url)
            except (urllib.error.URLError, OSError):
                pass
        if not pending:
            return
        for pid in watch:
            if not pid:
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                raise RuntimeError(f"a rollout step (pid {pid}) exited before {pending} became "
                                   "healthy; see server-<i>.log and router.log") from None
        if time.monotonic() > deadline:
            raise TimeoutError(f"rollout servers not healthy after {timeout_s:.0f} s: {pending} "
                               "(cluster.rollout_startup_timeout_s)")
        time.sleep(poll_s)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


def shield_agent_from_stop_signals() -> None:
    """Lets the trainer finish its step and checkpoint on SIGTERM/SIGUSR1.

    Slurm delivers a step's signals to every process of the step, torchrun's agent included.
    The agent would answer SIGTERM by killing its workers 30 s later and die on SIGUSR1, so it
    ignores both (ignored dispositions survive exec; TORCHELASTIC_SIGNALS_TO_HANDLE keeps the
    agent from installing its own SIGTERM handler). The workers inherit the ignore, and the
    trainer installs its own handlers for both; SIGKILL after Slurm's grace time still applies.
    """
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = AGENT_SIGNALS
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _exec(argv: list[str]) -> None:
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *argv])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctpo_megatron.cluster.role", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", choices=ROLES)
    p.add_argument("--plan", required=True, help="plan.json written by `ctpo_megatron.cluster.plan --emit job`")
    p.add_argument("--watch-pid", type=int, action="append", default=[],
                   help="wait: fail when this process exits (repeatable)")
    p.add_argument("--server", type=int, help="rollout: index of the server in the plan")
    args = p.parse_args(argv)
    plan = load_plan(args.plan)
    if args.role == "wait":
        urls = plan.server_urls + ([plan.router_url] if plan.router_url else [])
        print(header("wait", servers=",".join(urls) or "-"), flush=True)
        try:
            wait_for_servers(urls, plan.startup_timeout_s, watch_pid=args.watch_pid)
        except (TimeoutError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"[ctpo-role] all {len(plan.server_urls)} rollout server(s) healthy"
              + (f", router {plan.router_url} healthy" if plan.router_url else ""), flush=True)
        return 0
    env = export_role_env(plan, args.role)
    if args.role != "wait":
        print("[ctpo-role] env " + (" ".join(f"{k}={v}" for k, v in env.items()) or "-"), flush=True)
    if args.role == "trainer":
        print(header("trainer", rendezvous=f"{plan.master_addr}:{plan.master_port}",
                     servers=",".join(plan.server_urls) or "-"), flush=True)
        shield_agent_from_stop_signals()
        _exec(plan.train_argv)
    elif args.role == "rollout":
        server = server_for_this_task(plan, args.server)
        gpus = visible_gpus_for(server)
        if gpus is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpus
        print(header("rollout", url=server.url), flush=True)
        _exec(server.argv)
    else:
        print(header("router", url=plan.router_url), flush=True)
        _exec(plan.router_argv)
    return 0  # unreachable: exec replaced the process


if __name__ == "__main__":
    sys.exit(main())
