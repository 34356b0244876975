"""`python -m ctpo_megatron.logprobs --cp 2` under torchrun (4 ranks) against transformers."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ctpo_megatron.parallel import free_port
from tests._tiny_hf import BUILDERS, hf_response_log_probs, random_samples

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("family,layout", [
    ("llama", ["--tp", "1", "--pp", "2", "--cp", "2"]),
    # TP2 x CP2 is also covered, for all three families, by test_actor_context_parallel.py
    # through the same compute_log_probs; this launch costs another ~40 s.
    pytest.param("qwen3", ["--tp", "2", "--cp", "2"], marks=pytest.mark.slow)])
def test_torchrun_cp2_writes_log_probs(tmp_path, family, layout):
    """Ragged lengths (not multiples of 2*cp), a response of one token, micro-batches that
    straddle the samples: the output equals transformers' float32 log-probs within 1e-4."""
    model_dir = BUILDERS[family](tmp_path / family, num_hidden_layers=2)
    samples = random_samples(5, seed=23, max_len=15)
    samples[3]["response_ids"] = samples[3]["response_ids"][:1]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(dict(s, id=i)) + "\n" for i, s in enumerate(samples)))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "--master-port", str(free_port()), "-m", "ctpo_megatron.logprobs",
           "--hf-model", str(model_dir), "--input", str(src), "--output", str(out),
           "--micro-batch-size", "2", *layout]
    env = dict(os.environ, OMP_NUM_THREADS="1", CTPO_CPU_MODE="on")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(samples)))
    assert len(rows[3]["log_probs"]) == 1
    for row, want in zip(rows, hf_response_log_probs(model_dir, samples)):
        torch.testing.assert_close(torch.tensor(row["log_probs"]), want, rtol=0, atol=1e-4)
