"""Behaviour of files, images, records, start-up checks, evaluation reports, answer scoring, plots, the eval command
and the pipeline that no test guarded: each test names what would go wrong without it."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from alignlm import files
from alignlm.data.images import check_crop_size, decoded_batches, load_rgb
from alignlm.data.records import DataError

# ---- files.py -------------------------------------------------------------------------------------------------------


def test_remove_abandoned_leaves_an_idle_file_whose_suffix_is_no_writers_process_id(tmp_path):
    """Only :func:`files.replace_file` temporaries (``.<name>.tmp<pid>``) are removed once idle: without the check of
    the pid, a user's own ``.<name>.tmp-backup`` beside the cache (matching the glob) was deleted after an hour."""
    mine, theirs = tmp_path / ".a.safetensors.tmp-backup", tmp_path / ".a.safetensors.tmp123"
    hours_ago = time.time() - 7200
    for f in (mine, theirs):
        f.write_bytes(b"\0" * 10)
        os.utime(f, (hours_ago, hours_ago))
    assert files.remove_abandoned(tmp_path, "*.safetensors") == (1, 10)
    assert mine.exists() and not theirs.exists()


def test_partial_rows_refuse_arrays_of_another_row_count_than_the_pass(tmp_path):
    """``allocate`` checks each array's first dimension against the pass's rows: an array of fewer rows was written
    past its end (or its rows never reached) and the kept rows of a resumed pass no longer lined up with the inputs."""
    rows = files.PartialRows(tmp_path / "x.partial", {"k": 1})
    assert rows.resume(4, {"a": np.float32}) == 0
    with pytest.raises(ValueError, match="4 rows first"):
        rows.allocate({"a": ((3, 2), np.float32)})


def test_a_forked_child_forgets_the_sole_writer_blocks_of_its_parent(tmp_path):
    """A forked process (a data-loader worker) holds none of its parent's locks: had it kept the parent's record of
    the ``sole_writer`` blocks it is in, its own ``sole_writer`` of the same path would take itself for the holder and
    write beside the parent, unlocked."""
    read, write = os.pipe()
    with files.sole_writer(tmp_path / "out.json", "writing out.json"):
        assert files._WRITING
        pid = os.fork()
        if pid == 0:  # the child: report what it believes it holds, and end at once
            os.write(write, str(len(files._WRITING)).encode())
            os._exit(0)
        os.waitpid(pid, 0)
    os.close(write)
    assert os.read(read, 16) == b"0"
    os.close(read)


# ---- images.py ------------------------------------------------------------------------------------------------------


def test_16_bit_grey_is_rounded_to_the_nearest_8_bit_level_not_truncated(tmp_path):
    """16-bit grey is scaled to 8 bits rounding to nearest, as a 16-to-8-bit conversion should: truncated, a level
    just under the next 8-bit step (257 * 128 - 1) became 127, darkening every such image by one level."""
    Image.fromarray(np.full((4, 4), 257 * 128 - 1, np.uint16)).save(tmp_path / "grey16.png")
    assert np.asarray(load_rgb(tmp_path / "grey16.png"))[0, 0].tolist() == [128, 128, 128]


def test_a_crop_resize_of_exactly_max_image_pixels_is_allowed():
    """``data.max_image_pixels`` is the most pixels allowed, not one more than that: a crop stage's image whose resize
    has exactly that many pixels is read (``>`` as for the padded square), not refused as too large."""
    check_crop_size(None, (100, 200), 50, 50 * 100)  # resized to 50 x 100: exactly the limit
    with pytest.raises(DataError):
        check_crop_size(None, (100, 200), 50, 50 * 100 - 1)


