"""Checks that need a CUDA device (skipped cleanly without one): the training step never waits for the device; the
sharded strategies stop, resume and train like plain data parallelism in bf16."""

from __future__ import annotations

import pytest
import torch

from alignlm.data.images import PADDED
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


def test_the_probe_metrics_run_on_the_gpu_and_match_the_cpu(tiny_model, colour_set, monkeypatch):
    """``extract`` sent every batch's features to the host, so eval's probe metrics and the monitor's ran on the CPU
    in float64 while the GPU waited. The features stay on the model's device, the metrics read them there, and the
    figures are the CPU's."""
    from alignlm.geometry import suite
    from alignlm.models.probes import extract, load_probe_set, probe_metrics
    from alignlm.training.monitor import AlignmentMonitor

    probe = load_probe_set(colour_set["pretrain"], 12)
    metrics = ["modality_gap", "cka", "mutual_knn", "retrieval", "a_score"]
    cpu_model = tiny_model()
    cpu = probe_metrics(extract(cpu_model, probe, 5, tokens=True, num_workers=2), metrics, topk=4)
    model = cpu_model.cuda()
    devices: list[str] = []
    cka, same_dim = suite.PAIR_METRICS["cka"]
    monkeypatch.setitem(suite.PAIR_METRICS, "cka", (lambda a, b: devices.append(a.device.type) or cka(a, b), same_dim))
    feats = extract(model, probe, 5, tokens=True, num_workers=2)
    assert {t.device.type for t in (feats.visual_mean, feats.text_mean, feats.encoder, *feats.a_scores)} == {"cuda"}
    gpu = probe_metrics(feats, metrics, topk=4)
    assert devices == ["cuda", "cuda"]  # pooled and encoder
    flat_cpu, flat_gpu = suite.flat(cpu), suite.flat(gpu)
    assert flat_gpu == pytest.approx(flat_cpu, rel=1e-4, abs=1e-4)
    cfg = {"every": 1, "probe": str(colour_set["pretrain"]), "n": 12, "topk": 4, "metrics": metrics}
    devices.clear()
    assert AlignmentMonitor(cfg, model, num_workers=2)(1, model)
    assert devices == ["cuda"]


