"""Hostile and broken inputs fail safe, every cause is counted, nothing is lost (docs/reliability.md).

Each test is one defect of the reliability issue: checkpoints that try to run code, a diverging run, decompression
bombs, image paths that leave their root, damaged checkpoints, bad records, special tokens in user text, and the
smaller ones (summary over resumed segments, run names, a clean stop_after_steps). A fuzz test throws 10,000
malformed records at the data path.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from alignlm import pipeline
from alignlm.commands import main
from alignlm.config import ConfigError
from alignlm.constants import IGNORE_INDEX
from alignlm.data.build import build_dataset
from alignlm.data.collate import Collator, Skipped
from alignlm.data.images import load_rgb
from alignlm.data.llava import LlavaDataset
from alignlm.data.records import TOO_LONG, DataError, Source, record_images
from alignlm.data.templates import TemplateError, get_template, special_ids, to_turns, tokenize
from alignlm.models.io import UnsafeConfigError, config_yaml, load_checkpoint_config, load_model, safe_model_config
from alignlm.models.probes import load_probe_set
from alignlm.objectives.base import LossTerm
from alignlm.objectives.lm import LMObjective
from alignlm.pipeline import run
from alignlm.training import checkpoint as ckpt
from alignlm.training.trainer import StopTraining, Trainer, TrainingError
from tests.conftest import RANKS, compose, read_losses, tiny_overrides


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose header claims ``width x height`` pixels: a decompression bomb's calling card."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


# ---- checkpoints are data, never code ---------------------------------------------------------------------------------


@pytest.fixture
def final_dir(colour_set, tmp_path) -> Path:
    run(compose(*tiny_overrides(colour_set, tmp_path), "run=[pretrain]", "stages.pretrain.max_steps=2", "eval.sets=[]"))
    return tmp_path / "t" / "pretrain" / "final"


def rewrite_model(final_dir: Path, part: str, node: dict) -> None:
    """Replace one part of a final/ folder's config.yaml, as someone handing over a checkpoint could."""
    cfg = OmegaConf.load(final_dir / "config.yaml")
    cfg.model[part] = node
    (final_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))


def test_a_hostile_config_runs_nothing(final_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    rewrite_model(final_dir, "llm", {"_target_": "builtins.open", "_args_": [str(victim), "w"]})
    with pytest.raises(UnsafeConfigError, match="model.llm._target_='builtins.open' is not one of alignlm's part"):
        load_model(final_dir)
    with pytest.raises(UnsafeConfigError):
        main(["export", str(final_dir), str(tmp_path / "out")])
    assert victim.read_text() == "precious" and not (tmp_path / "out").exists()


def test_a_checkpoint_config_naming_hub_kernels_for_attention_is_refused(final_dir):
    """transformers downloads and runs a Hub repository's kernels for ``attn_implementation="<org>/<repo>"`` without
    asking for trust_remote_code: from a checkpoint's config that is code, refused unless allowed."""
    cfg = OmegaConf.load(final_dir / "config.yaml")
    node = OmegaConf.to_container(cfg.model, resolve=True)
    node["llm"]["attn_implementation"] = "kernels-community/flash-attn"
    with pytest.raises(UnsafeConfigError, match=r"model.llm.attn_implementation='kernels-community/flash-attn' names"):
        safe_model_config(node)
    assert safe_model_config(node, allow_code=True).llm.attn_implementation == "kernels-community/flash-attn"
    node["llm"]["attn_implementation"] = "sdpa"
    assert safe_model_config(node).llm.attn_implementation == "sdpa"


def test_a_handed_over_config_that_reads_the_environment_is_refused(final_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLM_TEST_SECRET", "hunter2")
    config = final_dir / "config.yaml"
    config.write_text(config.read_text().replace("run_name: t\n", "run_name: ${oc.env:ALIGNLM_TEST_SECRET}\n", 1))
    for attempt in (lambda: load_model(final_dir), lambda: main(["export", str(final_dir), str(tmp_path / "hf")])):
        with pytest.raises(UnsafeConfigError, match=r"run_name holds the interpolation '\$\{oc.env") as e:
            attempt()  # the export once wrote the secret into the model card it makes for the Hub
        assert "hunter2" not in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_a_literal_dollar_brace_in_a_value_round_trips_through_a_checkpoint_config(tmp_path):
    cfg = OmegaConf.create({"prompt": "\\${not} an interpolation", "copy": "${prompt}", "rows": ["a ${prompt}"]})
    (tmp_path / "config.yaml").write_text(config_yaml(cfg))
    back = OmegaConf.to_container(load_checkpoint_config(tmp_path / "config.yaml"), resolve=True)
    assert back == {"prompt": "${not} an interpolation", "copy": "${not} an interpolation",
                    "rows": ["a ${not} an interpolation"]}  # fmt: skip


def test_weights_holding_nan_are_refused_on_load(final_dir):
    weights = final_dir / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(weights))
    name = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(weights), metadata=metadata)
    with pytest.raises(ValueError, match=f"checkpoint weights hold NaN: \\['{re.escape(name)}'\\]"):
        load_model(final_dir)


def test_remote_code_shipped_with_weights_never_runs(final_dir, tmp_path):
    from alignlm.models.llm import tiny

    llm, tok = tiny()
    folder = tmp_path / "llm"
    llm.save_pretrained(folder)
    tok.save_pretrained(folder)
    marker = tmp_path / "ran.txt"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    rewrite_model(
        final_dir,
        "llm",
        {"_target_": "alignlm.models.llm.pretrained", "name_or_path": str(folder), "trust_remote_code": True},
    )
    node = {"llm": {"_target_": "alignlm.models.llm.pretrained", "trust_remote_code": True}}
    assert safe_model_config(node).llm.trust_remote_code is False  # the checkpoint's wish is ignored
    try:
        load_model(final_dir)
    except Exception:  # transformers refuses to run the folder's code without trust_remote_code: nothing ran
        pass
    assert not marker.exists()


class MyConnector(torch.nn.Module):
    """Not an alignlm part: the kind of target --allow-code exists for."""


def test_user_parts_need_allow_code():
    node = {"connector": {"_target_": "tests.test_reliability.MyConnector"}}
    with pytest.raises(UnsafeConfigError, match="--allow-code"):
        safe_model_config(node)
    assert safe_model_config(node, allow_code=True).connector._target_ == "tests.test_reliability.MyConnector"


