"""Config composition and start-up validation (real Hydra compose over configs/)."""

import os
import re

import pytest
from omegaconf import OmegaConf

from ctpo_megatron.config import TrainConfig, load_config, save_config

PAPER = ["model.path=/ckpt/qwen3-32b", "data.train_files=[train.parquet]"]


def test_paper_defaults():
    cfg = load_config(PAPER)
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.name == "qwen3_32b" and cfg.model.num_attention_heads == 64
    # The reference's rollout and schedule (configs/rollout/paper.yaml, configs/config.yaml).
    assert cfg.rollout.n_samples == 8 and cfg.rollout.max_tool_turns == 4
    assert (cfg.rollout.max_prompt_len, cfg.rollout.max_response_len) == (16000, 8000)
    assert cfg.rollout.agent.conversation == "tool_turns" and not cfg.rollout.agent.enable_thinking
    assert cfg.rollout.agent.reward_mode == "any" and cfg.rollout.agent.max_tool_output_chars == 256
    assert (cfg.trainer.total_steps, cfg.trainer.eval_every, cfg.trainer.eval_samples) == (305, 20, 32)
    assert cfg.trainer.eval_temperature == 0.7
    assert cfg.trainer.prompts_per_step == 512 and cfg.trainer.mini_batch_prompts == 32
    assert cfg.trainer.updates_per_step == 16
    assert cfg.correction.level == "sequence" and cfg.correction.mode == "truncate"
    assert cfg.correction.threshold == 5.0
    assert cfg.algo.name == "ctpo" and cfg.algo.la_clip_high == 0.05
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp) == (8, 2, 1)
    assert cfg.parallel.sequence_parallel and cfg.parallel.distributed_optimizer
    assert cfg.validate(world_size=64).dp == 4


@pytest.mark.parametrize("model", ["tiny", "qwen3_4b", "qwen3_14b", "qwen3_32b", "qwen2.5_32b"])
def test_every_model_group_composes(model):
    cfg = load_config(PAPER + [f"model={model}", "parallel=tp1", "rollout.max_prompt_len=512",
                               "rollout.max_response_len=256"])
    assert cfg.model.name == model
    cfg.validate(world_size=1)


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


@pytest.mark.parametrize("algo", sorted(f[:-5] for f in os.listdir(os.path.join(CONFIGS, "algo"))))
def test_algo_groups(algo):
    # The whole composed section equals the group file over the dataclass defaults: several
    # groups share `name` (ctpo, ctpo_geomean, ctpo_noadapt), so the name alone proves nothing.
    from dataclasses import asdict

    from ctpo_megatron.algo import PolicyLossConfig

    expected = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PolicyLossConfig),
                                                   OmegaConf.load(os.path.join(CONFIGS, "algo", f"{algo}.yaml"))))
    assert asdict(load_config(PAPER + [f"algo={algo}"]).algo) == asdict(expected)


def test_paper_baselines_and_model_presets():
    assert load_config(PAPER + ["algo=ctpo_geomean"]).algo.la_power == -0.5
    gspo = load_config(PAPER + ["algo=gspo"]).algo
    assert (gspo.clip_ratio_low, gspo.clip_ratio_high) == (3e-4, 4e-4)
    for name, model, tp, dp in (("paper_qwen3_4b", "qwen3_4b", 2, 4), ("paper_qwen3_14b", "qwen3_14b", 4, 2)):
        cfg = load_config(PAPER, config_name=name)
        assert cfg.model.name == model and cfg.trainer.total_steps == 305
        assert cfg.rollout.agent.conversation == "tool_turns"
        assert cfg.validate(world_size=8).dp == dp and cfg.parallel.tp == tp


def test_tiny_preset():
    cfg = load_config(config_name="tiny")
    assert cfg.model.name == "tiny" and cfg.parallel.tp == 2
    assert cfg.validate(world_size=2).dp == 1


