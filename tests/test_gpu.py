"""Checks that need a CUDA device (skipped cleanly without one): the training step never waits for the device."""

from __future__ import annotations

import pytest
import torch

from alignlm.pipeline import make_accelerator
from alignlm.training.trainer import Trainer
from tests.conftest import compose, tiny_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_training_step_never_waits_for_the_device(colour_set, tmp_path):
    cfg = compose(
        *tiny_overrides(colour_set, tmp_path),
        "run=[finetune]",
        "stages.finetune.init_from=null",
        "stages.finetune.max_steps=8",
        "mixed_precision=bf16",
    )
    trainer = Trainer(cfg, "finetune", make_accelerator(cfg))
    trainer.setup()
    batches = iter(trainer.loader())
    for step in range(1, 4):  # warm up: allocator, kernel selection
        trainer.step([next(batches)], step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation now raises
    try:
        logs = [trainer.step([next(batches)], step) for step in range(4, 8)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rows = trainer.fetch(logs)  # the one wait, for all four steps
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(r[1]["loss/total"])) for r in rows)


@pytest.mark.parametrize("strategy", ["fsdp2", "zero2", "zero3"])
def test_sharded_strategies_on_cuda_train_like_ddp(colour_set, tmp_path, strategy):
    """Each sharded strategy on one GPU (its own one-rank group, so in subprocesses) against plain training, bf16
    autocast, LoRA finetuning: the same losses within bf16 noise."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    losses = {}
    for name in ("ddp", strategy):
        overrides = tiny_overrides(
            colour_set,
            tmp_path,
            f"run_name={name}",
            f"launcher={name}",
            "mixed_precision=bf16",
            "stages.finetune.parts.llm=lora",
        )
        env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
        proc = subprocess.run(
            [sys.executable, "-m", "alignlm.commands", "train", *overrides],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = (tmp_path / name / "finetune" / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(r)["loss/total"] for r in rows]
    assert losses[strategy] == pytest.approx(losses["ddp"], rel=2e-2)
