#!/usr/bin/env bash
# Evaluate an alignlm checkpoint with lmms-eval's `llava_hf` model: export it as a transformers Llava folder (kept while
# it is of this checkpoint as it is now), then run lmms-eval on it. TASKS: lmms-eval task names (Hub data) or a
# LLaVA-format question set (a .json path, e.g. data/digits/test.json), run offline as a local task (lmms-task).
#   scripts/eval_lmms.sh outputs/tiny/finetune/final exports/tiny data/digits/test.json [extra lmms-eval flags]
#   scripts/eval_lmms.sh outputs/tiny/finetune/final exports/tiny mme,textvqa_val
# Needs lmms-eval importable beside alignlm (docs/evaluation.md: install it in its own venv). DEVICE, DTYPE,
# NUM_PROCESSES, OUTPUT_PATH override the defaults. lmms-eval exits 0 even when a task fails, so this script exits 1
# unless the run wrote a results file.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n 2,9p "$0"; exit 2
fi
# paths as the caller wrote them, from the caller's folder: the script then works from the repository's
final=$(realpath -m "$1"); export_dir=$(realpath -m "$2"); tasks=$3; shift 3
[[ "$tasks" == *.json ]] && tasks=$(realpath -m "$tasks")
[ -n "${OUTPUT_PATH:-}" ] && OUTPUT_PATH=$(realpath -m "$OUTPUT_PATH")
if [ ! -f "$final/model.safetensors" ]; then  # a mistyped path scored whatever the export folder held
  echo "eval_lmms.sh: $final/model.safetensors: no such file; name a final/ checkpoint folder" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && [ -z "${VIRTUAL_ENV:-}" ] && . .venv/bin/activate
# lmms-eval must be importable by the python beside `alignlm` (its venv's): checked before the export (37 s with the
# tiny model), not after it; and not `pip install lmms-eval` there, which breaks that venv (docs/evaluation.md).
# Without a python beside it (another kind of install) `alignlm lmms-eval` says the same when it starts.
python=$(dirname "$(command -v alignlm || echo .)")/python
if [ -x "$python" ] && ! "$python" -c 'import importlib.util as u, sys; sys.exit(not u.find_spec("lmms_eval"))'; then
  echo "eval_lmms.sh: lmms-eval is not installed beside alignlm ($python cannot import lmms_eval): install it in a" \
    "virtualenv of its own, as docs/evaluation.md says (section 'lmms-eval (llava_hf)', 'Install it in its own" \
    "virtualenv'), activate that one and run this again; a \`pip install lmms-eval\` into alignlm's venv breaks it" >&2
  exit 2
fi
# the export folder is kept only while it is of this checkpoint as it is now (the source its export recorded): one of
# another checkpoint, or of this one before it was trained again, is made again, unless that would lose lmms-eval
# results of the model exported there
current=0
why=$(alignlm export "$final" "$export_dir" --is-current) || current=$?
if [ "$current" = 1 ]; then
  if [ -e "$export_dir/lmms_eval" ]; then
    echo "eval_lmms.sh: $why; a new export would replace $export_dir whole, with the lmms-eval results of the model" \
      "exported there ($export_dir/lmms_eval): move them, or name another export folder" >&2
    exit 2
  fi
  alignlm export "$final" "$export_dir"
elif [ "$current" != 0 ]; then
  exit "$current"
fi
include=()
if [[ "$tasks" == *.json ]]; then  # a local question set -> an lmms-eval task folder
  name=alignlm_$(basename "$(dirname "$tasks")")
  alignlm lmms-task "$tasks" "$export_dir/lmms_tasks" --name "$name"
  include=(--include_path "$export_dir/lmms_tasks"); tasks=$name
fi
nproc=${NUM_PROCESSES:-1}
out=${OUTPUT_PATH:-$export_dir/lmms_eval}
args="pretrained=$export_dir,dtype=${DTYPE:-bfloat16}"
flags=(--model llava_hf --tasks "$tasks" ${include[@]+"${include[@]}"} --batch_size 1 --log_samples
       --output_path "$out" "$@")
mkdir -p "$out"
stamp=$(mktemp "$out/.started.XXXXXX"); trap 'rm -f "$stamp"' EXIT
# a second in the past: a results file written within the file system's clock tick of the stamp is not -newer
touch -d "@$(( $(date +%s) - 1 ))" "$stamp"
if [ "$nproc" = 1 ]; then  # llava_hf needs the device named twice (device_map, and device for its .to() calls)
  dev=${DEVICE:-$(python -c 'import torch; print("cuda:0" if torch.cuda.is_available() else "cpu")')}
  alignlm lmms-eval --model_args "$args,device_map=$dev,device=$dev" "${flags[@]}"
else  # several processes: llava_hf places each rank on cuda:<local rank> itself
  accelerate launch --num_processes "$nproc" -m alignlm.commands lmms-eval --model_args "$args" "${flags[@]}"
fi
# lmms-eval exits 0 when a task or the model fails to load: success is a results file written by this run
results=$(find "$out" -name '*_results.json' -newer "$stamp" | head -n 1)
if [ -z "$results" ]; then
  echo "eval_lmms.sh: lmms-eval wrote no results file under $out (see its log above)" >&2; exit 1
fi
echo "results: $results"
