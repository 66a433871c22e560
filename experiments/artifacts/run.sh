#!/usr/bin/env bash
# The artifact probe on the demo tower, then the filter's effect on the alignment monitor (docs/experiments/artifacts.md):
# per seed, shapes caption pretraining of the demo model with the monitor on, without the filter and with it replacing
# the tower's highest-norm tokens; then the monitor's last measurements side by side, paired by seed.
#
#   bash experiments/artifacts/run.sh outputs/artifacts 0 1 2     # about 2 min a run on a 2-core CPU
set -euo pipefail
out=${1:?usage: bash experiments/artifacts/run.sh OUTPUT_DIR SEED...}
shift
data=${DATA_ROOT:-data}
mkdir -p "$out"
python experiments/artifacts/probe.py --sets "$data/shapes/test_captions.json" "$data/digits/test_captions.json" \
    --json "$out/probe.json" | tee "$out/probe.md"
common=(
  +exp=demo "output_dir=$out" "data_root=$data" "eval.sets=[]" "run=[pretrain]"
  stages.pretrain.max_steps=80 stages.pretrain.save_every=0 "stages.pretrain.data.sources=[{path:$data/shapes/pretrain.json}]"
  monitor.every=20 "monitor.probe=$data/shapes/test_captions.json"
)
declare -A arms=(
  [none]="model.vision_artifacts=null"
  [replace4]="model.vision_artifacts={mode:replace,factor:4.0}"
  [replace2]="model.vision_artifacts={mode:replace,factor:2.0}"
)
for seed in "$@"; do
  for arm in none replace4 replace2; do
    run="${arm}_seed_$seed"
    [ -f "$out/$run/pretrain/final/config.yaml" ] || alignlm train "${common[@]}" "run_name=$run" "seed=$seed" \
        "model.init_seed=$seed" "${arms[$arm]}"
  done
done
python experiments/monitor_table.py "$out"
