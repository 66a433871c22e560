#!/usr/bin/env bash
# More image-finetuning seeds for the ReVision comparison (docs/experiments/revision.md, "Seeds"), reusing connectors that are
# already pretrained: the 80-step finetuning, not the pretraining, is where most of the seed noise is, and it costs
# a fraction of a pretraining. For each seed, the three arms of experiments/revision/compare.sh finetune with that seed
# (untrained connector; connector pretrained on raw captions; connector pretrained with ReVision), and each arm's
# final/ is evaluated on the whole held-out digits and shapes sets.
#
#   PRETRAINED="REVISION_FINAL:RAW_FINAL ..." JOBS=2 bash experiments/revision/finetune_seeds.sh OUT "3 4 5" [overrides]
#
# PRETRAINED lists pairs of pretrain final/ folders (ReVision, no ReAlign); seed k starts from pair k mod n.
# Overrides go to every arm; they must name the dual encoder the connectors were pretrained with
# (revision.encoder=...), which each arm uses as it is (revision.fit=null, so no revision.fit.* override). Results: OUT/seed_<k>/eval_<arm>/report.json, then one paired comparison per seed and the
# per-seed table with means (experiments/revision/seed_table.py). Rerunning skips finished arms and evaluations.
set -euo pipefail
out=${1:?usage: PRETRAINED=... bash experiments/revision/finetune_seeds.sh OUT "SEEDS" [hydra overrides...]}
seeds=${2:?give the seeds as one argument, e.g. "3 4 5"}
shift 2
read -r -a pairs <<< "${PRETRAINED:?set PRETRAINED to REVISION_FINAL:RAW_FINAL pairs}"
jobs=${JOBS:-1}
data=${DATA_ROOT:-data}
[ "$jobs" -gt 1 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

arm() {  # arm SEED NAME INIT [overrides...]: finetune one arm at one seed, then evaluate its final/
  # every seed reads the one draw of the offline sets its connectors were pretrained on (offline_dataset_seed)
  local seed=$1 name=$2 init=$3 dir="$out/seed_$1"
  shift 3
  if ! alignlm train +exp=revision "seed=$seed" "output_dir=$dir" "data_root=$data" "eval.sets=[]" run=[finetune] \
      revision.fit=null "run_name=$name" "stages.finetune.init_from=$init" stages.finetune.save_every=0 "$@" \
      > "$dir.$name.log" 2>&1; then
    echo "seed $seed, arm $name failed; the end of $dir.$name.log:" >&2
    tail -n 5 "$dir.$name.log" >&2
    return 1
  fi
  [ -f "$dir/eval_$name/report.json" ] || alignlm eval "$dir/$name/finetune" --no-probe --no-plots \
      --sets "digits=$data/digits/test.json" "shapes=$data/shapes/test.json" --out "$dir/eval_$name" > /dev/null
}

mkdir -p "$out"
for seed in $seeds; do
  IFS=: read -r revision raw <<< "${pairs[$((seed % ${#pairs[@]}))]}"
  for spec in "revision_untrained null" "revision_raw $raw" "revision $revision"; do
    mkdir -p "$out/seed_$seed"
    # shellcheck disable=SC2086  # each spec is a name and its init_from
    arm "$seed" $spec "$@" &
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done  # a failed arm said so; the others go on
  done
done
wait

missing=()
for seed in $seeds; do
  for name in revision_untrained revision_raw revision; do
    [ -f "$out/seed_$seed/eval_$name/report.json" ] || missing+=("seed $seed $name")
  done
done
if [ "${#missing[@]}" -gt 0 ]; then  # no comparison or table of fewer arms than asked; a rerun trains only these
  printf 'no evaluation of: %s\n' "${missing[@]}" >&2
  exit 1
fi
for seed in $seeds; do
  d="$out/seed_$seed"
  alignlm compare "$d"/eval_revision_untrained/report.json "$d"/eval_revision_raw/report.json \
      "$d"/eval_revision/report.json --same-step --reference revision_untrained
done
# shellcheck disable=SC2046  # one folder per seed
python "$(dirname "$0")/seed_table.py" $(for seed in $seeds; do echo "$out/seed_$seed"; done)