def test_raise_unreadable_names_the_first_unreadable_image_of_the_batch(tmp_path):
    """With ``raise_unreadable`` the first image of the batch that cannot be read is the error, as a read one at a
    time in this process had raised it: naming a later one sent the user to the wrong file."""
    import torch

    good = tmp_path / "good.png"
    Image.new("RGB", (4, 4)).save(good)
    paths = [good, tmp_path / "first-missing.png", tmp_path / "second-missing.png"]
    with pytest.raises(DataError, match="first-missing"):
        list(decoded_batches(paths, load_rgb, 3, torch.device("cpu"), raise_unreadable=True))


# ---- records.py -----------------------------------------------------------------------------------------------------


def test_a_records_caption_field_comes_before_its_text_field():
    """A caption record's ``caption`` is its caption, then ``text``: a record carrying both (a ``text`` of OCR
    tokens beside the caption) had the probes and the caption sets read the wrong one."""
    from alignlm.data.records import record_caption

    assert record_caption({"caption": "a red square", "text": "OCR: 7", "conversations": []}) == "a red square"


def test_the_reference_caption_is_the_last_assistant_turn_not_the_first():
    """Without ``captions`` a caption set scores against the record's last assistant turn (the answer to the last
    question, the one generated): the first turn of a multi-turn record scored every prediction against an answer
    to another question."""
    from alignlm.data.records import reference_captions

    record = {
        "id": "r",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Describe it."},
            {"from": "gpt", "value": "a red square on black"},
        ],
    }
    assert reference_captions(record) == ["a red square on black"]


def test_a_source_with_no_usable_records_at_a_fractional_weight_adds_nothing_to_the_mixture():
    """A source left with no usable records (all skipped as malformed, or an empty file) adds nothing at any weight:
    the check that a positive weight rounds to at least one record is for a source that has records. Without it, a
    weight of 0.5 on an emptied source stopped the stage with a division by zero in the message."""
    from alignlm.data.records import mixture_index

    index, pools = mixture_index([0, 4], [0.5, 1.0])
    assert index.tolist() == [[1, 0], [1, 1], [1, 2], [1, 3]] and pools == []


# ---- checks.py ------------------------------------------------------------------------------------------------------


def test_a_run_that_names_no_stage_is_refused_at_start_up(tmp_path):
    """``run=[]`` trains nothing and evaluates nothing: accepted, the command exited 0 having done nothing, and the
    user took the run for finished."""
    from alignlm.checks import check_config
    from alignlm.config import ConfigError
    from tests.conftest import compose

    with pytest.raises(ConfigError, match="names no stage"):
        check_config(compose(f"output_dir={tmp_path}", "run=[]"))


def test_an_unknown_resume_mode_is_refused_naming_the_modes(tmp_path):
    """``resume`` is auto or never: another word (``resume=always``, meant as never) was accepted and read as auto,
    so the finished stages were skipped where the user asked for them to be trained again."""
    from alignlm.checks import check_config
    from alignlm.config import ConfigError
    from tests.conftest import compose

    with pytest.raises(ConfigError, match=r"resume='always' is not known"):
        check_config(compose(f"output_dir={tmp_path}", "resume=always"))


def test_a_stage_that_starts_from_its_own_unwritten_final_is_refused(tmp_path):
    """``init_from`` naming the stage itself has no weights to start from until that stage has finished once: taken
    as a stage "run before" it, the mistake passed the start-up checks and failed when the stage began, after the
    stages before it had trained."""
    from alignlm.checks import check_config
    from alignlm.config import ConfigError
    from tests.conftest import compose

    with pytest.raises(ConfigError, match=r"stages.finetune.init_from='finetune': that stage is not run before"):
        check_config(compose(f"output_dir={tmp_path}", "stages.finetune.init_from=finetune"))


# ---- evaluation/report.py -------------------------------------------------------------------------------------------


