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

# Requeue on the time-limit signal (#SBATCH --signal=B:USR1@<seconds>): stop the running step with SIGTERM and
# wait for it (fit saves <output_dir>/checkpoints/last.ckpt; predict keeps the samples written), then requeue.
# The requeued job re-runs this script and every step resumes (fit from last.ckpt, predict skips the written
# samples). equidiff never writes Lightning's HPC checkpoints (hpc_ckpt_*.ckpt) and never requeues by itself;
# a step that got the signal itself (--signal=USR1@... without B:) ends with status 138 (128 + SIGUSR1), and
# is requeued the same way. Any other failure ends the job.
STEP_PID=""
requeue() {
  echo "equidiff: time limit near, stopping the step and requeueing job ${SLURM_JOB_ID:-?}"
  if [ -n "$STEP_PID" ]; then
    kill -TERM "$STEP_PID" 2>/dev/null || true
    wait "$STEP_PID" || true  # the step saves what it can and ends with 143 (128 + SIGTERM)
  fi
  if [ -n "${SLURM_JOB_ID:-}" ]; then scontrol requeue "$SLURM_JOB_ID"; fi
  exit 0
}
trap requeue USR1

# one process per GPU, started by srun (Lightning's SLURM environment sets up DDP from it); run in the
# background and `wait`, so the shell can take the signal while srun runs. --kill-on-bad-exit: a task that
# fails (an exception, an out-of-memory kill) ends the whole step at once, instead of leaving the other
# ranks waiting for it in a collective (after a stop by signal too: a fit's ranks have saved together by
# then; a predict rank still in its batch loses that batch, not the samples written).
step() {
  srun --kill-on-bad-exit=1 "$@" &
  STEP_PID=$!
  local status=0
  wait "$STEP_PID" || status=$?
  STEP_PID=""
  if [ "$status" -eq 138 ]; then requeue; fi
  return "$status"
}

# the trainer for `srun`: ddp over all tasks of the allocation (TRAINER=gpu for a single task)
TRAINER=${TRAINER:-ddp}
DEVICES=${SLURM_NTASKS_PER_NODE:-1}
NODES=${SLURM_NNODES:-1}
