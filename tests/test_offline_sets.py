"""The offline datasets: deterministic bytes, disjoint splits, valid answers, per-patch labels, knob errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from alignlm.data import GENERATORS

SMALL = {"digits": {"limit": 60, "n_test": 10}, "shapes": {"n_train": 40, "n_test": 12}}


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=sorted(SMALL))
def generated(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    GENERATORS[name](root / "a", seed=1, **SMALL[name])
    return name, root


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def test_same_seed_same_bytes_other_seed_differs(generated):
    name, root = generated
    GENERATORS[name](root / "b", seed=1, **SMALL[name])
    GENERATORS[name](root / "c", seed=2, **SMALL[name])
    assert files(root / "a") == files(root / "b")
    assert files(root / "a") != files(root / "c")


def test_splits_disjoint_and_images_valid(generated):
    name, root = generated
    a = root / "a"
    train = {r["image"] for r in load(a / "pretrain.json")} | {r["image"] for r in load(a / "instruct.json")}
    test = {r["image"] for r in load(a / "test.json")}
    assert train and test and not train & test
    size = 64 if name == "digits" else 128
    for image in sorted(train | test)[:20]:
        with Image.open(a / image) as im:
            assert im.mode == "RGB" and im.size == (size, size)


def test_records_are_llava_and_answers_valid(generated):
    name, root = generated
    a = root / "a"
    for fname in ("pretrain", "instruct", "test", "test_captions"):
        records = load(a / f"{fname}.json")
        ids = [r["id"] for r in records]
        assert all(ids) and len(set(ids)) == len(ids)
        for r in records:
            roles = [m["from"] for m in r["conversations"]]
            assert roles == ["human", "gpt"] * (len(roles) // 2) and r["conversations"][0]["value"].startswith(
                "<image>"
            )
    for r in load(a / "test.json"):
        assert r["answer"] in r["meta"]["choices"] and r["conversations"][1]["value"] == r["answer"]
    info = json.loads((a / "info.json").read_text())
    if name == "digits":
        assert info["chance"] == pytest.approx(0.1)
    else:
        assert 0.15 < info["chance"] < 0.5


def test_instruct_answers_use_the_test_phrasing(generated):
    """A model finetuned on instruct sees each test question phrasing with the same answer style."""
    _, root = generated
    instruct_qs = {
        m["value"].removeprefix("<image>\n")
        for r in load(root / "a" / "instruct.json")
        for m in r["conversations"]
        if m["from"] == "human"
    }
    test_qs = {r["conversations"][0]["value"].removeprefix("<image>\n") for r in load(root / "a" / "test.json")}
    generic = {q.split("?")[0].split(" the ")[0] for q in instruct_qs}
    assert all(q.split("?")[0].split(" the ")[0] in generic for q in test_qs)


def test_shapes_patch_labels(tmp_path):
    GENERATORS["shapes"](tmp_path, seed=0, n_train=30, n_test=5, max_shapes=1)
    labels = json.loads((tmp_path / "patch_labels.json").read_text())
    grid, vocab = labels["grid"], set(labels["words"])
    records = load(tmp_path / "pretrain.json") + load(tmp_path / "test.json")
    assert set(labels["images"]) == {r["id"] for r in records}
    saw_background_only = False
    for cells in labels["images"].values():
        assert len(cells) == grid * grid
        for cell in cells:
            scores = [s for _, s in cell]
            assert all(0 <= s <= 1 for s in scores) and scores == sorted(scores, reverse=True)
            assert all(w in vocab for w, _ in cell)
            saw_background_only |= cell == [["background", 1.0]]
    assert saw_background_only  # one shape in one quadrant leaves whole cells empty


@pytest.mark.parametrize(
    "name,knobs,match",
    [
        ("digits", {"n_test": 5000}, "n_test=5000"),
        ("digits", {"image_size": 8}, "image_size=8"),
        ("shapes", {"max_shapes": 5}, "max_shapes=5"),
        ("shapes", {"image_size": 16}, "image_size=16"),
        ("shapes", {"n_train": 0}, "n_train=0"),
    ],
)
def test_bad_knobs_name_the_knob(tmp_path, name, knobs, match):
    with pytest.raises(ValueError, match=match):
        GENERATORS[name](tmp_path, **knobs)


def test_cli_writes_a_set(tmp_path, capsys):
    from alignlm.commands import main

    assert main(["data", "shapes", "--out", str(tmp_path), "--set", "n_train=8", "--set", "n_test=4"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["test"] == 4
    assert (tmp_path / "shapes" / "test.json").exists()


def test_cli_names_the_knobs_when_one_is_unknown(tmp_path, capsys):
    from alignlm.commands import main

    assert main(["data", "digits", "--out", str(tmp_path), "--set", "n_train=8"]) == 2  # digits has no n_train
    assert (
        "its knobs: ['image_size', 'n_test', 'limit']" in capsys.readouterr().err and not (tmp_path / "digits").exists()
    )


def test_a_runs_own_eval_set_written_again_by_another_seed_is_refused_naming_the_command(tmp_path, monkeypatch):
    """A seed sweep writes the shared data_root/digits again for each seed: seed 0's checkpoint, evaluated after the
    seed-1 run on its run's own eval.sets, was scored on seed 1's test split, which holds most of seed 0's training
    digits, without a word. The run's set written again with the command given is accepted."""
    from alignlm.commands import main
    from alignlm.config import ConfigError
    from alignlm.evaluation.report import eval_sets

    monkeypatch.chdir(tmp_path)
    knobs = SMALL["digits"]
    run = {  # what a checkpoint's config.yaml says of its offline sets and eval sets (paths relative to the run)
        "seed": 0,
        "data_root": "data",
        "offline_datasets": ["digits"],
        "offline_dataset_args": {"digits": knobs},
        "eval": {"sets": [{"name": "digits", "path": "data/digits/test.json"}]},
    }
    GENERATORS["digits"](Path("data/digits"), seed=0, **knobs)
    assert [s["name"] for s in eval_sets({}, run, "ck")] == ["digits"]
    GENERATORS["digits"](Path("data/digits"), seed=1, **knobs)  # the next seed's run
    with pytest.raises(ConfigError, match=r"ck: its run's eval set digits \(data/digits/test.json\) is in data/digits, written again since the run with seed=1 \(the run's: seed=0\)") as e:  # fmt: skip
        eval_sets({}, run, "ck")
    assert eval_sets({"sets": [{"name": "mine", "path": "data/digits/test.json"}]}, run, "ck")  # the user's choice
    command = str(e.value).split("Write the run's set again (alignlm ")[1].split(")")[0]
    assert main(command.split()) == 0
    assert [s["name"] for s in eval_sets({}, run, "ck")] == ["digits"]
    Path("data/digits/info.json").write_bytes(b"")  # as a full disk left it, when it was written in place
    with pytest.raises(ConfigError, match=r"is in data/digits, whose info.json cannot be read \(JSONDecodeError: "):
        eval_sets({}, run, "ck")
    Path("data/digits/info.json").unlink()  # a generation killed half way: what the folder holds cannot be told
    with pytest.raises(ConfigError, match=r"is in data/digits, which holds no info.json"):
        eval_sets({}, run, "ck")


