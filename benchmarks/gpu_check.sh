#!/usr/bin/env bash
# The GPU checks of one device call, every result kept as it comes, all within one deadline. A session has 15 minutes
# (900 s) of device time in all, a machine's start-up of 1-2 minutes included, 10 minutes a command, and at most 8
# files come back from $OUT, so $OUT holds three: log.txt (each step, its exit status and its figures), results.jsonl
# (one JSON object a line, {"name", "rc", "result"}, for each benchmark point and the strategies run, appended as each
# ends, "result" being what the point saved, null if nothing) and details.tgz (every other output: the machine, the
# pre-flight, each command's whole output; packed anew after each step, so a call cut short returns the newest).
#
# The two device calls, from the repository root (.carry/site, ignored by git, holds hydra, omegaconf, antlr4,
# deepspeed and their needs; this script puts it and src/ on PYTHONPATH), the most important figures first:
#   1. run(command="bash benchmarks/gpu_check.sh", carry=[".carry"], timeout_s=600)
#      the default parts, "bench gputests suite", within DEADLINE=570 s: with the start-up, 630-690 s of the 900
#   2. what is left, read from status() at once (the machine still warm): B = budget_left_s, D = B - 30 (its end,
#      the files' transfer and the hand-back), or D = B - 150 where status says warm: false (a fresh start-up too),
#      and at most 570; with D under 55 nothing fits (see DEADLINE below): give_back() instead. Else, D written out:
#      run(command="PARTS=strategies DEADLINE=D bash benchmarks/gpu_check.sh", carry=[".carry"], timeout_s=D+15)
#      (about 180 s after a whole call 1: the sharded GPU test, cut to fit; strategies.py where 55 s are still
#      left), then give_back(). A call cut from outside all the same (SIGTERM) stops its step at once and keeps
#      what it wrote.
#
# Parts (PARTS, run in the order named):
#   bench       throughput points of benchmarks/train_throughput.py (alignlm against transformers' Llava), the
#               issue's three targets first: (a) ft_1.1b_32k, the 1.1B finetune at 32k vocabulary, (b) pt_1.1b_cached,
#               the 1.1B stage 1 from cached features, (c) pt_7b_32k, the 7B stage 1 (alignlm alone), then
#               ft_1.1b_32k_packed (--packing true: whether SDPA should pack). Batches follow the card's memory
#               (under 100 GiB: 8 for the 1.1B finetune, 16 for the 7B stage 1; else 16 and 32); a point that runs out
#               of memory on either side runs once more at half its batch (NAME_b<half>); both sides run with
#               PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
#   gputests    tests/test_metrics.py::test_cuda_matches_cpu, then tests/test_gpu.py but its sharded-strategies test
#   suite       the whole test suite but tests/test_gpu.py, on 16 processes where pytest-xdist is installed
#   strategies  tests/test_gpu.py's sharded-strategies test (tiny, bf16, 7 processes), then benchmarks/strategies.py:
#               the 1.1B-shaped finetune under ddp, then zero2, zero3, fsdp2 each stopped halfway and resumed; losses
#               against ddp's, peak memory per process (checkpoints in a temporary folder, never under $OUT)
# DEADLINE (seconds from the start, default 570) bounds the whole script: each step's own timeout (BENCH_TIMEOUT a
# point, default 200; GPUTESTS_TIMEOUT 180; TEST_TIMEOUT 300; SHARDED_TIMEOUT 200; STRATEGIES_TIMEOUT 400) is cut to
# the time left less 15 s, a step cut at its timeout is logged so and the next gets what is left, and a step with
# under 55 s left (MIN_STEP 40 s plus MARGIN 15 s; both may be set, for the tests) is skipped and logged.
# A TERM or INT (the device tool cutting the call) stops the running step at once: its process group is sent TERM,
# then KILL 2 s later; its results line is written with rc 143 (130 for INT) and what it had saved, details.tgz is
# packed with its partial output, $WORK is removed, and the log says "stopped by a signal".
# Pre-flight: where deepspeed does not import, the carried one (CARRY_SITE/deepspeed*) is left off the path
# (accelerate imports deepspeed wherever it finds it: a broken one would break every strategy, zero or not) and
# zero2/zero3 are skipped; where alignlm.commands does not import, the script stops at once, the reason in log.txt.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d) # details/ and the strategies' checkpoints (tens of GB), never under $OUT; removed on the way out
DETAILS=$WORK/details
mkdir -p "$DETAILS"
START=$SECONDS
DEADLINE=${DEADLINE:-570}
log() { echo "[$(date +%T) +$((SECONDS - START))s] $*" | tee -a "$OUT/log.txt"; }
left() { echo $((DEADLINE - (SECONDS - START))); }
MARGIN=${MARGIN:-15}     # seconds kept back at the end (a step's kill, the last packing)
MIN_STEP=${MIN_STEP:-40} # the least a step is given
budget() { # the timeout of a step: its own ($1), cut to the time left less the margin; 0: skip it
  local want=$1 rest
  rest=$(($(left) - MARGIN))
  if ((rest < MIN_STEP)); then echo 0; elif ((want < rest)); then echo "$want"; else echo "$rest"; fi
}
pack() { tar -czf "$OUT/details.tgz.part" -C "$WORK" details && mv -f "$OUT/details.tgz.part" "$OUT/details.tgz"; }
trap 'pack; rm -rf "$WORK"' EXIT
STEP_PID= STEP_NAME= STEP_RESULT= STEP_JSON= # the running step: its timeout's pid (its process group), name, result

