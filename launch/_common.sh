# Shared helpers of the Slurm launchers (sourced, not run). They only map Slurm's environment
# to commands; the plan (roles, nodes, ports, overrides, memory) comes from
# `python -m ctpo_megatron.cluster.plan`.

# ctpo_python: the interpreter that plans the job: $CTPO_PYTHON, else the repository's .venv,
# else python3 from PATH. It needs the ctpo_megatron package importable.
ctpo_python() {
  if [ -n "${CTPO_PYTHON:-}" ]; then echo "$CTPO_PYTHON"
  elif [ -x "$CTPO_REPO/.venv/bin/python" ]; then echo "$CTPO_REPO/.venv/bin/python"
  else command -v python3; fi
}

# ctpo_has_flag FLAG ARGS...: whether FLAG is among ARGS.
ctpo_has_flag() {
  local flag=$1; shift
  local a; for a in "$@"; do [ "$a" = "$flag" ] && return 0; done
  return 1
}

# ctpo_srun_role ROLE NODELIST NNODES TASKS_PER_NODE [extra srun options...]
# Starts `python -m ctpo_megatron.cluster.role ROLE` as one background srun step, output
# appended to $CTPO_LOG_DIR/ROLE.log (task-labelled). Sets CTPO_LAST_PID to srun's pid.
# --overlap: the steps share the allocation's CPUs (without it a second step waits forever).
ctpo_srun_role() {
  local role=$1 nodes=$2 nnodes=$3 per_node=$4; shift 4
  local cpus=$(( ${SLURM_CPUS_ON_NODE:-1} / per_node )); [ "$cpus" -ge 1 ] || cpus=1
  local container=()
  if [ -n "$CTPO_CONTAINER_IMAGE" ]; then
    container=(--container-image="$CTPO_CONTAINER_IMAGE" --container-mounts="$CTPO_CONTAINER_MOUNTS"
               --container-workdir="$CTPO_REPO")
  fi
  srun --overlap --label --nodelist="$nodes" --nodes="$nnodes" --ntasks="$(( nnodes * per_node ))" \
       --ntasks-per-node="$per_node" --cpus-per-task="$cpus" "${container[@]}" "$@" \
       env PYTHONPATH="$CTPO_REPO${PYTHONPATH:+:$PYTHONPATH}" \
       "$CTPO_PY" -m ctpo_megatron.cluster.role "$role" --plan "$CTPO_PLAN" \
       >>"$CTPO_LOG_DIR/$role.log" 2>&1 &
  CTPO_LAST_PID=$!
}