def test_world_size_mismatch_names_sizes():
    cfg = load_config(PAPER)
    with pytest.raises(ValueError, match=r"world size 40 is not a multiple of tp\(8\) \* pp\(2\) \* cp\(1\)"):
        cfg.validate(world_size=40)
    cfg = load_config(PAPER + ["parallel.dp=4"])
    with pytest.raises(ValueError, match=r"dp\(4\)"):
        cfg.validate(world_size=128)


@pytest.mark.parametrize("overrides", [["parallel=tp8_pp2_cp2"], ["parallel.cp=2"]])
def test_context_parallel_layout_resolves(overrides):
    cfg = load_config(PAPER + overrides)
    dims = cfg.validate(world_size=64)  # TP 8 x PP 2 x CP 2 = 32 GPUs per replica
    assert (dims.tp, dims.pp, dims.cp, dims.dp) == (8, 2, 2, 2)
    assert cfg.actor_config(dims).dims.cp == 2


@pytest.mark.parametrize("overrides,names", [
    (["algo.name=gspo"], "algo.name='gspo'"),
    (["algo.loss_agg_mode=seq-mean-token-mean"], "algo.loss_agg_mode='seq-mean-token-mean'")])
def test_context_parallel_refuses_losses_it_cannot_split(overrides, names):
    with pytest.raises(ValueError, match=rf"{re.escape(names)}.*parallel.cp=2"):
        load_config(PAPER + ["parallel.cp=2"] + overrides)  # at load time: before any process group
    load_config(PAPER + overrides)  # fine at CP 1
    load_config(PAPER + ["parallel.cp=2", "algo.name=grpo"])


def test_tp_not_dividing_heads():
    cfg = load_config(PAPER + ["model=qwen2.5_32b", "parallel=tp1", "parallel.tp=16"])
    with pytest.raises(ValueError, match="tp=16 does not divide num_attention_heads=40"):
        cfg.validate(world_size=16)


def test_pp_not_dividing_layers():
    cfg = load_config(config_name="tiny", overrides=["parallel.tp=1", "parallel.pp=3"])
    with pytest.raises(ValueError, match="pp=3 does not divide num_hidden_layers=4"):
        cfg.validate(world_size=3)


def test_response_budget_over_context():
    with pytest.raises(Exception, match=r"rollout.max_response_len \(40000\).*max_position_embeddings=40960"):
        load_config(PAPER + ["rollout.max_response_len=40000"])


def test_batch_not_divisible_by_dp():
    cfg = load_config(config_name="tiny", overrides=["parallel.tp=1", "trainer.mini_batch_prompts=1",
                                                     "trainer.prompts_per_step=3", "rollout.n_samples=3"])
    with pytest.raises(ValueError, match="not divisible by the data-parallel size dp=2"):
        cfg.validate(world_size=2)


@pytest.mark.parametrize("override, message", [
    ("trainer.mini_batch_prompts=7", "mini_batch_prompts=7 does not divide"),
    ("trainer.old_log_probs=engine", "old_log_probs='engine'"),
    ("rollout.server_urls=[localhost:3000]", "is not an http"),
    ("parallel.tp=0", "parallel.tp=0"),
    ("parallel.sequence_parallel=true", "sequence_parallel=true needs parallel.tp > 1"),
    ("model.arch=llama", "model.arch='llama'"),
    ("algo.la_clip_high=-1", "la_clip_high"),
    ("rollout.stale_policy=ignore", "rollout.stale_policy='ignore': expected mask or drop"),
    ("rollout.max_staleness=-1", "rollout.max_staleness=-1 must be >= 0"),
])
def test_invalid_values_are_named(override, message):
    with pytest.raises(Exception, match=message):
        load_config(config_name="tiny", overrides=["parallel=tp1", override])


