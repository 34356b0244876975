"""`python -m ctpo_megatron.logprobs` under torchrun (2 ranks, TP2) against transformers."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ctpo_megatron.parallel import free_port
from tests._tiny_hf import build_qwen2, hf_response_log_probs, random_samples

pytestmark = pytest.mark.dist


def test_torchrun_tp2_writes_log_probs(tmp_path):
    model_dir = build_qwen2(tmp_path / "qwen2")
    samples = random_samples(5, seed=21)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(dict(s, id=i)) + "\n" for i, s in enumerate(samples)))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "ctpo_megatron.logprobs",
           "--hf-model", str(model_dir), "--input", str(src), "--output", str(out),
           "--tp", "2", "--temperature", "0.9", "--micro-batch-size", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CTPO_CPU_MODE="on")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(samples)))  # order and extra keys kept
    ref = hf_response_log_probs(model_dir, samples, temperature=0.9)
    for row, want in zip(rows, ref):
        # float32 end to end: within the 1e-4 bar.
        torch.testing.assert_close(torch.tensor(row["log_probs"]), want, rtol=0, atol=1e-4)


def test_help_documents_the_flags():
    proc = subprocess.run([sys.executable, "-m", "ctpo_megatron.logprobs", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--hf-model", "--input", "--output", "--tp", "--pp", "--temperature",
                 "--micro-batch-size", "torchrun"):
        assert flag in proc.stdout, flag
