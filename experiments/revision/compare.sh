#!/usr/bin/env bash
# ReVision against its two baselines, on the same image finetuning (the claim, docs/experiments/revision.md section 4):
#   revision            +exp=revision: connector pretrained on ReAligned captions alone, then image finetuning
#   revision_raw        the same pretraining on raw normalised captions (no ReAlign)
#   revision_untrained  no pretraining: image finetuning from an untrained connector
# then each finetuning (its step checkpoints and final/) evaluated on the whole held-out digits and shapes sets,
# paired per-question differences against each baseline at equal finetuning steps, and accuracy against step
# (curves.png).
#
#   bash experiments/revision/compare.sh outputs/rc                       # the recipe as configured
#   bash experiments/revision/compare.sh outputs/rc_s1 seed=1             # any Hydra override goes to every arm
#   JOBS=2 bash experiments/revision/compare.sh outputs/rc                # two arms at a time, one thread each
#
# About 65 min on a 2-core CPU with JOBS=2 (the one-off preparation, then the arms). Rerunning resumes: finished
# stages and evaluations are kept.
set -euo pipefail
out=${1:?usage: bash experiments/revision/compare.sh OUTPUT_DIR [hydra overrides...]}
shift
jobs=${JOBS:-1}
data=${DATA_ROOT:-data}
common=(+exp=revision "output_dir=$out" "data_root=$data" "eval.sets=[]"
        stages.finetune.save_every=20 stages.finetune.keep_last=0 "$@")
[ "$jobs" -gt 1 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# the shared preparation (dual encoder, embeddings, ReAlign statistics) once, before the arms run side by side
alignlm train "${common[@]}" run_name=revision run=[pretrain]

arm() {  # arm NAME [overrides...]: train, then evaluate every finetuning checkpoint
  local name=$1
  shift
  if ! alignlm train "${common[@]}" "run_name=$name" "$@" > "$out/$name.log" 2>&1; then
    echo "arm $name failed; the end of $out/$name.log:" >&2
    tail -n 5 "$out/$name.log" >&2
    return 1
  fi
  [ -f "$out/eval_$name/report.json" ] || alignlm eval "$out/$name/finetune" --no-probe --no-plots \
      --sets "digits=$data/digits/test.json" "shapes=$data/shapes/test.json" --out "$out/eval_$name" > /dev/null
}
pids=()
for spec in "revision" "revision_raw revision.realign=null" \
            "revision_untrained run=[finetune] stages.finetune.init_from=null"; do
  # shellcheck disable=SC2086  # each spec is a name and its overrides
  arm $spec &
  pids+=($!)
  if [ "${#pids[@]}" -ge "$jobs" ]; then wait "${pids[0]}" || true; pids=("${pids[@]:1}"); fi  # the others go on
done
for p in "${pids[@]}"; do wait "$p" || true; done

reports=("$out"/eval_revision_untrained/report.json "$out"/eval_revision_raw/report.json "$out"/eval_revision/report.json)
for r in "${reports[@]}"; do  # no comparison of fewer arms than asked; a rerun trains only the missing ones
  [ -f "$r" ] || { echo "no evaluation at $r: see the failed arm above" >&2; exit 1; }
done
alignlm compare "${reports[@]}" --same-step --reference revision_untrained --plot "$out/curves.png"
alignlm compare "${reports[@]}" --same-step --reference revision_raw
