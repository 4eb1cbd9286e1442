# Shared set-up for equidiff's SLURM scripts (sourced from the repository root). Adjust to your cluster.
set -euo pipefail
# the project's virtual environment (make install)
source .venv/bin/activate
# no downloads on compute nodes: weights and datasets are local (paths.weights_dir, paths.data_dir)
export HF_HUB_OFFLINE=1
# wandb offline on the nodes; sync later with `wandb sync outputs/<task>/wandb/offline-run-*`
export WANDB_MODE=${WANDB_MODE:-offline}
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}

# Requeue on the time-limit signal (#SBATCH --signal=B:USR1@<seconds>): the requeued job re-runs this
# script, and every step resumes (predict skips samples already written; fit resumes from last.ckpt).
# equidiff does not rely on Lightning's HPC checkpoints for progress.
STEP_PID=""
requeue() {
  echo "equidiff: time limit near, requeueing job ${SLURM_JOB_ID:-?}"
  if [ -n "${SLURM_JOB_ID:-}" ]; then scontrol requeue "$SLURM_JOB_ID"; fi
  # stop the running step now (samples already written stay; the requeued job resumes after them)
  if [ -n "$STEP_PID" ]; then kill -TERM "$STEP_PID" 2>/dev/null || true; fi
  exit 0
}
trap requeue USR1

# one process per GPU, started by srun (Lightning's SLURM environment sets up DDP from it);
# run in the background and `wait`, so the shell can take the signal while srun runs
step() {
  srun "$@" &
  STEP_PID=$!
  wait "$STEP_PID"
  STEP_PID=""
}

# the trainer for `srun`: ddp over all tasks of the allocation (TRAINER=gpu for a single task)
TRAINER=${TRAINER:-ddp}
DEVICES=${SLURM_NTASKS_PER_NODE:-1}
NODES=${SLURM_NNODES:-1}
