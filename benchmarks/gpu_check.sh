#!/usr/bin/env bash
# The GPU checks of one session on a CUDA machine, each part time-boxed, every result written to $OUT as it comes:
# the machine, then the parts named in PARTS (default all three, in this order):
#   bench       throughput points of benchmarks/train_throughput.py (alignlm against transformers' Llava); a point
#               that runs out of memory is run once more at half its batch (NAME_b<half>.json)
#   strategies  benchmarks/strategies.py: the 1.1B-shaped finetune, 50 steps, under ddp, then zero2, zero3, fsdp2
#               each stopped at step 25 and resumed; losses against ddp's, peak memory per process
#   suite       the whole test suite
# Run from the repository root with alignlm importable (installed, or PYTHONPATH=src plus its deps):
#   OUT=gpu_out bash benchmarks/gpu_check.sh
#   PARTS="strategies suite" OUT=gpu_out bash benchmarks/gpu_check.sh
# The suite's DeepSpeed GPU checks (tests/test_gpu.py, zero2/zero3 vs DDP) skip unless deepspeed is importable: on a
# machine without it, carry its pure-Python package with the others on PYTHONPATH.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/log.txt"; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"
} > "$OUT/machine.txt" 2>&1
log "machine: $(tr '\n' ' ' < "$OUT/machine.txt")"

run_bench() {  # NAME BATCH, then train_throughput.py flags
  local name=$1 batch=$2
  shift 2
  log "bench $name: --batch $batch $*"
  timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/train_throughput.py --json "$OUT/$name.json" --batch "$batch" "$@" \
    > "$OUT/bench_$name.txt" 2>&1
  log "  rc=$? $(grep -E '^\| [0-9.]+b' "$OUT/bench_$name.txt" | tr '\n' ' ')"
}

bench() {  # as run_bench; out of memory at BATCH (an H100 has 78 GiB, an H200 139), once more at half of it
  local name=$1 batch=$2
  shift 2
  run_bench "$name" "$batch" "$@"
  if grep -q OutOfMemoryError "$OUT/bench_$name.txt"; then
    run_bench "${name}_b$((batch / 2))" $((batch / 2)) "$@"
  fi
}

has() { [[ " ${PARTS:-bench strategies suite} " == *" $1 "* ]]; }

if has bench; then
  bench ft_1.1b_32k 16 --size 1.1b --stage finetune --vocab 32000 --steps 10 --warmup 3
  # packing=auto pads under SDPA (no flash-attn on the machine): the same point packed says whether SDPA should pack
  bench ft_1.1b_32k_packed 16 --size 1.1b --stage finetune --vocab 32000 --steps 10 --warmup 3 --no-peer --packing true
  bench pt_7b_32k 32 --size 7b --stage pretrain --vocab 32000 --steps 6 --warmup 3 --no-peer
  bench pt_1.1b_cached 32 --size 1.1b --stage pretrain --vocab 32000 --steps 10 --warmup 3 --cached-features
fi

if has strategies; then
  log "strategies: 1.1b finetune, 50 steps, ddp / zero2 / zero3 / fsdp2 (stop at 25, resume)"
  timeout "${STRATEGIES_TIMEOUT:-420}" python3 benchmarks/strategies.py --size 1.1b --vocab 32000 --batch 8 \
    --steps 50 --timeout 150 --out "$OUT/strategies" > "$OUT/strategies.txt" 2>&1
  log "  rc=$? $(tail -n 6 "$OUT/strategies.txt" | tr '\n' ' ')"
  rm -rf "$OUT/strategies/data"
fi

if has suite; then
  log "pytest, the whole suite"
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -n 16 -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
  log "  rc=$? $(tail -n 1 "$OUT/pytest.txt")"
fi

log done