def test_a_set_written_again_with_a_knob_that_keeps_its_split_still_scores_the_runs_checkpoint(tmp_path, monkeypatch):
    """``+exp=som`` and ``+exp=baseline`` write data/shapes with and without som.json, every other file the same:
    ``alignlm eval`` of either arm was refused after the other ran ("another split"). A knob that changes none of the
    split's files is no other split; one that does (the seed) still is."""
    from alignlm.config import ConfigError
    from alignlm.evaluation.report import eval_sets

    monkeypatch.chdir(tmp_path)
    knobs = {"n_train": 4, "n_test": 3, "image_size": 32}
    run = {
        "seed": 0,
        "data_root": "data",
        "offline_datasets": ["shapes"],
        "offline_dataset_args": {"shapes": {**knobs, "som": True}},
        "eval": {"sets": [{"name": "shapes", "path": "data/shapes/test.json"}]},
    }
    GENERATORS["shapes"](Path("data/shapes"), seed=0, **knobs, som=False)  # the baseline arm, after the SoM arm
    assert [s["name"] for s in eval_sets({}, run, "ck")] == ["shapes"]
    GENERATORS["shapes"](Path("data/shapes"), seed=1, **knobs, som=False)
    with pytest.raises(ConfigError, match=r"written again since the run with seed=1 \(the run.s: seed=0\)"):
        eval_sets({}, run, "ck")
