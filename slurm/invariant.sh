#!/bin/bash
# Invariant-set sampling (seed 000) at 256 px on 4 GPUs, through the seed's own backbone, LightningDiT-XL/1 +
# VA-VAE (convert its released files once: conf/diffusion/lightningdit_imagenet256.yaml). The diffusers
# DiT-XL/2 substitute: EXPERIMENT=invariant/imagenet_dit_logits sbatch slurm/invariant.sh
# Resume after preemption or timeout: SLURM requeues the job and the same command skips the
# queries/seeds already written under outputs/<task>/samples/.
#SBATCH --job-name=equidiff-invariant
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --mem=128G
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
# submit from the repository root: sbatch slurm/invariant.sh [overrides]
cd "${SLURM_SUBMIT_DIR:-.}" && source slurm/_common.sh

EXPERIMENT=${EXPERIMENT:-invariant/imagenet_lightningdit_logits}
step equidiff predict experiment="$EXPERIMENT" trainer="$TRAINER" trainer.devices="$DEVICES" \
  trainer.num_nodes="$NODES" "$@"
