#!/usr/bin/env bash
# Installs NVIDIA's CUDA compiler from PyPI wheels into .cache/cuda_nvcc (once; ~130 MB), so the
# compile-only check of csrc/cuda (csrc/check_cuda_compile.sh, run by
# tests/unit/test_ops_cuda_compile.py) runs on machines without a CUDA toolkit or GPU.
# Usage: bash scripts/setup_nvcc.sh    (prints the nvcc path)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.cache/cuda_nvcc"
NVCC="$DEST/nvidia/cu13/bin/nvcc"
# nvcc + cicc (nvvm) + the C runtime headers + cudart headers + CUB (cccl), one CUDA release.
WHEELS=(nvidia-cuda-nvcc==13.5.37 nvidia-nvvm==13.5.37 nvidia-cuda-crt==13.5.37
        nvidia-cuda-runtime==13.5.37 nvidia-cuda-cccl==13.3.5.0.6)
if [ ! -x "$NVCC" ] || [ "$(cat "$DEST/.wheels" 2>/dev/null)" != "${WHEELS[*]}" ]; then
  echo "[setup] installing nvcc for the CUDA compile check (${WHEELS[*]})" >&2
  rm -rf "$DEST"
  "$ROOT/.venv/bin/pip" install -q --no-deps --target "$DEST" "${WHEELS[@]}"
  echo "${WHEELS[*]}" > "$DEST/.wheels"
fi
"$NVCC" --version >/dev/null
echo "$NVCC"
