"""Renders a LaunchPlan for people (dry run), for sbatch, and for the job script (shell vars)."""

from __future__ import annotations

import os
import shlex
import sys

from ctpo_megatron.cluster.config import ClusterConfig
from ctpo_megatron.cluster.plan import LaunchPlan

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _nodes(hosts: list[str]) -> str:
    return ",".join(hosts) if hosts else "-"


def plan_text(plan: LaunchPlan, cluster: ClusterConfig) -> str:
    """The dry-run printout: nodes per role, parallel sizes, DP, servers, memory per GPU."""
    p = plan.parallel
    note = " (placeholder names: no allocation yet)" if plan.placeholder_hosts else ""
    lines = [
        f"CTPO launch plan: job {plan.job_id}, {len(plan.hosts)} node(s) x {plan.gpus_per_node} GPU(s){note}",
        f"  trainer  : {len(plan.train_hosts)} node(s) {_nodes(plan.train_hosts)}",
        f"             model {plan.model}, world {plan.world_size} = tp {p['tp']} x pp {p['pp']} x "
        f"cp {p['cp']} x dp {p['dp']}, sequence {plan.seq_len} tokens",
        f"             rendezvous c10d {plan.master_addr}:{plan.master_port}, module {cluster.train_module}",
        f"  rollout  : {len(plan.rollout_hosts)} node(s) {_nodes(plan.rollout_hosts)}, "
        f"{len(plan.servers)} {cluster.rollout_backend} server(s) x {cluster.rollout_gpus_per_server} GPU(s)",
    ]
    if not plan.servers:
        lines.append("             (no rollout nodes: the trainer starts its own servers)")
    for s in plan.servers:
        lines.append(f"             {s.url}  gpus {','.join(map(str, s.gpu_slots))}")
    if plan.rollout_memory:
        r = plan.rollout_memory
        lines.append(f"             per GPU: weights {r['weights'] / 1024 ** 3:.2f} GiB, KV cache "
                     f"{r['kv_bytes_per_token'] / 1024:.0f} KiB/token -> {r['kv_tokens']:,} tokens per server "
                     f"(~{r['kv_tokens'] // plan.seq_len} full {plan.seq_len}-token trajectories) at "
                     "mem-fraction 0.85")
    if plan.router_url:
        lines.append(f"  router   : {plan.router_url}")
    lines += [f"  run dir  : {plan.run_dir}", f"  logs     : {plan.log_dir}/{{trainer,rollout,router}}.log",
              f"  container: {cluster.container_image or '(none: plain environment)'}",
              f"  slurm    : {' '.join(sbatch_args(plan, cluster))}",
              "  trainer overrides:"]
    lines += [f"    {o}" for o in plan.train_overrides]
    lines += ["  memory per GPU (trainer, estimate):", plan.memory_text]
    if plan.memory_what_ifs:
        lines.append("  why it fits: total per GPU")
        limit = plan.memory["gpu_memory"] / 1024 ** 3
        for name, gib in plan.memory_what_ifs.items():
            lines.append(f"    {name:<34}{gib:8.2f} GiB{'  (over ' + f'{limit:.0f} GiB)' if gib > limit else ''}")
    return "\n".join(lines)


def sbatch_args(plan: LaunchPlan, cluster: ClusterConfig) -> list[str]:
    """sbatch options of the job (one node-level task per node; roles are srun steps)."""
    args = [f"--job-name={cluster.job_name}", f"--nodes={cluster.nodes}", "--ntasks-per-node=1", "--exclusive",
            f"--gres=gpu:{cluster.gpus_per_node}", f"--time={cluster.time}",
            f"--output={os.path.join(plan.run_dir, 'logs', 'slurm-%j.out')}", "--open-mode=append"]
    if cluster.partition:
        args.append(f"--partition={cluster.partition}")
    if cluster.account:
        args.append(f"--account={cluster.account}")
    if cluster.requeue:
        args.append("--requeue")
        if cluster.signal_before_end_s:
            args.append(f"--signal=B:USR1@{cluster.signal_before_end_s}")
    return args + list(cluster.sbatch_args)


def role_python(cluster: ClusterConfig) -> str:
    """Interpreter of the role processes: the image's `python`, the venv's, or this one."""
    if cluster.container_image:
        return "python"
    venv = cluster.venv or os.path.join(REPO_ROOT, ".venv")
    candidate = os.path.join(venv, "bin", "python")
    if os.path.exists(candidate):
        return candidate
    if cluster.venv:
        raise ValueError(f"cluster.venv={cluster.venv!r} has no bin/python")
    return sys.executable


def job_env(plan: LaunchPlan, cluster: ClusterConfig, plan_path: str) -> dict[str, str]:
    """Shell variables the job script uses to start the roles with srun."""
    mounts = [f"{REPO_ROOT}:{REPO_ROOT}", f"{plan.run_dir}:{plan.run_dir}"]
    if cluster.container_mounts:
        mounts.append(cluster.container_mounts)
    return {
        "CTPO_PLAN": plan_path, "CTPO_LOG_DIR": plan.log_dir, "CTPO_RUN_DIR": plan.run_dir,
        "CTPO_REPO": REPO_ROOT, "CTPO_PY": role_python(cluster),
        "CTPO_GPUS_PER_NODE": str(plan.gpus_per_node),
        "CTPO_TRAIN_NODES": ",".join(plan.train_hosts), "CTPO_TRAIN_NNODES": str(len(plan.train_hosts)),
        "CTPO_ROLLOUT_NODES": ",".join(plan.rollout_hosts),
        "CTPO_ROLLOUT_NNODES": str(len(plan.rollout_hosts)),
        "CTPO_SERVERS_PER_NODE": str(cluster.servers_per_node), "CTPO_ROUTER_NODE": plan.router_host,
        "CTPO_MASTER_ADDR": plan.master_addr, "CTPO_MASTER_PORT": str(plan.master_port),
        "CTPO_CONTAINER_IMAGE": cluster.container_image,
        "CTPO_CONTAINER_MOUNTS": ",".join(mounts) if cluster.container_image else "",
        "CTPO_REQUEUE": "1" if cluster.requeue else "0",
    }


def shell_assignments(env: dict[str, str]) -> str:
    return "\n".join(f"{key}={shlex.quote(value)}" for key, value in env.items())
