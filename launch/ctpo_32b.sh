#!/usr/bin/env bash
# CTPO training on Slurm: training nodes (Megatron under torchrun) + rollout nodes (inference
# servers). `bash launch/ctpo_32b.sh --help` lists the options; `--dry-run` prints the plan.
#
#   bash launch/ctpo_32b.sh [--dry-run] [--nodes N] [--rollout-nodes R] [--container-image IMG]
#        [--partition P] [--time T] [--cluster NAME] [hydra overrides...]
#
# Outside an allocation it submits itself with sbatch; inside one (SLURM_JOB_ID set) it runs the
# job: plan -> rollout servers -> wait for /health -> torchrun trainer -> stop servers. On SIGTERM
# (preemption, scancel) or USR1 (time limit near) the trainer is asked (SIGUSR1) to checkpoint
# after its current step and stop; on USR1 the job then requeues itself and resumes.
set -euo pipefail
if [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${CTPO_REPO:-}" ]; then
  :  # sbatch runs a spool copy of this file: the repository comes from the submit environment
else
  CTPO_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fi
export CTPO_REPO
# shellcheck source=launch/_common.sh
source "$CTPO_REPO/launch/_common.sh"
PY=$(ctpo_python)
export PYTHONPATH="$CTPO_REPO${PYTHONPATH:+:$PYTHONPATH}"
export CTPO_LAUNCHER_PROG="bash launch/ctpo_32b.sh"

if ctpo_has_flag --help "$@" || ctpo_has_flag -h "$@" || ctpo_has_flag --dry-run "$@"; then
  exec "$PY" -m ctpo_megatron.cluster.plan "$@"
fi

if [ -z "${SLURM_JOB_ID:-}" ]; then
  if ! command -v sbatch >/dev/null 2>&1; then
    echo "error: sbatch not found: submit from a Slurm login node (or look at the plan with --dry-run)" >&2
    exit 2
  fi
  opts=$("$PY" -m ctpo_megatron.cluster.plan --emit sbatch "$@")
  mapfile -t SBATCH_OPTS <<<"$opts"
  job=$(sbatch --parsable "${SBATCH_OPTS[@]}" "$CTPO_REPO/launch/ctpo_32b.sh" "$@")
  job=${job%%;*}
  out=$(printf '%s\n' "${SBATCH_OPTS[@]}" | grep -- '^--output=' | cut -d= -f2-)
  echo "submitted job $job: batch log ${out//%j/$job}, role logs in $(dirname "$out")/slurm-$job/"
  exit 0
fi

# ---- inside the allocation ----
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)
vars=$("$PY" -m ctpo_megatron.cluster.plan --emit job --hosts "$hosts" --job-id "$SLURM_JOB_ID" \
       --restart "${SLURM_RESTART_COUNT:-0}" "$@")
eval "$vars"
echo "[ctpo] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $hosts; plan: $CTPO_LOG_DIR/plan.txt"

SIGNALED="" ROLLOUT_PID="" ROUTER_PID="" WAIT_PID="" TRAIN_PID=""
# SIGTERM (preemption, scancel) or USR1 (time limit near): ask the trainer for a checkpoint at
# the end of its step with SIGUSR1 to its step (srun forwards it; torchrun's agent ignores it).
forward() {
  SIGNALED=$1
  if [ -n "$TRAIN_PID" ]; then
    echo "[ctpo] SIG$1 received: the trainer checkpoints after its current step and stops"
    kill -USR1 "$TRAIN_PID" 2>/dev/null || true
  else
    echo "[ctpo] SIG$1 received before the trainer started"
    [ -z "$WAIT_PID" ] || kill -TERM "$WAIT_PID" 2>/dev/null || true
  fi
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap 'forward INT' INT

wait_for() {  # wait_for PID: the exit status of PID, waiting again after trapped signals
  local pid=$1 rc=0
  wait "$pid" || rc=$?
  while kill -0 "$pid" 2>/dev/null; do rc=0; wait "$pid" || rc=$?; done
  return "$rc"
}

rc=0
if [ "$CTPO_ROLLOUT_NNODES" -gt 0 ]; then
  ctpo_srun_role rollout "$CTPO_ROLLOUT_NODES" "$CTPO_ROLLOUT_NNODES" "$CTPO_SERVERS_PER_NODE" \
    --gres="gpu:$CTPO_GPUS_PER_NODE"
  ROLLOUT_PID=$CTPO_LAST_PID
  if [ -n "$CTPO_ROUTER_NODE" ]; then
    ctpo_srun_role router "$CTPO_ROUTER_NODE" 1 1
    ROUTER_PID=$CTPO_LAST_PID
  fi
  "$PY" -m ctpo_megatron.cluster.role wait --plan "$CTPO_PLAN" --watch-pid "$ROLLOUT_PID" \
    >>"$CTPO_LOG_DIR/rollout.log" 2>&1 &
  WAIT_PID=$!
  wait_for "$WAIT_PID" || rc=$?
  WAIT_PID=""
  if [ "$rc" -ne 0 ] && [ -z "$SIGNALED" ]; then
    echo "[ctpo] rollout servers did not come up (rc $rc); see $CTPO_LOG_DIR/rollout.log" >&2
  fi
fi

if [ "$rc" -eq 0 ] && [ -z "$SIGNALED" ]; then
  ctpo_srun_role trainer "$CTPO_TRAIN_NODES" "$CTPO_TRAIN_NNODES" 1 \
    --gres="gpu:$CTPO_GPUS_PER_NODE" --kill-on-bad-exit=1
  TRAIN_PID=$CTPO_LAST_PID
  wait_for "$TRAIN_PID" || rc=$?
  TRAIN_PID=""
  echo "[ctpo] trainer exited with rc $rc"
fi

for pid in $ROUTER_PID $ROLLOUT_PID; do kill -TERM "$pid" 2>/dev/null || true; done
for pid in $ROUTER_PID $ROLLOUT_PID; do wait "$pid" 2>/dev/null || true; done

if [ "$SIGNALED" = USR1 ] && [ "$CTPO_REQUEUE" = 1 ]; then
  echo "[ctpo] time limit near: requeueing job $SLURM_JOB_ID (it resumes from the checkpoint)"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