stopped() { # STATUS: a TERM or INT (the caller cutting the call) arrived: stop the running step, keep what it wrote
  trap '' TERM INT
  log "stopped by a signal${STEP_PID:+ during $STEP_NAME}"
  if [[ -n $STEP_PID ]]; then # timeout leads a process group of its own: the step's every process
    kill -TERM -- "-$STEP_PID" "$STEP_PID" 2> /dev/null
    for _ in {1..20}; do
      kill -0 "$STEP_PID" 2> /dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-$STEP_PID" 2> /dev/null
    [[ -z $STEP_RESULT ]] || record "$STEP_RESULT" "$1" "$STEP_JSON"
  fi
  exit "$1" # the EXIT trap packs details.tgz, the step's partial output with it, and removes $WORK
}
trap 'stopped 143' TERM
trap 'stopped 130' INT

step() { # NAME WANT FILE RESULT JSON, then a command: run under its timeout (budget), output to details/FILE, status
  # in RC; RESULT (unless empty): its line of results.jsonl, written with JSON (what it saved) as it ends or is stopped.
  # In the background, waited for: bash runs the TERM trap only between commands, and wait is one it leaves at once.
  local name=$1 limit
  limit=$(budget "$2")
  local file=$DETAILS/$3 result=$4 json=$5
  shift 5
  if ((limit == 0)); then
    log "$name: skipped, $(left) s left of DEADLINE=$DEADLINE (a step needs $((MIN_STEP + MARGIN)))"
    RC=skipped
    return
  fi
  log "$name (timeout $limit s): $*"
  STEP_NAME=$name STEP_RESULT=$result STEP_JSON=$json
  timeout -k 10 "$limit" "$@" > "$file" 2>&1 &
  STEP_PID=$!
  wait "$STEP_PID"
  RC=$?
  STEP_PID= STEP_RESULT=
  if ((RC == 124 || RC == 137)); then log "  $name: cut at its timeout of $limit s"; fi
  [[ -z $result ]] || record "$result" "$RC" "$json"
  pack
}

record() { # NAME RC JSON-FILE: one line of results.jsonl
  local body=null
  if [[ -s $3 ]]; then body=$(tr -d '\n' < "$3"); fi
  printf '{"name": "%s", "rc": %s, "result": %s}\n' "$1" "$2" "$body" >> "$OUT/results.jsonl"
}

# the machine and its Python path: src/ and the carried packages first
SITE=${CARRY_SITE:-$PWD/.carry/site}
[[ -d $SITE ]] || SITE=
BASE_PATH=${PYTHONPATH:-}
use_site() { export PYTHONPATH="$PWD/src${SITE:+:$SITE}${BASE_PATH:+:$BASE_PATH}"; }
use_site
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  df -h /dev/shm | tail -n 1 # data-loader workers pass batches through it (a container's 64 MB default is too small)
  python3 -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"
} > "$DETAILS/machine.txt" 2>&1
log "machine: $(tr '\n' ' ' < "$DETAILS/machine.txt")"
log "PYTHONPATH=$PYTHONPATH"

imports() { # MODULE: whether it imports (its error's last line in $WHY)
  local out
  out=$(timeout -k 5 120 python3 -c "import $1" 2>&1)
  local rc=$?
  printf 'import %s: rc=%s\n%s\n' "$1" "$rc" "$out" >> "$DETAILS/preflight.txt"
  WHY=$(tail -n 1 <<< "$out")
  return $rc
}
timeout -k 5 60 python3 - >> "$DETAILS/preflight.txt" 2>&1 << 'PY'
import importlib.util
import shutil
need = ["hydra", "omegaconf", "PIL", "matplotlib", "numpy", "safetensors", "deepspeed", "einops", "msgpack", "pytest",
        "xdist"]
