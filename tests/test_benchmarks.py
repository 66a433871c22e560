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
