"""Evaluation: caption scores on hand-checkable cases, question-set accuracy and chance, deterministic reports over
several checkpoints, the alignment monitor logging at its configured steps, the runs plot, and the lmms-eval loading
path. (Answer scoring itself: tests/test_answers.py.)"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from alignlm.commands import main
from alignlm.config import ConfigError
from alignlm.evaluation.captions import bleu, cider_d, tokenize
from alignlm.evaluation.report import write_report
from alignlm.pipeline import run
from tests.conftest import compose, tiny_overrides

# ------------------------------------------------------------------------------------------- scores


def test_bleu_hand_checked():
    assert tokenize("A red, square!") == ["a", "red", "square"]
    assert bleu(["a red square on grey"], [["a red square on grey"]]) == pytest.approx(1.0)
    # an order without a match scores pycocoevalcap's floor, (0 + 1e-15) / (guesses + 1e-9), not 0: a checkpoint of
    # short captions had scored 0 where COCO's scorer gives 0.03
    t, s = 1e-15, 1e-9
    floor = ((t / (1 + s)) * (t / s) ** 3) ** 0.25 * math.exp(1 - (3 + s) / (1 + t))  # and the brevity of 1 word of 3
    assert bleu(["blue"], [["a red square"]]) == pytest.approx(floor, rel=1e-12)
    # hypothesis "the cat sat on the mat" vs reference "the cat is on the mat": matches 5/6, 3/5, 1/4, 0/3
    cat = ((5 + t) / (6 + s) * (3 + t) / (5 + s) * (1 + t) / (4 + s) * t / (3 + s)) ** 0.25
    assert bleu(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(cat, rel=1e-12)
    # 7-word hypothesis, reference with one substitution at the end: p = 6/7, 5/6, 4/5, 3/4, no brevity penalty
    hyp, ref = "a b c d e f g", "a b c d e f x"
    expected = math.exp((math.log(6 / 7) + math.log(5 / 6) + math.log(4 / 5) + math.log(3 / 4)) / 4)
    assert bleu([hyp], [[ref]]) == pytest.approx(expected)
    # brevity penalty: a perfect 4-word prefix of an 8-word reference scores exp(1 - 8/4)
    assert bleu(["a b c d"], [["a b c d e f g h"]]) == pytest.approx(math.exp(-1.0))
    # the closest reference length counts: adding an exact-length reference lifts the penalty
    assert bleu(["a b c d"], [["a b c d e f g h", "a b c d"]]) == pytest.approx(1.0)


def test_cider_hand_checked():
    # two images whose references share no n-gram: every idf is log 2, identical captions score 10 each
    hyps, refs = ["a red square here", "two blue circles there"], [["a red square here"], ["two blue circles there"]]
    assert cider_d(hyps, refs) == pytest.approx(10.0)
    assert cider_d(hyps[::-1], refs) == 0.0  # swapped: nothing matches
    # three-word captions have no 4-gram: that order contributes 0, so identical captions score 7.5
    assert cider_d(["a red square", "two blue circles"], [["a red square"], ["two blue circles"]]) == pytest.approx(7.5)
    # a single image: every n-gram occurs in every document, idf 0, CIDEr is 0 by definition
    assert cider_d(["a red square"], [["a red square"]]) == 0.0
    # partial credit: 3 of 4 unigrams, 2 of 3 bigrams, 1 of 2 trigrams (cosines 3/sqrt(12), 2/sqrt(6), 1/sqrt(2)),
    # times the length penalty exp(-1 / (2 * 6^2)) for one word too few
    part = cider_d(["a red square", "two blue circles"], [["a red square"], ["two blue circles here"]])
    second = 10 * (3 / math.sqrt(12) + 2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert part == pytest.approx((7.5 + second) / 2)
    with pytest.raises(ValueError, match="one reference list per hypothesis"):
        cider_d(["x"], [])


def test_captions_in_any_script_have_words():
    """``[a-z0-9]+`` split "élégant" into "l", "gant" and gave a Russian caption no word: a perfect one scored 0."""
    assert tokenize("Un chat élégant") == ["un", "chat", "élégant"]
    assert tokenize("Кошка сидит на столе.") == ["кошка", "сидит", "на", "столе"]
    assert tokenize("cafe\u0301 noir") == tokenize("café noir") == ["café", "noir"]  # one word, composed or not
    assert tokenize("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # a vowel sign is a mark inside the word
    assert tokenize("snake_case, x2") == ["snake", "case", "x2"]  # ASCII as before
    hyps = ["Кошка сидит на красном столе", "Собака бежит по зелёной траве", "Две птицы сидят на ветке дерева"]
    refs = [[h] for h in hyps]
    assert bleu(hyps, refs) == pytest.approx(1.0) and cider_d(hyps, refs) == pytest.approx(10.0)


# ------------------------------------------------------------------------------ trained tiny checkpoints


@pytest.fixture(scope="module")
def tiny_run(colour_set, tmp_path_factory):
    """A tiny two-stage run with the monitor on: pretrain 4 steps, finetune 4, checkpoints every 2."""
    out = tmp_path_factory.mktemp("evalrun")
    probe = colour_set["pretrain"]  # image + caption records
    run(
        compose(
            *tiny_overrides(
                colour_set,
                out,
                "monitor.every=2",
                f"monitor.probe={probe}",
                "monitor.n=12",
                "stages.pretrain.max_steps=4",
                "stages.finetune.save_every=2",
                "stages.finetune.keep_last=0",
            )
        )
    )
    return out / "t"


def test_monitor_logs_at_configured_steps(tiny_run):
    for stage, steps in (("pretrain", [1, 2, 4]), ("finetune", [1, 2, 4])):
        rows = [json.loads(line) for line in (tiny_run / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # one row per step: merged, not added
        logged = [r for r in rows if "monitor/pooled/modality_gap" in r]
        assert [r["step"] for r in logged] == steps
        first = logged[0]
        for key in (
            "monitor/pooled/mutual_knn",
            "monitor/pooled/cka",
            "monitor/pooled/i2t_recall@1",
            "monitor/per_token/a_score_visual_to_text",
            "monitor/seconds",
        ):
            assert key in first and math.isfinite(first[key])
        assert 0.0 < logged[-1]["monitor/time_share"] < 1.0
        # its clock starts with the loop: the first measurement of a process (of a resumed run too) has its share
        assert all("monitor/time_share" in r for r in logged)
        assert "loss/total" in first


def _eval(ckpts, out, colour_set, *extra):
    argv = [
        "eval",
        *map(str, ckpts),
        "--out",
        str(out),
        "--sets",
        f"colours={colour_set['test']}",
        f"captions={colour_set['pretrain']}",
        "--probe",
        str(colour_set["pretrain"]),
        "--probe-n",
        "12",
        "--limit",
        "4",
        "--layers",
        "0,-1",
        "--set",
        "caption_max_new_tokens=4",
        *extra,
    ]
    assert main(argv) == 0
    return out


def test_report_over_several_checkpoints_is_deterministic(tiny_run, colour_set, tmp_path):
    ckpts = [tiny_run / "pretrain" / "final", tiny_run / "finetune"]  # a final/ and a stage (its steps, then final)
    a = _eval(ckpts, tmp_path / "a", colour_set)
    b = _eval(ckpts, tmp_path / "b", colour_set, "--no-plots")
    assert (a / "report.json").read_bytes() == (b / "report.json").read_bytes()
    report = json.loads((a / "report.json").read_text())
    labels = [c["label"] for c in report["checkpoints"]]
    assert labels == ["t/pretrain/final", "t/finetune/step_000002", "t/finetune/final"]
    assert [c["step"] for c in report["checkpoints"]] == [4, 2, 4]  # a final/ is at its stage's last step
    for c in report["checkpoints"]:
        assert c["sets"]["colours"]["kind"] == "qa" and c["sets"]["colours"]["n"] == 4
        assert c["sets"]["colours"]["file"] == {  # what paired differences pair by (not the set's name alone)
            "path": str(Path(colour_set["test"]).resolve()),
            "sha256": hashlib.sha256(Path(colour_set["test"]).read_bytes()).hexdigest(),
        }
        assert c["sets"]["colours"]["scored_with"]["limit"] == 4
        assert c["sets"]["captions"]["kind"] == "caption" and c["sets"]["captions"]["cider"] >= 0.0
        probe = c["probe"]
        assert probe["n"] == 12 and 0.0 <= probe["pooled"]["modality_gap"] <= 2.0
        assert {
            "mutual_knn",
            "cycle_knn",
            "lcs_knn",
            "edit_distance_knn",
            "cka",
            "unbiased_cka",
            "cknna",
            "svcca",
            "i2t_recall@10",
            "t2i_recall@1",
        } <= set(probe["pooled"])
        assert set(probe["layers"]) == {"0", "2"}  # the tiny LLM has 2 layers: -1 is hidden state 2
        assert [d for d, _ in c["gap_shift"]["curve"]][:3] == [-0.5, -0.25, 0.0]
        art = c["artifacts"]["layers"]  # the tiny CLIP tower: embeddings, 2 layers, then the output (CLS dropped)
        assert list(art) == ["layer 0", "layer 1", "layer 2", "output"] and art["output"]["prefix_ratio"] is None
        assert all(0.0 <= v["outlier_share"] <= 1.0 and v["max_ratio"] >= 1.0 for v in art.values())
    assert c["template"] == "vicuna_v1" and report["checkpoints"][0]["template"] == "plain"
    md = (a / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| checkpoint |"))
    assert "colours acc %" in header and "captions CIDEr" in header and "modality_gap" in header
    assert all(f"| {label} |" in md for label in labels)
    scores = [c["sets"]["colours"]["scores"] for c in report["checkpoints"]]
    assert all(len(s) == 4 and set(s) == set(scores[0]) for s in scores)  # every question, by id, for pairing
    assert [(r["b"], r["set"], r["n"]) for r in report["paired"]] == [(label, "colours", 4) for label in labels[1:]]
    assert (
        "## Paired differences (same questions)" in md and "| t/finetune/final | t/pretrain/final | colours | 4 |" in md
    )
    assert "## Vision-tower artifact tokens: t/pretrain/final" in md
    for png in ("pca.png", "metrics.png", "gap_shift.png", "layers.png", "artifacts.png"):
        assert (a / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (b / "pca.png").exists()


def test_eval_defaults_to_the_runs_own_sets(tiny_run, colour_set, tmp_path):
    """With no --sets, the checkpoint's training config decides (here: none), and a bad path says what it expected."""
    out = tmp_path / "r"
    assert (
        main(
            [
                "eval",
                str(tiny_run / "finetune" / "checkpoints" / "step_000002"),
                "--out",
                str(out),
                "--probe",
                str(colour_set["pretrain"]),
                "--probe-n",
                "12",
                "--no-plots",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoints"][0]["sets"] == {} and report["checkpoints"][0]["probe"]["n"] == 12
    with pytest.raises(FileNotFoundError, match="neither a final/ folder"):
        main(["eval", str(tmp_path), "--out", str(out)])
    with pytest.raises(ValueError, match=r"nothing to evaluate .* the probe is off \(--no-probe\)"):
        main(
            [
                "eval",
                str(tiny_run / "finetune" / "checkpoints" / "step_000002"),
                "--out",
                str(out),
                "--probe",
                str(colour_set["pretrain"]),
                "--no-probe",
            ]
        )


@pytest.mark.parametrize(
    "metric", ["mutual_knn", "cka", "unbiased_cka", "cknna", "svcca", "modality_gap", "i2t_recall@5"]
)
def test_the_gap_shift_curve_at_delta_zero_is_the_tables_value(metric):
    """The shift normalised the rows and the metric clamped outliers after: for every metric that clamps, the curve
    at delta 0 was not the table's (mutual kNN 0.1273 against 0.1328), with rows of unequal norms and outlier
    channels, as LLM hidden means have."""
    from alignlm.geometry.suite import pair_metrics
    from alignlm.models.probes import ProbeFeatures, gap_shift

    g = torch.Generator().manual_seed(0)
    n, d = 128, 64
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    image = base * (0.2 + 5 * torch.rand(n, 1, generator=g, dtype=torch.float64)) + 0.5
    image[:, :3] *= 20
    text = 0.3 * base @ torch.randn(d, d, generator=g, dtype=torch.float64) + torch.randn(n, d, generator=g)
    feats = ProbeFeatures(image.float(), text.float(), torch.ones(n, dtype=torch.long), torch.zeros(n, 4))
    table = pair_metrics(feats.visual_mean, feats.text_mean, ["retrieval" if "@" in metric else metric], 10)[metric]
    ((_, at_zero), (_, closed)) = gap_shift(feats, [0.0, 0.5], metric, 10)
    assert at_zero == pytest.approx(table, rel=1e-9, abs=1e-12) and math.isfinite(closed)


def test_gap_shift_measures_with_the_probes_topk(tiny_run, colour_set, tmp_path, monkeypatch):
    """The curve was measured with topk 10 whatever probe.topk said, so its kNN metrics were not the table's, and with
    ``--probe-n 8`` (topk at most 6) the evaluation failed once the probe was extracted."""
    from alignlm.evaluation import report

    ks = []
    measure = report.gap_shift
    monkeypatch.setattr(report, "gap_shift", lambda *args: ks.append(args[3:]) or measure(*args))
    out = tmp_path / "r"
    flags = ["--probe", str(colour_set["pretrain"]), "--probe-n", "8", "--no-plots"]
    knobs = [
        "probe.topk=5",
        "gap_shift.metric=mutual_knn",
        "gap_shift.deltas=[0.0,0.5]",
        "probe.artifacts.enabled=false",
    ]
    assert (
        main(["eval", str(tiny_run / "finetune" / "final"), "--out", str(out), *flags, *(f"--set={k}" for k in knobs)])
        == 0
    )
    (ck,) = json.loads((out / "report.json").read_text())["checkpoints"]
    assert ks == [(5,)] and [d for d, _ in ck["gap_shift"]["curve"]] == [0.0, 0.5]
    assert ck["above"] == ""  # recorded, so that compare tells apart runs of one name


def test_a_probe_file_too_small_for_topk_is_refused_before_answers_are_generated(
    tiny_run, colour_set, tmp_path, monkeypatch
):
    """The probe file was read after every set's answers were generated, so a file with fewer pairs than
    probe.topk + 2 failed then, in the metrics, naming no setting."""
    from alignlm.evaluation import report

    monkeypatch.setattr(report, "answer_accuracy", lambda *a, **k: pytest.fail("generated before the probe check"))
    monkeypatch.setattr(report.C, "load", lambda *a, **k: pytest.fail("loaded before the probe check"))
    small = tmp_path / "captions.json"
    small.write_text(json.dumps(json.loads(colour_set["pretrain"].read_text())[:6]))
    flags = ["--probe", str(small), "--no-plots", "--out", str(tmp_path / "r")]
    with pytest.raises(ConfigError, match=r"gives 6 usable image\+caption records .* probe.topk \+ 2 = 12"):
        main(["eval", str(tiny_run / "finetune" / "final"), *flags])


def test_a_step_checkpoint_named_by_a_relative_path_keeps_its_run(tiny_run, monkeypatch):
    """Its run and stage were the names of the relative path's parents: inside the run folder its run was "", inside
    the stage folder its ``init_from`` was looked up in the wrong folder, inside ``checkpoints/`` no config was
    found."""
    from alignlm.evaluation.checkpoints import load, resolve, stage_config

    monkeypatch.chdir(tiny_run / "finetune" / "checkpoints")
    (ck,) = resolve(["step_000002"])
    assert (ck.run, ck.stage, ck.label) == ("t", "finetune", "t/finetune/step_000002")
    assert ck.path == tiny_run / "finetune" / "checkpoints" / "step_000002" and stage_config(ck).run
    monkeypatch.chdir(tiny_run)
    assert [c.label for c in resolve(["finetune"])] == ["t/finetune/step_000002", "t/finetune/final"]
    monkeypatch.chdir(tiny_run / "finetune")
    load(resolve(["."])[0])  # the stage's init_from (pretrain's final/) is found from here too


def test_a_reused_out_folder_keeps_no_plot_of_another_report(tmp_path):
    """Plots the new report does not draw (no probe: no pca.png; --no-plots: none) stayed beside it from the last."""
    results = [{"label": "a", "sets": {"colours": {"kind": "qa", "accuracy": 0.5, "n": 4, "examples": []}}}]
    for name in ("pca", "layers", "gap_shift", "artifacts", "metrics", "mine"):
        (tmp_path / f"{name}.png").write_bytes(b"old")
    files = write_report(results, [{}], {}, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["metrics.png", "mine.png"]  # not a name it draws: kept
    assert files["metrics"].read_bytes() != b"old"
    write_report(results, [{}], {"plots": False}, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["mine.png"]


def test_a_plot_a_full_disk_stops_leaves_the_report_whole_and_says_so(tmp_path, monkeypatch, caplog):
    """report.json and report.md were written whole, then a plot's write on a full disk ended alignlm eval with exit
    1 and no word of the report, leaving a 0-byte metrics.png; the plot is written whole or not at all, and the
    report stands with a warning."""
    import errno

    from matplotlib.figure import Figure

    results = [{"label": "a", "sets": {"colours": {"kind": "qa", "accuracy": 0.5, "n": 4, "examples": []}}}]
    save = Figure.savefig

    def full(self, path, **kwargs):
        save(self, path, **kwargs)  # a part of it written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    with caplog.at_level("WARNING", logger="alignlm"):
        files = write_report(results, [{}], {}, tmp_path)
    assert f"plots not written ({tmp_path / 'metrics.png'}: No space left on device); " in caplog.text
    assert "metrics" not in files and json.loads(files["json"].read_text())["checkpoints"][0]["label"] == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]


def test_runs_of_one_name_are_two_runs_at_the_same_step_and_two_lines():
    """``s1/raw`` and ``s2/raw`` evaluated together: ``--same-step`` compared bare run names (both ``raw``: one run),
    and the accuracy plot drew them as one line."""
    from unittest import mock

    from alignlm.evaluation import plots
    from alignlm.evaluation.paired import same_step

    def ck(above, acc):
        scores = {str(i): acc for i in range(4)}
        return {
            "run": "raw",
            "above": above,
            "stage": "finetune",
            "step": 8,
            "label": f"{above}/raw/finetune/final",
            "sets": {"s1": {"kind": "qa", "accuracy": acc, "n": 4, "scores": scores}},
        }

    results = [ck("s1", 0.0), ck("s2", 1.0)]
    assert [(r["a"], r["b"], r["diff"]) for r in same_step(results, "s1/raw")] == [
        ("s1/raw/finetune/final", "s2/raw/finetune/final", 1.0)
    ]
    with mock.patch.object(plots, "plot_panels", lambda panels, path, xlabel: panels):
        panels = plots.plot_accuracy_curves(results, Path("unused.png"))
    assert panels == {"s1 accuracy %": {"s1/raw": [(8, 0.0)], "s2/raw": [(8, 100.0)]}}


def test_plot_runs_side_by_side(tiny_run, tmp_path):
    out = tmp_path / "runs.png"
    assert main(["plot-runs", str(tiny_run), str(tiny_run / "pretrain"), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    from alignlm.evaluation.plots import read_monitor

    chained = read_monitor(tiny_run)["pooled/modality_gap"]
    assert [s for s, _ in chained] == [1, 2, 4, 5, 6, 8]  # finetune continues after pretrain's 4 steps


def test_runs_and_checkpoints_of_the_same_name_keep_a_label_each(tmp_path, monkeypatch):
    """Two runs both called ``raw`` (``outputs/s1/raw``, ``outputs/s2/raw``) were two table rows labelled alike, one
    gap-shift line and one zig-zag per-layer line; ``plot-runs a/finetune b/finetune`` drew one line, dropping ``a``."""
    from safetensors.torch import save_file

    from alignlm.evaluation import plots
    from alignlm.evaluation.checkpoints import resolve

    finals = [tmp_path / s / "raw" / "finetune" / "final" for s in ("s1", "s2")]
    for final in finals:
        final.mkdir(parents=True)
        save_file({}, str(final / "model.safetensors"))
        (final / "config.yaml").write_text("{}\n")
    assert [c.label for c in resolve(list(map(str, finals)))] == ["s1/raw/finetune/final", "s2/raw/finetune/final"]
    with pytest.raises(ValueError, match=r"name the checkpoint .*s1/raw/finetune/final more than once"):
        resolve([str(finals[0]), str(finals[0].parent)])  # the stage folder holds the same final/

    drawn = {}
    monkeypatch.setattr(plots, "plot_panels", lambda panels, path, xlabel: drawn.update(panels))
    for name, gap in (("a", 1.5), ("b", 0.5)):
        (tmp_path / name / "finetune").mkdir(parents=True)
        (tmp_path / name / "finetune" / "metrics.jsonl").write_text(
            json.dumps({"step": 1, "monitor/pooled/modality_gap": gap}) + "\n"
        )
    main(
        [
            "plot-runs",
            str(tmp_path / "a" / "finetune"),
            str(tmp_path / "b" / "finetune"),
            "--out",
            str(tmp_path / "x.png"),
        ]
    )
    assert drawn == {"pooled/modality_gap": {"a/finetune": [(1, 1.5)], "b/finetune": [(1, 0.5)]}}


def test_a_final_named_from_inside_its_stage_folder_or_set_aside_keeps_its_stage(tmp_path, monkeypatch):
    """`alignlm eval final` run inside `outputs/raw/pretrain` read its stage and run from the relative path's empty
    parents, so its template fell back to the run's last stage."""
    from safetensors.torch import save_file

    from alignlm.evaluation.checkpoints import resolve

    final = tmp_path / "raw" / "pretrain" / "final"
    final.mkdir(parents=True)
    save_file({}, str(final / "model.safetensors"))  # saved before finals named their stage
    (final / "config.yaml").write_text("{}\n")
    monkeypatch.chdir(final.parent)
    (ck,) = resolve(["final"])
    assert (ck.run, ck.stage, ck.label) == ("raw", "pretrain", "raw/pretrain/final")
    # resume=never set it aside (pretrain/before-<time>/final): the stage its weights name, not the folder's
    aside = tmp_path / "raw" / "pretrain" / "before-20261205T000000" / "final"
    aside.mkdir(parents=True)
    save_file({}, str(aside / "model.safetensors"), metadata={"parts": "connector", "stage": "pretrain"})
    (aside / "config.yaml").write_text("{}\n")
    assert [(c.run, c.stage) for c in resolve([str(aside)])] == [("raw", "pretrain")]  # was run "pretrain"


def test_a_set_aside_step_checkpoint_starts_from_the_final_set_aside_with_it(tmp_path):
    """resume=never moves every stage's outputs to <stage>/before-<time>/: a step checkpoint there was labelled with
    its stage as run, and its stage's init_from resolved to <run>/<stage>/<init>/final, which never exists (fixing the
    parent alone would have loaded the new run's final under the old step's weights)."""
    from alignlm.evaluation.checkpoints import resolve
    from alignlm.training.checkpoint import resolve_init, set_aside, set_aside_name, stage_place

    run = tmp_path / "raw"
    step = run / "finetune" / "checkpoints" / "step_000004"
    step.mkdir(parents=True)
    (step / "trainable.safetensors").write_bytes(b"")
    (step / "trainer_state.json").write_text('{"step": 4, "stage": "finetune"}')
    (run / "pretrain" / "final").mkdir(parents=True)
    name = set_aside_name(run / s for s in ("pretrain", "finetune"))
    for s in ("pretrain", "finetune"):
        set_aside(run / s, name)  # one name for every stage of the run
    (ck,) = resolve([str(run / "finetune" / name / "checkpoints" / "step_000004")])
    assert (ck.run, ck.stage, ck.step) == ("raw", "finetune", 4)
    run_dir, aside = stage_place(ck.stage_dir)
    assert (run_dir, aside) == (run, name)
    assert (
        resolve_init("pretrain", run_dir, {"pretrain": {}, "finetune": {}}, aside) == run / "pretrain" / name / "final"
    )
    assert (run / "pretrain" / name / "final").is_dir()


def test_metrics_plot_draws_the_measured_numbers_not_the_tables_text(tmp_path, monkeypatch):
    """The table rounds (4 decimals, percentages to 1); metrics.png drew those strings, so a change below 1e-4 was
    flat and 12.345 % was 12.3."""
    from alignlm.evaluation import plots

    drawn = {}
    monkeypatch.setattr(
        plots, "plot_series", lambda series, xlabels, path, xlabel="", groups=None: drawn.update(series)
    )
    results = [
        {
            "label": label,
            "sets": {"colours": {"kind": "qa", "accuracy": acc, "n": 4, "examples": []}},
            "probe": {"n": 3, "pooled": {"modality_gap": gap}},
        }
        for label, acc, gap in (("a", 0.12345, 0.50001), ("b", 0.5, 0.50004))
    ]
    files = write_report(results, [{}, {}], {}, tmp_path)
    assert drawn == {"colours acc %": [12.345, 50.0], "modality_gap": [0.50001, 0.50004]}
    assert "| a | 12.3 | 0.5000 |" in files["md"].read_text()


def test_metrics_plot_joins_only_the_checkpoints_of_one_run(tmp_path, monkeypatch):
    """Two runs' checkpoints in one report were one line: b's finetune down to c's pretrain, a trajectory no training
    took."""
    from alignlm.evaluation import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    plots.plot_series({"m": [1.0, 2.0, 3.0, 4.0]}, ["b/p", "b/f", "c/p", "c/f"], tmp_path / "m.png", "", list("bbcc"))
    lines = figures[0].axes[0].get_lines()
    assert [list(line.get_xdata()) for line in lines] == [[0, 1], [2, 3]]
    assert [line.get_label() for line in lines] == ["b", "c"] and lines[0].get_color() != lines[1].get_color()


def test_a_step_checkpoint_unlike_its_manifest_or_lacking_a_trained_weight_is_refused(tiny_run, tmp_path):
    """A truncated ``trainable.safetensors`` was evaluated with the initial weights standing in for what it lost."""
    import shutil

    from safetensors.torch import load_file, save_file

    from alignlm.evaluation.checkpoints import load, resolve
    from alignlm.training.checkpoint import write_manifest

    shutil.copytree(tiny_run, tmp_path / "t")
    step = tmp_path / "t" / "finetune" / "checkpoints" / "step_000002"
    state = load_file(str(step / "trainable.safetensors"))
    lost = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != lost}, str(step / "trainable.safetensors"))
    with pytest.raises(ValueError, match=rf"step checkpoint {step} cannot be evaluated: .* \(truncated\?\)"):
        load(resolve([str(step)])[0])
    (step / "manifest.json").unlink()
    write_manifest(step)  # the manifest agrees now: the weight is still missing
    with pytest.raises(ValueError, match=rf"step checkpoint {step} lacks the weights of 1 parameters .*{lost}"):
        load(resolve([str(step)])[0])


def test_a_layer_or_a_metric_the_run_lacks_is_named(tiny_run, colour_set, tmp_path):
    """``--layers 99`` on the 2-layer LLM was probed and reported as layer 0; ``--metrics bogus`` on a run with monitor
    metrics said to train with the monitor on."""
    final = str(tiny_run / "finetune" / "final")
    probe = ["--probe", str(colour_set["pretrain"]), "--probe-n", "12", "--no-plots"]
    with pytest.raises(
        ConfigError, match=r"layers=\[99\]: this LLM has 2 layers; give 'all' or whole numbers in -3\.\.2"
    ):
        main(["eval", final, "--out", str(tmp_path / "r"), *probe, "--layers", "99"])
    with pytest.raises(
        ValueError, match=r"none of the metrics \['bogus'\] is among the runs' monitor metrics \[.*'pooled/cka'"
    ):
        main(["plot-runs", str(tiny_run), "--out", str(tmp_path / "p.png"), "--metrics", "bogus"])


def test_exported_folder_loads_like_lmms_eval_llava_hf(tiny_run, colour_set, tmp_path):
    """lmms-eval's ``llava_hf`` path: AutoConfig -> Llava.from_pretrained -> AutoProcessor (left padding) -> a string
    ``<image>\\n question`` through the tokenizer's chat template -> processor -> generate(image_sizes=...). Its prompt
    must be the one alignlm trained with, and its greedy answers alignlm's."""
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    from alignlm.data.collate import Collator
    from alignlm.data.images import preprocess
    from alignlm.data.templates import get_template, to_turns
    from alignlm.evaluation.lmms import drop_unused_image_sizes
    from alignlm.export.hf_llava import export
    from alignlm.models.io import load_model

    final = tiny_run / "finetune" / "final"
    out = export(final, tmp_path / "hf")
    assert AutoConfig.from_pretrained(out).model_type == "llava"
    hf = LlavaForConditionalGeneration.from_pretrained(out, dtype="auto", device_map="cpu").eval()
    processor = AutoProcessor.from_pretrained(out)
    processor.tokenizer.padding_side = "left"
    questions = ["What color is it?", "Is it a photo? Answer yes or no."]
    texts = [
        processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"<image>\n{q}"}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    images = [Image.new("RGB", (40, 30), c) for c in ((220, 30, 30), (30, 30, 220))]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    drop_unused_image_sizes()  # what `python -m alignlm.evaluation.lmms` does before lmms-eval runs
    theirs = hf.generate(**inputs, max_new_tokens=5, do_sample=False, image_sizes=[im.size for im in images])
    theirs = theirs[:, inputs["input_ids"].shape[1] :]

    model = load_model(final)
    template = get_template("vicuna_v1")  # what the tiny run finetuned with
    samples = []
    for q, image in zip(questions, images):
        rendered = template.render(
            to_turns([{"from": "human", "value": f"<image>\n{q}"}]), model.tokenizer, add_generation_prompt=True
        )
        ids = model.tokenizer(rendered.text, add_special_tokens=False).input_ids
        ids = [t for i in ids for t in ([i] * model.num_image_tokens if i == model.image_token_id else [i])]
        samples.append(
            {
                "id": q,
                "input_ids": torch.tensor(ids),
                "labels": torch.full((len(ids),), -100),
                "pixel_values": preprocess(image, model.image_spec)[None],
                "n_images": 1,
            }
        )
    batch = Collator(model.tokenizer.pad_token_id, padding_side="left")(samples)
    assert batch["input_ids"].tolist() == inputs["input_ids"].tolist()  # the same prompt, token for token
    ours = model.generate(batch, max_new_tokens=5, do_sample=False)
    n = min(ours.shape[1], theirs.shape[1])
    assert n > 0 and ours[:, :n].tolist() == theirs[:, :n].tolist()
    # lmms-eval 0.7.3's default (chat) llava_hf renders structured content with the processor's chat template
    for q, text in zip(questions, texts):
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        assert processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text


def test_lmms_task_writes_a_local_question_set(colour_set, tmp_path):
    """``alignlm lmms-task``: one JSONL row per question with an absolute image path, a task YAML naming it, and
    task functions that score as ``alignlm eval`` does."""
    import importlib.util

    import yaml
    from PIL import Image

    assert main(["lmms-task", str(colour_set["test"]), str(tmp_path), "--name", "colours"]) == 0
    task = tmp_path / "colours"
    records = json.loads(colour_set["test"].read_text())
    rows = [json.loads(line) for line in (task / "colours.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == [r["answer"] for r in records]
    assert all(
        Path(r["image"]).is_absolute() and Path(r["image"]).exists() and "<image>" not in r["question"] for r in rows
    )

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    cfg = yaml.load((task / "colours.yaml").read_text(), Loader=Loader)
    assert cfg["task"] == "colours" and cfg["dataset_path"] == "json"
    assert Path(cfg["dataset_kwargs"]["data_files"]["test"]) == (task / "colours.jsonl").resolve()
    assert cfg["process_results"] == "utils.process_results"
    spec = importlib.util.spec_from_file_location("lmms_task_utils", task / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert isinstance(utils.doc_to_visual(rows[0])[0], Image.Image)
    assert utils.process_results(rows[0], [rows[0]["answer"].upper() + "."]) == {"accuracy": 1.0}
    assert utils.process_results(rows[0], ["no such colour"]) == {"accuracy": 0.0}


def test_lmms_task_reads_a_jsonl_set_as_eval_does(colour_set, tmp_path):
    """``alignlm lmms-task`` reads ``.jsonl`` sets (through ``read_records``, as ``alignlm eval``); numeric answers are
    written as text, the choices travel with each row, and a record without a usable answer is named."""
    import importlib.util
    import shutil

    records = json.loads(colour_set["test"].read_text())[:3]
    records[0]["answer"] = 7
    questions = tmp_path / "set.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in records))
    shutil.copytree(colour_set["test"].parent / "images", tmp_path / "images")
    assert main(["lmms-task", str(questions), str(tmp_path / "tasks"), "--name", "jl"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "tasks" / "jl" / "jl.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["7", *(r["answer"] for r in records[1:])]
    assert all(row["choices"] == r["meta"]["choices"] for row, r in zip(rows, records))
    spec = importlib.util.spec_from_file_location("lmms_task_utils_jl", tmp_path / "tasks" / "jl" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    letter = {"answer": "B", "choices": ["A", "B", "C"]}
    assert utils.process_results(letter, ["The answer is B."]) == {"accuracy": 1.0}

    records[1]["answer"] = []
    questions.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=f"record '{records[1]['id']}': answer is an empty list"):
        main(["lmms-task", str(questions), str(tmp_path / "tasks"), "--name", "jl"])


def test_lmms_task_shows_one_image_per_question_and_names_a_record_without_id(colour_set, tmp_path):
    """A two-image record was written with its first image and both ``<image>`` markers gone; ``image: []`` raised
    IndexError and a record without ``id`` KeyError."""
    import shutil

    shutil.copytree(colour_set["test"].parent / "images", tmp_path / "images")
    record = json.loads(colour_set["test"].read_text())[0]
    questions = tmp_path / "set.json"
    for images, count in (([record["image"], record["image"]], 2), ([], 0)):
        questions.write_text(json.dumps([{**record, "image": images}]))
        with pytest.raises(
            ValueError, match=rf"record '{record['id']}' has {count} images; an lmms-eval task shows one"
        ):
            main(["lmms-task", str(questions), str(tmp_path / "tasks")])
    questions.write_text(json.dumps([{k: v for k, v in record.items() if k != "id"}]))
    assert main(["lmms-task", str(questions), str(tmp_path / "tasks"), "--name", "t"]) == 0
    row = json.loads((tmp_path / "tasks" / "t" / "t.jsonl").read_text())
    assert row["question_id"] == f"{questions}#0"  # as the data layer names it


def test_a_refused_lmms_task_leaves_the_earlier_one_whole(colour_set, tmp_path):
    """The rows before a bad record were written over the earlier task's JSONL, beside its YAML: lmms-eval ran the
    truncated task without a word."""
    import shutil

    assert main(["lmms-task", str(colour_set["test"]), str(tmp_path / "tasks"), "--name", "t"]) == 0
    before = (tmp_path / "tasks" / "t" / "t.jsonl").read_bytes()
    records = json.loads(colour_set["test"].read_text())
    records[2]["answer"] = []
    shutil.copytree(colour_set["test"].parent / "images", tmp_path / "images")
    (tmp_path / "bad.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="answer is an empty list"):
        main(["lmms-task", str(tmp_path / "bad.json"), str(tmp_path / "tasks"), "--name", "t"])
    assert (tmp_path / "tasks" / "t" / "t.jsonl").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "tasks" / "t").iterdir()) == ["t.jsonl", "t.yaml", "utils.py"]


def _answer_accuracy_of(monkeypatch, preds, ids=True):
    """``answer_accuracy`` over fixed ``(id, prediction, record)`` triples, without a model; each record carries its
    id (``ids=False``: as given, the id being the data layer's ``<file>#<index>`` of a record without one)."""
    from alignlm.evaluation import evaluate

    preds = [(rid, pred, {"id": rid, **rec} if ids else rec) for rid, pred, rec in preds]
    monkeypatch.setattr(evaluate, "generate_set", lambda *args, **kwargs: preds)
    return evaluate.answer_accuracy(None, "set", "set.json", {})


def test_chance_averages_over_the_records_that_have_choices(monkeypatch):
    two, three = {"choices": ["red", "blue"]}, {"choices": ["1", "2", "3"]}
    preds = [
        ("q0", "red", {"answer": "red", "meta": two}),
        ("q1", "2", {"answer": "2", "meta": three}),
        ("q2", "red", {"answer": "red"}),  # no choices: no guessing level
        ("q3", "no", {"answer": ["no"] * 4}),
    ]
    r = _answer_accuracy_of(monkeypatch, preds)
    assert r["n"] == 4 and r["accuracy"] == 1.0
    assert r["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2) and r["chance_n"] == 2
    none = _answer_accuracy_of(monkeypatch, [("q0", "red", {"answer": "red"})])
    assert none["chance"] == 0.0 and none["chance_n"] == 0


def test_a_numeric_answer_is_scored_and_an_unscorable_one_names_its_record(monkeypatch):
    preds = [("q0", "2", {"answer": 2, "meta": {"choices": ["1", "2", "3"]}}), ("q1", "two", {"answer": 2})]
    r = _answer_accuracy_of(monkeypatch, preds)
    assert r["scores"] == {"q0": 1.0, "q1": 1.0} and r["choice_scores"] == {"q0": 1.0}
    with pytest.raises(ValueError, match="set.json record id=q1: answer is an empty list"):
        _answer_accuracy_of(monkeypatch, [("q0", "red", {"answer": "red"}), ("q1", "red", {"answer": []})])


def test_a_record_without_id_is_scored_by_its_place_in_the_set(monkeypatch):
    """Its score was keyed ``<path as typed>#<i>``: a report naming the set ``colours/test.json`` and one naming it
    ``/abs/colours/test.json`` shared no question and could not be compared."""
    scores = [
        _answer_accuracy_of(
            monkeypatch, [(f"{path}#0", "red", {"answer": "red"}), (f"{path}#1", "red", {"answer": "blue"})], ids=False
        )["scores"]
        for path in ("colours/test.json", "/abs/colours/test.json")
    ]
    assert scores[0] == scores[1] == {"#0": 1.0, "#1": 0.0}
    # a record with an id keeps it, even one that looks like a path and an index
    assert _answer_accuracy_of(monkeypatch, [("a.json#7", "red", {"answer": "red"})])["scores"] == {"a.json#7": 1.0}


def test_numeric_choices_name_the_numeric_answer(monkeypatch):
    """Choices ``[1.0, 2.0, 3.0]`` were written "2.0" and the answer ``2.0`` "2": names-choice scored 0 for "2"."""
    r = _answer_accuracy_of(
        monkeypatch, [("q0", "There are 2.", {"answer": 2.0, "meta": {"choices": [1.0, 2.0, 3.0]}})]
    )
    assert r["choice_scores"] == {"q0": 1.0}
    with pytest.raises(ValueError, match="set.json record id=q1: choice None is not a string or a number"):
        _answer_accuracy_of(monkeypatch, [("q1", "2", {"answer": 2, "meta": {"choices": [None, 2]}})])


def test_the_names_choice_column_says_it_covers_only_the_questions_with_choices(monkeypatch, tmp_path):
    """The lenient score is over the records with choices, beside the strict one over all: half of them with choices
    read 12 % against 20 %, with no n to tell why."""
    questions = [
        ("q0", "red", {"answer": "red", "meta": {"choices": ["red", "blue"]}}),
        ("q1", "red", {"answer": "red"}),
    ]
    r = _answer_accuracy_of(monkeypatch, questions)
    assert (r["n"], r["choice_n"]) == (2, 1)
    files = write_report([{"label": "a", "sets": {"s": r}}], [], {"plots": False}, tmp_path)
    assert "Names-choice % over the questions with choices (meta.choices) only: s 1 of 2" in files["md"].read_text()


def test_a_metric_that_is_not_finite_is_null_in_report_json_and_nan_in_the_table(tmp_path):
    result = {"label": "a", "sets": {}, "probe": {"n": 3, "pooled": {"cka": float("nan"), "mutual_knn": 0.5}}}
    files = write_report([result], [], {"plots": False}, tmp_path)
    report = json.loads(files["json"].read_text(), parse_constant=pytest.fail)  # strict: no bare NaN
    assert report["checkpoints"][0]["probe"]["pooled"] == {"cka": None, "mutual_knn": 0.5}
    assert "| pooled/cka | nan |" in files["md"].read_text()


def test_paired_difference_hand_checked():
    """B right on q2 and q3, A right on q1: diff = (0 + 1 + 1 - 1 + 0) / 5 over the shared ids only."""
    from alignlm.evaluation.paired import paired_difference

    a = {"q0": 1.0, "q1": 1.0, "q2": 0.0, "q3": 0.0, "q4": 0.0, "only_a": 1.0}
    b = {"q0": 1.0, "q1": 0.0, "q2": 1.0, "q3": 1.0, "q4": 0.0, "only_b": 0.0}
    r = paired_difference(a, b)
    d = [0.0, -1.0, 1.0, 1.0, 0.0]
    mean = sum(d) / 5
    se = (sum((x - mean) ** 2 for x in d) / 4 / 5) ** 0.5
    assert r is not None and r["n"] == 5 and r["a_acc"] == 0.4 and r["b_acc"] == 0.6
    assert abs(r["diff"] - 0.2) < 1e-12 and abs(r["se"] - se) < 1e-12 and abs(r["z"] - 0.2 / se) < 1e-12
    assert (r["only_b"], r["only_a"]) == (2, 1)
    assert paired_difference({"x": 1.0}, {"x": 0.0}) is None  # one shared question has no standard error
    same = paired_difference(a, a)
    assert same is not None and same["diff"] == 0.0 and same["se"] == 0.0 and same["z"] == 0.0


def test_paired_rows_per_set_and_pooled():
    from alignlm.evaluation.paired import POOLED, against_first, markdown_lines

    def ck(label, s1, s2):
        return {
            "label": label,
            "sets": {
                "s1": {"scores": dict(enumerate(s1))},
                "s2": {"scores": dict(enumerate(s2))},
                "cap": {"kind": "caption"},
            },
        }

    results = [ck("base", [1, 0, 0], [0, 0]), ck("new", [1, 1, 1], [1, 0])]
    rows = against_first(results)
    assert [(r["b"], r["set"], r["n"]) for r in rows] == [("new", "s1", 3), ("new", "s2", 2), ("new", POOLED, 5)]
    pooled = rows[-1]
    assert pooled["a_acc"] == 0.2 and pooled["b_acc"] == 0.8 and pooled["only_b"] == 3 and pooled["only_a"] == 0
    md = "\n".join(markdown_lines(rows))
    assert "Paired differences" in md and "| new | base | all | 5 | 80.0 | 20.0 | +60.0 |" in md
    assert against_first(results[:1]) == [] and markdown_lines([]) == []


def test_sets_of_one_name_from_other_files_are_not_paired_and_other_settings_are_named(tmp_path, capsys):
    """Each checkpoint may read its own run's eval.sets: two runs' ``shapes`` from two data roots (other questions
    under the same ids) were paired, labelled "same questions", with no word; so were reports of other limits,
    decoding or templates, in ``alignlm compare``."""
    from alignlm.evaluation.paired import against_first, markdown_lines, pairing_notes

    def ck(label, sha, scored_with, scores=(1, 0, 0, 1)):
        files = {"path": f"/data_{sha}/shapes/test.json", "sha256": sha}
        sets = {"shapes": {"scores": dict(enumerate(scores)), "file": files, "scored_with": scored_with}}
        return {"label": label, "run": label.split("/")[0], "step": 8, "sets": sets}

    greedy = {"generation": {}, "limit": 50, "template": "chat"}
    base, other = ck("a/finetune/final", "x1", greedy), ck("b/finetune/final", "x2", greedy, (1, 1, 1, 1))
    assert against_first([base, other]) == []
    notes = pairing_notes(base, other)
    assert notes == [
        "shapes: b/finetune/final read /data_x2/shapes/test.json, a/finetune/final read /data_x1/shapes/test.json, "
        "other questions under the same ids: not paired"
    ]
    assert "not paired" in "\n".join(markdown_lines([], notes))
    sampled = ck("c/finetune/final", "x1", {**greedy, "generation": {"do_sample": True}, "limit": 80}, (1, 1, 1, 1))
    assert [r["set"] for r in against_first([base, sampled])] == ["shapes"]  # the same questions: paired, and said
    assert pairing_notes(base, sampled) == [
        "shapes: c/finetune/final was scored with other settings than a/finetune/final: generation "
        "{'do_sample': True} against {}; limit 80 against 50"
    ]
    reports = []
    for name, result in (("a", base), ("b", other), ("c", sampled)):
        reports.append(tmp_path / f"{name}.json")
        reports[-1].write_text(json.dumps({"checkpoints": [result]}))
    with pytest.raises(SystemExit, match="nothing to compare: shapes: b/finetune/final read"):
        main(["compare", str(reports[0]), str(reports[1])])
    assert main(["compare", str(reports[0]), str(reports[2])]) == 0
    assert "alignlm compare: shapes: c/finetune/final was scored with other settings" in capsys.readouterr().err


def test_compare_reads_separate_reports(tmp_path, capsys):
    """One eval per run, then `alignlm compare`: rows against --reference, bad labels and old reports refused."""

    def report(path, label, s1, more=()):
        cks = [
            {"label": label, "run": label.split("/")[0], "step": 8, "sets": {"s1": {"scores": dict(enumerate(s1))}}},
            *more,
        ]
        path.write_text(json.dumps({"checkpoints": cks}))
        return str(path)

    a = report(tmp_path / "a.json", "run_a/finetune/final", [1, 0, 0, 1])
    b = report(tmp_path / "b.json", "run_b/finetune/final", [1, 1, 1, 1])
    assert main(["compare", a, b, "--reference", "run_b/finetune/final", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["a"], r["b"], r["set"], r["diff"]) for r in rows] == [
        ("run_b/finetune/final", "run_a/finetune/final", "s1", -0.5)
    ]
    with pytest.raises(SystemExit, match="none of the reports"):
        main(["compare", a, b, "--reference", "nope"])
    # --same-step: each run's checkpoint against the reference run's at the same step (run_c's step 4 has no partner)
    early = {"label": "run_c/finetune/step_000004", "run": "run_c", "step": 4, "sets": {"s1": {"scores": {0: 1, 1: 1}}}}
    c = report(tmp_path / "c.json", "run_c/finetune/final", [0, 0, 0, 0], [early])
    assert main(["compare", a, b, c, "--same-step", "--reference", "run_a", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["a"], r["b"], r["diff"]) for r in rows] == [
        ("run_a/finetune/final", "run_b/finetune/final", 0.5),
        ("run_a/finetune/final", "run_c/finetune/final", -0.5),
    ]
    with pytest.raises(SystemExit, match="none of the reports' runs"):
        main(["compare", a, b, "--same-step", "--reference", "run_x"])
    with pytest.raises(SystemExit, match="repeat a checkpoint label"):
        main(["compare", a, a])

    def ck(run, step, acc):
        return {
            "label": f"{run}/finetune/{step}",
            "run": run,
            "step": step,
            "sets": {"s1": {"kind": "qa", "n": 4, "accuracy": acc, "scores": {}}, "cap": {"kind": "caption"}},
        }

    curves = tmp_path / "curves.json"
    curves.write_text(
        json.dumps({"checkpoints": [ck("r1", 2, 0.25), ck("r1", 4, 0.5), ck("r2", 2, 0.75), ck("r2", None, 1.0)]})
    )
    png = tmp_path / "curves.png"
    with pytest.raises(
        SystemExit, match="nothing to compare"
    ):  # no scores in it: the table refuses, as for old reports
        main(["compare", str(curves), "--plot", str(png)])
    from alignlm.evaluation.plots import plot_accuracy_curves

    assert (
        plot_accuracy_curves(json.loads(curves.read_text())["checkpoints"], png).read_bytes()[:8]
        == b"\x89PNG\r\n\x1a\n"
    )
    with pytest.raises(ValueError, match="no question-set accuracy"):
        plot_accuracy_curves([ck("r3", None, 0.5)], png)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"checkpoints": [{"label": "x", "sets": {"s1": {"accuracy": 0.5}}}]}))
    with pytest.raises(SystemExit, match="lack 'scores'"):
        main(["compare", str(old), a])


def test_revision_seed_table_hand_checked(tmp_path):
    """experiments/revision/seed_table.py: per seed, final accuracies and paired differences; across seeds, mean, SE, t."""
    import runpy

    table = runpy.run_path(str(Path(__file__).parents[1] / "experiments" / "revision" / "seed_table.py"))["table"]
    arms = ["untrained", "raw", "revision"]
    given = {
        "seed_a": {
            "untrained": ([1, 0, 0, 1], [0, 0]),
            "raw": ([0, 0, 0, 0], [1, 1]),
            "revision": ([1, 1, 1, 1], [1, 0]),
        },
        "seed_b": {
            "untrained": ([1, 1, 1, 1], [1, 1]),
            "raw": ([1, 1, 1, 1], [1, 1]),
            "revision": ([0, 0, 0, 0], [0, 0]),
        },
    }
    for seed, by_arm in given.items():
        for arm, (s1, s2) in by_arm.items():
            sets = {
                "s1": {"scores": {f"q{i}": v for i, v in enumerate(s1)}},
                "s2": {"scores": {f"q{i}": v for i, v in enumerate(s2)}},
            }
            step = {
                "kind": "step",
                "label": f"{arm}/finetune/step_000002",
                "sets": {"s1": {"scores": {}}, "s2": {"scores": {}}},
            }
            (tmp_path / seed / f"eval_{arm}").mkdir(parents=True)
            (tmp_path / seed / f"eval_{arm}" / "report.json").write_text(
                json.dumps({"checkpoints": [step, {"kind": "final", "label": f"{arm}/finetune/final", "sets": sets}]})
            )
    lines = table([tmp_path / "seed_a", tmp_path / "seed_b"], arms)
    assert (
        lines[2] == "| seed | untrained | raw | revision | raw vs untrained | revision vs untrained | revision vs raw |"
    )
    # seed_a over all 6 questions: untrained 2/6, raw 2/6, revision 5/6; paired SE of revision - untrained (3 of +1,
    # 3 of 0): sqrt(0.3 / 6) = 0.224; of revision - raw (4 of +1, 0, -1): sqrt(0.7 / 6) = 0.342
    assert lines[4] == (
        "| seed_a | 50.0 / 0.0 / 33.3 | 0.0 / 100.0 / 33.3 | 100.0 / 50.0 / 83.3 | +0.0 (36.5) "
        "| +50.0 (22.4) | +50.0 (34.2) |"
    )
    # across seeds, revision - untrained: +0.5 and -1.0, mean -0.25, SE 0.75
    assert "| -25.0 (SE 75.0, t -0.33, p 0.80, positive at 1/2) |" in lines[6]
    assert lines[6].startswith("| mean of 2 | 75.0 / 50.0 / 66.7 |")
    (tmp_path / "seed_b" / "eval_raw" / "report.json").write_text(json.dumps({"checkpoints": [step]}))
    with pytest.raises(ValueError, match="not a final/"):
        table([tmp_path / "seed_b"], arms)


EVAL_LMMS = Path(__file__).resolve().parents[1] / "scripts" / "eval_lmms.sh"
# A stand-in `alignlm` for scripts/eval_lmms.sh, recording each command in $CALLS: `export` writes a folder (sharded
# with SHARDED set: no model.safetensors, as transformers writes a large model) with its checkpoint and weights' size
# and time as its source, `export --is-current` compares them (exit 1, saying why, when they differ), `lmms-eval`
# writes a results file unless NO_RESULTS is set
STAND_IN_ALIGNLM = """#!/usr/bin/env bash
source_of() { echo "$1 $(stat -c '%s %Y' "$1/model.safetensors")"; }
if [ "$1" = export ] && [ "${4:-}" = --is-current ]; then
  echo "export --is-current" >> "$CALLS"
  [ "$(cat "$3/source" 2>/dev/null)" = "$(source_of "$2")" ] && exit 0
  echo "$3 is not of $2 as it is now"; exit 1
fi
echo "$1" >> "$CALLS"
if [ "$1" = export ]; then
  rm -rf "$3"; mkdir -p "$3"
  weights=model.safetensors
  [ -n "${SHARDED:-}" ] && weights="model.safetensors.index.json model-00001-of-00002.safetensors"
  for f in config.json $weights; do echo {} > "$3/$f"; done
  source_of "$2" > "$3/source"; exit 0
fi
out=""; while [ $# -gt 0 ]; do [ "$1" = --output_path ] && out=$2; shift; done
[ -z "${NO_RESULTS:-}" ] && mkdir -p "$out/m" && echo {} > "$out/m/$(date +%s%N)_results.json"
exit 0
"""


def eval_lmms(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """scripts/eval_lmms.sh ``args`` from ``tmp_path`` with the stand-in alignlm: its result and the commands it ran
    (exports and lmms-eval; not the `export --is-current` questions)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    if not bin_dir.exists():
        bin_dir.mkdir()
        (bin_dir / "alignlm").write_text(STAND_IN_ALIGNLM)
        (bin_dir / "alignlm").chmod(0o755)
    calls.unlink(missing_ok=True)
    environ = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VIRTUAL_ENV": "x", "DEVICE": "cpu"}
    environ |= {"CALLS": str(calls), **env}
    proc = subprocess.run(["bash", str(EVAL_LMMS), *args], env=environ, capture_output=True, text=True, cwd=tmp_path)
    ran = calls.read_text().splitlines() if calls.exists() else []
    return proc, [c for c in ran if c != "export --is-current"]


def trained_final(folder: Path, mtime: int) -> Path:
    """A stand-in final/ folder whose weights were written at ``mtime`` (seconds)."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text("weights")
    os.utime(folder / "model.safetensors", (mtime, mtime))
    return folder


@pytest.mark.parametrize("writes_results", [False, True])
def test_eval_lmms_script_fails_without_a_results_file(tmp_path, writes_results):
    """lmms-eval exits 0 when a task fails; the script's exit status must say whether it produced results."""
    trained_final(tmp_path / "final", 1_000_000)
    # paths relative to the caller's folder: the script moves to the repository's, so it resolves them first
    proc, _ = eval_lmms(tmp_path, "final", "export", "mme", **({} if writes_results else {"NO_RESULTS": "1"}))
    assert proc.returncode == (0 if writes_results else 1), proc.stderr
    if not writes_results:
        assert "wrote no results file" in proc.stderr
    else:  # under the caller's export/, not one the script's own folder holds
        assert len(list((tmp_path / "export" / "lmms_eval" / "m").glob("*_results.json"))) == 1


def test_eval_lmms_script_exports_again_a_checkpoint_trained_again(tmp_path):
    """An export folder was reused whenever it held a config.json: a checkpoint retrained since was scored as the
    old model. One trained again is exported again, unless that would replace the old model's lmms-eval results."""
    final = trained_final(tmp_path / "final", 1_000_000)
    proc, calls = eval_lmms(tmp_path, "final", "export", "mme")
    assert proc.returncode == 0 and calls == ["export", "lmms-eval"], proc.stderr
    os.utime(final / "model.safetensors", (2_000_000, 2_000_000))  # trained again
    proc, calls = eval_lmms(tmp_path, "final", "export", "mme")  # its results now in export/lmms_eval
    assert proc.returncode == 2 and calls == []
    assert f"is not of {final} as it is now; a new export would replace" in proc.stderr
    assert "with the lmms-eval results of the model exported there" in proc.stderr
    (tmp_path / "export" / "lmms_eval").rename(tmp_path / "old_results")
    proc, calls = eval_lmms(tmp_path, "final", "export", "mme")
    assert proc.returncode == 0 and calls == ["export", "lmms-eval"], proc.stderr


def test_eval_lmms_script_exports_again_for_another_checkpoint(tmp_path):
    """One export folder for several checkpoints: a checkpoint trained before the one exported there was scored as
    that one (its weights were not newer than the export's), with exit 0."""
    trained_final(tmp_path / "run2" / "final", 1_000_000)  # trained first
    trained_final(tmp_path / "run1" / "final", 2_000_000)
    results = {"OUTPUT_PATH": "results"}  # beside the export: nothing in it to lose
    proc, calls = eval_lmms(tmp_path, "run1/final", "export", "mme", **results)
    assert proc.returncode == 0 and calls == ["export", "lmms-eval"], proc.stderr
    assert (tmp_path / "export" / "source").read_text().startswith(f"{tmp_path / 'run1' / 'final'} ")
    proc, calls = eval_lmms(tmp_path, "run2/final", "export", "mme", **results)
    assert proc.returncode == 0 and calls == ["export", "lmms-eval"], proc.stderr
    assert (tmp_path / "export" / "source").read_text().startswith(f"{tmp_path / 'run2' / 'final'} ")


def test_eval_lmms_script_refuses_a_checkpoint_with_no_weights(tmp_path):
    """A mistyped checkpoint path scored the model the export folder held, with exit 0."""
    trained_final(tmp_path / "run2" / "final", 1_000_000)
    assert eval_lmms(tmp_path, "run2/final", "export", "mme")[0].returncode == 0
    proc, calls = eval_lmms(tmp_path, "run2/fianl", "export", "mme")
    assert proc.returncode == 2 and calls == [], proc.stderr
    assert f"{tmp_path / 'run2' / 'fianl' / 'model.safetensors'}: no such file" in proc.stderr


def test_eval_lmms_script_keeps_a_sharded_export_of_its_checkpoint(tmp_path):
    """A sharded export (model-0000N-of-0000M.safetensors, no model.safetensors) was taken as older than its
    checkpoint at every run (bash's -nt with a missing file): exported again each time, and once lmms_eval/ held
    results, refused with exit 2 and a false message."""
    trained_final(tmp_path / "final", 1_000_000)
    proc, calls = eval_lmms(tmp_path, "final", "export", "mme", SHARDED="1")
    assert proc.returncode == 0 and calls == ["export", "lmms-eval"], proc.stderr
    assert not (tmp_path / "export" / "model.safetensors").exists()
    proc, calls = eval_lmms(tmp_path, "final", "export", "mme", SHARDED="1")
    assert proc.returncode == 0 and calls == ["lmms-eval"], proc.stderr


def stand_in_final(folder: Path, weights: bytes = b"weights") -> Path:
    """The files of a final/ folder an export reads, as far as its recorded source goes."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("run_name: t\n")
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_export_is_current_compares_the_checkpoint_with_the_source_its_export_recorded(tmp_path, capsys):
    """`alignlm export FINAL OUT --is-current` (what scripts/eval_lmms.sh asks before it keeps OUT): 0 for an export
    of FINAL as it is now, 1 and why for one of another checkpoint, of FINAL before it was written again, or no
    export; 2 for a FINAL that is not a final/ folder."""
    from alignlm.export.hf_llava import SOURCE_FILE, checkpoint_source

    final, out = stand_in_final(tmp_path / "a" / "final"), tmp_path / "hf"
    out.mkdir()
    (out / SOURCE_FILE).write_text(json.dumps(checkpoint_source(final)))
    assert main(["export", str(final), str(out), "--is-current"]) == 0
    assert f"{out} is the export of {final} as it is now" in capsys.readouterr().out
    other = stand_in_final(tmp_path / "b" / "final")
    assert main(["export", str(other), str(out), "--is-current"]) == 1
    assert f"{out} was exported from {final}, not from {other}" in capsys.readouterr().out
    stat = (final / "model.safetensors").stat()
    os.utime(final / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # written again
    assert main(["export", str(final), str(out), "--is-current"]) == 1
    assert f"{final} was written again since {out} was exported from it" in capsys.readouterr().out
    (out / SOURCE_FILE).write_text("[]")
    assert main(["export", str(final), str(out), "--is-current"]) == 1
    assert "is not the JSON object an export writes" in capsys.readouterr().out
    assert main(["export", str(final), str(tmp_path / "none"), "--is-current"]) == 1
    assert f"{tmp_path / 'none'} has no {SOURCE_FILE}" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "c"), str(out), "--is-current"]) == 2
    assert f"{tmp_path / 'c'} is not a final/ folder" in capsys.readouterr().err
    assert main(["export", str(final), str(out), "--is-current", "--check", "set.json"]) == 2
    assert "leave out --check" in capsys.readouterr().err


def test_an_export_records_the_checkpoint_it_was_made_from(tiny_run, tmp_path):
    """The source `--is-current` compares is the one a real export writes, read before the weights."""
    from alignlm.export.hf_llava import SOURCE_FILE, checkpoint_source

    final, out = tiny_run / "finetune" / "final", tmp_path / "hf"
    assert main(["export", str(final), str(out)]) == 0
    recorded = json.loads((out / SOURCE_FILE).read_text())
    assert recorded == checkpoint_source(final) and recorded["checkpoint"] == str(final.resolve())
    assert set(recorded["files"]) == {"config.yaml", "model.safetensors"}
    assert main(["export", str(final), str(out), "--is-current"]) == 0


def test_eval_checkpoint_script_reads_paths_from_the_callers_folder(tmp_path):
    """The script moved to the repository's folder (its .venv): relative paths given from elsewhere, the checkpoint's
    and the report's, and those in the flags after `--` (--sets NAME=PATH, --probe, --config), named files there,
    a same-named file of the repository's silently. It stays in the caller's folder, as a SLURM job does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "alignlm"  # records its folder and its arguments
    fake.write_text('#!/usr/bin/env bash\n{ echo "$PWD"; printf "%s\\n" "$@"; } > "$ARGS_FILE"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGS_FILE": str(tmp_path / "args")}
    env["VIRTUAL_ENV"] = "x"  # an environment already active: the script keeps it (the stand-in alignlm first)
    env.pop("SLURM_SUBMIT_DIR", None)
    script = Path(__file__).resolve().parents[1] / "scripts" / "eval_checkpoint.sh"
    flags = ["--sets", "mine=sets/test.json", "--probe", "sets/captions.json", "--no-probe"]
    proc = subprocess.run(["bash", str(script), "reports", "runs/a/final", "--", *flags], env=env, cwd=tmp_path)
    assert proc.returncode == 0
    cwd, *args = (tmp_path / "args").read_text().splitlines()
    assert Path(cwd) == tmp_path and args == ["eval", "runs/a/final", "--out", "reports", *flags]


def test_seed_line_and_the_seed_table_entry_point(tmp_path, capsys):
    from alignlm.evaluation.paired import mean_se, print_seed_table, seed_line, t_test_p

    assert seed_line("d", [0.01, 0.03]) == "- d: +2.00 points over 2 seeds (SE 1.00, t +2.00, df 1, p 0.295)"
    assert seed_line("same", [0.5, 0.5], 1.0, "") == "- same: +0.50 over 2 seeds (SE 0.00, t +nan, df 1, p nan)"
    alike = [0.3, 0.1 + 0.2]  # equal but for float noise: an SE of 1e-17 had made t 1e16
    assert seed_line("alike", alike).endswith("(SE 0.00, t +nan, df 1, p nan)")
    assert mean_se([1.0, math.nan, 1.0])[1] != mean_se([1.0, math.nan, 1.0])[1]  # a missing seed: no SE, not 0
    # over 3 seeds a t of -2.73 (the SIMA table's) is p 0.11, and p 0.05 needs |t| 4.30: read p, not t as a z
    assert t_test_p(-2.727, 2) == pytest.approx(0.112, abs=1e-3) and t_test_p(4.303, 2) == pytest.approx(0.05, abs=1e-4)
    print_seed_table(lambda out: [f"read {out.name}"], "usage", [str(tmp_path / "runs")])
    assert capsys.readouterr().out == "read runs\n"
    with pytest.raises(SystemExit, match="usage"):
        print_seed_table(lambda out: [], "usage", ["--help"])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--batch-size", "0"], "batch_size=0 must be a whole number >= 1"),
        (["--limit", "-1"], r"limit=-1 must be a whole number >= 1 \(or null: all\)"),  # once: n=0, exit 0
        (["--template", "vicunaa"], "template='vicunaa' is not known"),
        (["--sets", "x=/missing.json"], r"do not exist: \['/missing.json'\]"),
        (["--set", "probe.metrics=[cka,foo]"], r"unknown metrics: foo \(no metric of that name"),
        (["--device", "gpu"], "device='gpu': not a device torch knows; use auto, cpu, cuda or cuda:N"),
    ],
)
def test_eval_refuses_knobs_that_cannot_work_before_loading_anything(tmp_path, flags, message):
    missing = tmp_path / "no_checkpoint_here"  # never read: the knobs fail first
    with pytest.raises(SystemExit, match=message):
        main(["eval", str(missing), "--out", str(tmp_path / "r"), *flags])


def test_paired_p_is_the_exact_sign_test():
    """z overstates confidence with few discordant questions: 4 of 50 all for B give z 2.06 but p 0.125."""
    from alignlm.evaluation.paired import paired_difference, sign_test

    a = {str(i): 0.0 for i in range(50)}
    b = {k: float(int(k) < 4) for k in a}
    r = paired_difference(a, b)
    assert r is not None and r["z"] > 2 and r["p"] == pytest.approx(0.125)
    assert sign_test(3, 0) == pytest.approx(0.25) and sign_test(0, 0) == 1.0 and sign_test(5, 5) == 1.0
    assert sign_test(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert 0 < sign_test(3000, 2000) < 1e-40  # exact integers, no overflow


def test_same_step_pairs_checkpoints_of_the_same_stage():
    """Steps restart in each stage: b's pretrain at step 500 pairs with a's pretrain, not a's finetune at 500."""
    from unittest import mock

    from alignlm.evaluation import plots
    from alignlm.evaluation.paired import same_step

    def ck(run, stage, acc):
        scores = {str(i): acc for i in range(10)}
        return {
            "run": run,
            "stage": stage,
            "step": 500,
            "label": f"{run}/{stage}/final",
            "sets": {s: {"kind": "qa", "accuracy": acc, "n": 10, "scores": scores} for s in ("s1", "s2")},
        }

    results = [ck("a", "pretrain", 0.0), ck("a", "finetune", 1.0), ck("b", "pretrain", 0.0), ck("b", "finetune", 1.0)]
    pairs = {(r["b"], r["a"], r["diff"]) for r in same_step(results, "a")}
    assert pairs == {("b/pretrain/final", "a/pretrain/final", 0.0), ("b/finetune/final", "a/finetune/final", 0.0)}
    with mock.patch.object(plots, "plot_panels", lambda panels, path, xlabel: panels):
        panels = plots.plot_accuracy_curves(results[:2], Path("unused.png"))
    assert panels["all questions accuracy %"] == {"a/pretrain": [(500, 0.0)], "a/finetune": [(500, 100.0)]}


def test_monitor_skips_a_measurement_of_non_finite_features(tiny_model, colour_set, caplog):
    """The metrics refuse NaN features; the in-training monitor warns and logs nothing rather than end the run."""
    from alignlm.training.monitor import AlignmentMonitor

    model = tiny_model()
    monitor = AlignmentMonitor({"every": 1, "probe": str(colour_set["pretrain"]), "n": 12, "topk": 4}, model)
    assert "monitor/pooled/cka" in monitor(1, model)
    with torch.no_grad():
        next(model.connector.parameters()).fill_(float("nan"))
    with caplog.at_level("WARNING", logger="alignlm"):
        assert monitor(2, model) == {}
    assert "not finite" in caplog.text


def test_generation_settings_alignlm_sets_itself_are_refused_and_lmms_tasks_ask_one_bare_question():
    """A second max_new_tokens was a duplicate-keyword TypeError; several sequences per question were paired with the
    wrong ids. An lmms-eval task asks one question with no history, so a multi-turn or system record is refused."""
    from alignlm.config import ConfigError
    from alignlm.evaluation.lmms import question_of
    from alignlm.models.generation import check_generation

    check_generation({"do_sample": True, "temperature": 0.7})
    for key in ("max_new_tokens", "num_return_sequences", "eos_token_id"):
        with pytest.raises(ConfigError, match=key):
            check_generation({key: 2})
    with pytest.raises(ConfigError, match="max_new_tokens"):
        run(compose("+eval.generation.max_new_tokens=4"))
    one = {"id": "a", "conversations": [{"from": "user", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}
    assert question_of(one) == "What?"
    two = {"id": "b", "conversations": [*one["conversations"], *one["conversations"]]}
    system = {"id": "c", "conversations": [{"from": "system", "value": "Be brief."}, *one["conversations"]]}
    for record in (two, system):
        with pytest.raises(ValueError, match=f"id='{record['id']}'"):
            question_of(record)


# ------------------------------------------------------------------------------ probe storage and refusals


def test_the_probe_keeps_every_items_tokens_only_for_a_metric_that_reads_them(tiny_model, colour_set, monkeypatch):
    """``extract`` kept every visual and caption token in float32, also when no metric read them (LLaVA-1.5-7B: 19.5
    GiB at 2k probe items, twice that for a moment in ``torch.cat``). Without ``a_score`` only the pooled features are
    kept, and every figure is the same; the A-score over groups of items is the A-score over all of them."""
    from alignlm.models import probes
    from alignlm.models.probes import extract, load_probe_set, needs_tokens, probe_metrics

    model, probe = tiny_model(), load_probe_set(colour_set["pretrain"], 12)
    names = ["modality_gap", "mutual_knn", "cka", "cknna", "svcca", "retrieval"]
    assert needs_tokens([*names, "a_score"]) and not needs_tokens(names)
    pooled = extract(model, probe, batch_size=5, tokens=False)
    whole = extract(model, probe, batch_size=5, tokens=True)
    assert pooled.a_scores is None and not hasattr(whole, "visual_tokens")
    assert probe_metrics(pooled, names, topk=4) == probe_metrics(whole, names, topk=4)
    with pytest.raises(ValueError, match="a_score reads every item's tokens"):
        probe_metrics(pooled, ["a_score"], topk=4)
    expected = probe_metrics(extract(model, probe, 12, tokens=True), ["a_score"], topk=4)["per_token"]  # one batch
    assert probe_metrics(whole, ["a_score"], topk=4)["per_token"] == pytest.approx(expected, rel=1e-12)
    monkeypatch.setattr(probes, "_A_SCORE_ELEMENTS", 2 * model.num_image_tokens * model.llm.config.hidden_size)
    grouped = extract(model, probe, batch_size=5, tokens=True)  # groups of 2 items within each batch
    assert probe_metrics(grouped, ["a_score"], topk=4)["per_token"] == pytest.approx(expected, rel=1e-12)


def test_caption_means_of_a_half_precision_llm_are_summed_in_fp32(tiny_model, colour_set):
    """The captions' mean embeddings were summed in the LLM's dtype (bf16 for Vicuna-7B), the visual tokens' in fp32:
    2e-3 off, moving the metrics by 3e-5."""
    from alignlm.data.templates import plain_text_ids
    from alignlm.models.probes import extract, load_probe_set

    model, probe = tiny_model(), load_probe_set(colour_set["pretrain"], 12)
    model.llm.get_input_embeddings().to(torch.bfloat16)
    table = model.llm.get_input_embeddings().weight.double()
    ids = plain_text_ids(probe.captions, model.tokenizer)
    exact = torch.stack([table[i].mean(dim=0) for i in ids])
    got = extract(model, probe, batch_size=5).text_mean.double()
    assert (got - exact).abs().max() < 1e-6


def _eval_config(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    from alignlm.commands.evaluate import eval_defaults

    return OmegaConf.to_container(OmegaConf.merge(eval_defaults(), OmegaConf.from_dotlist(list(overrides))))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["probe.topk=1"], "probe.topk=1: cknna needs probe.topk >= 2"),  # cknna in the default metrics
        (["probe.topk=1", "probe.metrics=[cka]", "gap_shift.metric=cknna"], "probe.topk=1: cknna needs"),
        (["probe.n=3", "probe.topk=1", "probe.metrics=[unbiased_cka]"], "probe.n=3 is fewer than the 4 probe pairs"),
    ],
)
def test_probe_settings_its_metrics_cannot_measure_with_are_refused_before_a_checkpoint_is_loaded(overrides, message):
    """cknna needs topk >= 2 and the unbiased HSIC (unbiased_cka, cknna) 4 pairs: the checks compared n with topk + 2
    only, so these raised in the metrics after every answer had been generated."""
    from alignlm.commands.evaluate import check_eval_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        check_eval_config(_eval_config(*overrides))
    check_eval_config(_eval_config(*overrides, "probe.enabled=false"))  # no probe, nothing it cannot measure
    check_eval_config(_eval_config("probe.topk=2", "probe.n=4"))


def test_a_probe_file_too_small_for_the_unbiased_hsic_is_refused_naming_it():
    """3 pairs passed ``check_probe_size`` for topk 1 (3 >= topk + 2); unbiased_cka then raised once measured."""
    from alignlm.models.probes import check_probe_size

    args = ("probe", "eval probe.path", "p.json", None)
    with pytest.raises(ConfigError, match=r"eval probe.path=p.json gives 3 usable .* the 4 that \['unbiased_cka'\]"):
        check_probe_size(3, 1, {"mutual_knn", "unbiased_cka"}, *args)
    with pytest.raises(ConfigError, match="probe.topk=1: cknna needs"):
        check_probe_size(40, 1, {"cknna"}, *args)
    check_probe_size(3, 1, {"mutual_knn", "cka"}, *args)
    check_probe_size(4, 2, {"cknna", "unbiased_cka"}, *args)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["monitor.topk=1"], "monitor.topk=1: cknna needs monitor.topk >= 2"),  # cknna in the default metrics
        (
            ["monitor.topk=1", "monitor.metrics=[cka]", "monitor.layers=[-1]", "monitor.layer_metrics=[cknna]"],
            "monitor.topk=1: cknna needs",
        ),
        (["monitor.n=3", "monitor.topk=1", "monitor.metrics=[unbiased_cka]"], "monitor.n=3 is fewer than the 4"),
    ],
)
def test_monitor_settings_its_metrics_cannot_measure_with_are_refused_before_training(
    tiny_model, colour_set, overrides, message
):
    """``monitor.topk=1`` passed the config check and the monitor's set-up, then stopped the run at its first
    measurement (after step 1): cknna needs topk >= 2, the unbiased HSIC 4 pairs."""
    from alignlm.checks import _check_monitor
    from alignlm.training.monitor import AlignmentMonitor

    cfg = compose("model=tiny", f"monitor.probe={colour_set['pretrain']}", "monitor.every=5", *overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        _check_monitor(cfg.monitor)
    if "monitor.n=3" not in overrides:  # the file gives more pairs than that: the set-up checks the settings too
        with pytest.raises(ConfigError, match=re.escape(message)):
            AlignmentMonitor(cfg.monitor, tiny_model())
    unmeasured = ("monitor.metrics=[cka]", "monitor.topk=1", "monitor.layer_metrics=[cknna]")  # no layers asked
    _check_monitor(compose(f"monitor.probe={colour_set['pretrain']}", "monitor.every=5", *unmeasured).monitor)


def test_the_pca_plot_joins_the_pairs_with_one_collection(tmp_path, monkeypatch):
    """One ``ax.plot`` per pair took 1.6 ms each (6 s for 4k pairs, 80 s for 50k); one collection draws them all."""
    from matplotlib.collections import LineCollection

    from alignlm.evaluation import plots
    from alignlm.evaluation.plots import pyplot

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)
    plots.plot_pca([("a", image, text, 0.5), ("b", text, image, 0.5)], tmp_path / "pca.png")
    for ax, (first, second) in zip(figures[0].axes, ((image, text), (text, image))):
        assert not ax.lines
        (lines,) = [c for c in ax.collections if isinstance(c, LineCollection)]
        a, b = plots.pca_2d(first, second)
        segments = torch.stack([torch.as_tensor(s) for s in lines.get_segments()])
        torch.testing.assert_close(segments, torch.stack([a, b], dim=1))
    pyplot().close(figures[0])


# ------------------------------------------------------------------ evaluations that stop part-way, and their cost


def _copy_run(tiny_run, tmp_path):
    """A copy of the tiny run, whose files a test may change."""
    import shutil

    return Path(shutil.copytree(tiny_run, tmp_path / "runs" / "t"))


def test_an_interrupted_eval_keeps_what_finished_and_the_same_command_computes_only_the_rest(
    tiny_run, colour_set, tmp_path, monkeypatch
):
    """Every checkpoint's results were held in memory until the last one was done: a job pre-empted in its third
    checkpoint (or at 80 % of one 12.6k-question set) left nothing in --out, and the requeued job redid it all."""
    from alignlm.evaluation import report

    run = _copy_run(tiny_run, tmp_path)
    ckpts = [run / "pretrain" / "final", run / "finetune" / "final"]
    whole = _eval(ckpts, tmp_path / "whole", colour_set, "--no-plots")
    calls = []
    for name in ("answer_accuracy", "caption_scores"):
        real = getattr(report, name)
        monkeypatch.setattr(report, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    real_caption_scores = report.caption_scores

    def pre_empted(*args, **kwargs):
        if calls.count("caption_scores") == 1:  # the second checkpoint's caption set
            raise KeyboardInterrupt
        return real_caption_scores(*args, **kwargs)

    monkeypatch.setattr(report, "caption_scores", pre_empted)
    with pytest.raises(KeyboardInterrupt):
        _eval(ckpts, tmp_path / "r", colour_set, "--no-plots")
    kept = sorted(str(p.relative_to(tmp_path / "r")) for p in (tmp_path / "r").rglob("*") if p.is_file())
    first, second = sorted({Path(p).parent.name for p in kept})
    assert first.startswith("t--finetune--final-") and second.startswith("t--pretrain--final-")
    assert [Path(p).name for p in kept] == [
        "set-colours.json",  # the second checkpoint's question set, finished before the stop
        "probe.json",
        "probe.safetensors",  # the pooled features the PCA plot draws
        "set-captions.json",
        "set-colours.json",
    ]
    monkeypatch.setattr(report, "caption_scores", real_caption_scores)
    loads = []
    real_load = report.C.load
    monkeypatch.setattr(report.C, "load", lambda ck, *a: loads.append(ck.label) or real_load(ck, *a))
    calls.clear()
    _eval(ckpts, tmp_path / "r", colour_set)  # the same command again (plots on: the kept features draw the PCA)
    assert loads == ["t/finetune/final"] and calls == ["caption_scores"]  # only what was missing
    assert (tmp_path / "r" / "report.json").read_bytes() == (whole / "report.json").read_bytes()
    assert (tmp_path / "r" / "pca.png").exists()
    # a changed scoring knob recomputes what it scores with; changed weights recompute their checkpoint
    loads.clear(), calls.clear()
    _eval(ckpts[:1], tmp_path / "r", colour_set, "--no-plots", "--max-new-tokens", "3")
    assert loads == ["t/pretrain/final"] and calls == ["answer_accuracy"]
    loads.clear(), calls.clear()
    weights = ckpts[0] / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    _eval(ckpts[:1], tmp_path / "r", colour_set, "--no-plots", "--max-new-tokens", "3")
    assert loads == ["t/pretrain/final"] and calls == ["answer_accuracy", "caption_scores"]


def test_every_eval_knob_is_either_part_of_what_a_kept_result_is_keyed_by_or_changes_no_number():
    """A knob missing from the keys of the kept pieces would serve results computed with its old value."""
    from alignlm.commands.evaluate import eval_defaults
    from alignlm.evaluation.report import NO_SCORE_KNOBS, PROBE_KNOBS, SET_KNOBS, TOKEN_BUDGET

    classified = {*SET_KNOBS, *TOKEN_BUDGET.values(), *PROBE_KNOBS, *NO_SCORE_KNOBS}
    assert set(eval_defaults()) == classified


def _final_with_own_sets(tiny_run, tmp_path, run: str, sets: str):
    """A copy of the tiny run's finetune final/ as run ``run``, its config's eval.sets set to ``sets``."""
    import shutil

    final = Path(shutil.copytree(tiny_run / "finetune" / "final", tmp_path / run / "finetune" / "final"))
    config = final / "config.yaml"
    text = config.read_text()
    assert "eval:\n  sets: []" in text
    config.write_text(text.replace("eval:\n  sets: []", f"eval:\n  sets: {sets}"))
    return final


def _refused_before_loading(monkeypatch):
    from alignlm.evaluation import report

    monkeypatch.setattr(report.C, "load", lambda *a, **k: pytest.fail("a checkpoint was loaded before the check"))


def test_a_later_runs_own_set_that_is_not_there_is_refused_before_any_checkpoint_is_loaded(
    tiny_run, colour_set, tmp_path, monkeypatch
):
    """Set files were checked for --sets only: a second run's own eval.sets naming a cluster path was found at its
    turn, after the first run's evaluation, which was then lost."""
    a = _final_with_own_sets(tiny_run, tmp_path, "a", f"[{{name: c, path: {colour_set['test']}}}]")
    b = _final_with_own_sets(tiny_run, tmp_path, "b", "[{name: c, path: /scratch/data/gqa_testdev.json}]")
    _refused_before_loading(monkeypatch)
    message = r"b/finetune/final: the eval.sets of its run's config name files that are not there: \['/scratch/data"
    with pytest.raises(ConfigError, match=message):
        main(["eval", str(a), str(b), "--out", str(tmp_path / "r"), "--no-probe"])


def test_a_reference_answer_that_cannot_be_scored_is_refused_before_any_checkpoint_is_loaded(
    tiny_run, colour_set, tmp_path, monkeypatch
):
    """One annotator's "?" among ten human answers of the last question was refused after the whole set had been
    generated (and every checkpoint before)."""
    from alignlm.data.records import DataError

    records = json.loads(colour_set["test"].read_text())
    records[-1]["answer"] = ["red"] * 9 + ["?"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    _refused_before_loading(monkeypatch)
    final = tiny_run / "finetune" / "final"
    with pytest.raises(DataError, match=r"eval set 'q' \(.*bad.json\) record id=t11: answer '\?' is empty after"):
        main(["eval", str(tiny_run / "pretrain" / "final"), str(final), "--out", str(tmp_path / "r"),
              "--sets", f"q={bad}", "--no-probe"])  # fmt: skip


def test_a_prompt_longer_than_the_stages_max_length_is_refused_before_any_answer_naming_it(
    tiny_run, colour_set, tmp_path, monkeypatch
):
    """A question over data.max_length was found when its batch was made, after every answer before it, as "a cut
    would leave no answer" (of a prompt), naming no set."""
    from alignlm.data.records import DataError
    from alignlm.evaluation import report

    records = json.loads(colour_set["test"].read_text())
    records[-1]["conversations"][0]["value"] = "<image>\n" + " ".join(f"tok{i}" for i in range(3000)) + "\nWhat?"
    long = tmp_path / "long.json"
    long.write_text(json.dumps(records))
    (tmp_path / "images").symlink_to(colour_set["test"].parent / "images")  # the set's images, where it reads them
    monkeypatch.setattr(report, "answer_accuracy", lambda *a, **k: pytest.fail("answers generated before the check"))
    message = (
        r"t/finetune/final: eval set 'q' \(.*long.json\): record id=t11 has a prompt of \d+ tokens "
        r"\(\d+ visual tokens per image\), over its stage.s data.max_length=2048"
    )
    with pytest.raises(DataError, match=message):
        main(["eval", str(tiny_run / "finetune" / "final"), "--out", str(tmp_path / "r"), "--sets", f"q={long}",
              "--no-probe"])  # fmt: skip


def test_a_report_that_cannot_be_written_whole_leaves_the_last_one_as_it_was(tmp_path):
    """report.json and report.md were rewritten in place: a full disk left report.json cut and unparseable beside the
    last run's report.md, which looked whole."""
    import resource

    def result(label, n):
        scores = {f"q{i}": float(i % 2) for i in range(n)}
        return {
            "label": label,
            "sets": {"s": {"kind": "qa", "accuracy": 0.5, "n": n, "examples": [], "scores": scores}},
        }

    write_report([result("a", 4)], [{}], {"plots": False}, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("report.json", "report.md")}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # a disk that fills while the new report is written
    try:
        with pytest.raises(OSError) as refused:
            write_report([result("a", 200), result("b", 200)], [{}, {}], {"plots": False}, tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert refused.value.filename == str(tmp_path / "report.json")
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]  # no temporary left


def test_eval_workers_build_the_same_batches_in_the_same_order(tiny_model, colour_set, tmp_path):
    """The images were decoded on the main thread between generation calls (5.6 ms a 336-px question, ~138 s a
    checkpoint over four benchmarks); workers decode them ahead, and the answers stay the same."""
    from omegaconf import OmegaConf

    from alignlm.commands.evaluate import check_eval_config
    from alignlm.data.images import loader_workers as eval_workers
    from alignlm.data.images import usable_cpus
    from alignlm.models.generation import generate_set

    model = tiny_model().eval()
    data = OmegaConf.to_container(compose().stages.finetune.data, resolve=True)
    path = str(colour_set["test"])
    alone = generate_set(model, path, data, batch_size=5, max_new_tokens=4)
    workers = generate_set(model, path, data, batch_size=5, max_new_tokens=4, num_workers=2)
    assert workers == alone and len(alone) == 12
    assert eval_workers("auto", torch.device("cpu")) == 0  # workers would take the cores generation runs on
    assert eval_workers("auto", torch.device("cuda")) == min(8, usable_cpus())
    assert eval_workers(3, torch.device("cpu")) == 3
    with pytest.raises(SystemExit, match=r"num_workers=-1 must be auto or a whole number >= 0"):
        check_eval_config(_eval_config("num_workers=-1"))


def test_a_plain_templates_stop_string_is_prepared_once_per_tokenizer(tiny_model, colour_set, tmp_path, monkeypatch):
    """transformers built a StopStringCriteria (the whole vocabulary read and sorted: 43 ms at 49k tokens) in every
    generate() call; it is built once, and answers still end at the template's newline."""
    from omegaconf import OmegaConf
    from transformers import LogitsProcessor, LogitsProcessorList
    from transformers.generation import stopping_criteria

    from alignlm.models.generation import generate_set

    built = []
    real = stopping_criteria.StopStringCriteria.__init__
    monkeypatch.setattr(
        stopping_criteria.StopStringCriteria, "__init__", lambda self, *a, **k: built.append(1) or real(self, *a, **k)
    )
    model = tiny_model().eval()
    tok = model.tokenizer
    answer = tok("red", add_special_tokens=False).input_ids + tok("\n", add_special_tokens=False).input_ids
    answer += tok(" blue green", add_special_tokens=False).input_ids

    class Force(LogitsProcessor):  # every question answered "red\n blue green"
        prompt = None

        def __call__(self, input_ids, scores):
            self.prompt = input_ids.shape[1] if self.prompt is None else self.prompt
            out = torch.full_like(scores, -1e9)
            out[:, answer[min(input_ids.shape[1] - self.prompt, len(answer) - 1)]] = 0
            return out

    data = {**OmegaConf.to_container(compose().stages.pretrain.data, resolve=True), "template": "plain"}
    preds = []
    for start in range(0, 12, 4):  # three calls of generate(), one per batch; a new processor each (its prompt)
        gen = {"do_sample": False, "logits_processor": LogitsProcessorList([Force()])}
        part = tmp_path / f"{start}.json"
        part.write_text(json.dumps(json.loads(colour_set["test"].read_text())[start : start + 4]))
        preds += generate_set(model, str(part), data, batch_size=4, max_new_tokens=8, generation=gen,
                              image_root=str(colour_set["test"].parent))  # fmt: skip
    assert [p for _, p, _ in preds] == ["red"] * 12
    assert len(built) == 1


def test_a_kept_result_is_keyed_by_the_images_its_file_names_the_code_and_the_local_weights_of_its_model(
    tmp_path, monkeypatch
):
    """A set or probe file unchanged whose images were replaced, another alignlm (a scoring fix), and new weights at a
    local path the run's model config names (a final/ holds only the parts it trained) had all been served the results
    kept before."""
    from omegaconf import OmegaConf

    from alignlm.evaluation import report

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"one")
    questions = tmp_path / "set.json"
    questions.write_text(json.dumps([{"id": "1", "image": "a.png", "conversations": []}]))
    parts = report.Parts(tmp_path / "parts", [], "cpu")
    before = parts.key(str(questions), {}, str(images))
    assert before == parts.key(str(questions), {}, str(images))
    (images / "a.png").write_bytes(b"other")
    assert parts.key(str(questions), {}, str(images)) != before
    again = parts.key(str(questions), {}, str(images))
    monkeypatch.setattr(report, "code_digest", lambda: "another version")
    assert parts.key(str(questions), {}, str(images)) != again
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "model.safetensors").write_bytes(b"w")
    cfg = OmegaConf.create({"model": {"llm": {"name_or_path": str(llm)}, "vision": {"name": "hub/model"}}})
    assert [Path(p).name for p, *_ in report._model_files(cfg)] == ["model.safetensors"]


# ------------------------------------------------------------------ a set stopped part-way resumes at its first batch


def _generate_counted(model, calls: list[int], stop_at: list[int | None]):
    """``model`` whose ``generate`` counts its calls in ``calls`` and raises KeyboardInterrupt (a kill) at the call
    ``stop_at[0]`` (0: the first; None: never)."""
    real = model.generate

    def generate(*args, **kwargs):
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    model.generate = generate
    return model


SAMPLED = ["--set", "generation.do_sample=true", "--set", "generation.temperature=5.0"]


@pytest.mark.parametrize("decoding", [[], SAMPLED], ids=["greedy", "sampled"])
def test_an_eval_killed_inside_a_set_generates_only_the_batches_it_had_not_finished(
    tiny_run, colour_set, tmp_path, monkeypatch, decoding
):
    """A set was the unit of what a stopped evaluation kept: a job killed at 80 % of a 12.6k-question set generated it
    again from its first question. Each batch's answers are kept as it finishes, and the same command again generates
    only the batches left, to the report of an evaluation that never stopped: sampled too (a seed per batch, where one
    stream for the whole set made a batch's samples depend on the batches before it)."""
    from alignlm.evaluation import report

    calls: list[int] = []
    stop_at: list[int | None] = [None]
    real_load = report.C.load
    monkeypatch.setattr(report.C, "load", lambda ck, *a: _generate_counted(real_load(ck, *a), calls, stop_at))
    final = tiny_run / "finetune" / "final"
    argv = ["eval", str(final), "--sets", f"colours={colour_set['test']}", "--no-probe", "--no-plots",
            "--batch-size", "2", "--max-new-tokens", "3", *decoding]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    assert len(calls) == 6  # 12 questions, 2 a batch
    calls.clear()
    stop_at[0] = 2  # killed in the third batch, whose first answer is among the report's examples
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--out", str(tmp_path / "r")])
    (partial,) = (tmp_path / "r").rglob("set-colours.partial.jsonl")
    key, *batches = [json.loads(line) for line in partial.read_text().splitlines()]
    assert [[rid for rid, _ in batch] for batch in batches] == [["t0", "t1"], ["t2", "t3"]]
    assert key["knobs"]["batch_size"] == 2 and not list((tmp_path / "r").rglob("set-colours.json"))
    calls.clear()
    stop_at[0] = None
    assert main([*argv, "--out", str(tmp_path / "r")]) == 0
    assert len(calls) == 4  # the batches left
    assert (tmp_path / "r" / "report.json").read_bytes() == (tmp_path / "whole" / "report.json").read_bytes()
    assert not partial.exists() and partial.with_name("set-colours.json").exists()  # the piece holds every answer
    # answers kept under another key (another answer length) are not reused
    calls.clear()
    stop_at[0] = 1
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--out", str(tmp_path / "r"), "--max-new-tokens", "2"])
    assert len(partial.read_text().splitlines()) == 2  # its key, its first batch
    calls.clear()
    stop_at[0] = None
    assert main([*argv, "--out", str(tmp_path / "r"), "--max-new-tokens", "1"]) == 0
    assert len(calls) == 6


def test_a_kept_batch_is_reused_only_under_its_key_and_a_line_the_kill_cut_is_ignored(
    tiny_model, colour_set, tmp_path, caplog
):
    """What a partial set file holds is reused only where it was answered under the same key (weights, files, knobs,
    code) and for the same records; a last line a kill cut is ignored and cut off, so the batches appended after it
    read back whole."""
    from omegaconf import OmegaConf

    from alignlm.evaluation.report import PartialSet
    from alignlm.models.generation import generate_set

    calls: list[int] = []
    stop_at: list[int | None] = [None]
    model = _generate_counted(tiny_model().eval(), calls, stop_at)
    data = OmegaConf.to_container(compose().stages.finetune.data, resolve=True)
    path, settings = str(colour_set["test"]), {"batch_size": 5, "max_new_tokens": 3, "generation": {"do_sample": True}}
    whole = generate_set(model, path, data, **settings)
    file = tmp_path / "set-c.partial.jsonl"
    stop_at[0], calls[:] = 1, []
    with pytest.raises(KeyboardInterrupt):
        generate_set(model, path, data, **settings, keep=PartialSet(file, {"k": 1}))
    assert len(file.read_text().splitlines()) == 2  # the key, the first batch
    with file.open("a") as f:
        f.write('[["t5", "re')  # the second batch's line, cut by a kill
    stop_at[0], calls[:] = None, []
    with caplog.at_level("INFO", logger="alignlm"):
        assert generate_set(model, path, data, **settings, keep=PartialSet(file, {"k": 1})) == whole
    assert len(calls) == 2 and "5 answers kept from before" in caplog.text
    lines = [json.loads(line) for line in file.read_text().splitlines()]
    assert lines[0] == {"k": 1} and [len(batch) for batch in lines[1:]] == [5, 5, 2]
    assert PartialSet(file, {"k": 1}).answered([["t0", "t1", "t2", "t3", "t4"], ["t5", "x"]]) == [
        [p for _, p, _ in whole[:5]]  # a line of other records ends what is reused, and is cut off
    ]
    assert len(file.read_text().splitlines()) == 2
    caplog.clear()
    calls[:] = []
    with caplog.at_level("INFO", logger="alignlm"):
        assert generate_set(model, path, data, **settings, keep=PartialSet(file, {"k": 2})) == whole
    assert len(calls) == 3 and "answered from other weights, files or settings" in caplog.text
    assert [json.loads(line) for line in file.read_text().splitlines()][0] == {"k": 2}


# ------------------------------------------------------------------ figures: order, colours, gaps, many lines


def _monitor_rows(stage: Path, rows: list[dict], mtime: float | None = None) -> None:
    """A stage folder's metrics.jsonl of ``rows``, last written at ``mtime``."""
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if mtime is not None:
        os.utime(stage / "metrics.jsonl", (mtime, mtime))


def _drawn_figures(monkeypatch) -> list:
    """The figures the plot functions draw, kept instead of saved (their lines are the data the PNG shows)."""
    from alignlm.evaluation import plots

    figures: list = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    return figures


def _lines(fig) -> dict[str, dict[str, tuple[list, list, object]]]:
    """Panel title -> line label -> (x, y, colour) of a drawn figure."""
    return {
        ax.get_title(): {
            line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_color()) for line in ax.lines
        }
        for ax in fig.axes
    }


def test_plot_runs_chains_a_later_dpo_jobs_stage_after_the_stages_it_started_from(tmp_path):
    """README's preference tuning is a later job in the same run folder (`run=[dpo]`): the order came from the `run`
    list of the config first by name (dpo's: [dpo]), so dpo was drawn first, then finetune, pretrain; with no
    config.yaml (only the metrics copied off a cluster) stages went by name: finetune before pretrain."""
    from alignlm.evaluation.plots import read_monitor

    run = tmp_path / "t"
    configs = {
        "pretrain": "run: [pretrain, finetune]\nstages: {pretrain: {init_from: null}, finetune: {init_from: pretrain}}\n",
        "finetune": "run: [pretrain, finetune]\nstages: {pretrain: {init_from: null}, finetune: {init_from: pretrain}}\n",
        "dpo": "run: [dpo]\nstages: {finetune: {init_from: pretrain}, dpo: {init_from: finetune}}\n",
    }
    now = 1_800_000_000
    # copied folders: last written in the reverse order; the configs order them all the same
    for i, (stage, gap) in enumerate((("pretrain", 3.0), ("finetune", 2.0), ("dpo", 1.0))):
        _monitor_rows(run / stage, [{"step": s, "monitor/pooled/modality_gap": gap} for s in (1, 2)], now - 60 * i)
        (run / stage / "config.yaml").write_text(configs[stage])
    assert read_monitor(run)["pooled/modality_gap"] == [(1, 3.0), (2, 3.0), (3, 2.0), (4, 2.0), (5, 1.0), (6, 1.0)]
    # no config.yaml: when each stage last wrote its metrics
    bare = tmp_path / "bare"
    for i, (stage, gap) in enumerate((("pretrain", 3.0), ("finetune", 2.0))):
        _monitor_rows(bare / stage, [{"step": 1, "monitor/pooled/modality_gap": gap}], now + 60 * i)
    assert read_monitor(bare)["pooled/modality_gap"] == [(1, 3.0), (2, 2.0)]


def test_a_towers_layers_are_in_layer_order_in_a_fresh_and_a_reused_report(tmp_path, monkeypatch):
    """A reused probe is read back from parts/probe.json, written with its keys sorted as text: report.md's tower
    table and artifacts.png put `layer 10` before `layer 2` (and drew each at that place on the x axis)."""
    from alignlm.evaluation import plots

    fresh = {f"layer {i}": {"outlier_share": i / 100, "max_ratio": 1 + i, "prefix_ratio": None} for i in range(12)}
    fresh["output"] = {"outlier_share": 0.5, "max_ratio": 50.0, "prefix_ratio": None}
    reused = json.loads(json.dumps(fresh, sort_keys=True))
    assert list(reused)[:3] == ["layer 0", "layer 1", "layer 10"]
    drawn = []
    monkeypatch.setattr(plots, "plot_panels", lambda panels, path, xlabel: drawn.append(panels) or path)
    tables = []
    for name, layers in (("fresh", fresh), ("reused", reused)):
        results = [{"label": "a", "sets": {}, "artifacts": {"factor": 4.0, "layers": layers}}]
        files = write_report(results, [{}], {}, tmp_path / name)
        rows = [line.split("|")[1].strip() for line in files["md"].read_text().splitlines() if line.startswith("| ")]
        tables.append(rows[rows.index("layer") + 1 :])  # the tower table's rows, below its header
    assert tables[0] == tables[1] == [f"layer {i}" for i in range(12)] + ["output"]
    assert drawn[0] == drawn[1]
    assert [y for _, y in drawn[1]["max / median token norm"]["a"]] == [1 + i for i in range(12)] + [50.0]


def test_a_label_keeps_one_colour_in_every_panel_and_the_one_legend_names_every_run(tmp_path, monkeypatch, alignlm_log):
    """Colours went panel by panel and the legend was the first panel's: run B, alone in the modality_gap panel, took
    run A's colour there, and a run absent from the first panel was named nowhere; a run without monitor metrics was
    left out without a word."""
    from alignlm.evaluation.plots import plot_runs

    figures = _drawn_figures(monkeypatch)
    _monitor_rows(tmp_path / "A" / "pretrain", [{"step": 1, "monitor/pooled/cka": 0.9, "monitor/pooled/mutual_knn": 1}])
    _monitor_rows(
        tmp_path / "B" / "pretrain", [{"step": 1, "monitor/pooled/cka": 0.1, "monitor/pooled/modality_gap": 1}]
    )
    _monitor_rows(tmp_path / "C" / "pretrain", [{"step": 1, "loss/total": 2.0}])
    plot_runs([tmp_path / r for r in "ABC"], tmp_path / "runs.png")
    (fig,) = figures
    lines = _lines(fig)
    assert set(lines["pooled/modality_gap"]) == {"B"} and set(lines["pooled/mutual_knn"]) == {"A"}
    for label in "AB":
        assert len({panel[label][2] for panel in lines.values() if label in panel}) == 1
    assert lines["pooled/cka"]["A"][2] != lines["pooled/cka"]["B"][2]
    assert lines["pooled/modality_gap"]["B"][2] == lines["pooled/cka"]["B"][2]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["A", "B"]
    assert not any(ax.get_legend() for ax in fig.axes)
    assert "C (" in alignlm_log.text and "no monitor/* metrics" in alignlm_log.text
    from alignlm.evaluation.plots import pyplot

    pyplot().close(fig)


def test_plot_runs_reads_a_run_whose_last_metrics_row_was_cut_short(tmp_path, alignlm_log):
    """A killed run's metrics.jsonl can end in half a row: plot-runs crashed on it with a JSONDecodeError naming no
    file; it reads the rows as training does (read_rows): the cut row left out, with a warning naming the file."""
    from alignlm.evaluation.plots import plot_runs, read_monitor

    stage = tmp_path / "K" / "pretrain"
    stage.mkdir(parents=True)
    (stage / "metrics.jsonl").write_text(json.dumps({"step": 1, "monitor/pooled/cka": 0.5}) + '\n{"step": 2, "monit')
    assert read_monitor(tmp_path / "K") == {"pooled/cka": [(1, 0.5)]}
    assert plot_runs([tmp_path / "K"], tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"
    assert "metrics.jsonl:2: the last row was cut short" in alignlm_log.text


def test_a_monitor_value_that_was_not_finite_is_a_gap_in_its_line(tmp_path, monkeypatch, alignlm_log):
    """A NaN CKA is null in metrics.jsonl; it was skipped, so the line ran straight from step 2 to step 4 as if
    measured between them. It is NaN now: matplotlib leaves a gap there."""
    from alignlm.evaluation.plots import plot_runs, pyplot, read_monitor

    values = (0.2, 0.4, None, 0.8)
    _monitor_rows(tmp_path / "N" / "pretrain", [{"step": s, "monitor/pooled/cka": v} for s, v in enumerate(values, 1)])
    read = read_monitor(tmp_path / "N")["pooled/cka"]
    assert [s for s, _ in read] == [1, 2, 3, 4] and math.isnan(read[2][1])
    figures = _drawn_figures(monkeypatch)
    plot_runs([tmp_path / "N"], tmp_path / "n.png")
    x, y, _ = _lines(figures[0])["pooled/cka"]["N"]
    assert x == [1, 2, 3, 4] and [v for v in y if not math.isnan(v)] == [0.2, 0.4, 0.8] and math.isnan(y[2])
    assert "1 monitor values were not finite" in alignlm_log.text
    pyplot().close(figures[0])


def test_the_pooled_accuracy_line_pools_only_the_sets_every_point_of_it_has(monkeypatch, alignlm_log):
    """A checkpoint evaluated without one set moved the pooled line (90 % / 10 % pooled to 50 %, gqa alone 90 %) with
    no set's accuracy changing."""
    from alignlm.evaluation import plots

    def ck(step, sets):
        return {
            "run": "A",
            "above": "",
            "stage": "finetune",
            "step": step,
            "label": f"A/finetune/step_{step}",
            "sets": {n: {"kind": "qa", "accuracy": a, "n": 100} for n, a in sets.items()},
        }

    results = [ck(2, {"gqa": 0.9, "pope": 0.1}), ck(4, {"gqa": 0.9}), ck(6, {"gqa": 0.9, "pope": 0.1})]
    monkeypatch.setattr(plots, "plot_panels", lambda panels, path, xlabel: panels)
    panels = plots.plot_accuracy_curves(results, Path("unused.png"))
    (pooled,) = [t for t in panels if "pooled" in t or "all questions" in t]
    assert panels[pooled] == {"A": [(2, 90.0), (4, 90.0), (6, 90.0)]}
    assert pooled != "all questions accuracy %" and "['pope'] (not at every step)" in alignlm_log.text
    whole = [ck(2, {"gqa": 0.9, "pope": 0.1}), ck(4, {"gqa": 0.8, "pope": 0.2})]
    assert plots.plot_accuracy_curves(whole, Path("unused.png"))["all questions accuracy %"] == {
        "A": [(2, 50.0), (4, 50.0)]
    }


def test_twenty_checkpoints_have_twenty_colours_and_a_legend_beside_the_panels(tmp_path, monkeypatch):
    """Past ten lines the colour cycle came round again (step 500 and step 5500 drawn alike), and the legend inside the
    first panel covered its lines and ran off the figure; metrics.png had no x label, the PCA panels no axis names."""
    from matplotlib.colors import to_hex

    from alignlm.evaluation.plots import pyplot
    from alignlm.evaluation.report import write_plots

    figures = _drawn_figures(monkeypatch)
    g = torch.Generator().manual_seed(0)
    results, features = [], []
    for i in range(20):
        results.append(
            {
                "label": f"raw/finetune/step_{(i + 1) * 500:06d}",
                "sets": {"vqa": {"kind": "qa", "accuracy": i / 20, "n": 50, "examples": []}},
                "probe": {
                    "n": 12,
                    "pooled": {"modality_gap": 1 - i / 40},
                    "layers": {"0": {"cka": i}, "4": {"cka": i}},
                },
            }
        )
        features.append({"image": torch.randn(6, 4, generator=g), "text": torch.randn(6, 4, generator=g)})
    files = write_plots(results, features, tmp_path)
    drawn = dict(zip(files, figures))
    lines = _lines(drawn["layers"])["cka"]
    assert len({to_hex(colour) for _, _, colour in lines.values()}) == 20
    (legend,) = drawn["layers"].legends
    assert [t.get_text() for t in legend.get_texts()] == [r["label"] for r in results]
    assert not any(ax.get_legend() for fig in figures for ax in fig.axes)
    assert all(ax.get_xlabel().startswith("checkpoint") for ax in drawn["metrics"].axes if ax.get_title())
    assert {(ax.get_xlabel(), ax.get_ylabel()) for ax in drawn["pca"].axes if ax.get_title()} == {("PC1", "PC2")}
    for fig in figures:
        pyplot().close(fig)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_step_checkpoint_is_evaluated_in_the_dtypes_its_final_loads_in(colour_set, tmp_path, monkeypatch, mode):
    """An LLM loaded in bf16 trains in fp32 (what trains is held in fp32, LoRA merged in fp32); a step checkpoint
    rebuilt for evaluation kept its LLM in fp32 where its stage's ``final/`` loads it in the configured bf16: twice
    the memory at 7B, and the step rows of a curve not computed as its final row."""
    from alignlm.evaluation import checkpoints
    from alignlm.models.build import build_model

    def bf16_llm(cfg):  # what model.llm.dtype=bfloat16 loads (the tiny LLM is built, not loaded)
        model = build_model(cfg)
        model.llm.to(torch.bfloat16)
        return model

    overrides = ["run=[finetune]", "stages.finetune.init_from=null", f"stages.finetune.parts.llm={mode}"]
    overrides += ["stages.finetune.max_steps=3", "stages.finetune.save_every=2"]
    run(compose(*tiny_overrides(colour_set, tmp_path, *overrides)))
    monkeypatch.setattr(checkpoints, "build_model", bf16_llm)
    [step] = [c for c in checkpoints.resolve([str(tmp_path / "t" / "finetune")]) if c.kind != "final"]
    model = checkpoints.load(step)
    assert {p.dtype for p in model.llm.parameters()} == {torch.bfloat16}
    assert not any("lora" in k for k in model.state_dict())


def test_scores_of_one_value_reached_by_other_sums_are_a_tie():
    """0.6 and 0.5999999999999999 (two VQA answers, each given by 2 of 10 annotators) had counted as a question the
    reference scored higher: p 0.50 where the 8 real discordant questions give 0.0078."""
    from alignlm.evaluation.paired import paired_difference

    a = {f"q{i}": 0.0 for i in range(8)} | {f"t{i}": 0.6 for i in range(12)}
    b = {f"q{i}": 1.0 for i in range(8)} | {f"t{i}": 0.5999999999999999 for i in range(12)}
    r = paired_difference(a, b)
    assert (r["only_b"], r["only_a"]) == (8, 0) and r["p"] == pytest.approx(0.0078125)
    alike = paired_difference({f"q{i}": 0.0 for i in range(50)}, {f"q{i}": 1 / 3 for i in range(50)})
    assert alike["se"] == 0.0 and alike["z"] == math.inf  # every difference alike: no spread (it was 1e-17: z 4e16)
    # as alignlm compare reads them back from report.json (6 digits): 1/3 and 2/3 - 1/3 are one difference there too
    rounded = {f"q{i}": 0.333333 if i % 2 else 0.666667 - 0.333333 for i in range(50)}
    assert paired_difference({f"q{i}": 0.0 for i in range(50)}, rounded)["z"] == math.inf


def test_seed_tables_pair_only_questions_of_the_same_file(tmp_path):
    """A seed sweep that regenerated the test set under the same ids had paired other questions in the seed tables,
    which alignlm compare refuses to pair; a report that does not record its file pairs, as compare pairs it."""
    from alignlm.evaluation.paired import paired_reports, pooled_pair

    def report(name: str, digest: str | None, scores: dict[str, float]) -> Path:
        shapes = {"scores": scores} | ({"file": {"path": "data/shapes/test.json", "sha256": digest}} if digest else {})
        digits = {"scores": {"d0": 1.0, "d1": 0.0}, "file": {"path": "data/digits/test.json", "sha256": "c" * 64}}
        sets = {"shapes": shapes, "digits": digits}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"checkpoints": [{"kind": "final", "label": name, "sets": sets}]}))
        return path

    scores = {f"q{i}": float(i % 2) for i in range(10)}
    before = report("before", "a" * 64, scores)
    assert paired_reports(before, report("same", "a" * 64, scores))["n"] == 12
    assert paired_reports(before, report("unrecorded", None, scores))["n"] == 12  # an older report
    other = report("other", "b" * 64, scores)
    assert sorted(pooled_pair(before, other)[0]) == ["digits/d0", "digits/d1"]  # shapes left out of both
    assert paired_reports(before, other)["n"] == 2


def test_a_set_named_as_the_pooled_row_is_refused():
    from alignlm.evaluation.evaluate import check_set_names

    with pytest.raises(ConfigError, match="eval.sets has a set named 'all', the name of all sets pooled"):
        check_set_names([{"name": "digits"}, {"name": "all"}])


def test_plot_runs_metrics_name_whole_parts_of_a_metric(tmp_path, monkeypatch, alignlm_log):
    """``--metrics retrieval`` and a plug-in's dotted path (whose mapping is logged as ``pooled/pkg.fn/key``) matched
    nothing: only the last "/"-part counted. A name asked that no run has is said, not dropped."""
    from alignlm.evaluation import plots

    row = {"monitor/pooled/retrieval/i2t_r1": 0.5, "monitor/pooled/mine.fn/a": 1.0, "monitor/layer1/mutual_knn": 0.2}
    row |= {"monitor/pooled/mutual_knn": 0.3, "monitor/pooled/cka": 0.1}
    _monitor_rows(tmp_path / "R" / "pretrain", [{"step": 1} | row])
    drawn = {}
    monkeypatch.setattr(plots, "plot_panels", lambda panels, path, _: drawn.setdefault("names", sorted(panels)))
    plots.plot_runs([tmp_path / "R"], tmp_path / "r.png", ["retrieval", "mine.fn", "mutual_knn", "typo"])
    assert drawn["names"] == [
        "layer1/mutual_knn",
        "pooled/mine.fn/a",
        "pooled/mutual_knn",
        "pooled/retrieval/i2t_r1",
    ]
    assert "no run has the metrics ['typo']" in alignlm_log.text


def test_answers_cut_at_max_new_tokens_are_counted_in_a_warning(tiny_model, colour_set, alignlm_log):
    """A model that answers in sentences read 0 % at 8 tokens ("I think the ans") and 67 % at 16, without a word:
    answers that reach the limit before their turn's end are said, with the knob that lengthens them."""
    from omegaconf import OmegaConf

    from alignlm.models.generation import generate_set

    model = tiny_model().eval()  # untrained: it runs on to any limit
    data = OmegaConf.to_container(compose().stages.finetune.data, resolve=True)
    answers = generate_set(model, str(colour_set["test"]), data, batch_size=5, max_new_tokens=3)
    assert f"12 of {len(answers)} answers reached max_new_tokens=3 before the end of their turn" in alignlm_log.text


def test_every_command_answers_at_one_default_length():
    """export --check and the lmms-eval task answered at 16 tokens where alignlm eval and the run's evaluation stop at
    8: one checkpoint read another accuracy from each."""
    import inspect

    from omegaconf import OmegaConf

    from alignlm.config import config_dir
    from alignlm.constants import MAX_NEW_TOKENS
    from alignlm.evaluation.export_check import compare_with_export
    from alignlm.evaluation.lmms import write_local_task

    assert OmegaConf.load(config_dir() / "eval" / "default.yaml").max_new_tokens == MAX_NEW_TOKENS
    assert compose().eval.max_new_tokens == MAX_NEW_TOKENS
    for fn in (compare_with_export, write_local_task):
        assert inspect.signature(fn).parameters["max_new_tokens"].default == MAX_NEW_TOKENS


def test_a_runs_own_sets_scored_otherwise_than_its_final_evaluation_are_said(tmp_path, alignlm_log):
    """alignlm eval of a run's final/ takes the run's eval.sets and nothing else of its evaluation: a run that sampled
    at temperature 2 on 20 questions (0 %) read 50 % greedy on all 36, without a word."""
    from alignlm.evaluation.report import eval_sets

    (tmp_path / "t.json").write_text("[]")
    run = {"eval": {"sets": [{"name": "t", "path": str(tmp_path / "t.json")}], "max_new_tokens": 24, "limit": 20}}
    run["eval"]["generation"] = {"do_sample": True, "temperature": 2.0}
    ours = {"max_new_tokens": 8, "limit": None, "generation": {"do_sample": False}, "seed": 0}
    assert [s["name"] for s in eval_sets(ours, run, "ck")] == ["t"]
    assert (
        "ck: its run's sets are scored with max_new_tokens=8, generation={'do_sample': False}, limit=None, where its "
        "run's final evaluation had max_new_tokens=24, generation={'do_sample': True, 'temperature': 2.0}, limit=20"
    ) in alignlm_log.text
    alignlm_log.clear()
    same = {**ours, "max_new_tokens": 24, "limit": 20, "generation": run["eval"]["generation"]}
    eval_sets(same, run, "ck")
    assert "scored with" not in alignlm_log.text
    eval_sets({**same, "seed": 5}, run, "ck")  # sampled: the final evaluation sampled under seed 0
    assert "ck: its run's sets are scored with seed=5, where its run's final evaluation had seed=0" in alignlm_log.text


def test_choice_accuracy_is_over_the_records_with_choices(monkeypatch):
    """The lenient names-the-choice score is over the ``choice_n`` records that have choices: over every record, a set
    where half have none read 0.5 for a model naming every right choice."""
    two = {"choices": ["red", "blue"]}
    preds = [
        ("q0", "It is red.", {"answer": "red", "meta": two}),
        ("q1", "blue", {"answer": "blue", "meta": two}),
        ("q2", "red", {"answer": "red"}),
        ("q3", "green", {"answer": "green"}),
    ]
    r = _answer_accuracy_of(monkeypatch, preds)
    assert r["choice_n"] == 2 and r["choice_scores"] == {"q0": 1.0, "q1": 1.0} and r["choice_accuracy"] == 1.0


def test_an_answer_length_change_keys_a_set_piece_anew():
    """``set_knobs``: a set's kept piece is keyed by its kind's answer length (``max_new_tokens`` for qa,
    ``caption_max_new_tokens`` for captions): a longer limit must not reuse answers cut at the shorter one."""
    from alignlm.evaluation.report import set_knobs

    base = {"template": None, "batch_size": 4, "limit": None, "generation": None, "seed": 0}
    qa8, qa64 = ({**base, "max_new_tokens": m, "caption_max_new_tokens": 30} for m in (8, 64))
    assert set_knobs(qa8, "qa") != set_knobs(qa64, "qa") and set_knobs(qa8, "qa")["max_new_tokens"] == 8
    cap = {**base, "max_new_tokens": 8}
    assert set_knobs({**cap, "caption_max_new_tokens": 30}, "caption") != set_knobs(
        {**cap, "caption_max_new_tokens": 60}, "caption"
    )


def test_a_piece_computed_on_another_device_type_is_not_reused(tmp_path):
    """``Parts.key``: the device type (cpu, cuda) is part of a kept piece's key: results computed on the CPU are not
    served to an evaluation on a GPU (bf16 kernels, other numbers)."""
    from alignlm.evaluation.report import Parts

    data = tmp_path / "set.json"
    data.write_text("[]")
    cpu, gpu = (Parts(tmp_path / "parts", [["w", 1, "x"]], d) for d in ("cpu", "cuda"))
    assert cpu.key(str(data), {}) != gpu.key(str(data), {})
    cpu.write("set-a", cpu.key(str(data), {}), {"accuracy": 1.0})
    assert cpu.read("set-a", cpu.key(str(data), {})) is not None
    assert gpu.read("set-a", gpu.key(str(data), {})) is None


def test_the_per_layer_plot_draws_layers_in_number_order_from_a_kept_report(tmp_path, monkeypatch):
    """A kept probe's layers come back keyed as sorted text (``"0"``, ``"10"``, ``"2"``): the per-layer lines go
    through the layers in number order, not 0, 10, 2 (a line zigzagging back across the plot)."""
    from alignlm.evaluation import plots
    from alignlm.evaluation.report import write_plots

    drawn = {}
    monkeypatch.setattr(plots, "plot_panels", lambda panels, path, xlabel: drawn.update(panels) or path)
    monkeypatch.setattr(plots, "plot_series", lambda *a, **k: tmp_path / "m.png")
    layers = {"0": {"cka": 0.1}, "10": {"cka": 0.3}, "2": {"cka": 0.2}}
    results = [{"label": "a", "sets": {}, "probe": {"n": 4, "pooled": {}, "layers": layers}}]
    write_plots(results, [{}], tmp_path)
    assert drawn["cka"]["a"] == [(0, 0.1), (2, 0.2), (10, 0.3)]


def test_the_reports_chance_level_is_in_percent():
    """report.md's chance line says 25.0 % for a four-choice set's chance of 0.25, as its table's accuracies are
    percent (0.2 % read as a chance level far below any score)."""
    from alignlm.evaluation.report import markdown

    res = {"label": "a", "sets": {"mc": {"kind": "qa", "accuracy": 0.5, "n": 4, "chance": 0.25, "examples": []}}}
    assert "Chance level: mc 25.0 %" in markdown([res])


def test_the_pca_plot_gets_each_checkpoints_image_and_text_features_as_such(tmp_path, monkeypatch):
    """The PCA panel's points labelled "image (visual tokens)" are the visual-token means, the others the caption
    embeddings: swapped, the picture named each side as the other."""
    from alignlm.evaluation import plots
    from alignlm.evaluation.report import write_plots

    got = []
    monkeypatch.setattr(plots, "plot_pca", lambda panels, path: got.extend(panels) or path)
    monkeypatch.setattr(plots, "plot_series", lambda *a, **k: tmp_path / "m.png")
    image, text = torch.zeros(3, 4), torch.ones(3, 4)
    results = [{"label": "a", "sets": {}, "probe": {"n": 3, "pooled": {"modality_gap": 0.5}}}]
    write_plots(results, [{"image": image, "text": text}], tmp_path)
    assert got[0][0] == "a" and got[0][1] is image and got[0][2] is text and got[0][3] == 0.5