# ---- non-finite steps ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_a_diverging_run_skips_non_finite_steps_and_stops_with_a_report(colour_set, tmp_path, strategy):
    """Under DeepSpeed the engine skips the update itself (a non-finite gradient norm in fp32); the report is the same."""
    if strategy != "ddp":
        pytest.importorskip("deepspeed")
    base = [
        *tiny_overrides(colour_set, tmp_path),
        f"launcher={strategy}",
        "run=[pretrain]",
        "eval.sets=[]",
        "stages.pretrain.max_steps=20",
        "stages.pretrain.save_every=0",
        "stages.pretrain.lr.connector=1e30",
        "stages.pretrain.warmup_ratio=0",
        "stages.pretrain.max_grad_norm=0",
        "nonfinite.stop_after=3",
        "logging.every=1",
    ]
    with pytest.raises(
        TrainingError, match=r"non-finite loss or gradient \(steps \[2, 3, 4\]\).*[Ll]ower the learning"
    ):
        run(compose(*base))
    rows = [json.loads(r) for r in (tmp_path / "t" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "nonfinite" not in rows[0] and all(r["nonfinite"] and r["loss/total"] is None for r in rows[1:])
    assert not (tmp_path / "t" / "pretrain" / "final").exists()  # nothing non-finite is ever written
    assert main(["train", *base, "run_name=cli"]) == 1  # a message and exit status 1, not a traceback


def test_the_stop_for_non_finite_steps_names_the_loss_term_that_was_not_finite(colour_set, tmp_path, monkeypatch):
    """A NaN in one objective's term (a knob, its inputs) stopped the run with advice about the learning rate; the
    message names the term, and says so when every term was finite and only the gradient was not."""
    from alignlm.objectives.base import LossTerm
    from alignlm.objectives.contrastive import ContrastiveObjective

    real = ContrastiveObjective.forward
    monkeypatch.setattr(
        ContrastiveObjective,
        "forward",
        lambda self, *a: (lambda t: LossTerm(t.loss * float("nan"), t.metrics))(real(self, *a)),
    )
    base = [
        *tiny_overrides(colour_set, tmp_path),
        "run=[pretrain]",
        "eval.sets=[]",
        "+objective@stages.pretrain.objectives.contrastive=contrastive",
        "stages.pretrain.save_every=0",
        "nonfinite.stop_after=2",
        "logging.every=1",
    ]
    with pytest.raises(
        TrainingError,
        match=r"\(steps \[1, 2\]\).*Not finite: loss/contrastive at steps \[1, 2\]; the other terms were\. Look",
    ):
        run(compose(*base))


def test_a_logged_value_not_finite_at_a_step_that_trained_is_warned_once(
    colour_set, tmp_path, monkeypatch, alignlm_log
):
    """A learnable temperature driven past its range logged null at every step while the loss stayed finite (the
    objective pinned at chance) and the run ended as if all was well: it is said once, naming the value and step."""
    from alignlm.objectives.base import LossTerm
    from alignlm.objectives.contrastive import ContrastiveObjective

    real = ContrastiveObjective.forward

    def forward(self, *args):
        term = real(self, *args)
        return LossTerm(term.loss, {**term.metrics, "temperature": term.metrics["temperature"] * float("inf")})

    monkeypatch.setattr(ContrastiveObjective, "forward", forward)
    overrides = [
        *tiny_overrides(colour_set, tmp_path),
        "run=[pretrain]",
        "eval.sets=[]",
        "+objective@stages.pretrain.objectives.contrastive=contrastive",
        "stages.pretrain.save_every=0",
        "logging.every=1",
    ]
    run(compose(*overrides))
    said = [r.getMessage() for r in alignlm_log.records if "was not finite at step" in r.getMessage()]
    assert said == [
        "stage pretrain: contrastive/temperature was not finite at step 1, a step whose loss was (logged as null): "
        "what computes it may have stopped working (a learnable temperature past its range, an objective pinned at "
        "chance)"
    ]


def test_non_finite_steps_stop_the_run_in_any_window_whatever_the_fetches_and_a_resume(
    colour_set, tmp_path, monkeypatch
):
    """``nonfinite.stop_after`` skipped steps within ``nonfinite.window`` steps stop the run wherever the window lies:
    only the window ending at a fetch of the logged values was counted, and a resume moved the fetches, so the same
    skipped steps stopped an uninterrupted run and not its resumed twin (or no run at all)."""
    poisoned, step, loss = {3, 6}, Trainer.step, Trainer.loss

    def poisoning_step(self, micro, n):
        self.poisoned = n in poisoned
        return step(self, micro, n)

    def poisoning_loss(self, *args, **kwargs):
        total, *rest = loss(self, *args, **kwargs)
        return (total * float("nan") if self.poisoned else total), *rest

    monkeypatch.setattr(Trainer, "step", poisoning_step)
    monkeypatch.setattr(Trainer, "loss", poisoning_loss)
    base = [
        *tiny_overrides(colour_set, tmp_path, "eval.sets=[]"),
        "run=[pretrain]",
        "stages.pretrain.max_steps=10",
        "stages.pretrain.save_every=0",
        "nonfinite.stop_after=2",
        "nonfinite.window=4",
    ]
    stopped = r"2 of the 4 steps up to step 6 had a non-finite loss or gradient \(steps \[3, 6\]\)"
    with pytest.raises(TrainingError, match=stopped):  # fetched at step 10 alone: the window ending there holds one
        run(compose(*base, "run_name=whole", "logging.every=10"))
    with pytest.raises(StopTraining):
        run(compose(*base, "run_name=resumed", "logging.every=3", "stop_after_steps=2"))
    with pytest.raises(TrainingError, match=stopped):  # fetched at 5 and 8 after the resume: neither window held two
        run(compose(*base, "run_name=resumed", "logging.every=3"))
    rows = [json.loads(r) for r in (tmp_path / "resumed" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))  # fetched at 3 and 6 as an uninterrupted run: stopped at 6


def test_a_skipped_step_leaves_a_trained_batchnorm_towers_running_statistics_as_they_were(colour_set, tmp_path):
    """A non-finite step updates no weight, but its forward in training mode had moved a trained BatchNorm tower's
    running statistics to NaN: the stage finished and wrote them into its checkpoints and final/, which every later
    stage and rerun then refused. They are kept back like the weights, and a non-finite buffer is never written."""
    from safetensors.torch import load_file

    cfg = compose(
        *tiny_overrides(colour_set, tmp_path, "eval.sets=[]"),
        "run=[pretrain]",
        "model/vision=efficientnet_lite0",
        "model.vision.weights=null",
        "model.vision.image_size=32",
        "stages.pretrain.parts.vision=full",
        "stages.pretrain.lr.vision=1e30",
        "stages.pretrain.warmup_ratio=0",
        "stages.pretrain.max_grad_norm=0",
        "stages.pretrain.max_steps=3",
        "stages.pretrain.save_every=1",
        "nonfinite.stop_after=0",
    )
    run(cfg)
    stage = tmp_path / "t" / "pretrain"
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["stages"]["pretrain"]["nonfinite_steps"] == [2, 3]
    final = load_file(stage / "final" / "model.safetensors")
    after_step_1 = load_file(stage / "checkpoints" / "step_000001" / "trainable.safetensors")
    running = [k for k in final if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert running and all(torch.equal(final[k], after_step_1[k]) for k in running)
    assert all(v.isfinite().all() for v in final.values() if v.is_floating_point())


class CountingLM(LMObjective):
    """The LM loss, with persistent buffers its forward moves: a count in place, a running mean by assignment."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(()))

    def forward(self, batch, out, model):
        self.calls += 1
        term = super().forward(batch, out, model)
        self.ema = 0.9 * self.ema + 0.1 * term.loss.detach().float()  # a new tensor: the usual idiom
        return term


def test_a_skipped_step_leaves_an_objectives_buffers_as_they_were(colour_set, tmp_path):
    """A non-finite step had kept back the model's buffers but not an objective's: a running statistic a forward moved
    (an EMA going to inf) stayed moved, and was written into every later checkpoint. The count here moves once per
    forward: step 2 is skipped, so it stays at the first step's."""
    cfg = compose(
        *tiny_overrides(colour_set, tmp_path, "eval.sets=[]"),
        "run=[pretrain]",
        f"stages.pretrain.objectives.lm._target_={__name__}.CountingLM",
        "~stages.pretrain.objectives.lm.weight",
        "stages.pretrain.lr.connector=1e30",
        "stages.pretrain.warmup_ratio=0",
        "stages.pretrain.max_grad_norm=0",
        "stages.pretrain.max_steps=3",
        "stages.pretrain.grad_accum=1",
        "stages.pretrain.save_every=1",
        "nonfinite.stop_after=0",
    )
    run(cfg)
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["stages"]["pretrain"]["nonfinite_steps"] == [2, 3]
    held = tmp_path / "t" / "pretrain" / "checkpoints"
    state = [load_file(held / f"step_00000{s}" / "objectives.safetensors") for s in (1, 2)]
    assert [int(s["lm.calls"]) for s in state] == [1, 1]
    assert state[0]["lm.ema"].isfinite() and torch.equal(state[1]["lm.ema"], state[0]["lm.ema"])


class NotFiniteLM(LMObjective):
    """The LM loss times NaN."""

    def forward(self, batch, out, model):
        term = super().forward(batch, out, model)
        return LossTerm(term.loss * float("nan"))


def test_a_stage_of_only_non_finite_steps_says_so_not_bad_data(colour_set, tmp_path):
    """It had been told as "every micro-batch was bad data", with no sample left out."""
    cfg = compose(
        *tiny_overrides(colour_set, tmp_path, "eval.sets=[]"),
        "run=[pretrain]",
        f"stages.pretrain.objectives.lm._target_={__name__}.NotFiniteLM",
        "stages.pretrain.max_steps=2",
        "nonfinite.stop_after=0",
    )
    with pytest.raises(TrainingError, match=re.escape("no step trained, every step's loss or gradient was not finite (steps [1, 2]")):  # fmt: skip
        run(cfg)


def test_a_weight_that_turns_non_finite_under_a_finite_step_is_never_written(colour_set, tmp_path, monkeypatch):
    """The last guard before a checkpoint: a weight that an update made non-finite while the loss and the gradient
    were finite (an overflowing update) stops the stage before any step checkpoint or ``final/`` holds it. Every
    non-finite test had made the loss or gradient so, whose steps are skipped: the guard itself went untested."""
    from alignlm.models.loading import finite

    update = Trainer.optimizer_step

    def overflowing(self, finite_step, data):
        update(self, finite_step, data)
        with torch.no_grad():
            next(p for p in self.core().connector.parameters() if p.requires_grad).view(-1)[0] = float("inf")

    monkeypatch.setattr(Trainer, "optimizer_step", overflowing)
    cfg = compose(
        *tiny_overrides(colour_set, tmp_path, "eval.sets=[]"), "run=[pretrain]", "stages.pretrain.max_steps=3"
    )
    with pytest.raises(TrainingError, match=r"stage pretrain: non-finite weights in \['connector\..*no checkpoint was"):
        run(cfg)
    written = list(tmp_path.rglob("*.safetensors"))
    assert all(finite(t) for f in written for t in load_file(f).values()), written


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_step_changes_no_weight_and_counts_no_step(colour_set, tmp_path, fused):
    """The fused optimizer skips on the device (its found_inf), the other one on the host: either way a non-finite
    step leaves every weight and Adam's step count as they were, and the next finite step updates. So does a step where
    no rank had data: its stand-ins' zero gradients moved every weight through Adam's momentum and weight decay."""
    from alignlm.pipeline import make_accelerator
    from alignlm.training.trainer import Trainer

    cfg = compose(*tiny_overrides(colour_set, tmp_path), f"stages.pretrain.fused_optimizer={str(fused).lower()}")
    trainer = Trainer(cfg, "pretrain", make_accelerator(cfg))
    trainer.setup()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert bool(inner.defaults.get("fused")) == fused
    params = [p for g in inner.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    trainer.optimizer_step(torch.tensor(False), torch.tensor(True))
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    trainer.optimizer_step(torch.tensor(True), torch.tensor(True))
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    assert all(int(inner.state[p]["step"]) == 1 for p in params)
    for p in params:
        p.grad = torch.zeros_like(p)  # what the stand-ins of bad data give every rank
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in inner.state[p].items()} for p in params]
    trainer.optimizer_step(torch.tensor(True), torch.tensor(False))
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert all(torch.equal(s[k], inner.state[p][k]) for s, p in zip(state, params) for k in s)  # momentum, step


@pytest.mark.parametrize(
    "bad",
    [
        "stages.pretrain.lr.connector=inf",
        "stages.pretrain.lr.connector=-1",
        "stages.pretrain.warmup_ratio=2",
        "stages.pretrain.grad_accum=0",
    ],
)
def test_numbers_are_checked_before_anything_is_built(colour_set, tmp_path, bad):
    key = bad.split("=")[0]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        run(compose(*tiny_overrides(colour_set, tmp_path), bad))


def test_a_config_that_cannot_work_is_a_message_and_status_2_not_a_traceback(colour_set, tmp_path, capsys):
    base = ["train", *tiny_overrides(colour_set, tmp_path)]
    assert main([*base, "stages.finetune.scheduler=cosin"]) == 2
    assert main([*base, "stages.finetune.max_stepz=3"]) == 2  # Hydra's own error: a key that does not exist
    err = capsys.readouterr().err
    assert "stages.finetune.scheduler='cosin' is not known" in err and "max_stepz" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "bad",
    [
        "stages.finetune.data.template=vicunaa",
        "stages.finetune.parts.llm=lroa",
        "+stages.finetune.parts.conector=full",
        "+stages.finetune.lr.conector=1e-3",
        "stages.finetune.scheduler=cosin",
        "stages.finetune.data.on_error=ignore",
        "stages.finetune.data.min_usable_fraction=1.5",
        "stages.finetune.data.packing=maybe",
        "stages.finetune.data.group_by_length=maybe",
        "stages.finetune.compile=maybe",
        "stages.finetune.gradient_checkpointing=[llm,visoin]",
        "stages.finetune.init_from=nope",
        "stages.finetune.parts.llm=lora stages.finetune.lora.r=0",
        "stages.finetune.parts.llm=lora stages.finetune.lora.dropout=1.5",
        "seed=-1",
        "logging.every=0",
        "nonfinite.window=0",
        "eval.limit=-1",
        "resume_allow_changes=maybe",
        "+stages.finetune.max_stepz=3",  # Hydra's advice for a typo: it was added and never read
        "+stages.finetune.data.templat=plain",
        "run=pretrain",
        "+offline_dataset_args.shapes.n_trian=5",
        "monitor.every=-1",
        "monitor.every=2 monitor.probe=x.json monitor.metrics=[modality_gap,foo]",
        "launcher=zero2 distributed.deepspeed_config=/nonexistent.json",
    ],
)
def test_the_second_stages_names_and_switches_are_checked_before_the_first_trains(colour_set, tmp_path, bad):
    """Each mistake once surfaced late: after the first stage had trained, at a step, or never (a string such as
    "maybe" counted as true, a learning rate for a missing part was ignored, logging.every=0 became 10)."""
    *extra, last = bad.split()
    parent, _, leaf = last.split("=")[0].lstrip("+").rpartition(".")
    cfg = compose(*tiny_overrides(colour_set, tmp_path, "run=[pretrain,finetune]"), *extra, last)
    with pytest.raises(ValueError, match=f"{re.escape(parent)}.*{re.escape(leaf)}"):  # the key, named
        run(cfg)
    assert not (tmp_path / "t").exists()  # nothing trained, nothing written


# ---- images -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(20000, 20000), (12000, 12000)])
def test_decompression_bombs_are_refused_before_decoding(tmp_path, size):
    bomb = png_claiming(tmp_path / "bomb.png", *size)
    assert bomb.stat().st_size < 1000
    with pytest.raises(DataError, match="pixels") as e:
        load_rgb(bomb)
    assert e.value.cause == "image over data.max_image_pixels"


def test_a_strip_image_is_as_large_as_the_square_it_is_padded_to(tmp_path):
    strip = png_claiming(tmp_path / "strip.png", 1, 1_000_000)  # 1 M pixels, under the limit; padded, 10^12
    with pytest.raises(DataError, match="padded to a square 1000000000000") as e:
        load_rgb(strip)
    assert e.value.cause == "image over data.max_image_pixels"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_16_bit_image_keeps_its_grey_and_32_bit_pixels_are_refused(tmp_path):
    """Pillow's convert("RGB") clips 16-bit grey at 255 (a mid-grey became white) and 32-bit float at 0 or 255: 16-bit
    grey is scaled to 8 bits, 32-bit integer or float pixels (no range says what is white) are an unreadable image."""
    Image.fromarray(np.full((4, 4), 32896, np.uint16)).save(tmp_path / "grey16.png")
    assert np.asarray(load_rgb(tmp_path / "grey16.png"))[0, 0].tolist() == [128, 128, 128]
    for name, pixels in (("int32.tif", np.full((4, 4), 7, np.int32)), ("float.tif", np.full((4, 4), 0.5, np.float32))):
        Image.fromarray(pixels).save(tmp_path / name)
        with pytest.raises(DataError, match="no fixed range") as e:
            load_rgb(tmp_path / name)
        assert e.value.cause == "unreadable image"


def test_an_image_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo.png")  # opening it would wait for a writer forever
    with pytest.raises(DataError, match="not a regular file") as e:
        load_rgb(tmp_path / "fifo.png")
    assert e.value.cause == "unreadable image"


def record(rid: str, image: str | None = "images/0.png", answer="red", question: str = "<image>\nWhat color?") -> dict:
    rec = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    return rec


def dataset(model, records, root: Path, **kw) -> LlavaDataset:
    path = root / "data.json"
    path.write_text(json.dumps(records))
    source = Source(str(path), allow_outside_root=kw.pop("allow_outside_root", False))
    template = get_template("vicuna_v1")
    return LlavaDataset([source], model.tokenizer, template, model.image_spec, model.num_image_tokens, **kw)


@pytest.fixture
def root(tmp_path) -> Path:
    """A data folder (images/0.png, images/bomb.png) and, beside it, a folder no record may reach."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (20, 20), (200, 10, 10)).save(data / "images" / "0.png")
    png_claiming(data / "images" / "bomb.png", 20000, 20000)
    (tmp_path / "outside").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "outside" / "secret.png")
    return data


def test_images_without_placeholders_all_go_before_the_first_question(tiny_model, root):
    """LLaVA's convention for a record with no <image>: the images before its first question, one slot per image (a
    record of two images got one placeholder, counted as two, and was always skipped as malformed)."""
    model = tiny_model()
    two = record("two", ["images/0.png", "images/0.png"], question="Same colour?")
    sample = dataset(model, [two, record("one", question="Colour?")], root)[0]
    assert (
        sample["n_images"] == 2
        and int((sample["input_ids"] == model.image_token_id).sum()) == 2 * model.num_image_tokens
    )


def test_a_preference_pair_whose_final_answer_the_cut_would_lose_is_too_long_not_two_copies(tiny_model, root):
    """A multi-turn prompt cut inside its last question by max_length: the final answers were cut away, and both
    sides then supervised the same earlier answer of the prompt (a pair with no margin, kept as 'truncated'). The final
    answer is chosen before the cut, so such a record is too long to cut."""
    model = tiny_model()
    prompt = record("p", image=None, question="q", answer="an earlier answer")
    prompt["conversations"].append({"from": "human", "value": " ".join(["seven"] * 60)})
    pair = dataset(model, [{**prompt, "chosen": "red", "rejected": "blue"}], root, preference=True, max_length=80)[0]
    assert isinstance(pair, Skipped) and pair.cause == TOO_LONG
    roomy = dataset(model, [{**prompt, "chosen": "red", "rejected": "blue"}], root, preference=True)[0]
    for side, answer in zip(roomy, ("red", "blue")):
        supervised = side["labels"][side["labels"] != IGNORE_INDEX]
        assert model.tokenizer.decode(supervised).strip().startswith(answer)


def test_bombs_and_escaping_paths_are_counted_under_skip_and_named_under_raise(tiny_model, root):
    model = tiny_model()
    outside = str(root.parent / "outside" / "secret.png")
    records = [
        record("ok"),
        record("bomb", "images/bomb.png"),
        record("up", "images/../../outside/secret.png"),
        record("abs", outside),
        record("ok2"),
    ]
    ds = dataset(model, records, root, min_usable_fraction=0.0)
    assert ds.report.counts == {"image path outside its image_root": 2} and len(ds) == 3
    skipped = ds[1]
    assert isinstance(skipped, Skipped) and skipped.cause == "image over data.max_image_pixels"
    with pytest.raises(DataError, match=r"id='up'.*leaves image_root"):
        dataset(model, records, root, on_error="raise")
    strict = dataset(model, [record("bomb", "images/bomb.png")], root, on_error="raise")
    with pytest.raises(DataError, match="id=bomb.*pixels"):
        strict[0]
    opted = dataset(model, records, root, allow_outside_root=True, min_usable_fraction=0.0)
    assert not opted.report.counts and len(opted) == 5  # the source's owner allowed it


def test_every_reader_of_records_keeps_image_paths_inside_their_root(root, monkeypatch):
    captions = [{"id": str(i), "image": "images/0.png", "captions": ["red"]} for i in range(3)]
    (root / "ok.json").write_text(json.dumps(captions))
    assert len(load_probe_set(root / "ok.json").images) == 3
    assert len(record_images([root / "ok.json"])) == 3
    for bad in ("../outside/secret.png", str(root.parent / "outside" / "secret.png")):
        (root / "bad.json").write_text(json.dumps([*captions, {"id": "x", "image": bad, "captions": ["red"]}]))
        with pytest.raises(DataError, match="leaves image_root"):
            load_probe_set(root / "bad.json")
        with pytest.raises(DataError, match="bad.json: record id=x: image path .* leaves image_root"):
            record_images([root / "bad.json"])
    # a list of one image is one image; a record that is not an object is named, not an AttributeError
    (root / "listed.json").write_text(json.dumps([{**c, "image": [c["image"]]} for c in captions]))
    assert load_probe_set(root / "listed.json").ids == ["0", "1", "2"]
    (root / "odd.json").write_text(json.dumps([*captions, "not a record"]))
    with pytest.raises(DataError, match=r"odd.json: record .*odd.json#3 is a str, not an object"):
        load_probe_set(root / "odd.json")
    monkeypatch.chdir(root)  # a relative root, "." included, is the folder it names
    assert Source("ok.json").image_paths(captions[0]) == [Path("images/0.png")]
    assert Source("ok.json", image_root=".").image_paths(captions[0]) == [Path("images/0.png")]


# ---- damaged checkpoints ------------------------------------------------------------------------------------------------


def test_a_truncated_newest_checkpoint_resumes_from_the_previous_one(colour_set, tmp_path):
    base = [
        *tiny_overrides(colour_set, tmp_path),
        "run=[pretrain]",
        "eval.sets=[]",
        "stages.pretrain.max_steps=6",
        "stages.pretrain.save_every=2",
        "stages.pretrain.keep_last=0",
    ]
    run(compose(*base, "run_name=full"))
    with pytest.raises(StopTraining):
        run(compose(*base, "run_name=broken", "stop_after_steps=4"))
    newest = tmp_path / "broken" / "pretrain" / "checkpoints" / "step_000004" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    assert "trainable.safetensors has 100 bytes" in ckpt.verify(newest.parent)
    summary = run(compose(*base, "run_name=broken"))
    full, resumed = (load_model(tmp_path / r / "pretrain" / "final") for r in ("full", "broken"))
    torch.testing.assert_close(resumed.connector.state_dict(), full.connector.state_dict())
    losses = read_losses(tmp_path / "broken" / "pretrain")
    assert losses == pytest.approx(read_losses(tmp_path / "full" / "pretrain"), rel=1e-6)
    assert summary["stages"]["pretrain"]["steps"] == 6  # the whole stage, every resumed segment


def test_a_resumed_run_draws_the_same_random_numbers_as_an_uninterrupted_one(colour_set, tmp_path):
    """LoRA's dropout masks come from torch's global random stream, which a checkpoint restores: the data loader once
    drew from it after the restore, so a resumed run's masks from step 3 on were not the uninterrupted run's (losses
    off by 1e-5; SEA's sampled labels by 5e-2, `tests/test_sea.py`)."""
    base = [*tiny_overrides(colour_set, tmp_path), "eval.sets=[]", "run=[finetune]", "stages.finetune.init_from=null",
            "stages.finetune.parts.llm=lora", "stages.finetune.lora.dropout=0.1", "stages.finetune.max_steps=4"]  # fmt: skip
    assert_resume_is_exact(base, tmp_path, "finetune")


def assert_resume_is_exact(base: list[str], out: Path, stage: str) -> None:
    """The run stopped after step 2 and resumed ends with the uninterrupted run's losses and weights, bit for bit."""
    run(compose(*base, f"stages.{stage}.save_every=2", "run_name=whole"))
    with pytest.raises(StopTraining):
        run(compose(*base, f"stages.{stage}.save_every=2", "run_name=resumed", "stop_after_steps=2"))
    run(compose(*base, f"stages.{stage}.save_every=2", "run_name=resumed"))
    assert read_losses(out / "resumed" / stage) == read_losses(out / "whole" / stage)
    whole, resumed = (load_file(str(out / r / stage / "final" / "model.safetensors")) for r in ("whole", "resumed"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_manifest_that_is_not_one_is_a_reason_to_pass_the_checkpoint_by_not_a_crash(tmp_path):
    (tmp_path / "trainable.safetensors").write_bytes(b"weights")
    (tmp_path / "trainer_state.json").write_text("{}")
    ckpt.write_manifest(tmp_path)
    assert ckpt.verify(tmp_path) is None
    (tmp_path / "README.md").write_text("notes")  # the user's: a finished stage trained again and the note was lost
    (tmp_path / ".DS_Store").write_bytes(b"x")
    assert ckpt.verify(tmp_path) is None
    (tmp_path / "extra.safetensors").write_bytes(b"weights")  # what a loader could read: the manifest must list it
    assert "extra.safetensors is not in the manifest" in ckpt.verify(tmp_path)
    (tmp_path / "extra.safetensors").unlink()
    whole = json.loads((tmp_path / ckpt.MANIFEST).read_text())
    outside = tmp_path.parent / "victim.bin"
    outside.write_bytes(b"x")
    for bad, why in [
        ([], "is not a manifest"),
        ({"trainable.safetensors": 5}, "is not a manifest"),
        ({**whole, "../victim.bin": {"bytes": 1, "sha256": ckpt.file_sha256(outside)}}, "is not a manifest"),
        ({}, "trainable.safetensors is not in the manifest"),  # an empty manifest once vouched for any files
    ]:
        (tmp_path / ckpt.MANIFEST).write_text(json.dumps(bad))
        assert why in ckpt.verify(tmp_path)  # the trainer then resumes from an older checkpoint, naming this one


def test_a_resuming_rank_hashes_the_files_it_reads_not_another_ranks_own(tmp_path):
    """Every rank of a resume hashed every file of the checkpoint, each rank's ZeRO optimizer partition included: the
    world size times the optimizer's bytes read per resume (64 ranks x 84 GB at 7B). A rank hashes what it reads
    and checks the sizes of the rest; a damaged file of its own, or a shared one, still passes the checkpoint by."""
    for name in ("trainable.safetensors", "optimizer_rank0.pt", "optimizer_rank1.pt", "rng_0.pt", "rng_1.pt"):
        (tmp_path / name).write_bytes(b"state of " + name.encode())
    ckpt.write_manifest(tmp_path)
    hashed = []
    sha256 = ckpt.file_sha256
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ckpt, "file_sha256", lambda path: hashed.append(path.name) or sha256(path))
        assert ckpt.verify(tmp_path, rank=1) is None
    assert sorted(hashed) == ["optimizer_rank1.pt", "rng_1.pt", "trainable.safetensors"]
    (tmp_path / "optimizer_rank0.pt").write_bytes(b"state of optimizer_rankX.pt")  # same size, other bytes
    assert ckpt.verify(tmp_path, rank=1) is None
    assert "optimizer_rank0.pt does not match its SHA-256" in ckpt.verify(tmp_path, rank=0)
    assert "optimizer_rank0.pt does not match its SHA-256" in ckpt.verify(tmp_path)
    (tmp_path / "rng_0.pt").write_bytes(b"short")
    assert "rng_0.pt has 5 bytes" in ckpt.verify(tmp_path, rank=1)  # sizes: every file, whoever reads it


def test_resuming_with_another_global_batch_is_refused_unless_allowed(colour_set, tmp_path):
    base = [*tiny_overrides(colour_set, tmp_path), "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=4"]
    with pytest.raises(StopTraining):
        run(compose(*base, "stop_after_steps=2"))
    with pytest.raises(ValueError, match=r"global_batch=4, this run has global_batch=8.*resume_allow_changes"):
        run(compose(*base, "stages.pretrain.per_device_batch_size=8"))
    run(compose(*base, "stages.pretrain.per_device_batch_size=8", "resume_allow_changes=true"))


def test_a_changed_learning_rate_on_resume_is_refused_or_applied_never_ignored(colour_set, tmp_path):
    """Loading the optimizer's and schedule's state restored the checkpoint's learning rates, decay and betas whatever
    this run's config said (lowered after a loss spike, the rate stayed the old one, the logged lr too): a changed
    stage setting is now named and refused, and with resume_allow_changes=true this run's rate applies from the
    resumed step, on this run's schedule."""
    base = [*tiny_overrides(colour_set, tmp_path), "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=6"]
    base += ["stages.pretrain.warmup_ratio=0", "stages.pretrain.scheduler=constant"]
    with pytest.raises(StopTraining):
        run(compose(*base, "stop_after_steps=3"))
    lower = "stages.pretrain.lr.connector=1e-4"
    with pytest.raises(
        ValueError, match=r"stages\.pretrain\.lr\.connector=0\.001, this run has .*=0\.0001.*resume_allow_changes"
    ):
        run(compose(*base, lower))
    with pytest.raises(ValueError, match=r"seed=0, this run has seed=1"):
        run(compose(*base, "seed=1"))
    run(compose(*base, lower, "resume_allow_changes=true", "stages.pretrain.save_every=100", "logging.every=1"))
    rows = [json.loads(r) for r in (tmp_path / "t" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3] * 3 + [1e-4] * 3)


def test_a_checkpoint_of_another_model_is_refused_as_such_not_passed_over_as_damaged(colour_set, tmp_path):
    """A checkpoint whose tensors do not fit (LoRA rank, parts, connector changed) is whole: it is refused before
    loading, naming the tensors, instead of every checkpoint being reported as damaged with advice to delete them."""
    base = [*tiny_overrides(colour_set, tmp_path), "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=4"]
    with pytest.raises(StopTraining):
        run(compose(*base, "stop_after_steps=2"))
    with pytest.raises(
        ValueError, match=r"does not fit this run's model: \d+ missing from the checkpoint \(llm\."
    ) as e:
        run(compose(*base, "stages.pretrain.parts.llm=full"))
    assert "could not be loaded" not in str(e.value) and "delete them" not in str(e.value)
    run(compose(*base, "stages.pretrain.save_every=1", "stages.pretrain.keep_last=1"))  # the free keys resume


def test_a_rerun_after_a_stop_in_a_later_stage_keeps_the_finished_stages_figures(colour_set, tmp_path):
    """The cluster's requeue path: stopped in finetune, rerun; pretrain is skipped as finished and its figures, now
    kept beside its final/, are in the run's summary.json (the run's file was written only at the end of a whole run,
    so the rerun's summary had finetune alone)."""
    base = [*tiny_overrides(colour_set, tmp_path), "eval.sets=[]", "stages.pretrain.max_steps=2"]
    base += ["stages.finetune.max_steps=4", "stages.finetune.save_every=1"]
    with pytest.raises(StopTraining):
        run(compose(*base, "stop_after_steps=3"))
    summary = run(compose(*base))
    assert list(summary["stages"]) == ["pretrain", "finetune"] and summary["stages"]["pretrain"]["steps"] == 2
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["stages"] == summary["stages"]


# ---- bad records --------------------------------------------------------------------------------------------------------


def test_values_that_are_not_strings_are_malformed_not_stringified(tiny_model, root):
    model = tiny_model()
    records = [record("ok"), record("int", answer=7), record("null", answer=None), record("list", answer=["a", "b"])]
    ds = dataset(model, records, root, min_usable_fraction=0.0)
    assert len(ds) == 1 and ds.report.counts == {"malformed record": 3}


def test_per_cause_counts_reach_summary_json(tmp_path):
    from tests.conftest import edited_colour_set, pretrain_on

    def edit(records: list[dict]) -> None:
        records[1]["image"] = "images/missing.png"
        records[2]["image"] = "../../etc/passwd"
        records[3]["conversations"][1]["value"] = " ".join(["red"] * 600)  # cut to max_length, kept
        records.append({"id": "bad", "conversations": "no"})

    sets = edited_colour_set(tmp_path / "d", edit)
    summary = run(
        compose(
            *pretrain_on(
                sets,
                tmp_path,
                "stages.pretrain.max_steps=7",
                "stages.pretrain.per_device_batch_size=1",
                "stages.pretrain.data.max_length=200",
            )
        )
    )
    data = summary["stages"]["pretrain"]["data"]
    assert data["counts"]["image path outside its image_root"] == 1 and data["examples"]["malformed record"] == ["bad"]
    assert data["counts"]["missing image"] == 1 and data["examples"]["missing image"] == ["p1"]
    assert data["counts"]["truncated to data.max_length (kept)"] >= 1


def test_a_stage_of_only_bad_data_fails_and_writes_nothing(tmp_path):
    from tests.conftest import edited_colour_set, pretrain_on

    def edit(records: list[dict]) -> None:
        for r in records:
            r["image"] = "images/missing.png"

    sets = edited_colour_set(tmp_path / "d", edit)
    with pytest.raises(TrainingError, match="no step trained.*missing image: 8"):
        run(
            compose(
                *pretrain_on(sets, tmp_path, "stages.pretrain.max_steps=4", "stages.pretrain.per_device_batch_size=2")
            )
        )
    assert not (tmp_path / "t" / "pretrain" / "final").exists() and not (tmp_path / "t" / "summary.json").exists()


@RANKS
@pytest.mark.parametrize("launcher", ["ddp", "zero2"])
def test_ranks_of_which_none_had_data_skip_the_step_as_one_process_does(tmp_path, monkeypatch, launcher):
    """Two gloo ranks, one sample each per step, against one process accumulating both: in the pretraining stage
    (every other pair of images missing) some global steps have no data on any rank, and the finetuning stage has
    none at all. The ranks ran their stand-ins and took an AdamW step on zero gradients (DeepSpeed's engine too),
    logged it as loss 0.0, and wrote the all-bad stage's final/ with untrained weights, exit status 0."""
    from safetensors.torch import load_file

    from tests.conftest import edited_colour_set
    from tests.test_cluster import deepspeed_on_cpu, torchrun

    if launcher == "zero2":
        deepspeed_on_cpu()
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # DeepSpeed's ranks stay on the CPU on a GPU machine too

    def edit(records: list[dict]) -> None:
        for i, r in enumerate(records):
            if i % 4 >= 2:
                r["image"] = "images/missing.png"

    sets = edited_colour_set(tmp_path / "d", edit)
    instruct = json.loads(sets["instruct"].read_text())
    sets["instruct"].write_text(json.dumps([{**r, "image": "images/missing.png"} for r in instruct]))
    job = tiny_overrides(
        sets,
        tmp_path,
        "run=[pretrain,finetune]",
        "eval.sets=[]",
        "logging.every=1",
        "stages.pretrain.max_steps=8",
        "stages.finetune.max_steps=2",
        "stages.pretrain.per_device_batch_size=1",
        "stages.finetune.per_device_batch_size=1",
        "stages.pretrain.save_every=0",
        "stages.finetune.save_every=0",
        "stages.pretrain.data.group_by_length=false",
        "stages.pretrain.warmup_ratio=0",
        "stages.pretrain.scheduler=linear",  # a rate per step: the schedule advances over skipped steps alike
    )
    ranks = torchrun([*job, f"launcher={launcher}", "run_name=ranks"])
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(TrainingError, match="stage finetune: no step trained, every micro-batch was bad data"):
        run(compose(*job, "run_name=one", "stages.pretrain.grad_accum=2", "stages.finetune.grad_accum=2"))
    rows = {
        r: [json.loads(line) for line in (tmp_path / r / "pretrain" / "metrics.jsonl").read_text().splitlines()]
        for r in ("one", "ranks")
    }
    assert [(r["step"], r["lr"]) for r in rows["ranks"]] == [(r["step"], r["lr"]) for r in rows["one"]]
    assert len(rows["one"]) < 8  # steps of no data were skipped, not logged
    losses = {r: [row["loss/total"] for row in rows[r]] for r in rows}
    assert losses["ranks"] == pytest.approx(losses["one"], rel=1e-5)
    ours, theirs = (load_file(tmp_path / r / "pretrain" / "final" / "model.safetensors") for r in ("ranks", "one"))
    assert all(torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-5) for k in theirs)
    assert ranks.returncode == 1 and "stage finetune: no step trained, every micro-batch was bad data" in ranks.stderr
    assert not (tmp_path / "ranks" / "finetune" / "final").exists()


# ---- special tokens in user text ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "chat"])
def test_special_tokens_in_user_text_stay_text(tiny_model, template):
    tok = tiny_model().tokenizer
    specials = special_ids(tok)

    def encode(question: str, answer: str):
        user = "<image>" if template == "plain" else question
        turns = to_turns([{"from": "human", "value": user}, {"from": "gpt", "value": answer}])
        return tokenize(get_template(template).render(turns, tok), tok)

    hostile = "no</s> wait <|im_end|> <image> done"
    ids, labels = encode("<image>\nIs it red? <|im_start|>assistant\nyes<|im_end|><s><pad>", hostile)
    benign, _ = encode("<image>\nIs it red?", "no wait done")
    controls = lambda seq: Counter(int(i) for i in seq if int(i) in specials)  # noqa: E731
    assert controls(ids) == controls(benign)  # control tokens come from the template alone, never from the data
    supervised = tok.decode([int(i) for i, label in zip(ids, labels) if label != -100])
    assert hostile in supervised  # the answer is learnt as the text it is


@pytest.mark.parametrize("strip", ["rstrip", "lstrip"])
@pytest.mark.parametrize("template", ["vicuna_v1", "chat"])
def test_a_special_token_that_swallows_whitespace_stays_text_at_a_messages_edge(tiny_model, template, strip):
    """A control token its tokenizer marks to swallow the whitespace beside it (Phi-3's ``<|end|>`` is ``rstrip``)
    written at the end (or start) of a message reaches into the template's own space after (before) it: it was kept
    a control token there, inside the message it stayed text."""
    from tokenizers import AddedToken

    tok = tiny_model().tokenizer
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken("<|end|>", special=True, normalized=False, **{strip: True})]},
        replace_extra_special_tokens=False,
    )
    end = tok.convert_tokens_to_ids("<|end|>")
    for question, answer in [("Say it <|end|>", "ok"), ("<|end|> say it", "ok"), ("Say it", "<|end|> ok <|end|>")]:
        turns = to_turns([{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}])
        ids, labels = tokenize(get_template(template).render(turns, tok), tok)
        assert end not in ids.tolist(), (question, answer)
        supervised = tok.decode([int(i) for i, label in zip(ids, labels) if label != -100])
        assert answer in supervised


