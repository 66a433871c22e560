#!/usr/bin/env bash
# WCA against the plain zero-shot score with the offline dual encoder (docs/experiments/wca.md): the encoder fitted
# once on the digits and shapes caption pairs (learnt temperature), then zero-shot classification of the held-out
# digits (10 classes) and of the shapes colour and shape questions, three crop seeds each.
#
#   bash experiments/wca/run.sh outputs/wca        # a few minutes on a 2-core CPU
set -euo pipefail
out=${1:?usage: bash experiments/wca/run.sh OUTPUT_DIR}
data=${DATA_ROOT:-data}
enc=$out/dual_encoder
[ -f "$enc/dual_encoder.json" ] || alignlm dual-encoder fit --train "$data/shapes/pretrain.json" "$data/digits/pretrain.json" \
    --eval "$data/shapes/test_captions.json" "$data/digits/test_captions.json" --out "$enc"
seeds=(--seeds 0 1 2)
alignlm wca --encoder "$enc" --set "$data/digits/test.json" --prompt "The digit {c}." \
    --descriptions "The digit {c}, written by hand in dark ink." "A handwritten {c}." "The number {c}." "{c}." \
    "${seeds[@]}" --out "$out/digits.json"
alignlm wca --encoder "$enc" --set "$data/shapes/test.json" --qtype color --prompt "A {c} shape." \
    --descriptions "A {c} circle." "A {c} square." "A {c} triangle." "Something {c}." "${seeds[@]}" --out "$out/shapes_color.json"
alignlm wca --encoder "$enc" --set "$data/shapes/test.json" --qtype shape --prompt "A {c}." \
    --descriptions "A red {c}." "A green {c}." "A blue {c}." "A yellow {c}." "A purple {c}." "An orange {c}." \
    "${seeds[@]}" --out "$out/shapes_shape.json"
# the digits again with larger crops (each side 0.8-1.0 of the image's): how much of WCA's loss there is the crop size
alignlm wca --encoder "$enc" --set "$data/digits/test.json" --prompt "The digit {c}." \
    --descriptions "The digit {c}, written by hand in dark ink." "A handwritten {c}." "The number {c}." "{c}." \
    --scale 0.8 1.0 "${seeds[@]}" --out "$out/digits_large_crops.json"
