#!/usr/bin/env bash
# The contrastive objective's effect on what the alignment monitor measures (docs/experiments/objectives.md): per seed,
# shapes caption pretraining of the demo model with the monitor on, with the captioning loss alone (none) and with the
# global InfoNCE added at weight 1 (contrastive, configs/exp/contrastive.yaml) and at 0.1; then the monitor's last
# measurements side by side, paired by seed.
#
#   bash experiments/objectives/run.sh outputs/objectives 0 1 2     # about 2.5 min a run on a 2-core CPU
set -euo pipefail
out=${1:?usage: bash experiments/objectives/run.sh OUTPUT_DIR SEED...}
shift
data=${DATA_ROOT:-data}
common=(
  "output_dir=$out" "data_root=$data" "eval.sets=[]" "run=[pretrain]"
  stages.pretrain.max_steps=80 stages.pretrain.save_every=0 "stages.pretrain.data.sources=[{path:$data/shapes/pretrain.json}]"
  monitor.every=20 "monitor.probe=$data/shapes/test_captions.json"
)
declare -A arms=(
  [none]="+exp=demo"
  [contrastive]="+exp=contrastive"
  [contrastive0.1]="+exp=contrastive stages.pretrain.objectives.contrastive.weight=0.1"
)
for seed in "$@"; do
  for arm in none contrastive contrastive0.1; do
    run="${arm}_seed_$seed"
    # shellcheck disable=SC2086  # an arm is several overrides
    [ -f "$out/$run/pretrain/final/config.yaml" ] || alignlm train ${arms[$arm]} "${common[@]}" "run_name=$run" \
        "seed=$seed" "model.init_seed=$seed"
  done
done
python experiments/monitor_table.py "$out"
