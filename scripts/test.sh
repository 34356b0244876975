#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the whole suite on CPU.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
bash scripts/setup_system.sh
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
