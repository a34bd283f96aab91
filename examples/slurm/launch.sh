# Shared by the sbatch scripts of this folder (sourced, not run).  One `torchrun` per node
# (srun, one task per node), c10d rendezvous on the job's first node, one worker per GPU;
# automatic resume (nemo-elastic continues from the run's latest checkpoint) and requeue after a
# preemption or time-limit SIGTERM that produced a new checkpoint.
#
# Environment (all optional): TP, PP (parallel sizes; DP = nodes x GPUs / (TP x PP)),
# GPUS_PER_NODE (default: Slurm's, else 8), NEMO_ELASTIC (the command; a venv's bin/nemo-elastic
# or a container's), MASTER_PORT (29500), MAX_REQUEUES (20), CONTAINER_IMAGE / CONTAINER_MOUNTS
# (pyxis/enroot: srun --container-image/--container-mounts), TORCH_ELASTIC_SHUTDOWN_TIMEOUT
# (seconds torchrun waits for the SIGTERM checkpoint before SIGKILL, default 240).
#
# DRY_RUN=1: validate the recipe for the job's world size (`nemo-elastic check`), print the srun
# line and the exact command every node runs, then stop (no Slurm needed: outside a job, NODES
# (default 2) fake nodes node001, node002, ... are shown).

TP=${TP:-1}
PP=${PP:-1}
NEMO_ELASTIC=${NEMO_ELASTIC:-nemo-elastic}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_REQUEUES=${MAX_REQUEUES:-20}
DRY_RUN=${DRY_RUN:-0}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}

job_hosts() {
  if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$SLURM_JOB_NODELIST"
  else
    for ((i = 1; i <= NNODES; i++)); do printf 'node%03d\n' "$i"; done
  fi
}

# latest CKPT_ROOT: the checkpoint name in CKPT_ROOT/latest (empty when none)
latest_checkpoint() { cat "$1/latest" 2>/dev/null || true; }

# srun_args: the srun options for N tasks, one per node
srun_args() {
  SRUN=(srun --kill-on-bad-exit=1 --nodes="$1" --ntasks-per-node=1)
  [ -n "${CONTAINER_IMAGE:-}" ] && SRUN+=(--container-image="$CONTAINER_IMAGE")
  [ -n "${CONTAINER_MOUNTS:-}" ] && SRUN+=(--container-mounts="$CONTAINER_MOUNTS")
  return 0
}

print_command() { printf '%q ' "$@" | sed 's/ $//'; printf '\n'; }

# launch_torchrun CKPT_ROOT SUBCOMMAND [ARGS...]: nemo-elastic SUBCOMMAND on every GPU of the
# job; requeues the job when it stopped after writing a new checkpoint under CKPT_ROOT.
launch_torchrun() {
  local ckpt_root=$1
  shift
  NNODES=${SLURM_NNODES:-${NODES:-2}}
  GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
  local world=$((NNODES * GPUS_PER_NODE)) model_parallel=$((TP * PP))
  if ((world % model_parallel)); then
    echo "error: TP=$TP x PP=$PP = $model_parallel does not divide $NNODES node(s) x" \
         "$GPUS_PER_NODE GPU(s) = $world ranks; change TP, PP, the node count or GPUS_PER_NODE" >&2
    return 2
  fi
  DP=$((world / model_parallel))
  mapfile -t HOSTS < <(job_hosts)
  MASTER_ADDR=${HOSTS[0]}
  export MASTER_ADDR MASTER_PORT
  TORCHRUN=(torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE"
            --rdzv_id="${SLURM_JOB_ID:-dryrun}" --rdzv_backend=c10d
            --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --no-python "$NEMO_ELASTIC" "$@")
  srun_args "$NNODES"
  local before
  before=$(latest_checkpoint "$ckpt_root")
  echo "job ${SLURM_JOB_ID:-dry-run} (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x" \
       "$GPUS_PER_NODE GPU(s) = $world ranks, TP=$TP PP=$PP DP=$DP, rendezvous" \
       "$MASTER_ADDR:$MASTER_PORT, resume from '${before:-none}' in $ckpt_root"
  if [ "$DRY_RUN" = 1 ]; then
    # validate the recipe with this world size, so a bad one fails here, not after queueing
    "$NEMO_ELASTIC" check --world-size "$world" --for "$@" || return 2
    printf 'srun: '; print_command "${SRUN[@]}"
    local host
    for host in "${HOSTS[@]}"; do printf '[%s] ' "$host"; print_command "${TORCHRUN[@]}"; done
    return 0
  fi
  local rc after
  set +e
  "${SRUN[@]}" "${TORCHRUN[@]}"
  rc=$?
  set -e
  after=$(latest_checkpoint "$ckpt_root")
  if [ "$rc" -ne 0 ] && [ -n "$after" ] && [ "$after" != "$before" ] \
     && [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
    echo "stopped with status $rc after writing $ckpt_root/$after: requeueing to resume"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$rc"
}

# launch_single SUBCOMMAND [ARGS...]: one nemo-elastic process on the first node (export).
launch_single() {
  srun_args 1
  SRUN+=(--ntasks=1)
  local command=("$NEMO_ELASTIC" "$@")
  echo "job ${SLURM_JOB_ID:-dry-run}: one process"
  if [ "$DRY_RUN" = 1 ]; then
    printf 'srun: '; print_command "${SRUN[@]}"
    printf '[%s] ' "$(NNODES=1 job_hosts | head -n 1)"; print_command "${command[@]}"
    return 0
  fi
  "${SRUN[@]}" "${command[@]}"
}

