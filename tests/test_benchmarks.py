"""The throughput benchmark's tiny size runs here, on the CPU, and prints both sides and their ratio."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

BENCH = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "train_throughput.py"))


@pytest.mark.parametrize("stage,cached", [("finetune", False), ("pretrain", True)])
def test_tiny_throughput_benchmark_prints_both_sides_and_the_ratio(stage, cached, capsys):
    result = BENCH["run"]("tiny", stage, vocab=1000, batch=2, steps=2, warmup=1, cached_features=cached, peer=True)
    for side in ("alignlm", "peer"):
        assert result[side]["tokens_per_s"] > 0 and result[side]["samples_per_s"] > 0 and result[side]["steps"] == 2
    assert result["ratio_tokens_per_s"] == pytest.approx(
        result["alignlm"]["tokens_per_s"] / result["peer"]["tokens_per_s"]
    )
    table = BENCH["table"]([result])
    assert "transformers Llava (peer)" in table and "alignlm" in table and "x |" in table
    if stage == "pretrain":
        assert result["projected_hours_558k"] > 0


def test_alignlm_figures_are_saved_before_the_peer_runs_and_kept_when_it_runs_out_of_memory(monkeypatch):
    """On a GPU the peer may not fit a batch alignlm fits: alignlm's figures are saved first and kept, the peer's
    failure is recorded (benchmarks/gpu_check.sh then retries the point at half the batch)."""
    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setitem(BENCH["run"].__globals__, "bench_peer", out_of_memory)  # run_path returned a copy
    saved = []
    result = BENCH["run"]("tiny", "finetune", 1000, 2, 1, 1, False, True, save=lambda r: saved.append(dict(r)))
    assert "peer" not in saved[0] and saved[0]["alignlm"]["tokens_per_s"] > 0
    assert result["peer_error"] == "OutOfMemoryError at batch 2" and saved[-1] == result
    assert "OutOfMemoryError at batch 2" in BENCH["table"]([result])


def test_strategies_benchmark_stops_resumes_and_matches_plain_training(tmp_path):
    """benchmarks/strategies.py, tiny and fp32: DeepSpeed ZeRO-2 (FSDP2 without DeepSpeed) in fresh one-rank processes
    (no launcher), stopped halfway and resumed by the same command, ends with plain training's losses."""
    import importlib.util
    import json
    import subprocess
    import sys

    sharded = "zero2" if importlib.util.find_spec("deepspeed") else "fsdp2"
    script = Path(__file__).parents[1] / "benchmarks" / "strategies.py"
    args = ["--size", "tiny", "--vocab", "1000", "--steps", "4", "--batch", "2", "--precision", "no"]
    args += ["--set", "deterministic=true"]  # a GPU's atomic additions would differ between the runs
    proc = subprocess.run(
        [sys.executable, str(script), *args, "--strategies", "ddp", sharded, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, other = json.loads((tmp_path / "strategies.json").read_text())
    assert ddp["ok"] and other["ok"] and other["resumed"] and other["resumed_at"] == 2 and other["final_saved"]
    assert [p["returncode"] for p in other["processes"]] == [75, 0]
    assert other["losses"] == pytest.approx(ddp["losses"], rel=1e-5) and len(ddp["losses"]) == 4
    assert f"| {sharded} |" in (tmp_path / "strategies.md").read_text()


def test_the_gpu_check_runs_its_parts_in_the_order_named_within_its_deadline(tmp_path):
    """benchmarks/gpu_check.sh on a stand-in machine (nvidia-smi and python3 faked): parts in PARTS order, an unknown
    one named, a part that no longer fits the deadline skipped and logged."""
    import os
    import subprocess

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/bash\n[[ "$*" == *noheader* ]] && echo 81559 || echo "H100, 81559 MiB"\n')
    (fake / "python3").write_text(
        '#!/bin/bash\n[[ "$1" == - || "$1" == -c ]] && echo "missing: []" && exit\necho "ran $*"; sleep "${NAP:-0}"\n'
    )
    for f in fake.iterdir():
        f.chmod(0o755)
    root = Path(__file__).parents[1]

    def check(parts: str, deadline: int, nap: int = 0) -> str:
        out = tmp_path / f"out_{deadline}"
        env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(out), "PARTS": parts}
        env.update(DEADLINE=str(deadline), NAP=str(nap))
        subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=root, env=env, check=True, capture_output=True)
        return (out / "log.txt").read_text()

    log = check("suite gputests nonsense", 600)
    assert log.index("the whole suite") < log.index("the GPU-only tests") < log.index("unknown part nonsense")
    assert "pre-flight: missing: []" in log and "rc=0 ran -m pytest" in log
    log = check("gputests suite", 60, nap=8)  # the GPU tests take 8 s of 60: under 40 s left (less a margin of 15)
    assert "the GPU-only tests" in log and "suite: skipped" in log
