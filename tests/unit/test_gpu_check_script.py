"""`scripts/gpu_check.sh --cpu`: the GPU readiness script's checks, run on CPU at a tiny size."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ("build", "kernel_tests", "bandwidth", "logprobs_fp32", "logprobs_bf16", "train_resume",
          "nan_grad", "peak_memory")


def test_gpu_check_cpu_mode_passes_every_check():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    lines = dict(re.findall(r"^CHECK (\S+)\s+(PASS|FAIL) ", out.stdout, flags=re.M))
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert lines == {name: "PASS" for name in CHECKS}, out.stdout
    # the figures are there: exact resume, fp32 parity with transformers
    assert re.search(r"train_resume\s+PASS max \|weights after resume - uninterrupted\| = 0\.00e\+00", out.stdout)
    fp32 = float(re.search(r"logprobs_fp32\s+PASS max \|megatron - transformers\| = (\S+)", out.stdout)[1])
    assert fp32 < 1e-4


def test_gpu_check_rejects_unknown_arguments():
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--bogus"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown argument --bogus" in out.stderr
