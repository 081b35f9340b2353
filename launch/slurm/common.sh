# Sourced by train.sbatch and train_srun.sbatch (not run on its own): the repository, the
# rendezvous address, NCCL settings, the run directory, and the requeue-after-preemption step.
# shellcheck shell=bash

# sbatch runs a spooled copy of the script: submit from the repository root
cd "${SLURM_SUBMIT_DIR:-.}" || exit 2
if [ ! -f launch/train.py ]; then
  echo "error: submit from the rlrr repository root (no launch/train.py in $PWD)" >&2
  exit 2
fi
PYTHON=${PYTHON:-python}
# Containers: SRUN_ARGS for pyxis/enroot ("--container-image=rlrr.sqsh --container-mounts=$PWD:$PWD
# --container-workdir=$PWD"), CONTAINER as a command prefix for Apptainer ("apptainer exec --nv
# rlrr.sif"). The run directory must be on a shared filesystem at the same path inside and out.
read -r -a SRUN_EXTRA <<< "${SRUN_ARGS:-}"
read -r -a CONTAINER_CMD <<< "${CONTAINER:-}"

# A sweep submits an array over a list of configs: pick this array task's line.
if [ "${1:-}" = "--config-list" ]; then
  CONFIG=$(sed -n "$(( ${SLURM_ARRAY_TASK_ID:?--config-list needs a job array} + 1 ))p" "$2")
  shift 2
elif [ $# -ge 1 ]; then
  CONFIG=$1
  shift
else
  echo "usage: sbatch $0 CONFIG.yaml [--set key=value ...]" >&2
  exit 2
fi
TRAIN_ARGS=(--config "$CONFIG" "$@")

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT

# NCCL on GPU nodes: abort a hung collective (then the job fails and can be requeued) instead of
# hanging until the time limit. Set NCCL_SOCKET_IFNAME / NCCL_IB_HCA for your fabric.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# Resolved by the same code (and container) as the training, in a one-task step.
RUN_DIR=$(srun --nodes=1 --ntasks=1 "${SRUN_EXTRA[@]}" "${CONTAINER_CMD[@]}" \
          "$PYTHON" launch/train.py --print-run-dir "${TRAIN_ARGS[@]}")
mkdir -p "$RUN_DIR/logs"
echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: ${CONFIG} -> ${RUN_DIR}" \
     "(rank logs in ${RUN_DIR}/logs/)"

# After the step: the ranks write RUN_DIR/PREEMPTED when a signal (USR1 before the time limit,
# TERM on preemption) made them checkpoint and stop early; requeue, and the next start resumes.
requeue_if_preempted() {
  if [ -f "$RUN_DIR/PREEMPTED" ]; then
    echo "stopped early at $(cat "$RUN_DIR/PREEMPTED"); requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}" || echo "warning: scontrol requeue ${SLURM_JOB_ID} failed" >&2
  fi
}
