#!/usr/bin/env bash
# Set-of-Mark "list items one by one" against plain finetuning (docs/experiments/som.md): from the demo's pretrained
# connector, per seed, LoRA finetuning on the shapes questions alone (plain) or with the tagged listing records mixed
# in (som), the same steps; then the 200 held-out shapes questions on plain, unmarked images, paired per question.
# SOM_ARMS adds the control som78: the mixture for 78 steps, as many question samples as plain sees in 60.
#
#   alignlm train +exp=demo                           # once: outputs/demo/pretrain/final
#   bash experiments/som/run.sh outputs/som 0 1 2     # about 5 min a run, 2 runs a seed, on a 2-core CPU
#   SOM_ARMS="plain som som78" bash experiments/som/run.sh outputs/som 0 1 2   # with the control
set -euo pipefail
out=${1:?usage: bash experiments/som/run.sh OUTPUT_DIR SEED...}
shift
from=${SOM_FROM:-outputs/demo/pretrain/final}
data=$out/data   # its own copy of shapes, written with the tagged scenes (seed 0, as the demo's)
[ -f "$data/shapes/som.json" ] || alignlm data shapes --out "$data" --set som=true > /dev/null
common=(
  "output_dir=$out" "data_root=$data" "offline_datasets=[]" "eval.sets=[]" "run=[finetune]"
  "stages.finetune.init_from=$from" stages.finetune.save_every=0
)
for seed in "$@"; do
  for arm in ${SOM_ARMS:-plain som}; do
    run="${arm}_seed_$seed"
    sources="[{path:$data/shapes/instruct.json}]" steps=60
    [ "$arm" != plain ] && sources="[{path:$data/shapes/instruct.json},{path:$data/shapes/som.json,weight:0.3}]"
    [ "$arm" = som78 ] && steps=78
    [ -f "$out/$run/finetune/final/config.yaml" ] || alignlm train +exp=demo "run_name=$run" "seed=$seed" \
        "stages.finetune.data.sources=$sources" "stages.finetune.max_steps=$steps" "${common[@]}"
    [ -f "$out/eval_$run/report.json" ] || alignlm eval "$out/$run/finetune/final" --no-probe --no-plots \
        --sets "shapes=$data/shapes/test.json" --out "$out/eval_$run" > /dev/null
  done
done
python experiments/som/table.py "$out"
