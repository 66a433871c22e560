#!/usr/bin/env bash
# The GPU checks of one session on a CUDA machine, each part time-boxed, every result written to $OUT as it comes:
# the machine, the throughput points of benchmarks/train_throughput.py (alignlm against transformers' Llava), then the
# test suite. Run from the repository root with alignlm importable (installed, or PYTHONPATH=src plus its deps):
#   OUT=gpu_out bash benchmarks/gpu_check.sh
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

bench() {  # NAME, then train_throughput.py flags
  local name=$1
  shift
  log "bench $name: $*"
  timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/train_throughput.py --json "$OUT/$name.json" "$@" \
    > "$OUT/bench_$name.txt" 2>&1
  log "  rc=$? $(grep -E '^\| [0-9.]+b' "$OUT/bench_$name.txt" | tr '\n' ' ')"
}

bench ft_1.1b_32k --size 1.1b --stage finetune --vocab 32000 --batch 16 --steps 10 --warmup 3
# packing=auto pads under SDPA (no flash-attn on the machine): the same point packed says whether SDPA should pack too
bench ft_1.1b_32k_packed --size 1.1b --stage finetune --vocab 32000 --batch 16 --steps 10 --warmup 3 --no-peer \
  --packing true
bench pt_7b_32k --size 7b --stage pretrain --vocab 32000 --batch 32 --steps 6 --warmup 3 --no-peer
bench pt_1.1b_cached --size 1.1b --stage pretrain --vocab 32000 --batch 32 --steps 10 --warmup 3 --cached-features

log "pytest, the whole suite"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -n 16 -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
log "  rc=$? $(tail -n 1 "$OUT/pytest.txt")"


log done
