"""CLI of the launch plan (`python -m ctpo_megatron.cluster.plan`), also `launch/ctpo_32b.sh --help`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ctpo_megatron.cluster.compose import hydra_value, load_launch_config
from ctpo_megatron.cluster.plan import build_plan, split_overrides
from ctpo_megatron.cluster.render import job_env, plan_text, sbatch_args, shell_assignments

# launcher flag -> ClusterConfig field (passed as a `cluster.<field>=` override)
FLAG_FIELDS = {"nodes": "nodes", "rollout_nodes": "rollout_nodes", "gpus_per_node": "gpus_per_node",
               "partition": "partition", "time": "time", "account": "account",
               "container_image": "container_image", "container_mounts": "container_mounts",
               "venv": "venv", "run_dir": "run_dir", "job_name": "job_name"}

EPILOG = """\
Hydra overrides (KEY=VALUE) go to the trainer (`python -m ctpo_megatron.train`), e.g.
trainer.total_steps=200 model.path=/ckpt/Qwen3-32B parallel.cp=4; `cluster.KEY=VALUE`
overrides a setting of the trainer config's `cluster` section, configs/cluster/<name>.yaml
(e.g. cluster.rollout_port=31000, cluster.env.NCCL_SOCKET_IFNAME=ib0 for the network NCCL and
Gloo use); the trainer gets the same cluster settings. The memory estimate reads the trainer's
own settings (actor.micro_batch_size, actor.logprob_chunk_size, recompute, parallel sizes).
docs/slurm.md has a first-run checklist.

Outside an allocation the launcher submits itself with sbatch; inside one (SLURM_JOB_ID set)
it starts the roles with srun: rollout servers on the last `--rollout-nodes` nodes (one step per
server), torchrun on the others. Logs: <run_dir>/logs/slurm-<job>/{trainer,router,server-<i>,
rollout}.log and plan.txt. The trainer stops before a step that cannot finish by the job's end;
the job requeues when steps remain and resumes from <run_dir>/checkpoints/latest.

One node shared by training and rollout: ROLLOUT_PLACEMENT=colocated in front of the launcher
(it adds --nodes 1 --rollout-nodes 0 rollout.placement=colocated
rollout.weight_sync.transport=tensor): the servers run on the training node's GPUs with
SGLang's memory saver, released while the trainer trains.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=os.environ.get("CTPO_LAUNCHER_PROG", "python -m ctpo_megatron.cluster.plan"),
        description="Plan (and with launch/ctpo_32b.sh, submit) a CTPO training job on Slurm: "
                    "training nodes (Megatron under torchrun) + rollout nodes (inference servers).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster", default="qwen3_32b",
                   help="the trainer's `cluster` group option configs/cluster/<name>.yaml, or a YAML "
                        "file of cluster settings (default qwen3_32b)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit, submit nothing")
    p.add_argument("--nodes", type=int, help="nodes of the job (training + rollout)")
    p.add_argument("--rollout-nodes", type=int, help="nodes running inference servers")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--time", help="time limit of one job attempt, e.g. 04:00:00")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--job-name", help="Slurm job name")
    p.add_argument("--container-image", help="pyxis container image for every role")
    p.add_argument("--container-mounts", help="extra pyxis mounts src:dst[,...]")
    p.add_argument("--venv", help="virtual environment of the plain (no container) setup")
    p.add_argument("--run-dir", help="run directory (default: the trainer's trainer.run_dir)")
    internal = p.add_argument_group("used by the job script")
    internal.add_argument("--emit", choices=["text", "sbatch", "job"], default="text",
                          help="text: the plan; sbatch: sbatch options, one per line; job: write "
                               "plan.json/plan.txt to the log dir and print shell variables")
    internal.add_argument("--hosts", help="comma-separated node names of the allocation")
    internal.add_argument("--job-id", default="dryrun", help="Slurm job id")
    internal.add_argument("--restart", type=int, default=0, help="Slurm restart count (requeues)")
    p.add_argument("overrides", nargs="*", help="trainer Hydra overrides and cluster.KEY=VALUE")
    return p


def make_plan(args: argparse.Namespace):
    """(cluster config, plan) from parsed arguments; raises ValueError on bad settings."""
    cluster_overrides, trainer_overrides = split_overrides(args.overrides)
    for flag, name in FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            cluster_overrides.append(f"{name}={hydra_value(value)}")
    train_cfg, selection = load_launch_config(args.cluster, cluster_overrides, trainer_overrides)
    hosts = args.hosts.split(",") if args.hosts else None
    plan = build_plan(train_cfg, selection + trainer_overrides, hosts=hosts, job_id=args.job_id,
                      restart=args.restart)
    return train_cfg.cluster, plan


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    try:
        cluster, plan = make_plan(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not plan.memory["fits"]:
        print(f"warning: the trainer's estimated memory per GPU exceeds {cluster.gpu_memory_gib:.0f} GiB:\n"
              f"{plan.memory_text}", file=sys.stderr)
    if args.emit != "text":  # the dry run prints them in the plan
        for warning in plan.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    if args.emit == "sbatch" and plan.rollout_hosts and not plan.model_path:
        print("error: the inference servers load the checkpoint: pass model.path=<HF checkpoint dir> "
              "(--dry-run shows the plan without it)", file=sys.stderr)
        return 2
    if args.emit == "sbatch":
        os.makedirs(os.path.join(plan.run_dir, "logs"), exist_ok=True)  # sbatch --output needs it
        print("\n".join(sbatch_args(plan, cluster)))
    elif args.emit == "job":
        os.makedirs(plan.log_dir, exist_ok=True)
        path = os.path.join(plan.log_dir, "plan.json")
        with open(path, "w") as f:
            json.dump(plan.to_dict(), f, indent=1)
        with open(os.path.join(plan.log_dir, "plan.txt"), "w") as f:
            f.write(plan_text(plan, cluster) + "\n")
        print(shell_assignments(job_env(plan, cluster, path)))
    else:
        print(plan_text(plan, cluster))
    return 0
