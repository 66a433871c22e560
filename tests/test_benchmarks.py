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