def test_a_kept_probe_piece_whose_features_file_changed_is_computed_again(tmp_path):
    """A probe piece is reused with its pooled features only while their file is the one it recorded (its SHA-256):
    a features file replaced since (another evaluation's, a copy) had its PCA plot drawn from features of other
    weights beside this checkpoint's probe numbers."""
    import torch
    from safetensors.torch import save_file

    from alignlm.evaluation.report import Parts

    parts = Parts(tmp_path / "parts", [["model.safetensors", "abc"]], "cpu")
    key = {"knobs": {"n": 4}}
    features = {"image": torch.ones(2, 3), "text": torch.zeros(2, 3)}
    parts.write("probe", key, {"probe": {"n": 4}, "features": features})
    kept = parts.read("probe", key)
    assert kept is not None and torch.equal(kept["features"]["image"], features["image"])
    save_file(
        {"image": torch.full((2, 3), 7.0), "text": torch.zeros(2, 3)}, str(tmp_path / "parts" / "probe.safetensors")
    )
    assert parts.read("probe", key) is None


def _partial_set(tmp_path, body: bytes):
    import json

    from alignlm.evaluation.report import PartialSet

    key = {"file": ["set.json", "abc"], "knobs": {"limit": None}}
    path = tmp_path / "set-qa.partial.jsonl"
    path.write_bytes(json.dumps(key, sort_keys=True).encode() + b"\n" + body)
    return PartialSet(path, key), path


def test_a_kept_batch_line_without_its_newline_is_generated_again_and_cut_off(tmp_path):
    """A batch line is kept only once its newline is written: a kill between the line and its newline left it
    unterminated, and taken as answered, the next batch was appended on the same line, so the resumed file held one
    line of two batches that no later resume could read."""
    partial, path = _partial_set(tmp_path, b'[["r1", "red"]]')
    assert partial.answered([["r1"], ["r2"]]) == []
    assert path.read_bytes().count(b"\n") == 1 and path.read_bytes().endswith(b"}\n")


def test_a_kept_batch_of_other_record_ids_is_not_taken_for_this_batch(tmp_path):
    """A kept batch answers this batch only when it holds exactly these records' ids, in order: one of other ids (a
    set whose records moved) of the same size had its predictions scored against these records' answers."""
    partial, _ = _partial_set(tmp_path, b'[["other", "red"]]\n')
    assert partial.answered([["r1"]]) == []
    partial, _ = _partial_set(tmp_path, b'[["r1", "red"]]\n')
    assert partial.answered([["r1"]]) == [["red"]]


def test_the_report_shows_three_examples_per_set_and_checkpoint():
    """``report.md`` lists the first three predictions of every set of every checkpoint (the examples a reader checks
    the scoring by): one fewer hid the third, and with it the only wrong answer of many a small set."""
    from alignlm.evaluation.report import markdown

    examples = [{"id": f"q{i}", "prediction": "red", "answer": "red", "correct": True} for i in range(5)]
    results = [{"label": "ck", "sets": {"s": {"kind": "qa", "n": 5, "accuracy": 1.0, "examples": examples}}}]
    shown = [line for line in markdown(results).splitlines() if line.startswith("- `ck` s ")]
    assert [line.split()[3] for line in shown] == ["q0:", "q1:", "q2:"]


def test_a_towers_output_comes_after_its_layers_whatever_they_are_named():
    """The artifact table and plot run from the tower's input to its ``output``: ordered by name alone, the output of
    a plug-in tower whose layers sort after it (``stage 0``, ``stage 1``) came first, and the plot's last point, read
    as the connector's input, was a middle layer."""
    from alignlm.evaluation.report import tower_layers

    layers = {"stage 1": {}, "output": {}, "stage 0": {}, "stage 10": {}}
    assert [name for name, _ in tower_layers(layers)] == ["stage 0", "stage 1", "stage 10", "output"]