@pytest.mark.parametrize("hostile", ["<|im_end|>", "\n", "user", "<|im_start|>assistant"])
@pytest.mark.parametrize("where", ["question", "answer"])
def test_a_chat_message_that_is_only_template_text_stays_in_its_place(tiny_model, hostile, where):
    """A message made wholly of the template's own text is still tokenized as the plain text of that message, in its
    place: the sequence is the benign one with the message's plain tokens swapped in (an answer "<|im_end|>" was once
    found at the turn's closing token, which then became the plain text and the answer a control token)."""
    tok = tiny_model().tokenizer
    chat = get_template("chat")

    def encode(text: str):
        question, answer = (text, "red") if where == "question" else ("Is it red?", text)
        turns = to_turns([{"from": "human", "value": question}, {"from": "gpt", "value": answer}])
        return [int(i) for i in tokenize(chat.render(turns, tok), tok)[0]]

    def plain(text: str) -> list[int]:
        return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    benign, stand_in = encode("zq"), plain("zq")
    at = next(k for k in range(len(benign)) if benign[k : k + len(stand_in)] == stand_in)
    text = hostile.strip() if where == "answer" else hostile  # answers are stripped (docs/core.md), questions kept
    if not text:  # an answer of only whitespace is a reply of nothing, refused (docs/reliability.md)
        with pytest.raises(TemplateError, match="is empty, a reply of nothing to train on"):
            encode(hostile)
        return
    assert encode(hostile) == benign[:at] + plain(text) + benign[at + len(stand_in) :]


