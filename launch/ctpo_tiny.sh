#!/usr/bin/env bash
# The tiny local CTPO run on a CPU-only machine (placeholder until the trainer lands).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
echo "the tiny training run is not implemented yet" >&2
exit 1
