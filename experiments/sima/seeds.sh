#!/usr/bin/env bash
# SIMA from the demo's finetuned model, several seeds (docs/experiments/sima.md): per seed, self-generation, the
# in-context critic and the DPO stage (+exp=sima seed=S), then the whole held-out digits and shapes sets; the finetuned
# model itself is evaluated once (greedy answers: the same for every seed). Then the per-seed table with paired
# differences and the critic's agreement with the reference answers.
#
#   alignlm train +exp=demo                              # once: outputs/demo/finetune/final
#   bash experiments/sima/seeds.sh outputs/sima 0 1 2    # about 12 min a seed on a 2-core CPU
set -euo pipefail
out=${1:?usage: bash experiments/sima/seeds.sh OUTPUT_DIR SEED...}
shift
data=${DATA_ROOT:-data}
from=${SIMA_FROM:-outputs/demo/finetune/final}
sets=(--sets "digits=$data/digits/test.json" "shapes=$data/shapes/test.json")
[ -f "$out/eval_before/report.json" ] || alignlm eval "$from" --no-probe --no-plots "${sets[@]}" --out "$out/eval_before" > /dev/null
for seed in "$@"; do
  run="seed_$seed"
  alignlm train +exp=sima "seed=$seed" "output_dir=$out" "run_name=$run" "sima.from=$from" "data_root=$data" "eval.sets=[]"
  alignlm sima check "$out/$run/sima" > /dev/null
  [ -f "$out/eval_$run/report.json" ] || alignlm eval "$out/$run/dpo/final" --no-probe --no-plots "${sets[@]}" \
      --out "$out/eval_$run" > /dev/null
done
python experiments/sima/seed_table.py "$out"