# ---- the smaller ones ---------------------------------------------------------------------------------------------------


def test_run_names_are_plain_folder_names(colour_set, tmp_path):
    base = [*tiny_overrides(colour_set, tmp_path), "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=2"]
    run(compose(*[o for o in base if not o.startswith("run_name")], "run_name=nan"))
    assert (tmp_path / "nan" / "pretrain" / "final").exists()
    with pytest.raises(ValueError, match="run_name='../x' must be a plain folder name"):
        run(compose(*base, "run_name=../x"))


def test_stage_names_are_plain_folder_names(colour_set, tmp_path):
    """A recipe's stage named ``/some/folder`` trained there, and ``resume=never`` moved that folder's files aside;
    ``../x`` was refused for a config key it misread."""
    from omegaconf import open_dict

    from alignlm.checks import check_config

    for name in ("/tmp/elsewhere", "../x", "a.b", ""):
        cfg = compose(*tiny_overrides(colour_set, tmp_path), "run=[pretrain]")
        with open_dict(cfg):
            cfg.stages[name] = cfg.stages.pretrain
        cfg.run = [name]
        with pytest.raises(ValueError, match=f"stage name '{re.escape(name)}' must be a plain folder name"):
            check_config(cfg)
    assert not (tmp_path / "elsewhere").exists()


