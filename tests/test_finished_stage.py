"""A finished stage is skipped only when it was trained from this run's settings and files (docs/reliability.md).

With resume=auto a stage whose final/ existed was skipped whatever had changed since it trained: a new learning rate,
a data file or a prepare step's file rewritten at the same path. The old weights went on to the next stages and the
evaluation with one info line. Now final/ records what the stage was trained from (trained_from.json), a rerun that
differs is refused before anything trains, naming each change, and a step checkpoint's recipe holds the files'
digests too. The record names the weights the stage started from (a later stage kept after the earlier one it trained
from was retrained had passed on stale weights), and a path spelled otherwise (relative, absolute) is no change.
"""

from __future__ import annotations

import json
import os
import shutil
from hashlib import sha256
from pathlib import Path

import pytest
import torch

from alignlm.config import ConfigError
from alignlm.pipeline import run
from alignlm.training import checkpoint as ckpt
from alignlm.training.trainer import StopTraining
from tests.conftest import compose, tiny_overrides, write_colour_set


def own_data(colour_set: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the pretraining captions that the test may rewrite (the colour set is shared by the session)."""
    data = tmp_path / "data" / "pretrain.json"
    data.parent.mkdir()
    shutil.copy(colour_set["pretrain"], data)
    return data


def pretrain_only(colour_set: dict[str, Path], tmp_path: Path, data: Path, *extra: str) -> list[str]:
    """A 2-step pretraining stage alone, on ``data`` with the colour set's images, no evaluation."""
    images = colour_set["pretrain"].parent
    return tiny_overrides(
        colour_set,
        tmp_path,
        "run=[pretrain]",
        "eval.sets=[]",
        "stages.pretrain.max_steps=2",
        f"stages.pretrain.data.sources=[{{path:{data},image_root:{images}}}]",
        *extra,
    )


def weights_stamp(final: Path) -> tuple[int, int]:
    """The inode and modification time of a final/'s weights: a retrained stage writes a new file."""
    stat = (final / "model.safetensors").stat()
    return stat.st_ino, stat.st_mtime_ns


def test_a_finished_stage_with_a_changed_setting_is_refused_or_kept_on_request_and_an_unchanged_one_skipped(
    colour_set, tmp_path, alignlm_log
):
    data = own_data(colour_set, tmp_path)
    base = pretrain_only(colour_set, tmp_path, data)
    final = tmp_path / "t" / "pretrain" / "final"
    run(compose(*base))
    stamp = weights_stamp(final)

    summary = run(compose(*base))  # (c) the same settings and files: skipped, not retrained
    assert weights_stamp(final) == stamp and summary["stages"]["pretrain"]["steps"] == 2
    assert "trained from other" not in alignlm_log.text

    new_lr = "stages.pretrain.lr.connector=5e-2"
    with pytest.raises(ConfigError) as refused:
        run(compose(*base, new_lr))
    message = str(refused.value)
    assert "stage pretrain" in message and "stages.pretrain.lr.connector: 0.001 -> 0.05" in message
    assert "resume=never" in message and "resume_allow_changes=true" in message
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.max_steps: 2 -> 3"):  # not a re-counted total
        run(compose(*base, "stages.pretrain.max_steps=3"))
    assert weights_stamp(final) == stamp
    record = json.loads((final / ckpt.TRAINED_FROM).read_text())  # the data file by its bytes, the image root not
    assert record["stages.pretrain.data.sources[0].path contents"]["path"] == str(data)
    assert [key for key in record if key.endswith(ckpt.CONTENTS)] == ["stages.pretrain.data.sources[0].path contents"]

    alignlm_log.clear()
    run(compose(*base, new_lr, "resume_allow_changes=true"))  # kept as it is, the changes named
    assert weights_stamp(final) == stamp
    assert "keeping" in alignlm_log.text and "stages.pretrain.lr.connector: 0.001 -> 0.05" in alignlm_log.text

    alignlm_log.clear()
    (final / ckpt.TRAINED_FROM).unlink()  # a final/ written before the record existed: skipped, with a warning
    (final / ckpt.MANIFEST).unlink()  # (nor had it a manifest)
    run(compose(*base, new_lr))
    assert weights_stamp(final) == stamp and "cannot be compared" in alignlm_log.text


def test_a_finished_stage_whose_data_file_was_rewritten_in_place_is_refused_naming_it(colour_set, tmp_path):
    data = own_data(colour_set, tmp_path)
    base = pretrain_only(colour_set, tmp_path, data)
    run(compose(*base))
    records = json.loads(data.read_text())
    data.write_text(json.dumps(records[::-1]))  # same path, same keys, other contents
    with pytest.raises(ConfigError, match=rf"stages\.pretrain\.data\.sources\[0\]\.path \({data}\): contents changed"):
        run(compose(*base))
    data.write_text(json.dumps(records))  # back as it was trained: skipped again
    run(compose(*base))


def test_a_step_checkpoint_resume_after_a_named_file_changed_is_refused_naming_it(colour_set, tmp_path):
    data = own_data(colour_set, tmp_path)
    base = pretrain_only(colour_set, tmp_path, data, "stages.pretrain.max_steps=4")
    with pytest.raises(StopTraining):
        run(compose(*base, "stop_after_steps=2"))
    records = json.loads(data.read_text())
    data.write_text(json.dumps(records[::-1]))
    with pytest.raises(ValueError, match=r"written from other files: stages\.pretrain\.data\.sources\[0\]\.path"):
        run(compose(*base))
    run(compose(*base, "resume_allow_changes=true"))  # continues from the checkpoint on this run's file
    assert (tmp_path / "t" / "pretrain" / "final" / "model.safetensors").exists()


def test_a_finished_stage_trained_from_an_earlier_stage_since_retrained_is_refused_naming_its_init_from(
    colour_set, tmp_path
):
    base = tiny_overrides(colour_set, tmp_path, "stages.pretrain.max_steps=2", "stages.finetune.max_steps=2")
    base.append("eval.sets=[]")
    pretrain, finetune = tmp_path / "t" / "pretrain" / "final", tmp_path / "t" / "finetune" / "final"
    new_lr = "stages.pretrain.lr.connector=5e-3"
    run(compose(*base))
    first_pretrain = sha256((pretrain / ckpt.TRAINED_FROM).read_bytes()).hexdigest()
    stamp = weights_stamp(finetune)

    run(compose(*base, "run=[pretrain]", "resume=never", new_lr))  # pretrain alone retrained, finetune left as it was
    with pytest.raises(ConfigError) as refused:  # pretrain matches this run; finetune was trained from its old weights
        run(compose(*base, new_lr))
    message = str(refused.value)
    assert f"stages.finetune.init_from ({pretrain}): its weights changed since this stage trained from them" in message
    assert "stage pretrain" not in message and weights_stamp(finetune) == stamp
    started = json.loads((finetune / ckpt.TRAINED_FROM).read_text())[f"stages.finetune.init_from{ckpt.START}"]
    assert started == {"path": str(pretrain), "trained_from sha256": first_pretrain}  # the record of run 1's pretrain

    shutil.rmtree(pretrain)  # gone: this run would train pretrain anew, and finetune never saw those weights
    with pytest.raises(ConfigError, match=r"stages\.finetune\.init_from \(.*\): no weights there now"):
        run(compose(*base, new_lr))
    assert weights_stamp(finetune) == stamp


def test_a_rerun_naming_the_same_files_by_another_spelling_skips_the_finished_stages(
    tmp_path, monkeypatch, alignlm_log
):
    monkeypatch.chdir(tmp_path)
    write_colour_set(tmp_path / "data", n=8)
    relative = {"pretrain": Path("data/pretrain.json"), "instruct": Path("data/instruct.json")}
    absolute = {k: tmp_path / v for k, v in relative.items()}
    extra = ("stages.pretrain.max_steps=2", "stages.finetune.max_steps=2", "eval.sets=[]")
    finals = [tmp_path / "out" / "t" / name / "final" for name in ("pretrain", "finetune")]
    run(compose(*tiny_overrides(relative, Path("out"), *extra)))
    stamps = [weights_stamp(f) for f in finals]

    run(compose(*tiny_overrides(absolute, tmp_path / "out", *extra)))  # same files and outputs, spelled absolutely
    assert [weights_stamp(f) for f in finals] == stamps and "trained from other" not in alignlm_log.text

    records = json.loads(absolute["pretrain"].read_text())
    absolute["pretrain"].write_text(json.dumps(records[::-1]))  # now other bytes: named as such, not as a new path
    with pytest.raises(ConfigError) as refused:
        run(compose(*tiny_overrides(absolute, tmp_path / "out", *extra)))
    message = str(refused.value)
    assert f"stages.pretrain.data.sources[0].path ({absolute['pretrain']}): contents changed" in message
    assert "stages.pretrain.data.sources:" not in message and "file data/" not in message


def test_starting_weights_without_a_record_are_identified_by_their_bytes(tmp_path):
    """A transformers Llava folder (or a final/ without a record) as init_from: a copy with new modification times
    (``cp -r`` to node-local disk at each requeue) is the same start (it had been refused on resume as changed
    weights); new bytes of the same size are a change; a record written before starts held digests is compared by
    size and time, a rewrite said as such."""
    folder = tmp_path / "llava"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")  # not weights: not part of the identity
    first = ckpt.start_weights(folder)
    assert list(first["weights"]) == ["model.safetensors"] and ckpt.start_weights(None) is None

    def changes(theirs, ours):
        return {k: ckpt.change_text(k, *ab) for k, ab in ckpt.recipe_changes({"k weights": theirs}, ours).items()}

    os.utime(folder / "model.safetensors", ns=(1, 1))  # touched: the same bytes
    copy = shutil.copytree(folder, tmp_path / "local" / "llava", copy_function=shutil.copy)  # no times kept
    assert changes(first, {"k weights": ckpt.start_weights(folder)}) == {}
    assert changes(first, {"k weights": ckpt.start_weights(copy)}) == {}
    (copy / "model.safetensors").write_bytes(b"WEIGHTS")  # new weights, the same size
    assert changes(first, {"k weights": ckpt.start_weights(copy)}) == {
        "k weights": f"k ({copy}): its weights changed since this stage trained from them"
    }
    old = {"path": str(folder), "weights": {"model.safetensors": first["weights"]["model.safetensors"][:2]}}
    assert changes(old, {"k weights": ckpt.start_weights(copy)}) == {
        "k weights": f"k ({copy}): its weights files were rewritten (same sizes, other modification times; this "
        "record holds no digests to compare)"
    }
    old["weights"]["model.safetensors"][1] = (folder / "model.safetensors").stat().st_mtime_ns
    assert changes(old, {"k weights": ckpt.start_weights(folder)}) == {}  # an old record of unchanged files


def test_a_resumed_stage_records_the_weights_its_first_segment_started_from(colour_set, tmp_path):
    """finetune stopped after its first step, pretrain retrained under it, finetune resumed from its step checkpoint:
    its weights still come from the old pretrain, and its final/ says so (it had recorded the new one, and a rerun
    kept the stage)."""
    base = tiny_overrides(colour_set, tmp_path, "stages.pretrain.max_steps=2", "stages.finetune.max_steps=3")
    base += ["eval.sets=[]", "stages.finetune.save_every=1"]
    pretrain = tmp_path / "t" / "pretrain" / "final"
    new_lr = "stages.pretrain.lr.connector=5e-3"
    with pytest.raises(StopTraining):
        run(compose(*base, "stop_after_steps=3"))  # pretrain's 2 steps and finetune's first
    first = sha256((pretrain / ckpt.TRAINED_FROM).read_bytes()).hexdigest()
    run(compose(*base, "run=[pretrain]", "resume=never", new_lr))  # sets aside pretrain only
    run(compose(*base, "run=[finetune]", "resume_allow_changes=true"))  # resumes finetune from its step 1
    started = json.loads((tmp_path / "t" / "finetune" / "final" / ckpt.TRAINED_FROM).read_text())
    assert started[f"stages.finetune.init_from{ckpt.START}"]["trained_from sha256"] == first
    with pytest.raises(ConfigError, match=r"stages\.finetune\.init_from .*its weights changed"):
        run(compose(*base, new_lr))


def test_a_finished_stage_whose_final_was_cut_short_is_trained_again_naming_the_file(colour_set, tmp_path, alignlm_log):
    """A ``final/`` whose weights were cut short (a node lost during or after the write) counted as finished: every rerun
    crashed loading it with a SafetensorError naming no file. Its manifest now tells, the rerun warns naming the file
    and trains the stage again from its newest whole step checkpoint, and the final/ it writes is whole."""
    data = own_data(colour_set, tmp_path)
    base = pretrain_only(colour_set, tmp_path, data, "stages.pretrain.save_every=1")
    run(compose(*base))
    final = tmp_path / "t" / "pretrain" / "final"
    weights = final / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    alignlm_log.clear()
    run(compose(*base))
    assert "stage pretrain: its final/ is damaged" in alignlm_log.text and "model.safetensors" in alignlm_log.text
    assert ckpt.final_intact(final) is None and len(weights.read_bytes()) == len(whole)


def test_a_resume_past_a_lowered_max_steps_is_refused(colour_set, tmp_path):
    """With resume_allow_changes=true a checkpoint past the stage's new max_steps resumed into a loop of no step: its
    final/ was written from the checkpoint's weights, recorded as trained to the new max_steps, and the negative count
    of this process's steps raised the budget stop_after_steps gives the stages after it."""
    data = own_data(colour_set, tmp_path)
    base = pretrain_only(colour_set, tmp_path, data, "stages.pretrain.save_every=2")
    with pytest.raises(StopTraining):
        run(compose(*base, "stages.pretrain.max_steps=6", "stop_after_steps=4"))
    lowered = [*base, "stages.pretrain.max_steps=3", "resume_allow_changes=true"]
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.max_steps=3 ends before .*step_000004, at step 4"):
        run(compose(*lowered))
    assert not (tmp_path / "t" / "pretrain" / "final").exists()


def test_step_checkpoints_are_ordered_by_step_past_six_digits_and_pruning_clears_what_a_kill_left(tmp_path):
    """By name, step_1000000 sorted before step_999995: a resume took the older for the newest and pruning deleted the
    newer ones. A job killed while it wrote a checkpoint left its temporary folder (nearly a whole checkpoint), which no
    later save of another step removed."""
    root = tmp_path / "checkpoints"
    for name in ["step_999995", "step_1000005", "step_1000000", "step_000013.tmp", "step_1000010.tmp", "stepx"]:
        (root / name).mkdir(parents=True)
    assert [p.name for p in ckpt.step_dirs(tmp_path)] == ["step_999995", "step_1000000", "step_1000005"]
    assert ckpt.step_of(root / "step_000013.tmp") is None and ckpt.step_of(root / "step_1000000") == 1000000
    ckpt.prune(tmp_path, 0, root / "step_1000005")
    assert sorted(p.name for p in root.iterdir()) == ["step_1000000", "step_1000005", "step_999995", "stepx"]


def test_a_changed_setting_is_refused_before_the_prepare_steps_run(colour_set, tmp_path, monkeypatch):
    """`+exp=aligngpt model.extras.align_levels.num_levels=4` after the L=8 run scored every caption pair with the
    dual encoder (minutes; hours at LLaVA's 558k) and only then was refused for its changed setting. Settings are
    compared before the offline sets and prepare steps; the refusal names a new run_name as the way to a second arm."""
    from alignlm import pipeline

    data = own_data(colour_set, tmp_path)
    base = pretrain_only(colour_set, tmp_path, data)
    run(compose(*base))
    monkeypatch.setattr(pipeline, "run_prepare_steps", lambda cfg: pytest.fail("the prepare steps ran"))
    monkeypatch.setattr(pipeline, "ensure_offline_datasets", lambda *a: pytest.fail("the offline sets were made"))
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.lr\.connector: 0\.001 -> 0\.05.*another run_name"):
        run(compose(*base, "stages.pretrain.lr.connector=5e-2"))


def test_group_by_length_true_and_band_are_one_setting_and_step_names_band_as_the_way_on(tmp_path):
    """A run started when the stage files said ``group_by_length: true`` was refused under the new default ``step``,
    and ``band``, documented as the way to its order, was refused too (``True -> band``)."""
    key = "stages.pretrain.data.group_by_length"
    assert ckpt.recipe_changes({key: True}, {key: "band"}) == {}
    (line,) = [ckpt.change_text(k, a, b) for k, (a, b) in ckpt.recipe_changes({key: True}, {key: "step"}).items()]
    assert line == f"{key}: True -> step ({key}=band goes on in the order it started with)"


def test_the_early_check_leaves_a_path_not_there_yet_to_the_full_check(tmp_path):
    """Before the offline sets are written, `data/x.json` and its absolute spelling cannot be told the same: the
    early check refused a rerun that the full check, after the sets, accepts."""
    final = tmp_path / "final"
    final.mkdir()
    key = "stages.pretrain.data.sources"
    theirs = {key: [{"path": "data/x.json"}], "stages.pretrain.lr.connector": 0.001}
    (final / ckpt.TRAINED_FROM).write_text(json.dumps(theirs))
    ours = {key: [{"path": str(tmp_path / "data" / "x.json")}], "stages.pretrain.lr.connector": 0.001}
    assert ckpt.finished_changes(final, ours, {}, settings_only=True) == []
    assert ckpt.finished_changes(final, ours, {}) == [f"{key}: {theirs[key]} -> {ours[key]}"]
    changed = {**ours, "stages.pretrain.lr.connector": 0.05}
    assert ckpt.finished_changes(final, changed, {}, settings_only=True) == [
        "stages.pretrain.lr.connector: 0.001 -> 0.05"
    ]


def test_a_part_a_final_holds_in_fp32_starts_the_next_stage_in_fp32(tiny_model, tmp_path):
    """An LLM trained fully from a bf16-loaded preset is saved in fp32; the next stage, built from the preset in bf16
    with the LLM frozen, had loaded it into its bf16 weights and saved it again so (67 % of a short finetune's change
    lost). A part a final/ holds in fp32 starts the stage in fp32, unrounded; one it holds in bf16 keeps the built
    dtype."""
    from safetensors.torch import save_file

    from alignlm.models.io import part_state

    trained = tiny_model()
    with torch.no_grad():
        for p in trained.llm.parameters():
            p.add_(1e-4)  # below bf16's resolution at these weights
    folder = tmp_path / "final"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in part_state(trained, ["llm"]).items()}
    save_file(state, folder / "model.safetensors", metadata={"parts": "llm"})
    model = tiny_model()
    model.llm.to(torch.bfloat16)  # as a preset's model.llm.dtype builds it
    assert ckpt.load_init(model, folder) == ["llm"]
    loaded = part_state(model, ["llm"])
    assert all(v.dtype == torch.float32 and torch.equal(v, state[k]) for k, v in loaded.items())
    save_file({k: v.bfloat16() for k, v in state.items()}, folder / "model.safetensors", metadata={"parts": "llm"})
    model = tiny_model()
    model.llm.to(torch.bfloat16)
    ckpt.load_init(model, folder)
    assert {p.dtype for p in model.llm.parameters()} == {torch.bfloat16}