def test_sea_eval_v2l_words_export_check_and_wca_run_on_cuda_as_on_the_cpu(
    colour_set, tiny_clip, tmp_path, monkeypatch
):
    """sea-eval, v2l-words and export --check once ran their models on the CPU beside a GPU, and WCA scored its classes
    there: each now runs on the device asked, and gives there what it gives on the CPU."""
    import json

    import numpy as np
    from PIL import Image

    from alignlm.commands import main
    from alignlm.commands import sea as sea_command
    from alignlm.commands import v2l as v2l_command
    from alignlm.data.records import read_records, record_images
    from alignlm.data.templates import get_template
    from alignlm.evaluation import export_check
    from alignlm.export.hf_llava import llava_processor, to_llava
    from alignlm.methods.sea.labels import LabelSet, write_labels
    from alignlm.methods.wca.score import WCAConfig, class_texts, descriptions_for, scores
    from alignlm.models.build import build_model
    from alignlm.models.encoders import load_encoder

    def fresh(*overrides: str):
        torch.manual_seed(0)
        return build_model(compose("model=tiny", *overrides).model).eval()

    images = sorted({p for _, paths in record_images([str(colour_set["test"])], None) for p in paths})
    ids = np.random.default_rng(0).integers(-1, 3, (len(images), 16, 2)).astype(np.int32)
    ids[:, :, 0] = np.abs(ids[:, :, 0])
    labels = write_labels(
        tmp_path / "labels.safetensors",
        LabelSet(["red", "green", "blue"], (4, 4), images, ids, np.where(ids >= 0, 0.5, 0.0), "test"),
    )
    devices = []
    report, words = sea_command.token_word_report, v2l_command.image_words
    monkeypatch.setattr(sea_command, "load_model", lambda *a: fresh())
    monkeypatch.setattr(sea_command, "final_image_reading", lambda ck: PADDED)
    monkeypatch.setattr(
        sea_command,
        "token_word_report",
        lambda m, *a: devices.append(next(m.parameters()).device.type) or report(m, *a),
    )
    monkeypatch.setattr(v2l_command, "load_model", lambda *a: fresh("model/connector=v2l"))
    monkeypatch.setattr(v2l_command, "final_image_reading", lambda ck: PADDED)
    monkeypatch.setattr(
        v2l_command, "image_words", lambda m, *a: devices.append(next(m.parameters()).device.type) or words(m, *a)
    )
    figures = []
    for device in ("cuda", "cpu"):
        sea, v2l = tmp_path / f"sea_{device}.json", tmp_path / f"v2l_{device}.json"
        args = ["--labels", str(labels), "--data", str(colour_set["test"]), "--device", device, "--json", str(sea)]
        assert main(["sea-eval", "r/a/s/final", *args]) == 0
        args = ["--data", str(colour_set["test"]), "--batch-size", "3", "--device", device, "--json", str(v2l)]
        assert main(["v2l-words", "r/s/final", *args]) == 0
        figures.append((json.loads(sea.read_text())["r/a/s/final"]["all words"], json.loads(v2l.read_text())))
    assert devices == ["cuda", "cuda", "cpu", "cpu"]
    (sea_gpu, v2l_gpu), (sea_cpu, v2l_cpu) = figures
    assert sea_gpu == pytest.approx(sea_cpu) and v2l_gpu == v2l_cpu
    # export --check: the exported folder answers on the GPU as on the CPU; alignlm's side is moved there too
    model, folder = fresh(), tmp_path / "hf"
    hf = to_llava(model)
    hf.save_pretrained(folder)
    llava_processor(model, get_template("vicuna_v1"), hf.config.vision_feature_select_strategy).save_pretrained(folder)
    records, root = read_records(str(colour_set["test"]))[:3], colour_set["test"].parent
    torch.cuda.reset_peak_memory_stats()
    on_gpu = export_check.exported_answers(folder, records, root, 6, torch.device("cuda"))
    assert torch.cuda.max_memory_allocated() > 0
    assert on_gpu == export_check.exported_answers(folder, records, root, 6, torch.device("cpu"))
    monkeypatch.setattr(export_check, "resolve", lambda paths: ["ck"])
    monkeypatch.setattr(export_check, "load", lambda ck, *a: fresh())
    monkeypatch.setattr(export_check, "stage_config", lambda ck: None)
    monkeypatch.setattr(export_check, "data_config", lambda ck, cfg: {})
    monkeypatch.setattr(
        export_check, "generate_set", lambda m, *a, **k: devices.append(next(m.parameters()).device.type) or []
    )
    monkeypatch.setattr(export_check, "exported_answers", lambda *a: devices.append(a[-1].type) or [])
    export_check.compare_with_export("ck", folder, colour_set["test"], device="cuda")
    assert devices[-2:] == ["cuda", "cuda"]
    # WCA: the descriptions and the per-class sum on the encoder's device, the CPU's scores
    classes = ["red", "green", "blue"]
    picture = Image.new("RGB", (40, 30), (200, 30, 30))
    got = []
    for device in ("cuda", "cpu"):
        encoder = load_encoder(str(tiny_clip), device=device)
        p, texts = class_texts(encoder, classes, descriptions_for(classes, ["a {c} square", "the colour {c}"]), 0.1)
        plain, wca = scores(encoder, picture, p, texts, WCAConfig(crops=4), np.random.default_rng(0))
        assert texts.embeddings.device.type == wca.device.type == device
        got.append((plain.cpu(), wca.cpu()))
    torch.testing.assert_close(got[0], got[1], rtol=1e-4, atol=1e-5)