def test_a_checkpoints_kept_pieces_are_found_whatever_other_checkpoints_it_is_evaluated_beside(tmp_path, monkeypatch):
    """The pieces' folder is named from the checkpoint alone: the folders ``above`` its run that tell it from another
    run of its name depend on what else the command evaluates, so with them in the name the same checkpoint evaluated
    alone, then beside a run of the same name, found none of its pieces and was generated again."""
    import torch

    from alignlm.evaluation import report
    from alignlm.evaluation.checkpoints import Checkpoint

    monkeypatch.setattr(report, "checkpoint_identity", lambda ck, cfg: [])
    path = tmp_path / "s1" / "raw" / "finetune" / "final"
    alone = Checkpoint(path, "final", "raw", "finetune", None)
    beside = Checkpoint(path, "final", "raw", "finetune", None, above="s1")
    cpu = torch.device("cpu")
    assert report.Parts.of(tmp_path, alone, None, cpu).folder == report.Parts.of(tmp_path, beside, None, cpu).folder


# ---- evaluation/answers.py, evaluation/evaluate.py -------------------------------------------------------------------


def test_a_list_of_two_reference_answers_is_scored_by_the_vqa_rule_whatever_their_order():
    """Only a single reference is exact match; a list of references, two included, is scored by VQA's
    leave-one-out rule, so the score depends on which answers match, not on which one comes first: read as exact
    match against the first, a prediction matching the second reference scored 0 and one matching the first 1."""
    from alignlm.evaluation.answers import vqa_accuracy

    assert vqa_accuracy("red", ["red", "blue"]) == pytest.approx(1 / 6)
    assert vqa_accuracy("red", ["blue", "red"]) == pytest.approx(1 / 6)


def test_a_repeated_question_id_keeps_every_questions_score(monkeypatch):
    """Two records of one ``id`` are two questions: the second's score goes under ``<id>#1``, so the scores that
    paired differences compare hold every question (written under the one id, the second replaced the first)."""
    from alignlm.evaluation import evaluate

    records = [{"id": "q", "answer": "red"}, {"id": "q", "answer": "blue"}]
    monkeypatch.setattr(evaluate, "generate_set", lambda *a, **k: [("q", "red", r) for r in records])
    result = evaluate.answer_accuracy(None, "s", "unused.json", {})
    assert result["scores"] == {"q": 1.0, "q#1": 0.0} and result["accuracy"] == 0.5


def test_the_answer_check_reads_only_the_records_the_limit_evaluates(tmp_path):
    """``--limit N`` evaluates the first N records, so only they must be scorable: a record past the limit without an
    answer refused an evaluation that never asks it."""
    import json

    from alignlm.evaluation.evaluate import check_answers

    path = tmp_path / "set.json"
    path.write_text(json.dumps([{"id": "a", "answer": "red"}, {"id": "b"}]))
    check_answers("s", str(path), limit=1)
    with pytest.raises(DataError, match="has no 'answer'"):
        check_answers("s", str(path))


def test_a_question_of_several_reference_answers_has_no_names_choice_score():
    """Names-choice scores a prediction against the one right option; a question with a list of reference answers
    has none, so it gets no names-choice score: scored against its first answer alone, a prediction naming another
    accepted answer counted as wrong in ``choice_accuracy``."""
    from alignlm.evaluation.evaluate import scored

    record = {"answer": ["red", "blue"], "meta": {"choices": ["red", "blue", "green"]}}
    assert scored("blue", record)[1] is None
    assert scored("blue", {"answer": "blue", "meta": {"choices": ["red", "blue", "green"]}})[1] == 1.0


# ---- evaluation/plots.py --------------------------------------------------------------------------------------------


def test_the_metrics_plot_always_labels_the_last_checkpoint(tmp_path, monkeypatch):
    """With more checkpoints than ticks fit, every k-th is labelled and the last one always: the newest checkpoint,
    the one a reader looks for, had no label when the count was not a multiple of k."""
    from alignlm.evaluation import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    n = plots.TICKS_MAX * 2 + 2  # labelled every 3rd: 0, 3, ..., and the last, n - 1, is no multiple of 3
    plots.plot_series({"acc": [0.5] * n}, [f"step_{i}" for i in range(n)], tmp_path / "metrics.png")
    ticks = list(figures[0].axes[0].get_xticks())
    assert ticks[-1] == n - 1 and ticks[0] == 0
    plots.pyplot().close(figures[0])