def test_stop_after_steps_exits_cleanly_with_its_own_status(colour_set, tmp_path, capsys):
    base = [*tiny_overrides(colour_set, tmp_path), "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=4"]
    assert main(["train", *base, "stop_after_steps=2"]) == 75
    assert "stopped after step 2 of 4" in capsys.readouterr().err
    assert main(["train", *base]) == 0
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())["stages"]["pretrain"]
    assert summary["steps"] == 4 and summary["first_loss"] == read_losses(tmp_path / "t" / "pretrain")[0]


# ---- a clean stop, asked for at any point; one run of a name at a time -------------------------------------------------

STOPPED_BEFORE_FINETUNE = "stopped after stage pretrain, before stage finetune (distributed.stop_signal or stop_file)"


@pytest.fixture
def heard_outside() -> list[int]:
    """SIGUSR1's default action ends the process (here: pytest); in its place, a handler that records each signal it
    hears. A run holds a handler of its own from start to end, so this one hears nothing sent during a run: before,
    it heard what came outside a stage's step loop (the signal's default action killed a real run there)."""
    heard: list[int] = []

    def hear(signum: int, frame) -> None:
        heard.append(signum)

    previous = signal.signal(signal.SIGUSR1, hear)
    yield heard
    assert signal.getsignal(signal.SIGUSR1) is hear  # each run handed back the handler it found
    signal.signal(signal.SIGUSR1, previous)


def stop_signal() -> None:
    """SIGUSR1 to this process, as ``kill -USR1`` or ``scancel --signal=USR1`` sends it to a rank."""
    os.kill(os.getpid(), signal.SIGUSR1)


def two_short_stages(colour_set, tmp_path, *extra: str) -> list[str]:
    return [
        *tiny_overrides(colour_set, tmp_path, "eval.sets=[]", "logging.every=1"),
        "stages.pretrain.max_steps=2",
        "stages.finetune.max_steps=2",
        *extra,
    ]


@pytest.mark.parametrize("how", ["signal", "file"])
def test_a_stop_asked_at_a_stages_last_step_stops_before_the_next_stage(
    colour_set, tmp_path, monkeypatch, heard_outside, how
):
    """At stage 1's last step the stop signal was forgotten (stage 2 trained all its steps, exit 0), where the stop
    file stopped after stage 2's first step: both now let stage 1 end, its final/ written, and stop before stage 2
    with exit 75; the stop file is served, and the rerun trains stage 2."""
    base = two_short_stages(colour_set, tmp_path)
    step = Trainer.step

    def asked_at_the_last_step(self, micro, n):
        if self.name == "pretrain" and n == 2:
            stop_signal() if how == "signal" else (tmp_path / "t" / "STOP").touch()
        return step(self, micro, n)

    monkeypatch.setattr(Trainer, "step", asked_at_the_last_step)
    with pytest.raises(StopTraining, match=re.escape(STOPPED_BEFORE_FINETUNE)):
        run(compose(*base))
    assert heard_outside == [] and not (tmp_path / "t" / "STOP").exists()
    assert (tmp_path / "t" / "pretrain" / "final").is_dir() and not (tmp_path / "t" / "finetune").exists()
    monkeypatch.setattr(Trainer, "step", step)
    summary = run(compose(*base))
    assert summary["stages"]["pretrain"]["steps"] == 2 and summary["stages"]["finetune"]["steps"] == 2


