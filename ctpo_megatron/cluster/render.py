"""Renders a LaunchPlan for people (dry run), for sbatch, and for the job script (shell vars)."""

from __future__ import annotations

import os
import shlex
import sys

from ctpo_megatron.cluster.config import REPO_ROOT, ClusterConfig
from ctpo_megatron.cluster.plan import LaunchPlan


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
    if plan.colocated_mem_fraction:
        lines.append(f"             colocated on the training node's GPUs: SGLang memory saver (released while "
                     f"the trainer trains), --mem-fraction-static {plan.colocated_mem_fraction:g}")
    for s in plan.servers:
        lines.append(f"             {s.url}  gpus {','.join(map(str, s.gpu_slots))}")
    if plan.rollout_memory:
        r = plan.rollout_memory
        lines.append(f"             per GPU: weights {r['weights'] / 1024 ** 3:.2f} GiB, KV cache "
                     f"{r['kv_bytes_per_token'] / 1024:.0f} KiB/token -> {r['kv_tokens']:,} tokens per server "
                     f"(~{r['kv_tokens'] // plan.seq_len} full {plan.seq_len}-token trajectories) at "
                     f"mem-fraction {plan.colocated_mem_fraction or 0.85:g}")
    if plan.router_url:
        lines.append(f"  router   : {plan.router_url} (generation goes through it; weight updates go to each "
                     "server)")
    lines.append("  model    : " + (plan.model_path or "(unset: pass model.path=<HF checkpoint dir> to submit)"))
    lines += weight_sync_lines(plan)
    lines += env_lines(plan)
    lines += deadline_lines(plan, cluster)
    logs = "trainer,router," if plan.router_url else "trainer,"
    lines += [f"  run dir  : {plan.run_dir} (resumes from checkpoints/latest when present)",
              f"  logs     : {plan.log_dir}/{{{logs}server-<i>,rollout}}.log",
              f"  container: {container_text(plan, cluster)}",
              f"  slurm    : {' '.join(sbatch_args(plan, cluster))}",
              "  trainer overrides:"]
    lines += [f"    {o}" for o in plan.train_overrides]
    lines += ["  memory per GPU (trainer, estimate):", plan.memory_text]
    if plan.memory_what_ifs:
        lines.append("  why it fits: total per GPU")
        limit = plan.memory["gpu_memory"] / 1024 ** 3
        for name, gib in plan.memory_what_ifs.items():
            lines.append(f"    {name:<34}{gib:8.2f} GiB{'  (over ' + f'{limit:.0f} GiB)' if gib > limit else ''}")
    for warning in plan.warnings:
        lines.append(f"  WARNING  : {warning}")
    return "\n".join(lines)


def weight_sync_lines(plan: LaunchPlan) -> list[str]:
    ws = plan.weight_sync
    if not plan.servers:
        return [f"  weights  : {ws['transport']} (servers started by the trainer)"]
    lines = [f"  weights  : {ws['transport']} weight sync to {ws['servers']} server(s) of TP {plan.server_tp_size} "
             f"(server TP size: cluster.rollout_gpus_per_server; the trainer checks each server's own)"]
    if ws["transport"] == "distributed":
        lines += [f"             group: trainer rank 0 + {ws['servers']} x {plan.server_tp_size} server ranks = "
                  f"{ws['group_world_size']} ranks",
                  f"             master address: {ws['master_address']}",
                  f"             master port: {ws['master_port']}"]
    return lines


