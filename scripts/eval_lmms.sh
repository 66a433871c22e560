#!/usr/bin/env bash
# Evaluate an alignlm checkpoint with lmms-eval's `llava_hf` model: export it as a transformers Llava folder, then
# run lmms-eval on it (which downloads its task data from the Hugging Face Hub).
#   scripts/eval_lmms.sh outputs/demo/finetune/final exports/demo mme,textvqa_val [extra lmms_eval flags]
# Needs `pip install lmms-eval` (same transformers as the export). lmms-eval runs through alignlm.evaluation.lmms, which
# drops the `image_sizes` that lmms-eval <= 0.7.3 passes to generate (transformers 5's Llava fails on it with CLIP towers).
# One process: device_map must name a device (lmms-eval's default "" is refused by transformers >= 4.57).
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n 2,7p "$0"; exit 2
fi
final=$1; export_dir=$2; tasks=$3; shift 3
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
[ -f "$export_dir/config.json" ] || alignlm export "$final" "$export_dir"
nproc=${NUM_PROCESSES:-1}
args="pretrained=$export_dir,dtype=${DTYPE:-bfloat16}"
if [ "$nproc" = 1 ]; then  # one process: name the device; several: llava_hf places each rank itself
  args="$args,device_map=${DEVICE:-$(python -c 'import torch; print("cuda:0" if torch.cuda.is_available() else "cpu")')}"
fi
exec accelerate launch --num_processes "$nproc" -m alignlm.evaluation.lmms \
  --model llava_hf \
  --model_args "$args" \
  --tasks "$tasks" --batch_size 1 --log_samples --output_path "${OUTPUT_PATH:-$export_dir/lmms_eval}" "$@"
