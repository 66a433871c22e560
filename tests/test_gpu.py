"""Checks that need a CUDA device (skipped cleanly without one): the training step never waits for the device; the
sharded strategies stop, resume and train like plain data parallelism in bf16."""

from __future__ import annotations

import pytest
import torch

from alignlm.pipeline import make_accelerator
from alignlm.training.trainer import Trainer
from tests.conftest import WAIT_FREE_RECIPES, compose, tiny_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


# every recipe under bf16, and fp16's loss scaler on the fused optimizer (its skip flag handed to the kernel)
CASES = {**{name: (*recipe, "bf16") for name, recipe in WAIT_FREE_RECIPES.items()}, "fp16": ("finetune", [], "fp16")}


@pytest.mark.parametrize("stage, extra, precision", CASES.values(), ids=CASES.keys())
def test_training_step_never_waits_for_the_device(colour_set, tmp_path, stage, extra, precision):
    cfg = compose(
        *tiny_overrides(colour_set, tmp_path),
        f"run=[{stage}]",
        f"stages.{stage}.init_from=null",
        f"stages.{stage}.max_steps=8",
        f"mixed_precision={precision}",
        *extra,
    )
    trainer = Trainer(cfg, stage, make_accelerator(cfg))
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


def test_sharded_strategies_on_cuda_stop_resume_and_train_like_ddp(tmp_path):
    """benchmarks/strategies.py on one GPU, tiny, bf16 autocast, LoRA finetuning: each sharded strategy in fresh
    one-rank processes, stopped halfway and resumed, gives plain training's losses within bf16 noise."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    strategies = ["ddp", "fsdp2"] + (["zero2", "zero3"] if importlib.util.find_spec("deepspeed") else [])
    script = Path(__file__).parents[1] / "benchmarks" / "strategies.py"
    args = ["--size", "tiny", "--vocab", "1000", "--steps", "6", "--batch", "4", "--precision", "bf16"]
    proc = subprocess.run(
        [sys.executable, str(script), *args, "--set", "stages.finetune.parts.llm=lora", "--out", str(tmp_path)]
        + ["--strategies", *strategies],
        env={k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"},  # the GPU, whatever ran before
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, *sharded = json.loads((tmp_path / "strategies.json").read_text())
    for r in sharded:
        assert r["ok"] and r["resumed"] and r["final_saved"], r["strategy"]
        assert r["losses"] == pytest.approx(ddp["losses"], rel=2e-2), r["strategy"]


def test_sea_labels_score_the_words_where_the_encoder_put_the_patches(shapes_root):
    """SEA's dual-encoder labels: the cosines against every word and their top-k run on the encoder's device (on the
    CPU they made a GPU encoder's labelling CPU-bound), and come back on the CPU equal to the CPU's."""
    from alignlm.methods.sea.labels import from_dual_encoder
    from tests.test_sea import _PatchEncoder

    class OnGpu(_PatchEncoder):
        def encode_texts(self, texts):
            return torch.randn(len(texts), 4, generator=torch.Generator().manual_seed(1))

        def patch_embeddings(self, pixel_values):
            return super().patch_embeddings(pixel_values).cuda()

    class OnCpu(OnGpu):
        def patch_embeddings(self, pixel_values):
            return _PatchEncoder.patch_embeddings(self, pixel_values)

    data, words = [str(shapes_root / "shapes" / "pretrain.json")], [f"w{i}" for i in range(12)]
    gpu = from_dual_encoder(data, 3, OnGpu(), words, batch_size=3)
    cpu = from_dual_encoder(data, 3, OnCpu(), words, batch_size=3)
    assert (gpu.word_ids == cpu.word_ids).all() and abs(gpu.scores - cpu.scores).max() < 1e-5
