"""`python -m ctpo_megatron.export`: a policy trained at TP2 (Qwen2, untied) and one trained at
PP2 (Llama, tied embeddings) are saved, exported, and loaded back with transformers; the
weights are the trained ones bit for bit and the log-probs are the actor's. Missing and partial
checkpoints fail naming what is missing."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ctpo_megatron.export import CheckpointError, check_checkpoint_files, resolve_checkpoint
from ctpo_megatron.parallel.spawn import run_on_ranks
from tests._tiny_hf import build_llama, build_qwen2, hf_response_log_probs, random_samples

pytestmark = pytest.mark.dist

LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}


def _loss(log_probs, batch):
    mask = batch["response_mask"]
    return -(log_probs * mask).sum() / batch["global_num_tokens"] * batch["dp_size"], {}


def _train_samples():
    samples = random_samples(4, seed=5)
    for s in samples:
        r = len(s["response_ids"])
        s.update(response_mask=[1.0] * r, old_log_probs=[0.0] * r, advantages=[1.0] * r)
    return samples


def _write_run_config(run_dir, model_dir, tp, pp):
    """The part of the trainer's config.yaml the export reads."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(f"model:\n  path: {model_dir}\n  tokenizer_path: ''\nparallel:\n  tp: {tp}\n  pp: {pp}\n")


def _train_save_export(rank, world_size, jobs, eval_samples):
    """Per layout: 2 steps, save, the actor's weights and log-probs, then export in-process."""
    from ctpo_megatron.actor import ActorConfig, PolicyActor
    from ctpo_megatron.export import export_checkpoint
    from ctpo_megatron.parallel import ParallelDims
    from ctpo_megatron.trainer.checkpoint import checkpoint_root

    out = {}
    for name, (model_dir, run_dir, export_dir) in jobs.items():
        tp, pp = LAYOUTS[name]
        actor = PolicyActor(ActorConfig(hf_model_dir=model_dir, dims=ParallelDims(tp=tp, pp=pp),
                                        lr=0.01, adam_eps=1e-3, micro_batch_size=2))
        for _ in range(2):
            actor.train_step(_train_samples(), _loss)
        if rank == 0:
            _write_run_config(run_dir, model_dir, tp, pp)
        actor.save_checkpoint(checkpoint_root(run_dir), {"trainer": {"step": 2}})
        # numpy arrays pickle by value (torch tensors would cross as shared-memory handles).
        weights = {k: v.numpy().copy() for k, v in actor.iter_hf_weights() if v is not None}
        log_probs = [lp.numpy() for lp in actor.compute_log_probs(eval_samples)]
        ckpt, _ = resolve_checkpoint(run_dir)
        summary = export_checkpoint(ckpt, export_dir, base_model=model_dir, tp=tp, pp=pp,
                                    max_shard_bytes=150_000, progress=False)
        out[name] = dict(weights=weights, log_probs=log_probs, summary=summary)
    # The Qwen2 checkpoint with the Llama base model: same sizes, but QKV bias and an untied
    # lm_head the Llama lacks. Every rank must fail the same way, before any weight is read.
    from ctpo_megatron.export import CheckpointError

    qwen2_ckpt, _ = resolve_checkpoint(jobs["tp2"][1])
    try:
        export_checkpoint(qwen2_ckpt, jobs["tp2"][2].parent / "wrong", base_model=jobs["pp2"][0],
                          tp=2, pp=1, progress=False)
    except CheckpointError as e:
        out["wrong_base"] = str(e)
    return out if rank == 0 else None


