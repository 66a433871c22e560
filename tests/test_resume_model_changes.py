"""A step-checkpoint resume compares the model settings and the files they load, as a finished stage does.

A resume compared the stage's settings, seed, precision and file digests but never the ``model`` settings: a
changed ``model.connector.router_lr_scale`` was neither refused nor applied (the restored optimizer kept the router
group's old rate), and ``model.visual_token_norm``, ``model.init_seed`` or a loss weight changed without a word. Nor
did it notice new weights in the local folder a frozen part loads from, which a step checkpoint does not hold. Each
step checkpoint's recipe now holds both (``checkpoint.step_recipe``), compared as a finished stage's are; a change is
refused unless ``resume_allow_changes=true``, which applies this run's values, the optimizer groups' rates among
them. A checkpoint written before they were recorded is compared without them (docs/reliability.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from alignlm.pipeline import run
from alignlm.training import checkpoint as ckpt
from alignlm.training.logging import read_rows
from alignlm.training.trainer import StopTraining
from tests.conftest import compose, tiny_overrides
from tests.test_finished_stage import own_data, pretrain_only
from tests.test_frozen_sources import copy_again, local_llm, save_llm


def edit_recipe(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``edit`` to the recipe of the step checkpoint ``folder``, as an older version would have written it."""
    state_file = folder / "trainer_state.json"
    state = json.loads(state_file.read_text())
    edit(state["recipe"])
    state_file.write_text(json.dumps(state, indent=2))
    (folder / ckpt.MANIFEST).unlink()  # the manifest lists the files beside it, not itself
    ckpt.write_manifest(folder)


def forget_model(folder: Path) -> None:
    """Make ``folder`` a step checkpoint as written before its recipe held the model settings and files."""

    def forget(recipe: dict[str, Any]) -> None:
        for key in (ckpt.MODEL_SETTINGS, ckpt.MODEL_FILES):
            del recipe[key]

    edit_recipe(folder, forget)


def stopped_at_step_two(colour_set: dict[str, Path], tmp_path: Path) -> tuple[Path, list[str]]:
    """A 4-step pretraining whose frozen LLM loads from the local folder ``<tmp_path>/llm``, stopped after step 2;
    returns the folder and the run's overrides."""
    llm = tmp_path / "llm"
    save_llm(llm, 0)
    base = tiny_overrides(colour_set, tmp_path, "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=4")
    base += local_llm(llm)
    with pytest.raises(StopTraining):
        run(compose(*base, "stop_after_steps=2"))
    return llm, base


def test_a_model_setting_changed_on_resume_is_refused_naming_it_or_applied_to_the_optimizer(
    colour_set, tmp_path, alignlm_log
):
    data = own_data(colour_set, tmp_path)
    base = pretrain_only(
        colour_set,
        tmp_path,
        data,
        "model/connector=moe",
        "stages.pretrain.max_steps=4",
        "stages.pretrain.scheduler=constant",
        "stages.pretrain.warmup_ratio=0",
        "logging.every=1",
    )
    with pytest.raises(StopTraining):
        run(compose(*base, "stop_after_steps=2"))
    slower = "model.connector.router_lr_scale=0.1"
    with pytest.raises(ValueError) as refused:
        run(compose(*base, slower))
    message = str(refused.value)
    assert "was written with model.connector.router_lr_scale=1.0" in message
    assert "this run has model.connector.router_lr_scale=0.1" in message and "resume_allow_changes=true" in message
    with pytest.raises(ValueError, match=r"model\.visual_token_norm=None, this run has model\.visual_token_norm=1\.0"):
        run(compose(*base, "model.visual_token_norm=1.0"))

    run(compose(*base, slower, "resume_allow_changes=true"))  # this run's router rate from the resumed step on
    rows = read_rows(tmp_path / "t" / "pretrain" / "metrics.jsonl")
    rates = {row["step"]: (row["lr/connector"], row["lr/connector.router"]) for row in rows}
    assert rates[2] == pytest.approx((1e-3, 1e-3))
    assert rates[3] == pytest.approx((1e-3, 1e-4)) and rates[4] == pytest.approx((1e-3, 1e-4))
    assert "model.connector.router_lr_scale: 1.0 -> 0.1" in alignlm_log.text


def test_a_step_checkpoint_written_before_model_settings_were_recorded_resumes_without_them(colour_set, tmp_path):
    data = own_data(colour_set, tmp_path)
    base = pretrain_only(colour_set, tmp_path, data, "stages.pretrain.max_steps=4")
    with pytest.raises(StopTraining):
        run(compose(*base, "stop_after_steps=2"))
    with pytest.raises(ValueError, match=r"model\.init_seed=0, this run has model\.init_seed=7"):
        run(compose(*base, "model.init_seed=7"))
    forget_model(tmp_path / "t" / "pretrain" / "checkpoints" / "step_000002")
    run(compose(*base, "model.init_seed=7"))  # nothing recorded to compare: resumed as before
    assert (tmp_path / "t" / "pretrain" / "final" / "model.safetensors").exists()