@pytest.mark.parametrize("override, message", [
    ("actor.temperature=0.7", r"actor.temperature=0.7 conflicts with rollout.temperature"),
    ("actor.sequence_parallel=true", r"actor.sequence_parallel=True (conflicts with parallel|needs tp > 1)"),
    ("actor.params_dtype=bfloat16", r"actor.params_dtype='bfloat16' conflicts with model.dtype"),
    ("actor.dims.tp=4", r"actor.dims=.* conflicts with parallel.tp/pp/cp/dp"),
    ("model.dtype=float16", r"model.dtype='float16': expected float32 or bfloat16"),
])
def test_overridden_derived_settings_are_errors(override, message):
    with pytest.raises(Exception, match=message):
        load_config(config_name="tiny", overrides=["parallel=tp1", override])


@pytest.mark.parametrize("overrides, message", [
    (["rollout.max_staleness=1"], r"placement=colocated cannot run rollouts ahead \(rollout.max_staleness=1\)"),
    (["rollout.weight_sync.transport=distributed"], "set rollout.weight_sync.transport=tensor"),
    (["rollout.weight_sync.tensor_encoding=safetensors"], "tensor_encoding=sglang"),
    (["rollout.placement=shared"], "rollout.placement='shared': expected separate or colocated"),
    (["rollout.server_mem_fraction_static=1.5"], "server_mem_fraction_static=1.5 must be in"),
])
def test_colocated_settings_are_checked(overrides, message):
    with pytest.raises(Exception, match=message):
        load_config(config_name="tiny", overrides=["rollout.placement=colocated", *overrides])


def test_colocated_servers_must_fit_the_training_node():
    cfg = load_config(config_name="tiny", overrides=["rollout.placement=colocated", "rollout.num_servers=2"])
    assert cfg.rollout.weight_sync.transport == "tensor" and cfg.rollout.max_staleness == 0
    cfg.rollout.check_colocated_gpus(tp_size=4, gpus=8)  # GPUs 0-7: two TP-4 servers fit
    with pytest.raises(ValueError, match=r"num_servers=2 x server TP 8 .* = 16 GPUs, but the training node has 8"):
        cfg.rollout.check_colocated_gpus(tp_size=8, gpus=8)


def test_derived_actor_settings_are_computed():
    cfg = load_config(config_name="tiny", overrides=["parallel=tp1", "rollout.temperature=0.6",
                                                     "actor.temperature=0.6", "model.path=/m"])
    actor = cfg.actor_config(cfg.parallel.dims().resolve(2))
    assert (actor.temperature, actor.hf_model_dir, actor.dims.dp, actor.params_dtype) == (0.6, "/m", 2, "float32")
    assert actor.use_distributed_optimizer is False and actor.lr == cfg.actor.lr


def test_rollout_old_log_probs_conflicts_with_correction():
    with pytest.raises(Exception, match="correction.enabled=true needs trainer.old_log_probs=actor"):
        load_config(config_name="tiny", overrides=["trainer.old_log_probs=rollout"])
    cfg = load_config(config_name="tiny", overrides=["trainer.old_log_probs=rollout",
                                                     "correction.enabled=false"])
    assert cfg.trainer.old_log_probs == "rollout"


def test_check_inputs_names_missing_paths(tmp_path):
    cfg = load_config(["data.train_files=[a.parquet]"])
    with pytest.raises(ValueError, match="model.path is empty"):
        cfg.check_inputs()
    cfg = load_config([f"model.path={tmp_path}", "data.train_files=[a.parquet]"])
    with pytest.raises(ValueError, match="has no config.json"):
        cfg.check_inputs()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="data.train_files: 'a.parquet' does not exist"):
        cfg.check_inputs()
    cfg = load_config([f"model.path={tmp_path}"])
    with pytest.raises(ValueError, match="data.train_files is empty"):
        cfg.check_inputs()


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(config_name="tiny", overrides=["trainer.total_steps=3", "rollout.server_urls=[http://h:1]"])
    path = os.path.join(tmp_path, "config.yaml")
    save_config(cfg, path)
    loaded = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path)))
    assert loaded == cfg
