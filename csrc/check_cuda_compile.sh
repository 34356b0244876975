#!/usr/bin/env bash
# Compile-only check of the CUDA sources (no GPU and no CUDA build of torch needed): runs nvcc
# on every csrc/cuda/*.cu against the installed torch's headers and deletes the objects.
# Usage: bash csrc/check_cuda_compile.sh [extra nvcc flags, e.g. -arch=sm_90]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NVCC="${NVCC:-nvcc}"
command -v "$NVCC" >/dev/null || { echo "nvcc not found (set NVCC or add the CUDA toolkit to PATH)" >&2; exit 2; }
PY="${PYTHON:-python}"
mapfile -t INCLUDES < <("$PY" - <<'PYEOF'
import sysconfig
from torch.utils.cpp_extension import include_paths
for path in include_paths():
    print(path)
print(sysconfig.get_paths()["include"])
PYEOF
)
ABI=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# A CPU wheel of torch ships the c10/cuda headers but not this header that CMake generates
# for CUDA builds; supply its one definition so the sources can be checked anyway.
STUB=()
if ! "$PY" -c "import os, sys; from torch.utils.cpp_extension import include_paths; \
sys.exit(0 if any(os.path.exists(os.path.join(p, 'c10/cuda/impl/cuda_cmake_macros.h')) for p in include_paths()) else 1)"; then
  mkdir -p "$OUT/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$OUT/stub/c10/cuda/impl/cuda_cmake_macros.h"
  STUB=("-I$OUT/stub")
fi
# One nvcc per source, all at once: each is single-threaded and takes about a minute.
compile_one() {
  local src="$1"
  if "$NVCC" -c "$src" -o "$OUT/$(basename "$src").o" -std=c++17 -O3 --expt-relaxed-constexpr \
      -DCTPO_WITH_CUDA -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DTORCH_EXTENSION_NAME=_C \
      -Icsrc/include "${INCLUDES[@]/#/-I}" "${STUB[@]}" -Xcompiler -fPIC "${EXTRA[@]}" >"$OUT/$(basename "$src").log" 2>&1; then
    echo "ok: $src"
  else
    cat "$OUT/$(basename "$src").log" >&2
    echo "FAILED: $src" >&2
    return 1
  fi
}
EXTRA=("$@")
pids=()
for src in csrc/cuda/*.cu; do
  compile_one "$src" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
exit $status