print("missing:", [m for m in need if importlib.util.find_spec(m) is None])
print("ninja:", shutil.which("ninja"), "c++:", shutil.which("c++") or shutil.which("g++"))  # DeepSpeed's CPU tests build
PY
log "pre-flight: $(head -n 2 "$DETAILS/preflight.txt" | tr '\n' ' ')"
DEEPSPEED=yes
if ! imports deepspeed; then
  DEEPSPEED=no
  if [[ -n $SITE ]] && compgen -G "$SITE/deepspeed*" > /dev/null; then
    mkdir -p "$WORK/site" # the carried packages but deepspeed: accelerate then finds none
    for f in "$SITE"/*; do [[ $(basename "$f") == deepspeed* ]] || ln -s "$f" "$WORK/site/"; done
    SITE=$WORK/site
    use_site
    log "deepspeed does not import ($WHY): the carried deepspeed left off the path, zero2 and zero3 skipped"
  else
    log "deepspeed does not import ($WHY): zero2 and zero3 skipped"
  fi
fi
if ! imports alignlm.commands; then
  log "alignlm.commands does not import ($WHY): stopping here, nothing else can run (details.tgz: preflight.txt)"
  exit 1
fi
MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2> /dev/null | head -n 1 | tr -dc 0-9)
if ((${MEM_MIB:-0} >= 100000)); then FT_BATCH=16 PT7_BATCH=32; else FT_BATCH=8 PT7_BATCH=16; fi

run_bench() { # NAME BATCH, then train_throughput.py flags
  local name=$1 batch=$2
  shift 2
  step "bench $name" "${BENCH_TIMEOUT:-200}" "bench_$name.txt" "$name" "$DETAILS/$name.json" \
    env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    python3 benchmarks/train_throughput.py --json "$DETAILS/$name.json" --batch "$batch" "$@"
  [[ $RC == skipped ]] && return
  log "  rc=$RC $(grep -E '^\| [0-9.]+b |^558k|^cached' "$DETAILS/bench_$name.txt" | tr '\n' ' ')"
}

bench() { # as run_bench; out of memory at BATCH (either side), once more at half of it
  local name=$1 batch=$2
  shift 2
  run_bench "$name" "$batch" "$@"
  if grep -q OutOfMemoryError "$DETAILS/bench_$name.txt" 2> /dev/null; then
    run_bench "${name}_b$((batch / 2))" $((batch / 2)) "$@"
  fi
}

part_bench() {
  bench ft_1.1b_32k "$FT_BATCH" --size 1.1b --stage finetune --vocab 32000 --steps 10 --warmup 3
  bench pt_1.1b_cached 32 --size 1.1b --stage pretrain --vocab 32000 --steps 10 --warmup 3 --cached-features
  bench pt_7b_32k "$PT7_BATCH" --size 7b --stage pretrain --vocab 32000 --steps 6 --warmup 3 --no-peer
  # packing=auto pads under SDPA (no flash-attn on the machine): the same point packed says whether SDPA should pack
  bench ft_1.1b_32k_packed "$FT_BATCH" --size 1.1b --stage finetune --vocab 32000 --steps 10 --warmup 3 --no-peer \
    --packing true
}

pytest_gpu() { # NAME WANT FILE, then pytest arguments
  local name=$1 want=$2 file=$3
  shift 3
  step "$name" "$want" "$file" "" "" python3 -m pytest -v -p no:cacheprovider -p no:randomly --tb=short "$@"
  [[ $RC == skipped ]] || log "  rc=$RC $(tail -n 1 "$DETAILS/$file")"
}

part_gputests() {
  pytest_gpu "gputests: the CUDA metrics check, the GPU-only tests but the sharded one" "${GPUTESTS_TIMEOUT:-180}" \
    pytest_gpu.txt tests/test_metrics.py::test_cuda_matches_cpu tests/test_gpu.py -k "not sharded"
}

part_strategies() {
  local only=()
  [[ $DEEPSPEED == yes ]] || only=(--strategies ddp fsdp2)
  pytest_gpu "strategies: the sharded GPU test" "${SHARDED_TIMEOUT:-200}" pytest_sharded.txt tests/test_gpu.py \
    -k sharded
  step "strategies: 1.1b finetune, ${STRATEGY_STEPS:-50} steps, each sharded one stopped halfway and resumed" \
    "${STRATEGIES_TIMEOUT:-400}" strategies.txt strategies "$DETAILS/strategies/strategies.json" \
    python3 benchmarks/strategies.py --size 1.1b --vocab 32000 --batch 8 --steps "${STRATEGY_STEPS:-50}" \
    --timeout 150 --out "$DETAILS/strategies" --work "$WORK/strategies" "${only[@]}"
  [[ $RC == skipped ]] && return
  log "  rc=$RC $(tail -n 6 "$DETAILS/strategies.txt" | tr '\n' ' ')"
}

part_suite() {
  local workers=()
  python3 -c "import xdist" 2> /dev/null && workers=(-n 16)
  # 16 processes of one thread each on 16 cores, not 16 x 16; tests that launch ranks spread over them (scripts/test.sh
  # runs those one at a time, for 2-core machines: in one worker they would take most of TEST_TIMEOUT here)
  step "suite: the whole suite but tests/test_gpu.py${workers[*]:+, ${workers[*]}}" "${TEST_TIMEOUT:-300}" pytest.txt \
    "" "" env OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((${#workers[@]} ? 1 : 16))}" python3 -m pytest -q "${workers[@]}" \
    -p no:cacheprovider --tb=short --maxfail=10 --ignore=tests/test_gpu.py
  [[ $RC == skipped ]] || log "  rc=$RC $(tail -n 1 "$DETAILS/pytest.txt")"
}

for part in ${PARTS:-bench gputests suite}; do
  case $part in
    bench | gputests | strategies | suite) "part_$part" ;;
    *) log "unknown part $part (bench, gputests, strategies, suite): skipped" ;;
  esac
done

log done