def env_lines(plan: LaunchPlan) -> list[str]:
    """Environment per role; the variables a cluster usually needs but left unset are named."""
    def fmt(env: dict) -> str:
        return " ".join(f"{k}={v}" for k, v in env.items()) or "-"
    common = plan.env.get("rollout", {})
    trainer_only = {k: v for k, v in plan.env.get("trainer", {}).items() if common.get(k) != v}
    lines = [f"  env      : every role: {fmt(common)}", f"             trainer also: {fmt(trainer_only)}"]
    unset = [k for k in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_IB_HCA") if k not in common]
    if unset:
        lines.append(f"             unset (NCCL/Gloo choose): {', '.join(unset)}; set e.g. "
                     "cluster.env.NCCL_SOCKET_IFNAME=ib0")
    return lines


def deadline_lines(plan: LaunchPlan, cluster: ClusterConfig) -> list[str]:
    d = plan.deadline
    lead = d["signal_before_end_s"]
    return [
        f"  deadline : job time limit {cluster.time}; checkpoint ~{d['checkpoint_bytes'] / 1e9:.0f} GB -> "
        f"~{d['checkpoint_s']} s at {d['write_gbps']:g} GB/s (first estimate; then measured)",
        "             the trainer reads the job's end (squeue %e / SLURM_JOB_END_TIME) and starts a step only if "
        f"step + checkpoint + {d['margin_s']:g} s fit",
        "             " + (f"Slurm warns the batch shell (USR1) {lead} s before the end; " if lead else
                           "no Slurm warning signal; ")
        + ("the job requeues only when steps remain" if cluster.requeue else "no requeue (cluster.requeue=false)"),
    ]


def container_text(plan: LaunchPlan, cluster: ClusterConfig) -> str:
    if not cluster.container_image:
        return "(none: plain environment)"
    return (f"{cluster.container_image} as --container-name=ctpo-{plan.job_id}, no home mount, "
            f"PYTHONPATH={REPO_ROOT}; mounts {','.join(plan.container_mounts)}")


def sbatch_args(plan: LaunchPlan, cluster: ClusterConfig) -> list[str]:
    """sbatch options of the job (one node-level task per node; roles are srun steps)."""
    args = [f"--job-name={cluster.job_name}", f"--nodes={cluster.nodes}", "--ntasks-per-node=1", "--exclusive",
            f"--gres=gpu:{max(cluster.gpus_per_node, cluster.rollout_gpus if cluster.rollout_nodes else 0)}",
            f"--time={cluster.time}",
            f"--output={os.path.join(plan.run_dir, 'logs', 'slurm-%j.out')}", "--open-mode=append"]
    if cluster.partition:
        args.append(f"--partition={cluster.partition}")
    if cluster.account:
        args.append(f"--account={cluster.account}")
    if cluster.requeue:
        args.append("--requeue")
        if plan.deadline["signal_before_end_s"]:
            args.append(f"--signal=B:USR1@{plan.deadline['signal_before_end_s']}")
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
    return {
        "CTPO_PLAN": plan_path, "CTPO_LOG_DIR": plan.log_dir, "CTPO_RUN_DIR": plan.run_dir,
        "CTPO_REPO": REPO_ROOT, "CTPO_PY": role_python(cluster),
        "CTPO_GPUS_PER_NODE": str(plan.gpus_per_node),
        "CTPO_TRAIN_NODES": ",".join(plan.train_hosts), "CTPO_TRAIN_NNODES": str(len(plan.train_hosts)),
        "CTPO_ROLLOUT_NODES": ",".join(plan.rollout_hosts),
        "CTPO_ROLLOUT_NNODES": str(len(plan.rollout_hosts)),
        "CTPO_SERVERS_PER_NODE": str(cluster.servers_per_node),
        "CTPO_SERVER_NODES": " ".join(s.host for s in plan.servers),
        "CTPO_SERVER_URLS": " ".join(s.url for s in plan.servers),
        "CTPO_ROLLOUT_GPUS": str(cluster.rollout_gpus), "CTPO_ROUTER_NODE": plan.router_host,
        "CTPO_MASTER_ADDR": plan.master_addr, "CTPO_MASTER_PORT": str(plan.master_port),
        "CTPO_CONTAINER_IMAGE": cluster.container_image,
        "CTPO_CONTAINER_MOUNTS": ",".join(plan.container_mounts),
        "CTPO_CONTAINER_NAME": f"ctpo-{plan.job_id}" if cluster.container_image else "",
        "CTPO_REQUEUE": "1" if cluster.requeue else "0",
    }


def shell_assignments(env: dict[str, str]) -> str:
    return "\n".join(f"{key}={shlex.quote(value)}" for key, value in env.items())
