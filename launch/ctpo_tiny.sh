#!/usr/bin/env bash
# The tiny local CTPO run on a CPU-only machine (2 cores are enough, a few minutes):
#   1. installs the environment (.venv, the csrc extension) if needed
#   2. builds a tiny Qwen2-style model + character tokenizer, a synthetic tool-use arithmetic
#      dataset, and warm-starts the model on a few imperfect demonstrations (plain torch)
#   3. trains it with CTPO through the real pipeline: the Megatron actor in CPU mode at TP 2
#      (2 ranks via torchrun), the embedded rollout server over HTTP, sandboxed tool calls,
#      weight resync after every step, the csrc kernels in the loss
#   4. draws the plots; the last line reads `held-out accuracy: <before> -> <after>`
# Usage: bash launch/ctpo_tiny.sh [hydra overrides, e.g. trainer.total_steps=10]
# Env: RUN_DIR (default runs/tiny; an existing run resumes from its last checkpoint),
#      NPROC (default 2 = the TP size of configs/tiny.yaml; the ranks must be a multiple of
#      tp x cp, e.g. `parallel.tp=1 parallel.cp=2` runs context parallelism on the same 2 ranks).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash "$ROOT/scripts/setup_env.sh"
PY="$ROOT/.venv/bin/python"
RUN_DIR="${RUN_DIR:-$ROOT/runs/tiny}"
NPROC="${NPROC:-2}"
INIT="$RUN_DIR/init"

echo "[tiny] preparing model, tokenizer and data in $INIT"
# One thread: on a small shared machine several OpenMP threads per process mostly spin.
OMP_NUM_THREADS=1 "$PY" -m ctpo_megatron.data.tiny_setup "$INIT"

echo "[tiny] training with CTPO on $NPROC ranks (progress below; logs of the rollout server in $RUN_DIR/logs)"
OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  -m ctpo_megatron.train --config-name tiny \
  "trainer.run_dir=$RUN_DIR" "model.path=$INIT/model" \
  "data.train_files=[$INIT/train.parquet]" "data.val_files=[$INIT/val.parquet]" "$@"

echo "[tiny] metrics: $RUN_DIR/metrics.jsonl (TensorBoard: tensorboard --logdir $RUN_DIR/tensorboard)"
echo "[tiny] plots:"
"$PY" -m ctpo_megatron.plot "$RUN_DIR" --summary
