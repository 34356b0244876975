#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv and builds csrc/.
# Idempotent: a stamp of the dependency files skips the pip work when nothing changed.
# Usage: bash scripts/setup_env.sh      (then: source .venv/bin/activate)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
# Every pip call is constrained so no dependency swaps the CPU torch for a CUDA build.
PIP=("$VENV/bin/pip" install -q -c "$ROOT/constraints.txt")

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in .venv"
  "$PY" -m venv "$VENV"
fi

stamp="$VENV/.ctpo_stamp"
want="$(find constraints.txt setup.py requirements-test.txt csrc -type f 2>/dev/null | sort | xargs cat | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$ROOT/.cache/sglang_contract/api_types.py" ] \
    && "$VENV/bin/python" -c "import ctpo_megatron" 2>/dev/null; then
  echo "[setup] environment up to date"
  exit 0
fi

echo "[setup] installing torch (CPU build) and dependencies"
"${PIP[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -r requirements-test.txt
echo "[setup] building the csrc extension (pip install -e .)"
"${PIP[@]}" --no-build-isolation -e .

# SGLang's own request contract (api_types.py needs only msgspec): fetched without
# dependencies so tests validate our client payloads against the real server's schema.
contract="$ROOT/.cache/sglang_contract"
if [ ! -f "$contract/api_types.py" ]; then
  echo "[setup] fetching SGLang's request contract (sglang==0.5.23, no dependencies)"
  tmp="$(mktemp -d)"
  "$VENV/bin/pip" download -q --no-deps -d "$tmp" "sglang==0.5.23"
  mkdir -p "$contract"
  "$VENV/bin/python" - "$tmp" "$contract" <<'PYEOF'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/sglang-*.whl")[0]
with zipfile.ZipFile(wheel) as zf:
    data = zf.read("sglang/api/v1/api_types.py")
open(sys.argv[2] + "/api_types.py", "wb").write(data)
PYEOF
  rm -rf "$tmp"
fi
echo "$want" > "$stamp"
echo "[setup] done"