def test_up_to_ten_lines_take_the_ten_colour_cycle():
    """Ten runs or fewer are drawn in the ten-colour cycle (its colours as far apart as a palette gets); only past
    ten, where the cycle would repeat, is a colormap sampled."""
    import matplotlib

    from alignlm.evaluation.plots import CYCLE, line_colours

    cycle = matplotlib.colormaps[CYCLE].colors
    labels = [f"run{i}" for i in range(len(cycle))]
    assert list(line_colours(labels).values()) == list(cycle)


# ---- commands -------------------------------------------------------------------------------------------------------


def test_a_pixel_limit_flag_takes_null_as_no_limit_as_the_config_does():
    """``--max-image-pixels`` reads as ``data.max_image_pixels``: ``null`` (the config's word) is no limit, like
    ``none``; refused, the value a user copied from the config stopped the command."""
    from alignlm.commands._flags import pixel_limit

    assert pixel_limit("null") is None and pixel_limit("None") is None and pixel_limit("12") == 12


def test_eval_probe_n_null_reads_every_probe_pair(tmp_path):
    """``probe.n: null`` means every pair of the probe file, as ``limit: null`` means every record: refused as "must
    be a whole number", the documented way to probe the whole file stopped ``alignlm eval`` before it began."""
    from omegaconf import OmegaConf

    from alignlm.commands.evaluate import check_eval_config, eval_defaults

    ecfg = OmegaConf.to_container(eval_defaults(), resolve=True)
    ecfg["probe"]["n"] = None
    check_eval_config(ecfg)
    ecfg["probe"]["n"] = 0
    with pytest.raises(SystemExit, match="probe.n=0"):
        check_eval_config(ecfg)


def test_eval_probe_n_must_leave_room_for_topk_neighbours_and_the_pair_itself():
    """``probe.n`` below ``topk + 2``, the bound the refusal states, is refused before any checkpoint loads, and that
    bound itself passes: one lower let ``probe.n = topk + 1`` through to be refused after the features were
    extracted, or not at all."""
    from omegaconf import OmegaConf

    from alignlm.commands.evaluate import check_eval_config, eval_defaults

    ecfg = OmegaConf.to_container(eval_defaults(), resolve=True)
    ecfg["probe"]["n"] = ecfg["probe"]["topk"] + 1
    with pytest.raises(SystemExit, match="must be at least probe.topk"):
        check_eval_config(ecfg)
    ecfg["probe"]["n"] = ecfg["probe"]["topk"] + 2
    check_eval_config(ecfg)


# ---- pipeline.py ----------------------------------------------------------------------------------------------------


def test_only_the_prepare_steps_of_the_stages_to_run_are_run(tmp_path):
    """``run=[a]`` prepares stage a alone: the prepare steps of a stage configured but not run (a DPO stage's
    preference pairs, generated by the model) ran all the same, for a stage that never trained on them."""
    from omegaconf import OmegaConf

    from alignlm.pipeline import run_prepare_steps

    step = lambda name: {"mk": {"_target_": "os.makedirs", "name": str(tmp_path / name)}}  # noqa: E731
    cfg = OmegaConf.create({"run": ["a"], "stages": {"a": {"prepare": step("a")}, "b": {"prepare": step("b")}}})
    run_prepare_steps(cfg)
    assert (tmp_path / "a").is_dir() and not (tmp_path / "b").exists()


