"""The CUDA sources compile (nvcc, compile only): on every CI run, without a GPU or a CUDA torch.

`scripts/test.sh` installs nvcc from NVIDIA's PyPI wheels (scripts/setup_nvcc.sh); the test runs
`csrc/check_cuda_compile.sh`, which compiles each csrc/cuda/*.cu against the installed torch's
headers. Without an nvcc this is a failure under CTPO_REQUIRE_EXT=1 (CI) and a skip elsewhere.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

from tests._require import missing_build_tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WHEEL_NVCC = os.path.join(ROOT, ".cache", "cuda_nvcc", "nvidia", "cu13", "bin", "nvcc")


def find_nvcc() -> str | None:
    """$NVCC, else the wheel install of scripts/setup_nvcc.sh, else nvcc on PATH."""
    for candidate in (os.environ.get("NVCC"), WHEEL_NVCC, shutil.which("nvcc")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.mark.slow
def test_cuda_sources_compile():
    nvcc = find_nvcc()
    if nvcc is None:
        missing_build_tool("no nvcc: run scripts/setup_nvcc.sh (or set NVCC) to compile-check csrc/cuda")
    env = {**os.environ, "NVCC": nvcc, "PYTHON": sys.executable}
    out = subprocess.run(["bash", "csrc/check_cuda_compile.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    tail = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0, tail
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    assert sources
    for src in sources:
        assert f"ok: csrc/cuda/{os.path.basename(src)}" in out.stdout, tail
