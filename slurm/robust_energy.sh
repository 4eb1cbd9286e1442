#!/bin/bash
# Robust-energy guided sampling (seed 002) on one node, one process per GPU.
# Resume after preemption or timeout: SLURM requeues the job (signal below) and the same command
# skips the samples already written under outputs/<task>/samples/.
#SBATCH --job-name=equidiff-robust-energy
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
# submit from the repository root: sbatch slurm/robust_energy.sh [overrides]
cd "${SLURM_SUBMIT_DIR:-.}" && source slurm/_common.sh

EXPERIMENT=${EXPERIMENT:-robust_energy/fig4_13_energy}
step equidiff predict experiment="$EXPERIMENT" trainer="$TRAINER" trainer.devices="$DEVICES" \
  trainer.num_nodes="$NODES" "$@"
