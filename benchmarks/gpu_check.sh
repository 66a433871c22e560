#!/usr/bin/env bash
# The GPU checks of one session on a CUDA machine, every result written to $OUT as it comes, all within one deadline:
# the machine and a pre-flight (what is missing to import), then the parts named in PARTS, in the order named (default
# "gputests bench strategies suite"):
#   gputests    the tests only a GPU runs (tests/test_gpu.py, the CUDA metrics check), verbose, first: a minute or two
#   bench       throughput points of benchmarks/train_throughput.py (alignlm against transformers' Llava), the issue's
#               three targets first; batches follow the card's memory (under 100 GiB: 1.1B finetune at 8, 7B stage 1
#               at 16), and a point that runs out of memory is run once more at half its batch (NAME_b<half>.json)
#   strategies  benchmarks/strategies.py: the 1.1B-shaped finetune under ddp, then zero2, zero3, fsdp2 each stopped
#               halfway and resumed; losses against ddp's, peak memory per process (checkpoints stay in a temporary
#               folder, never under $OUT)
#   suite       the whole test suite
# DEADLINE (seconds from the start, default 540) bounds the whole script: each part's timeout is cut to the time
# left, and a part with under 40 s left is skipped (logged). Run from the repository root with alignlm importable:
#   OUT=gpu_out bash benchmarks/gpu_check.sh
#   PARTS="strategies suite" OUT=gpu_out DEADLINE=560 bash benchmarks/gpu_check.sh
# The whole suite runs on 16 processes where pytest-xdist is installed, else on one.
# The suite's DeepSpeed GPU checks (tests/test_gpu.py, zero2/zero3 vs DDP) skip unless deepspeed is importable: on a
# machine without it, carry its pure-Python package (and einops, msgpack) with the others on PYTHONPATH.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d)  # the strategies' checkpoints (tens of GB), never under $OUT; removed however the script ends
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
DEADLINE=${DEADLINE:-540}
log() { echo "[$(date +%T) +$((SECONDS - START))s] $*" | tee -a "$OUT/log.txt"; }
left() { echo $((DEADLINE - (SECONDS - START))); }
budget() {  # the timeout of a part: its own (default $2), cut to the time left less a margin; 0: skip it
  local want=$1 rest
  rest=$(($(left) - 15))
  if ((rest < 40)); then echo 0; elif ((want < rest)); then echo "$want"; else echo "$rest"; fi
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  df -h /dev/shm | tail -n 1  # data-loader workers pass batches through it (a container's 64 MB default is too small)
  python3 -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"
} > "$OUT/machine.txt" 2>&1
log "machine: $(tr '\n' ' ' < "$OUT/machine.txt")"
timeout -k 5 60 python3 - > "$OUT/preflight.txt" 2>&1 <<'PY'
import importlib, importlib.util
import shutil
need = ["hydra", "omegaconf", "PIL", "matplotlib", "numpy", "safetensors", "deepspeed", "einops", "msgpack", "pytest",
        "xdist"]
print("missing:", [m for m in need if importlib.util.find_spec(m) is None])
print("ninja:", shutil.which("ninja"), "c++:", shutil.which("c++") or shutil.which("g++"))  # DeepSpeed's CPU tests build
for module in ("alignlm.commands", "alignlm.pipeline", "deepspeed"):
    try:
        importlib.import_module(module)
        print("import", module, "ok")
    except Exception as e:  # noqa: BLE001 - what fails to import is the finding
        print("import", module, "FAILED:", type(e).__name__, e)
PY
log "pre-flight: $(tr '\n' ' ' < "$OUT/preflight.txt")"
MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 | tr -dc 0-9)
if ((${MEM_MIB:-0} >= 100000)); then FT_BATCH=16 PT7_BATCH=32; else FT_BATCH=8 PT7_BATCH=16; fi