def test_a_resume_after_the_frozen_llm_folder_changed_is_refused_naming_it_or_allowed(
    colour_set, tmp_path, alignlm_log, monkeypatch
):
    llm = tmp_path / "llm"
    save_llm(llm, 0)
    monkeypatch.chdir(tmp_path)
    stage = ["run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=6"]
    base = tiny_overrides(colour_set, tmp_path, *stage, *local_llm(llm))
    with pytest.raises(StopTraining):
        run(compose(*base, "stop_after_steps=2"))
    copy_again(llm)  # the same bytes under new times (cp -r to node-local disk at a requeue) are no change, nor is
    with pytest.raises(StopTraining):  # the same folder spelled otherwise
        run(compose(*base, "model.llm.name_or_path=./llm", "stop_after_steps=2"))

    save_llm(llm, 1)  # new weights where the frozen LLM is rebuilt from
    with pytest.raises(ValueError) as refused:
        run(compose(*base))
    message = str(refused.value)
    assert f"written from other files: model.llm.name_or_path ({llm}): its files changed since" in message
    assert "resume_allow_changes=true" in message

    run(compose(*base, "resume_allow_changes=true"))  # goes on with the new weights, naming them
    assert (tmp_path / "t" / "pretrain" / "final" / "model.safetensors").exists()
    assert f"model.llm.name_or_path ({llm}): its files changed since" in alignlm_log.text


def test_a_step_checkpoint_without_recorded_model_files_is_compared_without_them(colour_set, tmp_path):
    llm, base = stopped_at_step_two(colour_set, tmp_path)
    forget_model(tmp_path / "t" / "pretrain" / "checkpoints" / "step_000002")
    save_llm(llm, 1)
    run(compose(*base))  # written before the files were recorded: resumed as before
    assert (tmp_path / "t" / "pretrain" / "final" / "model.safetensors").exists()


def test_the_attention_kernel_is_no_change_of_model_setting():
    """flash-attention on one machine, SDPA on the next: a resume or a finished stage is not refused for it."""
    from alignlm.training.checkpoint import model_setting_changes

    theirs = {"llm": {"attn_implementation": "flash_attention_2", "hidden_size": 64}}
    ours = {"llm": {"attn_implementation": "sdpa", "hidden_size": 64}}
    assert model_setting_changes(theirs, ours) == {}
    assert model_setting_changes(theirs, {"llm": {"attn_implementation": "sdpa", "hidden_size": 32}}) == {
        "model.llm.hidden_size": (64, 32)
    }


def test_a_setting_one_side_lacks_is_compared_as_its_builders_default():
    """A tower config without ``weights`` builds with its pretrained weights (the parameter's default), one with
    ``weights: null`` a random tower: reading every absent key as null called them the same, and a resume went on
    with another tower under the connector."""
    tower = "alignlm.models.vision.EfficientNetLiteTower"
    lacking = {"vision": {"_target_": tower}, "init_seed": 0}
    assert ckpt.model_setting_changes(lacking, {"vision": {"_target_": tower, "weights": None}, "init_seed": 0}) == {
        "model.vision.weights": ("(not set)", None)
    }
    assert (
        ckpt.model_setting_changes(lacking, {"vision": {"_target_": tower, "weights": "package"}, "init_seed": 0}) == {}
    )
    assert ckpt.model_setting_changes({"init_seed": 0}, {"init_seed": 0, "visual_token_norm": None}) == {}


def test_a_model_setting_added_since_the_checkpoint_at_its_null_default_is_no_change(colour_set, tmp_path):
    """A checkpoint written before a model setting existed lacks the key; the setting at its default (null) is what
    the code without it did. Every resume of such a checkpoint was refused (``(not set)`` against ``None``), so each
    new model setting would have refused every run in flight; one set to a value is still refused."""
    data = own_data(colour_set, tmp_path)
    base = pretrain_only(colour_set, tmp_path, data, "stages.pretrain.max_steps=4")
    with pytest.raises(StopTraining):
        run(compose(*base, "stop_after_steps=2"))
    dropped = []
    edit_recipe(
        tmp_path / "t" / "pretrain" / "checkpoints" / "step_000002",
        lambda recipe: dropped.append(recipe[ckpt.MODEL_SETTINGS].pop("visual_token_norm", "absent")),
    )
    assert dropped == [None]
    with pytest.raises(
        ValueError, match=r"model\.visual_token_norm=\(not set\), this run has model\.visual_token_norm"
    ):
        run(compose(*base, "model.visual_token_norm=1.0"))
    run(compose(*base))
    assert (tmp_path / "t" / "pretrain" / "final").is_dir()


def test_a_copy_of_the_frozen_llm_folder_against_a_record_without_digests_is_called_rewritten(colour_set, tmp_path):
    """A step checkpoint written before model stamps held digests compares modification times, as it did: refused,
    but not said to hold other weights."""
    llm, base = stopped_at_step_two(colour_set, tmp_path)

    def without_digests(recipe: dict[str, Any]) -> None:
        for source in recipe[ckpt.MODEL_FILES].values():
            source["files"] = [stamp[:3] for stamp in source["files"]]  # [name, bytes, modification time]

    edit_recipe(tmp_path / "t" / "pretrain" / "checkpoints" / "step_000002", without_digests)
    copy_again(llm)
    with pytest.raises(ValueError) as refused:
        run(compose(*base))
    assert (
        f"model.llm.name_or_path ({llm}): its files were rewritten (same sizes, other modification times; this record "
        "holds no digests to compare)" in str(refused.value)
    )
