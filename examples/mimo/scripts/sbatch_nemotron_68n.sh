#!/usr/bin/env bash
# Production shape: Nemotron-54l VLM on 68 nodes of 8 GPUs (examples/mimo/cluster/presets.py,
# shape nemotron-68n). Set HETERO_DATA_PATH and HETERO_TOKENIZER; see sbatch_job.sh.
#   sbatch examples/mimo/scripts/sbatch_nemotron_68n.sh [train_hetero flags]
#SBATCH --job-name=mimo-nemotron-68n
#SBATCH --nodes=68
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
exec bash "${HETERO_ROOT:-${SLURM_SUBMIT_DIR:-.}}/examples/mimo/scripts/sbatch_job.sh" nemotron-68n "$@"