def test_a_stage_that_read_only_the_images_of_an_offline_set_trained_on_it(tmp_path):
    """A stage trained on an offline set's images through a source's ``image_root`` (its records written elsewhere,
    such as a method's pairs file) trained on that set as much as one reading its records: not counted, the set was
    written again under the finished stage, with other images than its weights saw."""
    from omegaconf import OmegaConf

    from alignlm.pipeline import trained_on

    (tmp_path / "out" / "r" / "a" / "final").mkdir(parents=True)
    source = {"path": str(tmp_path / "pairs.json"), "image_root": str(tmp_path / "set")}
    cfg = OmegaConf.create(
        {
            "output_dir": str(tmp_path / "out"),
            "run_name": "r",
            "run": ["a"],
            "stages": {"a": {"data": {"sources": [source]}}},
        }
    )
    assert trained_on(cfg, tmp_path / "set") == ["a"]


def test_the_runs_final_evaluation_prompts_with_the_last_stages_data(tiny_model, tmp_path, monkeypatch):
    """The run's closing evaluation asks its questions with the last stage's data settings (its template, the one
    the model was last trained with): with the first stage's, a finetuned model was prompted with pretraining's
    ``plain`` template and its accuracy read far below what it had learnt."""
    from safetensors.torch import save_file

    from alignlm import pipeline
    from alignlm.models.io import part_state
    from tests.conftest import compose

    cfg = compose("run=[pretrain,finetune]", "eval.sets=[{name:s,path:x.json}]")
    final = tmp_path / "final"
    final.mkdir()
    state = {k: v.contiguous() for k, v in part_state(tiny_model(), ["connector"]).items()}
    save_file(state, final / "model.safetensors", metadata={"parts": "connector"})
    seen = []
    monkeypatch.setattr(pipeline, "answer_accuracy", lambda model, name, path, data, *rest: seen.append(data) or 0.5)
    assert pipeline.evaluate_final(cfg, final, torch.device("cpu")) == {"s": 0.5}
    assert seen[0]["template"] == cfg.stages.finetune.data.template != cfg.stages.pretrain.data.template


def test_a_finished_stages_summary_that_holds_no_object_is_left_out_with_a_warning(tmp_path, alignlm_log):
    """A finished stage's ``summary.json`` that holds JSON of another kind (a list, a number: a file written by hand
    or by another tool) is left out of the run's summary with a warning naming it: taken as the stage's figures, the
    run's table then failed reading them."""
    import json
    import logging

    from alignlm.pipeline import finished_stage_figures

    stage_file = tmp_path / "summary.json"
    stage_file.write_text(json.dumps([1, 2]))
    assert finished_stage_figures(stage_file, "pretrain", logging.getLogger("alignlm")) is None
    assert "holds a JSON list, not an object" in alignlm_log.text
    stage_file.write_text(json.dumps({"steps": 3}))
    assert finished_stage_figures(stage_file, "pretrain", logging.getLogger("alignlm")) == {"steps": 3}


def test_compare_names_step_checkpoints_of_one_label_by_the_folders_above_their_runs(tmp_path, capsys):
    """Two runs named alike (``s1/raw`` and ``s2/raw``), each evaluated alone at a step checkpoint, are told apart by
    the folder above each run, as their ``final/`` would be: a step checkpoint sits one folder deeper
    (``<stage>/checkpoints/step_*``), and read as a ``final/`` its run was taken for the folder above it
    (``raw/raw/finetune/step_000010``)."""
    from alignlm.commands.evaluate import tell_apart

    def step(seed: str) -> dict:
        path = tmp_path / seed / "raw" / "finetune" / "checkpoints" / "step_000010"
        return {"label": "raw/finetune/step_000010", "path": str(path), "kind": "step", "sets": {}}

    named = tell_apart([step("s1"), step("s2")], [tmp_path / "a.json", tmp_path / "b.json"])
    assert [c["label"] for c in named] == ["s1/raw/finetune/step_000010", "s2/raw/finetune/step_000010"]
    assert [c["above"] for c in named] == ["s1", "s2"]