@pytest.mark.parametrize("point", ["final", "next_stage_setup", "stop_checkpoint", "evaluation"])
def test_the_stop_signal_never_kills_a_run_and_is_kept_to_the_next_safe_point(
    colour_set, tmp_path, monkeypatch, heard_outside, point
):
    """The signal's handler lived only around a stage's step loop: sent while final/ was written, the next stage set
    up, the stop's own checkpoint written (a second signal) or the run evaluated, it killed the rank (steps since the
    last checkpoint, the checkpoint promised, the evaluation and summary.json lost), and a request before a stage
    began was dropped. Now the write in progress ends whole and the run stops at the next safe point; asked during
    the evaluation, the run's last work, the run finishes."""
    extra = {
        "stop_checkpoint": ["run=[pretrain]", "stages.pretrain.max_steps=4"],
        "evaluation": [f"eval.sets=[{{name:colours,path:{colour_set['test']}}}]", "eval.limit=2"],
    }
    base = two_short_stages(colour_set, tmp_path, *extra.get(point, []))
    where = {
        "final": (ckpt, "save_final"),
        "next_stage_setup": (Trainer, "setup"),
        "stop_checkpoint": (ckpt, "save_training_state"),
        "evaluation": (pipeline, "evaluate_final"),
    }
    owner, name = where[point]
    inner = getattr(owner, name)

    def signalled(*args, **kwargs):
        if point != "next_stage_setup" or args[0].name == "finetune":
            stop_signal()
        return inner(*args, **kwargs)

    monkeypatch.setattr(owner, name, signalled)
    step = Trainer.step

    def asked_at_step_1(self, micro, n):
        if n == 1:
            stop_signal()
        return step(self, micro, n)

    if point == "stop_checkpoint":  # asked at step 1, and again while the stop's checkpoint is written
        monkeypatch.setattr(Trainer, "step", asked_at_step_1)
    if point == "evaluation":
        summary = run(compose(*base))
        assert summary["eval"]["colours"]["n"] == 2
        assert json.loads((tmp_path / "t" / "summary.json").read_text())["eval"] == summary["eval"]
    else:
        stops = {"final": STOPPED_BEFORE_FINETUNE, "next_stage_setup": "stopped after step 1 of 2 ("}
        with pytest.raises(StopTraining, match=re.escape(stops.get(point, "stopped after step 1 of 4 ("))):
            run(compose(*base))
    assert heard_outside == []
    pretrain = tmp_path / "t" / "pretrain"
    if point != "stop_checkpoint":  # written whole, the signal notwithstanding
        assert (pretrain / "final" / "model.safetensors").exists() and not (pretrain / "final.tmp").exists()
    if point in ("next_stage_setup", "stop_checkpoint"):
        (written,) = ckpt.step_dirs(tmp_path / "t" / ("pretrain" if point == "stop_checkpoint" else "finetune"))
        assert written.name == "step_000001" and ckpt.verify(written) is None


def test_a_second_run_of_the_same_name_is_refused_while_the_first_holds_its_lock(colour_set, tmp_path, monkeypatch):
    """A requeued job overlapping the old one trained into the same folder with it: steps logged twice, each deleting
    the other's checkpoint being written. The run's main process locks the run while it runs; a second run is
    refused, naming the holder, before it writes anything. A holder that died let go of the lock with its life."""
    base = [*tiny_overrides(colour_set, tmp_path), "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=1"]
    lock = tmp_path / ".t.lock"
    hold = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
    hold += "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'node7:4242'); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        message = f"run_name=t in output_dir={tmp_path} is in use by another alignlm run (node7:4242), which holds"
        with pytest.raises(ConfigError, match=re.escape(message)):
            run(compose(*base))
        assert not (tmp_path / "t").exists()
    finally:
        holder.kill()  # as a crash, with no chance to let go
        holder.wait()
        holder.stdout.close()
    assert lock.read_text() == "node7:4242"  # a dead process's name: no longer a holder

    def held_while_it_runs(cfg):
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert lock.read_text().startswith(f"{socket.gethostname()}:{os.getpid()}, since ")

    monkeypatch.setattr(pipeline, "run_prepare_steps", held_while_it_runs)
    assert run(compose(*base))["stages"]["pretrain"]["steps"] == 1
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # let go when the run ended
    os.close(fd)


def test_a_stage_summary_is_written_whole_and_an_unreadable_one_is_left_out_with_a_warning(
    colour_set, tmp_path, monkeypatch, caplog
):
    """<stage>/summary.json was written in place after final/: a full disk left it at 0 bytes, and every rerun ended
    with "JSONDecodeError: Expecting value", naming no file. It is written beside and renamed; one that cannot be read
    is left out of the run's summary with a warning naming it, and the rerun goes on."""
    import io

    base = two_short_stages(colour_set, tmp_path)
    real_open = io.open  # what every Path's open and write_text call

    def full_disk(file, mode="r", *args, **kwargs):
        if "summary.json" in Path(file).name and "w" in mode:
            real_open(file, "w").close()  # created or truncated, then the write fails: what ENOSPC leaves
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        run(compose(*base))
    monkeypatch.setattr(io, "open", real_open)
    stage_file = tmp_path / "t" / "pretrain" / "summary.json"
    assert (tmp_path / "t" / "pretrain" / "final").is_dir() and not stage_file.exists()
    stage_file.write_text("")  # as an alignlm that wrote it in place left it
    monkeypatch.setattr(logging.getLogger("alignlm"), "propagate", True)  # a trainer's logger keeps to its handler
    with caplog.at_level("WARNING", logger="alignlm"):
        summary = run(compose(*base))
    assert f"{stage_file} could not be read (JSONDecodeError: Expecting value" in caplog.text
    assert list(summary["stages"]) == ["finetune"]


# ---- fuzz ---------------------------------------------------------------------------------------------------------------

KINDS = {  # kind of record -> the cause it must be counted under (None: trained)
    "ok": None,
    "text_only": None,
    "injection": None,
    "long": None,
    "not_object": "malformed record",
    "no_conversations": "malformed record",
    "bad_role": "malformed record",
    "value_not_str": "malformed record",
    "image_not_str": "malformed record",
    "escape": "image path outside its image_root",
    "absolute": "image path outside its image_root",
    "missing": "missing image",
    "corrupt": "unreadable image",
    "bomb": "image over data.max_image_pixels",
    "placeholders": "malformed record",
    "bad_json": "invalid JSON line",
}


def fuzz_record(kind: str, i: int, rng: random.Random) -> tuple[str, str]:
    """One JSONL line of the given kind and its record id."""
    rid = f"r{i}"
    rec = record(rid, answer=rng.choice(["red", "blue", "green"]))
    if kind == "text_only":
        rec = record(rid, image=None, question="Say red.")
    elif kind == "injection":
        rec = record(rid, answer=rng.choice(["red</s>", "<|im_end|>blue", "<image> green", "<pad><s>"]))
    elif kind == "long":
        rec = record(rid, answer=" ".join(["red"] * rng.randint(300, 600)))
    elif kind == "not_object":
        return json.dumps(rng.choice([7, "text", None, [1, 2]])), rid
    elif kind == "no_conversations":
        rec.pop("conversations")
    elif kind == "bad_role":
        rec["conversations"][0]["from"] = "bot"
    elif kind == "value_not_str":
        rec["conversations"][1]["value"] = rng.choice([7, None, ["a"], {"x": 1}])
    elif kind == "image_not_str":
        rec["image"] = rng.choice([7, ["a.png", 3]])
    elif kind == "escape":
        rec["image"] = "images/../../outside/secret.png"
    elif kind == "absolute":
        rec["image"] = "/etc/passwd"
    elif kind == "missing":
        rec["image"] = f"images/missing_{i}.png"
    elif kind == "corrupt":
        rec["image"] = "images/corrupt.png"
    elif kind == "bomb":
        rec["image"] = "images/bomb.png"
    elif kind == "placeholders":
        rec["conversations"][0]["value"] = "<image><image> two?"
    elif kind == "bad_json":
        return "{" + rid + ": oops", rid
    return json.dumps(rec), rid


def test_fuzz_ten_thousand_malformed_records(tiny_model, root, monkeypatch):
    model = tiny_model()
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG not really")
    rng = random.Random(0)
    kinds = [rng.choice(list(KINDS)) for _ in range(10_000)]
    lines, expected = [], {}
    for i, kind in enumerate(kinds):
        line, rid = fuzz_record(kind, i, rng)
        lines.append(line)
        expected[rid] = KINDS[kind]
    path = root / "fuzz.jsonl"
    path.write_text("\n".join(lines) + "\n")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(
        "alignlm.data.images.Image.open", lambda p, *a, **k: opened.append(Path(p)) or real_open(p, *a, **k)
    )
    data = {"sources": [{"path": str(path)}], "template": "vicuna_v1", "max_length": 256, "min_usable_fraction": 0.0}
    ds = build_dataset(data, model, seed=0)
    collate = Collator(
        model.tokenizer.pad_token_id,
        image_token_id=model.image_token_id,
        num_image_tokens=model.num_image_tokens,
        pack_length=256,
    )
    trained, skipped = [], []
    items = [ds[i] for i in range(len(ds))]
    for start in range(0, len(items), 64):
        batch = collate(items[start : start + 64])
        trained += batch["ids"]
        skipped += batch["skipped"]
    counted = dict(ds.report.counts)
    for s in skipped:
        counted[s.cause] = counted.get(s.cause, 0) + 1
    assert len(trained) + sum(counted.values()) == 10_000  # every record trained or counted, once
    assert sorted(trained) == sorted(r for r, c in expected.items() if c is None)
    want: dict[str, int] = {}
    for cause in expected.values():
        if cause is not None:
            want[cause] = want.get(cause, 0) + 1
    assert counted == want
    images_root = root.resolve()
    assert opened and all(p.resolve().is_relative_to(images_root) for p in opened)  # nothing outside the root opened


