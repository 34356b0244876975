#!/usr/bin/env bash
# CTPO training on Slurm: training nodes (Megatron under torchrun) + rollout nodes (inference
# servers). `bash launch/ctpo_32b.sh --help` lists the options; `--dry-run` prints the plan.
#
#   bash launch/ctpo_32b.sh [--dry-run] [--nodes N] [--rollout-nodes R] [--container-image IMG]
#        [--partition P] [--time T] [--cluster NAME] [hydra overrides...]
#   ROLLOUT_PLACEMENT=colocated bash launch/ctpo_32b.sh --cluster qwen3_4b ...   # one node, shared GPUs
#
# Outside an allocation it submits itself with sbatch; inside one (SLURM_JOB_ID set) it runs the
# job: plan -> one srun step per rollout server (+ router) -> wait for /health -> torchrun
# trainer, while watching the server steps -> stop servers -> requeue if steps remain.
# The trainer stops by itself before a step that cannot finish by the job's end. On SIGTERM
# (preemption, scancel) or USR1 (Slurm's time-limit warning) it is asked (SIGUSR1) to checkpoint
# after its current step and stop. The job requeues itself only when the trainer reports a clean
# stop with steps left (<run_dir>/status.json): a finished or crashed run does not requeue.
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

# ROLLOUT_PLACEMENT=colocated: one node, the inference servers on the training GPUs (SGLang's
# memory saver; docs/slurm.md, "Colocated on one node"). Options and overrides given after win.
case "${ROLLOUT_PLACEMENT:-separate}" in
  separate) ;;
  colocated)
    set -- --nodes 1 --rollout-nodes 0 rollout.placement=colocated rollout.weight_sync.transport=tensor "$@"
    unset ROLLOUT_PLACEMENT ;;  # the job gets these arguments from sbatch, not twice
  *) echo "error: ROLLOUT_PLACEMENT=$ROLLOUT_PLACEMENT: expected separate or colocated" >&2; exit 2 ;;
esac

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
# The job's end for the trainer where squeue is missing (containers): unix seconds, or empty.
end=$(squeue -h -o %e -j "$SLURM_JOB_ID" 2>/dev/null | head -1 || true)
CTPO_JOB_END=""
case "$end" in [0-9]*) CTPO_JOB_END=$(date -d "$end" +%s 2>/dev/null || true) ;; esac
export CTPO_JOB_END
echo "[ctpo] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $hosts; plan: $CTPO_LOG_DIR/plan.txt"

SIGNALED="" ROUTER_PID="" WAIT_PID="" TRAIN_PID="" ALL_DOWN=""
SERVER_PIDS=()
read -r -a SERVER_NODES <<<"$CTPO_SERVER_NODES"
read -r -a SERVER_URLS <<<"$CTPO_SERVER_URLS"
CPUS=${SLURM_CPUS_ON_NODE:-1}
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

watch_servers() {  # reports every server step that ended; all gone: the trainer saves and stops
  local i pid src alive=0
  for i in "${!SERVER_PIDS[@]}"; do
    pid=${SERVER_PIDS[$i]}
    [ -n "$pid" ] || continue
    if kill -0 "$pid" 2>/dev/null; then alive=$((alive + 1)); continue; fi
    src=0; wait "$pid" 2>/dev/null || src=$?
    SERVER_PIDS[$i]=""
    echo "[ctpo] $(date -u +%FT%TZ) rollout server $i (${SERVER_URLS[$i]}) exited with rc $src;" \
         "see $CTPO_LOG_DIR/server-$i.log; the trainer goes on with the others"
  done
  if [ "${#SERVER_PIDS[@]}" -gt 0 ] && [ "$alive" -eq 0 ] && [ -z "$ALL_DOWN" ] && [ -n "$TRAIN_PID" ]; then
    ALL_DOWN=1
    echo "[ctpo] every rollout server is down: the trainer checkpoints after its current step and stops"
    kill -USR1 "$TRAIN_PID" 2>/dev/null || true
  fi
}

rc=0
if [ "${#SERVER_NODES[@]}" -gt 0 ]; then
  per_node_cpus=$(( CPUS / CTPO_SERVERS_PER_NODE ))
  for i in "${!SERVER_NODES[@]}"; do  # one step per server: its own log, its own exit status
    ctpo_srun_role rollout "$CTPO_LOG_DIR/server-$i.log" "${SERVER_NODES[$i]}" 1 1 "$per_node_cpus" \
      --gres="gpu:$CTPO_ROLLOUT_GPUS" --kill-on-bad-exit=1 -- --server "$i"
    SERVER_PIDS[$i]=$CTPO_LAST_PID
  done
  if [ -n "$CTPO_ROUTER_NODE" ]; then
    ctpo_srun_role router "$CTPO_LOG_DIR/router.log" "$CTPO_ROUTER_NODE" 1 1 1
    ROUTER_PID=$CTPO_LAST_PID
  fi
  watch=(); for pid in "${SERVER_PIDS[@]}" $ROUTER_PID; do watch+=(--watch-pid "$pid"); done
  "$PY" -m ctpo_megatron.cluster.role wait --plan "$CTPO_PLAN" "${watch[@]}" >>"$CTPO_LOG_DIR/rollout.log" 2>&1 &
  WAIT_PID=$!
  wait_for "$WAIT_PID" || rc=$?
  WAIT_PID=""
  if [ "$rc" -ne 0 ] && [ -z "$SIGNALED" ]; then
    echo "[ctpo] rollout servers did not come up (rc $rc); see $CTPO_LOG_DIR/rollout.log and server-<i>.log" >&2
  fi
fi

if [ "$rc" -eq 0 ] && [ -z "$SIGNALED" ]; then
  ctpo_srun_role trainer "$CTPO_LOG_DIR/trainer.log" "$CTPO_TRAIN_NODES" "$CTPO_TRAIN_NNODES" 1 "$CPUS" \
    --gres="gpu:$CTPO_GPUS_PER_NODE" --kill-on-bad-exit=1
  TRAIN_PID=$CTPO_LAST_PID
  while kill -0 "$TRAIN_PID" 2>/dev/null; do
    watch_servers
    sleep 2 & wait $! 2>/dev/null || true  # a trapped signal interrupts this wait at once
  done
  watch_servers  # a server that died in the last poll interval is reported too
  wait_for "$TRAIN_PID" || rc=$?
  TRAIN_PID=""
  echo "[ctpo] trainer exited with rc $rc"
fi

for pid in $ROUTER_PID "${SERVER_PIDS[@]}"; do [ -z "$pid" ] || kill -TERM "$pid" 2>/dev/null || true; done
for pid in $ROUTER_PID "${SERVER_PIDS[@]}"; do [ -z "$pid" ] || wait "$pid" 2>/dev/null || true; done

# Requeue only a clean stop with steps left, and not after SIGTERM/INT (a user's scancel must
# stay cancelled; on preemption with PreemptMode=REQUEUE Slurm requeues the job itself).
attempt="$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}"
if [ "$CTPO_REQUEUE" = 1 ] && [ "$SIGNALED" != TERM ] && [ "$SIGNALED" != INT ] && [ "$rc" -eq 0 ] \
   && "$PY" -m ctpo_megatron.trainer.deadline --work-remains "$CTPO_RUN_DIR" --attempt "$attempt"; then
  echo "[ctpo] steps remain: requeueing job $SLURM_JOB_ID (it resumes from the checkpoint)"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
