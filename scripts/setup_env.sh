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
    && [ -f "$ROOT/.cache/sglang_contract/sglang_serializer.py" ] \
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

# SGLang's own wire formats, taken from the sglang wheel fetched without dependencies, so tests
# check our payloads with the real server's code: the /generate contract (api_types.py, needs
# only msgspec) and the tensor-payload serializer (MultiprocessingSerializer / SafeUnpickler).
contract="$ROOT/.cache/sglang_contract"
if [ ! -f "$contract/api_types.py" ] || [ ! -f "$contract/sglang_serializer.py" ]; then
  echo "[setup] fetching SGLang's wire contracts (sglang==0.5.23, no dependencies)"
  tmp="$(mktemp -d)"
  "$VENV/bin/pip" download -q --no-deps -d "$tmp" "sglang==0.5.23"
  "$VENV/bin/python" scripts/extract_sglang_contract.py "$(ls "$tmp"/sglang-*.whl | head -n1)" "$contract"
  rm -rf "$tmp"
fi
echo "$want" > "$stamp"
echo "[setup] done"
