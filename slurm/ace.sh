#!/bin/bash
# ACE counterfactual explanations (seed 003), one process per GPU; resumable by re-running.
#SBATCH --job-name=equidiff-ace
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
# submit from the repository root: sbatch slurm/ace.sh [overrides]
cd "${SLURM_SUBMIT_DIR:-.}" && source slurm/_common.sh

EXPERIMENT=${EXPERIMENT:-ace/celeba_smile}
step equidiff predict experiment="$EXPERIMENT" trainer="$TRAINER" trainer.devices="$DEVICES" \
  trainer.num_nodes="$NODES" "$@"