run_bench() {  # NAME BATCH, then train_throughput.py flags
  local name=$1 batch=$2 limit
  shift 2
  limit=$(budget "${BENCH_TIMEOUT:-240}")
  if ((limit == 0)); then log "bench $name: skipped, $(left) s left" && return; fi
  log "bench $name: --batch $batch $* (timeout $limit s)"
  timeout -k 10 "$limit" python3 benchmarks/train_throughput.py --json "$OUT/$name.json" --batch "$batch" "$@" \
    > "$OUT/bench_$name.txt" 2>&1
  log "  rc=$? $(grep -E '^\| [0-9.]+b' "$OUT/bench_$name.txt" | tr '\n' ' ')"
}

bench() {  # as run_bench; out of memory at BATCH (either side), once more at half of it
  local name=$1 batch=$2
  shift 2
  run_bench "$name" "$batch" "$@"
  if grep -q OutOfMemoryError "$OUT/bench_$name.txt" 2>/dev/null; then
    run_bench "${name}_b$((batch / 2))" $((batch / 2)) "$@"
  fi
}

part_gputests() {
  local limit
  limit=$(budget "${GPUTESTS_TIMEOUT:-180}")
  if ((limit == 0)); then log "gputests: skipped, $(left) s left" && return; fi
  log "pytest, the GPU-only tests (timeout $limit s)"
  timeout -k 10 "$limit" python3 -m pytest -v -p no:cacheprovider -p no:randomly --tb=short tests/test_gpu.py \
    "tests/test_metrics.py::test_cuda_matches_cpu" > "$OUT/pytest_gpu.txt" 2>&1
  log "  rc=$? $(tail -n 1 "$OUT/pytest_gpu.txt")"
}

part_bench() {
  bench ft_1.1b_32k "$FT_BATCH" --size 1.1b --stage finetune --vocab 32000 --steps 10 --warmup 3
  bench pt_7b_32k "$PT7_BATCH" --size 7b --stage pretrain --vocab 32000 --steps 6 --warmup 3 --no-peer
  bench pt_1.1b_cached 32 --size 1.1b --stage pretrain --vocab 32000 --steps 10 --warmup 3 --cached-features
  # packing=auto pads under SDPA (no flash-attn on the machine): the same point packed says whether SDPA should pack
  bench ft_1.1b_32k_packed "$FT_BATCH" --size 1.1b --stage finetune --vocab 32000 --steps 10 --warmup 3 --no-peer \
    --packing true
}

part_strategies() {
  local limit
  limit=$(budget "${STRATEGIES_TIMEOUT:-420}")
  if ((limit == 0)); then log "strategies: skipped, $(left) s left" && return; fi
  log "strategies: 1.1b finetune, ${STRATEGY_STEPS:-50} steps, ddp / zero2 / zero3 / fsdp2 (stop halfway, resume; timeout $limit s)"
  timeout -k 15 "$limit" python3 benchmarks/strategies.py --size 1.1b --vocab 32000 --batch 8 \
    --steps "${STRATEGY_STEPS:-50}" --timeout 150 --out "$OUT/strategies" --work "$WORK/strategies" \
    > "$OUT/strategies.txt" 2>&1
  log "  rc=$? $(tail -n 6 "$OUT/strategies.txt" | tr '\n' ' ')"
}

part_suite() {
  local limit workers=()
  limit=$(budget "${TEST_TIMEOUT:-240}")
  if ((limit == 0)); then log "suite: skipped, $(left) s left" && return; fi
  python3 -c "import xdist" 2> /dev/null && workers=(-n 16)
  log "pytest, the whole suite ${workers[*]} (timeout $limit s)"
  # 16 processes of one thread each on 16 cores, not 16 x 16
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((${#workers[@]} ? 1 : 16))} timeout -k 10 "$limit" python3 -m pytest -q "${workers[@]}" -p no:cacheprovider --tb=short --maxfail=10 \
    > "$OUT/pytest.txt" 2>&1
  log "  rc=$? $(tail -n 1 "$OUT/pytest.txt")"
}

for part in ${PARTS:-gputests bench strategies suite}; do
  case $part in
    gputests | bench | strategies | suite) "part_$part" ;;
    *) log "unknown part $part (gputests, bench, strategies, suite): skipped" ;;
  esac
done

log done
