#!/usr/bin/env bash
# V2L against mlp2x_gelu and VLAP on shapes (docs/experiments/v2l.md), the LLM frozen throughout: per seed and arm,
# caption pretraining (token-word accuracy of its connector on the held-out captions), then question finetuning of the
# connector alone (answer accuracy on the 200 held-out questions); then the per-seed table with paired differences.
#
#   bash experiments/v2l/run.sh outputs/v2l 0 1 2     # about 5 min a run, 3 runs a seed, on a 2-core CPU
set -euo pipefail
out=${1:?usage: bash experiments/v2l/run.sh OUTPUT_DIR SEED...}
shift
data=${DATA_ROOT:-data}
labels=$out/sea_labels.safetensors
[ -f "$labels" ] || alignlm sea-labels annotations --data "$data/shapes/pretrain.json" "$data/shapes/test_captions.json" \
    --out "$labels" > /dev/null
common=(
  "output_dir=$out" "data_root=$data" "eval.sets=[]"
  stages.pretrain.max_steps=80 stages.pretrain.save_every=0 "stages.pretrain.data.sources=[{path:$data/shapes/pretrain.json}]"
  stages.finetune.max_steps=40 stages.finetune.save_every=0 "stages.finetune.data.sources=[{path:$data/shapes/instruct.json}]"
  stages.finetune.parts.llm=frozen stages.finetune.lora=null
)
for seed in "$@"; do
  for arm in baseline vlap v2l; do
    run="${arm}_seed_$seed"
    [ -f "$out/$run/finetune/final/config.yaml" ] || alignlm train "+exp=$arm" "run_name=$run" "seed=$seed" \
        "model.init_seed=$seed" "${common[@]}"
    [ -f "$out/tokens_$run.json" ] || alignlm sea-eval "$out/$run/pretrain/final" --labels "$labels" \
        --data "$data/shapes/test_captions.json" --exclude-words background --json "$out/tokens_$run.json" > /dev/null
    [ -f "$out/eval_$run/report.json" ] || alignlm eval "$out/$run/finetune/final" --no-probe --no-plots \
        --sets "shapes=$data/shapes/test.json" --out "$out/eval_$run" > /dev/null
  done
done
python experiments/v2l/table.py "$out"
