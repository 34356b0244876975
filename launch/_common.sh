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

# ctpo_srun_role ROLE LOG NODELIST NNODES TASKS_PER_NODE CPUS_PER_TASK [srun options...] [-- role args...]
# Starts `python -m ctpo_megatron.cluster.role ROLE` as one background srun step, output
# appended to LOG (task-labelled). Sets CTPO_LAST_PID to srun's pid. The role exports the plan's
# environment of ROLE (cluster.env + automatic NCCL settings) before it execs.
# --overlap: the steps share the allocation's CPUs (without it a second step waits forever).
# Container mode (pyxis): one named container per job (imported once per node, reused by every
# step), the plan's mounts, no home directory, and PYTHONPATH = the repository only (the host's
# PYTHONPATH points at host paths that do not exist, or differ, in the image).
ctpo_srun_role() {
  local role=$1 log=$2 nodes=$3 nnodes=$4 per_node=$5 cpus=$6; shift 6
  local opts=() args=()
  while [ $# -gt 0 ]; do
    if [ "$1" = -- ]; then shift; args=("$@"); break; fi
    opts+=("$1"); shift
  done
  [ "$cpus" -ge 1 ] || cpus=1
  local container=() pypath="$CTPO_REPO${PYTHONPATH:+:$PYTHONPATH}"
  if [ -n "$CTPO_CONTAINER_IMAGE" ]; then
    container=(--container-image="$CTPO_CONTAINER_IMAGE" --container-name="$CTPO_CONTAINER_NAME"
               --container-mounts="$CTPO_CONTAINER_MOUNTS" --no-container-mount-home
               --container-workdir="$CTPO_REPO")
    pypath=$CTPO_REPO
  fi
  srun --overlap --label --nodelist="$nodes" --nodes="$nnodes" --ntasks="$(( nnodes * per_node ))" \
       --ntasks-per-node="$per_node" --cpus-per-task="$cpus" "${container[@]}" "${opts[@]}" \
       env PYTHONPATH="$pypath" \
       "$CTPO_PY" -m ctpo_megatron.cluster.role "$role" --plan "$CTPO_PLAN" "${args[@]}" \
       >>"$log" 2>&1 &
  CTPO_LAST_PID=$!
}
