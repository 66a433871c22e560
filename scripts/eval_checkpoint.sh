#!/usr/bin/env bash
# Evaluate checkpoints on a cluster node (or locally): question/caption sets + alignment probes -> report + plots.
#   scripts/eval_checkpoint.sh OUT_DIR CKPT [CKPT ...] [-- alignlm eval flags]
#   sbatch --gpus 1 scripts/eval_checkpoint.sh reports/sea outputs/sea/pretrain/final outputs/sea/finetune -- --layers all
# A CKPT is a final/ folder, a step checkpoint (<stage>/checkpoints/step_000500), a stage folder (every step
# checkpoint, then final/) or a run folder (each stage's final/). The model runs on the GPU when there is one.
#SBATCH --job-name=alignlm-eval
#SBATCH --ntasks=1
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n 2,6p "$0"; exit 2
fi
# every path (OUT, CKPT, the flags' --sets, --probe, --config) is read from the folder the script starts in, as in a
# job (which starts where it was submitted): moving to the repository read the flags' relative paths there. Only the
# virtualenv is the repository's: the script's, or, in a job (which runs a copy of it), the folder it was submitted from
repo=${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}
[ -f "$repo/.venv/bin/activate" ] && [ -z "${VIRTUAL_ENV:-}" ] && . "$repo/.venv/bin/activate"
out=$1; shift
ckpts=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do ckpts+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
exec alignlm eval "${ckpts[@]}" --out "$out" "$@"
