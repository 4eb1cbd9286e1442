#!/bin/bash
# Learning from plausible counterfactuals (seed 001): fit the source model, generate the perturbed
# dataset (predict), fit a fresh model on it, test it on the clean test set. Each stage resumes when
# the job is requeued: a fit from its checkpoints/last.ckpt (equidiff fit does it by itself; a finished
# fit trains nothing and leaves its exported model as it is), predict by skipping samples already written.
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
# (DATASET=waterbirds|spuco_animals: experiments pcfe/<DATASET>_*; DATASET=digits: the embedded digits/pcfe_*)
cd "${SLURM_SUBMIT_DIR:-.}" && source slurm/_common.sh

DATASET=${DATASET:-waterbirds}
SOLVER=${SOLVER:-pcfe_l0}
case "$DATASET" in
  digits) EXP=digits/pcfe_ ;;
  *) EXP=pcfe/${DATASET}_ ;;
esac
DDP=(trainer="$TRAINER" trainer.devices="$DEVICES" trainer.num_nodes="$NODES")

step equidiff fit experiment="${EXP}erm" "${DDP[@]}" "$@"
step equidiff predict experiment="${EXP}generate_${SOLVER}" "${DDP[@]}" "$@"
step equidiff fit experiment="${EXP}retrain_${SOLVER}" "${DDP[@]}" "$@"
# test the retrained model's last epoch (checkpoints/last.ckpt: no model selection on group labels) on the clean
# test set; exact under DDP (each rank tests its own shard, the group metrics are sum-reduced)
step equidiff test experiment="${EXP}retrain_${SOLVER}" "${DDP[@]}" \
  'ckpt_path=${paths.output_dir}/checkpoints/last.ckpt' "$@"
