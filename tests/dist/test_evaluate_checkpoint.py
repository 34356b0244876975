"""`python -m ctpo_megatron.evaluate eval.checkpoint=...`: a training checkpoint is loaded into
the policy (the training layout), exported as a Hugging Face directory and evaluated."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ctpo_megatron.parallel.spawn import run_on_ranks
from tests._tiny_hf import random_samples

pytestmark = pytest.mark.dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_and_save(rank, world_size, model_dir, ckpt):
    from ctpo_megatron.actor import ActorConfig, PolicyActor
    from ctpo_megatron.parallel import ParallelDims

    actor = PolicyActor(ActorConfig(hf_model_dir=model_dir, dims=ParallelDims(tp=1, pp=1), lr=0.01,
                                    adam_eps=1e-3, micro_batch_size=2))
    samples = random_samples(4, seed=3, vocab=100)
    for s in samples:
        r = len(s["response_ids"])
        s.update(response_mask=[1.0] * r, old_log_probs=[0.0] * r, advantages=[1.0] * r)

    def loss(log_probs, batch):
        return -(log_probs * batch["response_mask"]).sum() / batch["global_num_tokens"], {}

    actor.train_step(samples, loss)  # the checkpoint differs from the base model
    actor.save_checkpoint(ckpt, {"trainer": {"step": 1}})
    return {k: v.numpy().copy() for k, v in actor.iter_hf_weights() if v is not None}


def test_evaluate_a_training_checkpoint(tmp_path):
    from safetensors.numpy import load_file

    from ctpo_megatron.data.prompts import write_rows
    from ctpo_megatron.data.tiny_model import TinyModelConfig, build_tiny_model, save_tiny_model
    from ctpo_megatron.data.tiny_tokenizer import build_char_tokenizer

    model_dir, ckpt, out = str(tmp_path / "model"), str(tmp_path / "ckpt"), str(tmp_path / "eval")
    tok = build_char_tokenizer(model_dir)
    save_tiny_model(build_tiny_model(TinyModelConfig(), eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id), tok, model_dir)
    trained = run_on_ranks(_train_and_save, 1, model_dir, ckpt)[0]
    data = write_rows([{"data_source": "arith", "prompt": [{"role": "user", "content": "1+1=?"}],
                        "reward_model": {"ground_truth": "2"}}], str(tmp_path / "a.parquet"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "ctpo_megatron.evaluate", "--config-name", "tiny", "parallel=tp1", f"model.path={model_dir}",
           f"eval.checkpoint={ckpt}", f"eval.files=[{data}]", "eval.k=2", f"eval.out_dir={out}",
           "rollout.max_response_len=16"]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    exported = {}
    for name in os.listdir(os.path.join(out, "hf_export")):
        if name.endswith(".safetensors"):
            exported.update(load_file(os.path.join(out, "hf_export", name)))
    assert set(trained) <= set(exported)
    for k, v in trained.items():
        np.testing.assert_allclose(exported[k].astype(np.float32), v.astype(np.float32), rtol=0, atol=1e-6)
    rows = [json.loads(line) for line in open(os.path.join(out, "eval.jsonl"))]
    assert rows[-1]["source"] == "all" and rows[-1]["samples"] == 2
