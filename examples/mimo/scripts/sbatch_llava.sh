#!/usr/bin/env bash
# The LLaVA recipe (run_llava_recipe.sh: stage 1 trains the projector of a Hugging Face llava
# folder, stage 2 everything from stage 1's checkpoint, then the export) on one node of a SLURM
# cluster: one srun task runs the recipe, whose launcher starts NPROC ranks on the node (NCCL +
# bf16 when there is a GPU for each rank). Flags go to both stages, as the recipe's do:
#   HF_LLAVA=/models/llava-1.5-7b-hf DATA=/data/llava/llava.json NPROC=8 \
#     sbatch examples/mimo/scripts/sbatch_llava.sh --encoder-tp 2 --llm-tp 2 --llm-dp 3 \
#     --sequence-parallel --global-batch-size 24 --seq-length 2048 [trainer flags...]
#   sbatch examples/mimo/scripts/sbatch_llava.sh   # the tiny random llava on the shapes data, 2 ranks
# Environment: the recipe's (HF_LLAVA, DATA, TOKENIZER, STAGE1_ITERS, STAGE2_ITERS, NPROC: ranks
# on the node, default 2 = hetero 1 + 1, more with the grid flags that fill them), and
#   HETERO_ROOT     the repository (default: the directory sbatch was called from)
#   HETERO_PYTHON   its Python (default: $HETERO_ROOT/.venv/bin/python)
#   HETERO_RUN_DIR  the run directory (default: $HETERO_ROOT/runs/llava-<job id>); submit again
#                   with the same one to resume: each stage goes on from its own checkpoint.
# The stages' output is in the job's output file and in HETERO_RUN_DIR/stage{1,2}.log.
#SBATCH --job-name=mimo-llava
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
set -euo pipefail
: "${SLURM_JOB_ID:?sbatch_llava.sh runs inside a SLURM allocation (sbatch or salloc)}"
root=${HETERO_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$root/examples/mimo/train_hetero.py" ]; then
  echo "error: HETERO_ROOT=$root is not the repository (submit from its root or set HETERO_ROOT)" >&2
  exit 2
fi
export HETERO_PYTHON=${HETERO_PYTHON:-$root/.venv/bin/python}
export HETERO_RUN_DIR=${HETERO_RUN_DIR:-$root/runs/llava-$SLURM_JOB_ID}
echo "job $SLURM_JOB_ID: the LLaVA recipe on $(hostname) with ${NPROC:-2} rank(s); run directory $HETERO_RUN_DIR"
srun --ntasks=1 --kill-on-bad-exit=1 --chdir "$root" \
  bash "$root/examples/mimo/scripts/run_llava_recipe.sh" "$@"