def _load_hf(export_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export_dir)
    return {k: v.detach() for k, v in model.state_dict().items()}, model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Trains, saves and exports both layouts once (one 2-rank launch)."""
    from ctpo_megatron.data.tiny_tokenizer import build_char_tokenizer

    root = tmp_path_factory.mktemp("export")
    qwen2 = build_qwen2(root / "qwen2")
    build_char_tokenizer(str(qwen2))  # tokenizer files the export must carry over
    llama = build_llama(root / "llama")  # tied embeddings: PP2 keeps a copy on the last stage
    (llama / "generation_config.json").unlink()  # the export must write one
    jobs = {"tp2": (str(qwen2), str(root / "run_tp2"), root / "hf_tp2"),
            "pp2": (str(llama), str(root / "run_pp2"), root / "hf_pp2")}
    eval_samples = random_samples(3, seed=9)
    out = run_on_ranks(_train_save_export, 2, jobs, eval_samples, timeout=600)[0]
    return root, jobs, eval_samples, out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_export_round_trip_is_exact(trained, layout):
    _, jobs, eval_samples, out = trained
    model_dir, _, export_dir = jobs[layout]
    res = out[layout]
    files = set(os.listdir(export_dir))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= files
    assert len([f for f in files if f.endswith(".safetensors")]) >= 2  # sharded at 150 kB
    assert not os.path.exists(f"{export_dir}.incomplete")
    umask = os.umask(0o022)
    os.umask(umask)
    for name in (f for f in files if f.endswith(".safetensors")):  # readable by the server's user
        assert os.stat(export_dir / name).st_mode & 0o777 == 0o666 & ~umask, name
    state, _ = _load_hf(export_dir)
    base, _ = _load_hf(model_dir)
    moved = 0.0
    for name, trained_w in res["weights"].items():
        got = state[name]
        assert got.dtype == torch.float32
        assert torch.equal(got, torch.from_numpy(trained_w)), name  # bit for bit
        moved = max(moved, (got - base[name]).abs().max().item())
    assert moved > 1e-3  # the export holds the trained weights, not the base model's
    assert set(res["weights"]) | ({"lm_head.weight"} if layout == "pp2" else set()) == set(state)
    ref = hf_response_log_probs(export_dir, eval_samples)
    for actor_lp, hf_lp in zip(res["log_probs"], ref):
        # Same fp32 weights, two implementations (megatron vs transformers): summation order only.
        torch.testing.assert_close(torch.from_numpy(actor_lp), hf_lp, rtol=0, atol=2e-5)


def test_wrong_base_model_is_named(trained):
    _, jobs, _, out = trained
    msg = out["wrong_base"]
    assert "does not match the base model" in msg and "linear_qkv.bias" in msg, msg
    assert "output_layer.weight" in msg and "--base-model" in msg, msg
    assert not (jobs["tp2"][2].parent / "wrong").exists()


def test_export_carries_tokenizer_and_generation_config(trained):
    from transformers import AutoTokenizer, GenerationConfig

    _, jobs, _, _ = trained
    tok = AutoTokenizer.from_pretrained(jobs["tp2"][2])
    assert tok("1+2=3")["input_ids"] == AutoTokenizer.from_pretrained(jobs["tp2"][0])("1+2=3")["input_ids"]
    GenerationConfig.from_pretrained(jobs["pp2"][2])  # written for a base model without one


def test_cli_single_process_bf16_from_tp2_run(trained, tmp_path):
    """The CLI on the run directory: one process (TP1 from a TP2 save), bf16, one file."""
    _, jobs, _, out = trained
    _, run_dir, _ = jobs["tp2"]
    dest = tmp_path / "hf_bf16"
    env = dict(os.environ, OMP_NUM_THREADS="1", CTPO_CPU_MODE="on")
    proc = subprocess.run([sys.executable, "-m", "ctpo_megatron.export", run_dir, str(dest),
                           "--dtype", "bf16", "--tp", "1", "--step", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((dest / "config.json").read_text())["dtype"] == "bfloat16"
    assert os.path.exists(dest / "model.safetensors")  # below 5GB: a single file, no index
    from safetensors.torch import load_file

    state = load_file(dest / "model.safetensors")
    for name, trained_w in out["tp2"]["weights"].items():
        assert torch.equal(state[name], torch.from_numpy(trained_w).to(torch.bfloat16)), name


def test_missing_and_partial_checkpoints_are_named(trained, tmp_path, capsys):
    _, jobs, _, _ = trained
    run_dir = jobs["tp2"][1]
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 7 .*steps \[2\]"):
        resolve_checkpoint(run_dir, step=7)
    # A run killed during its first save: only the .incomplete directory.
    killed = tmp_path / "killed"
    os.makedirs(killed / "checkpoints" / "iter_0000001.incomplete")
    (killed / "config.yaml").write_text("model:\n  path: x\n")
    with pytest.raises(CheckpointError, match="no complete checkpoint.*iter_0000001.incomplete"):
        resolve_checkpoint(killed)
    fresh = tmp_path / "fresh_run"  # started, never saved
    fresh.mkdir()
    (fresh / "config.yaml").write_text("model:\n  path: x\n")
    with pytest.raises(CheckpointError, match="saved no checkpoint"):
        resolve_checkpoint(fresh)
    # Data files removed or cut short after the save.
    ckpt, _ = resolve_checkpoint(run_dir)
    partial = tmp_path / "partial" / "iter_0000002"
    shutil.copytree(ckpt, partial)
    data_files = sorted(f for f in os.listdir(partial) if f.endswith(".distcp"))
    os.remove(partial / data_files[0])
    with open(partial / data_files[1], "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=f"{data_files[0]} missing; {data_files[1]} truncated"):
        check_checkpoint_files(partial)
    os.remove(partial / ".metadata")
    with pytest.raises(CheckpointError, match=r"incomplete: \.metadata missing"):
        check_checkpoint_files(partial)
    # The CLI reports it without a traceback, before starting any process group.
    proc = subprocess.run([sys.executable, "-m", "ctpo_megatron.export", str(partial),
                           str(tmp_path / "never")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and ".metadata missing" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "never").exists()
    # OUT_DIR is replaced as a whole: never the run, the checkpoint or the base model.
    from ctpo_megatron.export import main

    for out in (run_dir, jobs["tp2"][0], os.path.dirname(run_dir)):
        assert main([run_dir, out, "--overwrite"]) == 2
    assert "overlaps" in capsys.readouterr().err
    assert os.path.isdir(os.path.join(run_dir, "checkpoints")) and os.listdir(jobs["tp2"][0])


def test_help_documents_the_options():
    proc = subprocess.run([sys.executable, "-m", "ctpo_megatron.export", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("CHECKPOINT_OR_RUN_DIR", "OUT_DIR", "--step", "--dtype", "--max-shard-size",
                 "--base-model", "--tp", "--pp", "torchrun", "model.safetensors.index.json"):
        assert flag in proc.stdout, flag
