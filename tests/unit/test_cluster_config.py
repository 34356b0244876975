"""The cluster section of the trainer's typed config: the launcher and the trainer compose the
same values, removed settings name their replacement, and the launcher's memory estimate is the
trainer's own (a change of an actor setting changes both)."""

from __future__ import annotations

import pytest

from ctpo_megatron.cluster.compose import load_launch_config
from ctpo_megatron.cluster.config import ClusterConfig
from ctpo_megatron.cluster.plan import build_plan
from ctpo_megatron.config.store import load_config
from ctpo_megatron.trainer.loop import check_policy_memory

TINY_HOSTS = ["a", "b", "c"]


def trainer_view(plan, cfg):
    """The config the trainer composes from the arguments the plan gives it."""
    argv = plan.train_argv[plan.train_argv.index(cfg.cluster.train_module) + 1:]
    name = argv[1] if argv[:1] == ["--config-name"] else "config"
    return load_config(argv[2:] if name != "config" else argv, config_name=name)


def test_the_trainer_composes_the_launchers_cluster_section():
    cfg, selection = load_launch_config("tiny", ["nodes=4", "rollout_nodes=2", "env.NCCL_SOCKET_IFNAME=ib0",
                                                 "time='01:30:00'"], ["model.path=/m"])
    assert isinstance(cfg.cluster, ClusterConfig)
    assert (cfg.cluster.nodes, cfg.cluster.time, cfg.cluster.env["NCCL_SOCKET_IFNAME"]) == (4, "01:30:00", "ib0")
    plan = build_plan(cfg, selection + ["model.path=/m"], hosts=["a", "b", "c", "d"])
    assert trainer_view(plan, cfg).cluster == cfg.cluster
    # `python -m ctpo_megatron.train cluster=tiny cluster.nodes=4 ...` reads the same typed section
    assert load_config(selection, config_name="tiny").cluster == cfg.cluster


def test_a_cluster_file_reaches_the_trainer_as_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train_config: tiny\nnodes: 3\nrollout_nodes: 1\ngpus_per_node: 1\n"
                    "rollout_backend: embedded\nrollout_gpus_per_server: 1\nrollout_args: ['--threads', '1']\ntime: '00:20:00'\n"
                    "env:\n  NCCL_DEBUG: INFO\n  MY_VAR: \"it's\"\nrouter: false\n")
    cfg, selection = load_launch_config(str(path), ["rollout_port=31000"], ["model.path=/m"])
    c = cfg.cluster
    assert (c.train_config, c.nodes, c.rollout_args, c.time, c.router) == ("tiny", 3, ["--threads", "1"],
                                                                             "00:20:00", False)
    assert c.env["MY_VAR"] == "it's" and c.env["NCCL_DEBUG"] == "INFO" and c.rollout_port == 31000
    assert c.job_name == ClusterConfig().job_name  # unset keys: the dataclass defaults, not a group file
    plan = build_plan(cfg, selection + ["model.path=/m"], hosts=TINY_HOSTS)
    assert trainer_view(plan, cfg).cluster == c
    path.write_text("nodes: 3\nno_such_key: 1\n")
    with pytest.raises(ValueError, match="no_such_key"):
        load_launch_config(str(path))


@pytest.mark.parametrize("where", ["hydra", "launcher", "file"])
def test_removed_settings_name_their_replacement(where, tmp_path):
    with pytest.raises(ValueError, match=r"cluster.micro_batch=2 was removed.*set actor.micro_batch_size"):
        if where == "hydra":  # python -m ctpo_megatron.train cluster.micro_batch=2
            load_config(["cluster.micro_batch=2"])
        elif where == "launcher":  # bash launch/ctpo_32b.sh cluster.micro_batch=2
            load_launch_config("qwen3_32b", ["micro_batch=2"])
        else:
            (tmp_path / "old.yaml").write_text("nodes: 12\nmicro_batch: 2\n")
            load_launch_config(str(tmp_path / "old.yaml"))
    with pytest.raises(ValueError, match="set actor.logprob_chunk_size"):
        load_launch_config("tiny", ["logits_chunk_tokens=0"])


def plan_and_trainer_estimate(*overrides: str):
    cfg, selection = load_launch_config("qwen3_32b", [], ["model.path=/ckpt/q", *overrides])
    plan = build_plan(cfg, selection + ["model.path=/ckpt/q", *overrides])
    dims = cfg.validate(plan.world_size)
    trainer = check_policy_memory(cfg, dims, gpu_memory_gib=cfg.cluster.gpu_memory_gib)
    return plan.memory, trainer.as_dict()


def test_the_launchers_estimate_is_the_trainers():
    base, trainer = plan_and_trainer_estimate()
    assert base == trainer
    assert base["tokens_per_gpu"] == 24000  # actor.micro_batch_size=1 x 24000 tokens
    # each actor setting the trainer runs with moves the launcher's estimate, and both agree
    changes = {"actor.micro_batch_size=2": lambda m: m["tokens_per_gpu"] == 48000,
               "actor.micro_batch_tokens=65536": lambda m: m["tokens_per_gpu"] == 65536,
               "actor.micro_batch_tokens=8192": lambda m: m["tokens_per_gpu"] == 24000,  # a longer sample runs alone
               "actor.logprob_chunk_size=4096": lambda m: m["logits"] == 4 * base["logits"],
               "model.recompute_granularity=selective": lambda m: m["activations"] > base["activations"],
               "parallel.distributed_optimizer=false": lambda m: m["optimizer"] == 4 * base["optimizer"],
               "cluster.memory_overhead_gib=1": lambda m: m["overhead"] == 2 ** 30,
               "rollout.weight_sync.bucket_bytes=1024": lambda m: m["weight_sync"] == 1024}
    for override, check in changes.items():
        plan, trainer = plan_and_trainer_estimate(override)
        assert plan == trainer and check(plan), override
