#!/usr/bin/env bash
# Small-scale parity job: the mock VLM hetero on one node (half the ranks encode), then the same
# steps colocated on every rank as the single-grid reference, and the loss curves compared.
# GPUs: one rank per GPU (add --gpus-per-node=N); a node without GPUs runs 2 CPU/gloo ranks.
#   sbatch examples/mimo/scripts/sbatch_parity_small.sh [train_hetero flags]
#SBATCH --job-name=mimo-parity-small
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=00:30:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
exec bash "${HETERO_ROOT:-${SLURM_SUBMIT_DIR:-.}}/examples/mimo/scripts/sbatch_job.sh" parity-small "$@"
