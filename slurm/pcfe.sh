#!/bin/bash
# Learning from plausible counterfactuals (seed 001): fit the source model, generate the perturbed
# dataset (predict), fit a fresh model on it, test it on the clean test set. Each stage resumes when
# the job is requeued: fit from its last checkpoint, predict by skipping samples already written.
#SBATCH --job-name=equidiff-pcfe
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
# submit from the repository root: DATASET=waterbirds SOLVER=pcfe_l0 sbatch slurm/pcfe.sh [overrides]
cd "${SLURM_SUBMIT_DIR:-.}" && source slurm/_common.sh

DATASET=${DATASET:-waterbirds}
SOLVER=${SOLVER:-pcfe_l0}
DDP=(trainer="$TRAINER" trainer.devices="$DEVICES" trainer.num_nodes="$NODES")
resume() { if [ -f "$1" ]; then echo "ckpt_path=$1"; fi; }

step equidiff fit experiment="pcfe/${DATASET}_erm" "${DDP[@]}" \
  $(resume "outputs/pcfe_${DATASET}_erm/checkpoints/last.ckpt") "$@"
step equidiff predict experiment="pcfe/${DATASET}_generate_${SOLVER}" "${DDP[@]}" "$@"
step equidiff fit experiment="pcfe/${DATASET}_retrain_${SOLVER}" "${DDP[@]}" \
  $(resume "outputs/pcfe_${DATASET}_retrain_${SOLVER}/checkpoints/last.ckpt") "$@"
# test the retrained model (its last epoch: no model selection on group labels) on the clean test set;
# exact under DDP (each rank tests its own shard, the group metrics are sum-reduced)
step equidiff test experiment="pcfe/${DATASET}_retrain_${SOLVER}" "${DDP[@]}" \
  ckpt_path="outputs/pcfe_${DATASET}_retrain_${SOLVER}/checkpoints/last.ckpt" "$@"