def test_one_process_trains_the_good_micro_batches_of_a_step_and_its_schedule_ends(tmp_path):
    """grad_accum 2, one sample per micro-batch, every other image missing: a step with one bad micro-batch trained
    nothing on one process (two processes trained the other), and skipped steps never advanced the schedule."""
    from alignlm.pipeline import run
    from tests.conftest import compose, edited_colour_set, pretrain_on

    def edit(records: list[dict]) -> None:
        for r in records[::2]:
            r["image"] = "images/missing.png"

    sets = edited_colour_set(tmp_path / "d", edit)
    summary = run(
        compose(
            *pretrain_on(sets, tmp_path),
            "eval.sets=[]",
            "mixed_precision=no",
            "stages.pretrain.max_steps=4",
            "stages.pretrain.per_device_batch_size=1",
            "stages.pretrain.grad_accum=2",
            "stages.pretrain.warmup_ratio=0",
            "stages.pretrain.scheduler=linear",
            "stages.pretrain.save_every=0",
            "logging.every=1",
            "stages.pretrain.data.group_by_length=false",
        )  # fmt: skip
    )
    rows = [json.loads(r) for r in (tmp_path / "t" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    # 4 good samples over 4 steps of 2 micro-batches: every step with one trains (the old code trained 1 step of 4)
    assert summary["stages"]["pretrain"]["skipped"] == 4 and len(rows) >= 3
    # the schedule advanced on the skipped steps: the last update ran at its last step's rate, a quarter of the peak
    assert rows[-1]["step"] == 4 and rows[-1]["lr"] == pytest.approx(1e-3 / 4)


def test_resume_never_sets_an_earlier_runs_checkpoints_aside(colour_set, tmp_path):
    """A new run (resume=never) in a stage folder holding a longer run's step_6 and step_8 wrote step_2, which pruning
    by name deleted at once; a later resume=auto would then have resumed from the old run."""

    def go(*extra: str) -> None:
        run(compose(*tiny_overrides(colour_set, tmp_path, "run=[pretrain]", "eval.sets=[]", *extra)))

    stage = tmp_path / "t" / "pretrain"
    go("stages.pretrain.max_steps=10", "stages.pretrain.save_every=2", "stages.pretrain.keep_last=2")
    assert [p.name for p in ckpt.step_dirs(stage)] == ["step_000006", "step_000008"]
    go("resume=never", "stages.pretrain.max_steps=6", "stages.pretrain.save_every=2", "stages.pretrain.keep_last=2")
    assert [p.name for p in ckpt.step_dirs(stage)] == ["step_000002", "step_000004"]
    (aside,) = stage.glob("before-*")
    assert [p.name for p in ckpt.step_dirs(aside)] == ["step_000006", "step_000008"]  # nothing deleted


def test_an_interrupted_resume_never_run_is_finished_by_resume_auto_not_taken_for_the_old_one(colour_set, tmp_path):
    """resume=never moved only the step checkpoints aside: interrupted, it left the old run's final/ and figures of
    every stage, which a rerun with resume=auto took for the stages finished (the old weights went on to evaluation),
    and its metrics.jsonl cut the old one to nothing. Now every stage's earlier outputs move aside before any trains."""
    out = tmp_path / "t"
    base = tiny_overrides(colour_set, tmp_path, "eval.sets=[]")
    run(compose(*base))
    old = {s: load_file(str(out / s / "final" / "model.safetensors")) for s in ("pretrain", "finetune")}
    new_lr = "stages.pretrain.lr.connector=5e-2"
    with pytest.raises(StopTraining, match="after step 3 of 6"):
        run(compose(*base, "resume=never", new_lr, "stop_after_steps=3"))
    for stage, left in (("pretrain", ["checkpoints", "config.yaml", "metrics.jsonl"]), ("finetune", [])):
        (aside,) = (out / stage).glob("before-*")
        assert sorted(p.name for p in (out / stage).iterdir() if p != aside) == left
        assert {"final", "metrics.jsonl", "summary.json"} <= {p.name for p in aside.iterdir()}
        assert len(read_losses(aside)) == {"pretrain": 6, "finetune": 4}[stage]  # the old figures, whole
    summary = run(compose(*base, new_lr))  # resume=auto finishes the new run
    assert summary["stages"]["pretrain"]["steps"] == 6 and summary["stages"]["finetune"]["steps"] == 4
    assert {r["lr"] for r in map(json.loads, (out / "pretrain" / "metrics.jsonl").read_text().splitlines())} >= {5e-2}
    for stage, weights in old.items():
        new = load_file(str(out / stage / "final" / "model.safetensors"))
        assert not all(torch.equal(weights[k], new[k]) for k in weights), stage


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    """After a resume past a damaged newer checkpoint, pruning by name kept the damaged one and deleted the new one."""
    from alignlm.training import checkpoint as ckpt

    for step in (10, 15, 20):
        (tmp_path / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    ckpt.prune(tmp_path, 1, tmp_path / "checkpoints" / "step_000015")
    assert [p.name for p in ckpt.step_dirs(tmp_path)] == ["step_000015"]
    (tmp_path / "checkpoints" / "step_000020").mkdir()
    ckpt.prune(tmp_path, 2, tmp_path / "checkpoints" / "step_000020")
    assert [p.name for p in ckpt.step_dirs(tmp_path)] == ["step_000015", "step_000020"]


def test_a_skipped_fp16_step_still_updates_the_gradient_scaler():
    """Under fp16 a non-finite step skipped optimizer.step(), so the scaler never updated: its next unscale_() raised
    "unscale_() has already been called on this optimizer since the last update()" and the scale never backed off."""
    import types

    from alignlm.training.trainer import Trainer

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    trainer = types.SimpleNamespace(optimizer=optimizer, acc=types.SimpleNamespace(scaler=scaler))
    for _ in range(2):
        scaler.scale((weight * float("inf")).sum()).backward()
        scaler.unscale_(optimizer)  # what accelerate's unscale_gradients does before clipping
        Trainer.optimizer_step(trainer, torch.tensor(False), torch.tensor(True))
        optimizer.zero_grad()
    assert scaler.get_scale() == 2.0**14 and torch.equal(weight.detach(), torch.ones(3))  # backed off twice, untouched


def test_a_step_where_no_rank_had_data_leaves_the_fp16_scale_as_one_process_does():
    """One process skips a step of only bad data before unscaling; ranks that ran stand-ins unscaled their zero
    gradients and must update the scaler, but not count the step towards its growth (at growth_interval=1 an ordinary
    update doubles the scale) nor update a weight."""
    import types

    from alignlm.training.trainer import Trainer

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1)
    trainer = types.SimpleNamespace(optimizer=optimizer, acc=types.SimpleNamespace(scaler=scaler))
    for _ in range(2):  # the second unscale_ raises unless the first step updated the scaler
        scaler.scale((weight * 0.0).sum()).backward()
        scaler.unscale_(optimizer)
        Trainer.optimizer_step(trainer, torch.tensor(True), torch.tensor(False))
        optimizer.zero_grad()
    assert scaler.get_scale() == 2.0**16 and torch.equal(weight.detach(), torch.ones(3)) and not optimizer.state


def test_a_loss_scaler_backing_off_is_logged_and_not_counted_as_divergence(colour_set, tmp_path, alignlm_log):
    """fp16's loss scaler overflows the gradient by design now and then and halves its scale: each back-off was counted
    as a non-finite step, so nonfinite.stop_after of them stopped a healthy fp16 run. A non-finite loss still counts.
    fp16 itself is refused on the CPU: the accelerator gets a GradScaler as accelerate's fp16 mode sets one up."""
    from accelerate.optimizer import AcceleratedOptimizer

    from alignlm.pipeline import make_accelerator
    from alignlm.training.trainer import Trainer

    cfg = compose(*tiny_overrides(colour_set, tmp_path), "nonfinite.stop_after=1", "stages.pretrain.grad_accum=1")
    trainer = Trainer(cfg, "pretrain", make_accelerator(cfg))
    trainer.setup()
    inner = trainer.optimizer.optimizer
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # fp32 gradients overflow as fp16's do at 2**16
    trainer.optimizer = AcceleratedOptimizer(inner, device_placement=False, scaler=scaler)
    trainer.acc.scaler, trainer.acc.unscale_gradients = scaler, lambda optimizer=None: scaler.unscale_(inner)
    batches = iter(trainer.loader())
    logs = [trainer.step([next(batches)], 1)]  # overflows: the scaler backs off, nothing is updated
    scaler.update(1.0)  # a scale the gradients fit in
    logs.append(trainer.step([next(batches)], 2))
    with torch.no_grad():
        next(p for p in trainer.core().parameters() if p.requires_grad).fill_(float("nan"))
    logs.append(trainer.step([next(batches)], 3))  # a non-finite loss: divergence, as without a scaler
    rows = {step: row for step, row, *_ in trainer.fetch(logs)}
    assert [rows[s].get("nonfinite", False) for s in (1, 2, 3)] == [False, False, True]
    assert [rows[s]["scaler/overflow"] for s in (1, 2, 3)] == [1.0, 0.0, 0.0]
    assert rows[1]["loss/total"] is not None and rows[1]["grad_norm"] is None and trainer.nonfinite == [3]
    assert not [r for r in alignlm_log.records if "was not finite at step" in r.getMessage()]  # its ordinary work
    with pytest.raises(TrainingError, match=r"\(steps \[3\]\)"):
        trainer.check_divergence(0)  # the skipped steps fetched after step 0


def test_a_resumed_fp16_run_keeps_its_loss_scale(colour_set, tmp_path, caplog, monkeypatch):
    """fp16's loss scaler was not in step checkpoints: a resumed run started from a fresh scale, which overflowed and
    skipped the step the uninterrupted run took. Now its scale and growth count resume with the step; a checkpoint
    written before resumes with a fresh scaler, as it did, and a warning says so. fp16 itself is refused on the CPU:
    the accelerator gets a GradScaler as accelerate's fp16 mode sets one up, before the trainer prepares it."""
    from alignlm.pipeline import make_accelerator
    from alignlm.training.throughput import Meter
    from alignlm.training.trainer import Trainer

    def trainer(name: str) -> Trainer:
        cfg = compose(
            *tiny_overrides(colour_set, tmp_path, f"run_name={name}", "run=[pretrain]", "nonfinite.stop_after=0")
        )
        acc = make_accelerator(cfg)
        # fp32 gradients overflow at 2**127 as fp16's do at 2**16; one back-off brings the scale to 2**27, where they fit
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
        t = Trainer(cfg, "pretrain", acc)
        acc.unscale_gradients = lambda optimizer=None: acc.scaler.unscale_(t.optimizer.optimizer)
        t.setup()
        t.meter = Meter(earlier=None)
        t.clock = t.meter.start
        return t

    def step(t: Trainer, batches, n: int) -> tuple[float, float]:
        ((_, row, *_),) = t.fetch([t.step([next(batches)], n)])
        return row["loss/total"], row["scaler/overflow"]

    first = trainer("a")
    batches = iter(first.loader())
    assert [step(first, batches, n)[1] for n in (1, 2)] == [1.0, 0.0]  # step 1 backs the scale off
    first.save_checkpoint(2)
    uninterrupted = step(first, batches, 3)
    resumed = trainer("a")
    assert resumed.start_step == 2 and resumed.acc.scaler.get_scale() == first.acc.scaler.get_scale() == 2.0**27
    assert step(resumed, iter(resumed.loader()), 3) == uninterrupted  # not another overflow
    folder = ckpt.step_dirs(tmp_path / "a" / "pretrain")[-1]
    for name in (ckpt.SCALER_FILE, ckpt.MANIFEST):  # as an earlier alignlm wrote it
        (folder / name).unlink()
    ckpt.write_manifest(folder)
    monkeypatch.setattr(logging.getLogger("alignlm"), "propagate", True)  # its own handler keeps it from caplog's
    with caplog.at_level("WARNING", logger="alignlm"):
        older = trainer("a")
    assert older.start_step == 2 and older.acc.scaler.get_scale() == 2.0**127
    assert "holds no loss scaler state" in caplog.text


# ---- weights that do not fit the model, and a metrics row cut short ---------------------------------------------------


def test_weights_of_another_shape_or_kind_or_not_finite_are_refused_naming_them(final_dir, tiny_model):
    """``copy_`` broadcast a checkpoint's tensor over the model's: a [32] row filled every row of a [64, 32] weight, a
    1-expert MoE connector loaded as 4 identical experts, integers and booleans became weights, and inf passed."""
    from alignlm.models.io import load_part_state, part_state

    weights = final_dir / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(weights))
    name = "connector.proj.0.weight"
    rows, cols = state[name].shape
    inf = state[name].clone()
    inf[0, 0] = float("inf")
    where = f"weight {re.escape(name)} of {re.escape(str(weights))}"
    for value, match in (
        (torch.randn(cols), rf"{where} has shape \[{cols}\] where the model's is \[{rows}, {cols}\] \(was it built"),
        (torch.ones(1, cols), rf"{where} has shape \[1, {cols}\] where the model's is \[{rows}, {cols}\]"),
        (torch.ones(rows, cols, dtype=torch.int64), f"{where} is torch.int64 where the model's is torch.float32"),
        (torch.ones(rows, cols, dtype=torch.bool), f"{where} is torch.bool where the model's is torch.float32"),
        (inf, rf"checkpoint weights hold inf: \['{re.escape(name)}'\] \(1 tensors of {re.escape(str(weights))}\)"),
    ):
        save_file({**state, name: value}, str(weights), metadata=metadata)
        with pytest.raises(ValueError, match=match):
            load_model(final_dir)
    one, four = (
        tiny_model("model/connector=moe", f"model.connector.num_experts={n}", "model.connector.top_k=1") for n in (1, 4)
    )
    router = four.connector.router.weight.clone()
    with pytest.raises(ValueError, match=r"weight connector\.\w+ of the checkpoint has shape \[1, .*model's is \[4, "):
        load_part_state(four, part_state(one, ["connector"]), ["connector"])
    assert torch.equal(four.connector.router.weight, router)  # nothing was loaded


def test_a_metrics_row_cut_short_is_left_out_on_resume_with_a_warning(tmp_path, caplog, monkeypatch):
    """A node lost mid-write leaves the last row of metrics.jsonl cut short: the resumed run failed at start with a
    JSONDecodeError naming no file. The cut row is left out, named in a warning; a bad row elsewhere is an error."""
    import logging

    from alignlm.training.logging import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": step, "loss/total": 1.0 / step} for step in (1, 2, 3)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 4, "loss/to')
    monkeypatch.setattr(logging.getLogger("alignlm"), "propagate", True)  # a trainer's logger keeps to its own handler
    with caplog.at_level("WARNING", logger="alignlm"):
        metrics = MetricsLogger(path, None, "t", {}, enabled=True, start_step=2)  # resumed from step 2's checkpoint
    metrics.log({"loss/total": 0.25}, step=3)
    metrics.close()
    assert f"{path}:4: the last row was cut short" in caplog.text
    assert [json.loads(line) for line in path.read_text().splitlines()] == [*rows[:2], {"step": 3, "loss/total": 0.25}]

    from alignlm.training.logging import read_rows

    assert read_rows(tmp_path / "none.jsonl") == []
    # a row damaged before the tail a resume reads: a stage's end, eval and plots leave it out, not end what trained
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with caplog.at_level("WARNING", logger="alignlm"):
        assert read_rows(path) == [{"step": 1}, {"step": 3}]
    assert f"{path}:2: not a JSON object" in caplog.text
    # rows that carriage returns alone separate read as one cut-short row: refused, not cut away
    path.write_bytes(b'{"step": 1}\r{"step": 2}\r{"step": 3}\r')
    with pytest.raises(ValueError, match=":1: not a JSON object"):
        MetricsLogger(path, None, "t", {}, enabled=True, start_step=2)
    assert path.read_bytes() == b'{"step": 1}\r{"step": 2}\r{"step": 3}\r'


def test_a_resume_reads_only_the_tail_of_metrics_jsonl_and_cuts_it_there(tmp_path, monkeypatch):
    """Each resume parsed and rewrote the whole file: about 10 s and 1 GB of the main process at 500k logged steps,
    at every requeue. The rows are in step order: it reads back from the end to the checkpoint's step and cuts."""
    from alignlm.training import logging as metrics_log

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": step, "loss/total": 1.0}) + "\n" for step in range(1, 20_001)))
    head = path.read_bytes()[: path.stat().st_size // 2]
    parsed = []
    loads = json.loads
    monkeypatch.setattr(metrics_log.json, "loads", lambda text, **k: parsed.append(text) or loads(text, **k))
    metrics_log._drop_rows_after(path, 19_990)
    monkeypatch.undo()
    assert len(parsed) == 11 and path.read_bytes().startswith(head)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == list(range(1, 19_991))
    path.write_text('{"step": 1}\n{"step": 2}')  # a row kept last that ends the file without its line break
    metrics_log._drop_rows_after(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def _start_and_sleep(started) -> None:
    import time

    started.set()
    time.sleep(30)


def test_a_run_into_a_folder_it_cannot_write_or_on_a_full_disk_is_refused_before_it_starts(
    colour_set, tmp_path, capsys
):
    """A read-only output_dir had only warned that the lock could not be taken, and the run built its sets, prepare
    steps and model before its first log failed. A full disk while the lock's holder was written left the lock held
    by its own descriptor: the same process's next run was refused as if another held it. Both are one line, exit
    status 1 (no config mistake), before anything is written."""
    from unittest import mock

    from alignlm.commands import console

    base = [*tiny_overrides(colour_set, tmp_path), "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=1"]
    with mock.patch.object(pipeline.os, "access", lambda path, mode: Path(path) != tmp_path):
        assert console(["train", *base]) == 1
    said = f"cannot be taken in output_dir={tmp_path}: {tmp_path}: cannot be written (a read-only file system, or no"
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1 and not (tmp_path / "t").exists()

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    with mock.patch.object(os, "write", full), pytest.raises(OSError) as e:
        pipeline.lock_run(tmp_path, "t")
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(pipeline.run_lock_file(tmp_path, "t")))
    pipeline.unlock_run(pipeline.lock_run(tmp_path, "t"))  # the lock went with the failed try


def test_a_stage_folder_removed_while_it_trains_is_said_and_the_rerun_says_what_is_lost(
    colour_set, tmp_path, monkeypatch, alignlm_log
):
    """The stage's folder removed mid-stage: the run logged on into the unlinked metrics.jsonl, the next checkpoint
    recreated the folder, and the stage ended as "no step trained, every micro-batch was bad data"; the rerun resumed
    without a word and its summary covered the resumed steps only."""
    import shutil

    base = [*tiny_overrides(colour_set, tmp_path), "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=6"]
    base += ["stages.pretrain.save_every=2"]
    stage = tmp_path / "t" / "pretrain"
    step = Trainer.step

    def removed_at_step_3(self, batches, n):
        if n == 3:
            shutil.rmtree(stage)
        return step(self, batches, n)

    monkeypatch.setattr(Trainer, "step", removed_at_step_3)
    with pytest.raises(TrainingError, match=r"its log .*metrics.jsonl is gone: was the stage's folder removed or"):
        run(compose(*base))
    monkeypatch.undo()
    assert [p.name for p in (stage / "checkpoints").iterdir()] == ["step_000004"] and not (stage / "final").exists()
    run(compose(*base))
    assert f"resuming at step 4, but {stage / 'metrics.jsonl'} is gone" in alignlm_log.text


def test_a_run_lock_is_not_held_by_the_processes_the_run_forked(tmp_path):
    """A data-loader worker forked during the run shared the lock: kept alive after the run (by the traceback a
    notebook keeps), it held it, and the rerun in that notebook was refused, naming its own process."""
    import multiprocessing

    from alignlm.pipeline import lock_run, unlock_run

    fd = lock_run(tmp_path, "t")
    fork = multiprocessing.get_context("fork")
    started = fork.Event()
    worker = fork.Process(target=_start_and_sleep, args=(started,))
    worker.start()
    try:
        assert started.wait(30)
        unlock_run(fd)  # the run ended; its worker lives on
        again = lock_run(tmp_path, "t")
        assert again is not None
        unlock_run(again)
    finally:
        worker.kill()
        worker.join()


def test_a_run_lock_in_a_folder_or_file_this_user_cannot_write_is_taken_read_only_or_skipped(tmp_path, monkeypatch):
    """The lock was created 0644 whatever the umask, and a lock file or folder this user cannot write (a team's shared
    folder, a run folder an admin made) ended the run with a PermissionError traceback, where every other file of the
    run let it resume. A lock file of another user is locked read-only (flock needs no write access); a folder where
    none can be made runs unlocked, with a warning."""
    fd = pipeline.lock_run(tmp_path, "t")
    pipeline.unlock_run(fd)
    lock = pipeline.run_lock_file(tmp_path, "t")
    umask = os.umask(0)
    os.umask(umask)
    assert lock.stat().st_mode & 0o777 == 0o666 & ~umask
    opened = os.open

    def no_write(path, flags, *args):
        if str(path).endswith(".lock") and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return opened(path, flags, *args)

    monkeypatch.setattr(pipeline.os, "open", no_write)
    fd = pipeline.lock_run(tmp_path, "t")  # another user's lock file: taken read-only ...
    try:
        with pytest.raises(ConfigError, match="in use by another alignlm run"):  # ... and it still refuses a second
            pipeline.lock_run(tmp_path, "t")
    finally:
        pipeline.unlock_run(fd)
    assert pipeline.lock_run(tmp_path, "u") is None  # no lock file there, none can be made: unlocked


def test_a_run_whose_own_folder_is_read_only_is_refused_though_its_output_dir_is_writable(tmp_path):
    """A rerun writes into ``output_dir/run_name`` (its checkpoints, its logs): that folder read-only (copied back
    from an archive) is refused before the run starts, though the folder above it can be written."""
    from unittest import mock

    (tmp_path / "t").mkdir()
    with mock.patch.object(pipeline.os, "access", lambda path, mode: Path(path) != tmp_path / "t"):
        with pytest.raises(OSError, match="cannot be written") as e:
            pipeline.lock_run(tmp_path, "t")
    assert e.value.filename == str(tmp_path / "t")


@pytest.mark.parametrize("ranks", [2, 4])
def test_every_rank_of_a_multi_rank_run_learns_the_lock_refusal(tmp_path, monkeypatch, ranks):
    """A rank that is not the main process learns the main process's refusal by a broadcast at any world size above
    one: without it, it went on to wait at a collective for a main process that had gone."""
    from types import SimpleNamespace

    said = []
    monkeypatch.setattr(pipeline, "broadcast_object_list", lambda objs: said.append(objs) or [("config", "in use")])
    acc = SimpleNamespace(is_main_process=False, num_processes=ranks)
    with pytest.raises(ConfigError, match="in use"), pipeline.run_lock(tmp_path, "t", acc):
        pass
    assert said == [[None]]
