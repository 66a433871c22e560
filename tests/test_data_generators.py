"""The offline generators (digits, shapes): same seed same bytes, disjoint splits, valid records and answers,
per-patch labels for SEA, and knob errors that name the knob and the value."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from alignlm.config import ConfigError
from alignlm.data import GENERATORS, digits, generator_defaults, generator_knobs, shapes
from alignlm.pipeline import ensure_offline_datasets

# Small but non-default sizes, so the tests also check that the knobs reach the files.
KNOBS = {
    "digits": {"limit": 80, "n_test": 20, "image_size": 32},
    "shapes": {"n_train": 40, "n_test": 12, "image_size": 96},
}
GENERATE = {"digits": digits.generate, "shapes": shapes.generate}
RECORD_FILES = ("pretrain", "instruct", "test", "test_captions")
SHAPE_WORDS = re.compile(r"\b(" + "|".join([*shapes.COLOURS, *shapes.SHAPES]) + r")\b")


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=sorted(GENERATE))
def dataset(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    root = tmp_path_factory.mktemp(name) / name
    GENERATE[name](root, seed=3, **KNOBS[name])
    return name, root


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    name, root = dataset
    GENERATE[name](tmp_path / "same", seed=3, **KNOBS[name])
    GENERATE[name](tmp_path / "other", seed=4, **KNOBS[name])
    first, same, other = tree(root), tree(tmp_path / "same"), tree(tmp_path / "other")
    assert first == same
    assert other != first and {k for k in first if first[k] != other.get(k)} >= {"pretrain.json", "test.json"}


def test_splits_disjoint_and_every_image_is_rgb_of_the_requested_size(dataset):
    name, root = dataset
    train = {r["image"] for f in ("pretrain", "instruct") for r in load(root / f"{f}.json")}
    test = {r["image"] for f in ("test", "test_captions") for r in load(root / f"{f}.json")}
    assert train and test and not train & test
    assert len(list((root / "images").iterdir())) == len(train | test)
    size = KNOBS[name]["image_size"]
    for image in sorted(train | test):
        with Image.open(root / image) as im:
            assert (im.mode, im.size) == ("RGB", (size, size))


def test_records_have_unique_ids_and_llava_conversations(dataset):
    _, root = dataset
    for fname in RECORD_FILES:
        records = load(root / f"{fname}.json")
        ids = [r["id"] for r in records]
        assert all(isinstance(i, str) and i for i in ids) and len(set(ids)) == len(ids), fname
        for r in records:
            assert r["image"] == f"images/{r['id']}.png"
            conv = r["conversations"]
            assert [m["from"] for m in conv] == ["human", "gpt"] * (len(conv) // 2) and conv
            assert all(m["value"] for m in conv)
            assert conv[0]["value"].startswith("<image>")
            assert all("<image>" not in m["value"] for m in conv[1:])
            if fname in ("pretrain", "test_captions"):
                assert conv[0]["value"] == "<image>" and len(conv) == 2 and conv[1]["value"].endswith(".")


def test_test_answers_are_terse_and_among_the_choices(dataset):
    name, root = dataset
    tests = load(root / "test.json")
    for r in tests:
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert len(r["conversations"]) == 2 and answer == r["answer"]
        assert question.startswith("<image>\n") and re.search(r"\? Answer [^?]+\.$", question)
        assert answer in r["meta"]["choices"] and r["meta"]["qtype"]
        assert answer == answer.lower() and not answer.endswith(".")
    info = load(root / "info.json")
    assert info["chance"] == pytest.approx(np.mean([1 / len(r["meta"]["choices"]) for r in tests]))
    if name == "digits":
        assert info["chance"] == 0.1


def test_instruct_asks_the_test_questions_with_the_same_answer_style(dataset):
    """A model finetuned on instruct has seen every test phrasing, answered in the same terse way."""
    _, root = dataset

    def template(question: str) -> str:
        return SHAPE_WORDS.sub("<w>", question.removeprefix("<image>\n"))

    seen: dict[str, set[str]] = {}
    for r in load(root / "instruct.json"):
        conv = r["conversations"]
        for q, a in zip(conv[::2], conv[1::2]):
            seen.setdefault(template(q["value"]), set()).add(a["value"])
    for r in load(root / "test.json"):
        assert seen[template(r["conversations"][0]["value"])] <= set(r["meta"]["choices"])


def test_info_counts_and_knobs(dataset):
    name, root = dataset
    info = load(root / "info.json")
    assert info["name"] == name and info["seed"] == 3
    assert {k: info["knobs"][k] for k in KNOBS[name]} == KNOBS[name]
    for fname in RECORD_FILES:
        assert info["counts"][fname] == len(load(root / f"{fname}.json"))
    n_test = KNOBS[name]["n_test"]
    assert info["counts"]["test"] == info["counts"]["test_captions"] == n_test


def test_info_records_every_knob_of_the_generator(dataset):
    """The pipeline tells a set on disk from the one a config asks for by info.json's knobs: one left out there would
    read as changed, and the set would be regenerated on every run."""
    name, root = dataset
    assert sorted(load(root / "info.json")["knobs"]) == sorted(generator_knobs(name))


def test_an_offline_set_is_regenerated_for_the_defaults_another_seed_or_a_knob_it_does_not_record(
    tmp_path, monkeypatch
):
    """A set written with n_train=3 was kept when the config went back to the defaults (only the knobs the config
    set were compared), and one of seed 0 under seed 1."""
    small = {"n_train": 3, "n_test": 2, "image_size": 32}
    shapes.generate(tmp_path / "shapes", seed=0, **small)
    calls = []
    defaults = generator_defaults("shapes")
    monkeypatch.setitem(GENERATORS, "shapes", lambda out, seed, **knobs: calls.append((seed, knobs)))

    def ensure(args, seed=0):
        cfg = {"data_root": str(tmp_path), "offline_datasets": ["shapes"], "offline_dataset_args": args, "seed": seed}
        ensure_offline_datasets(OmegaConf.create(cfg))
        return calls.pop() if calls else None

    assert ensure({"shapes": small}) is None  # as written: left alone
    assert ensure({}) == (0, defaults)  # back to the defaults
    assert ensure({"shapes": small}, seed=1) == (1, {**defaults, **small})
    info = load(tmp_path / "shapes" / "info.json")
    del info["knobs"]["som"]  # as written before the generator had the knob
    (tmp_path / "shapes" / "info.json").write_text(json.dumps(info))
    assert ensure({"shapes": small}) == (0, {**defaults, **small})


def test_digit_captions_name_the_digit_as_numeral_and_word(tmp_path):
    digits.generate(tmp_path, seed=0, limit=40, n_test=5)
    answers = {r["id"]: r["conversations"][1]["value"] for r in load(tmp_path / "instruct.json")}
    for r in load(tmp_path / "pretrain.json"):
        d = int(answers[r["id"]])
        caption = r["conversations"][1]["value"]
        assert str(d) in caption and digits.WORDS[d] in caption


def test_digit_limit_keeps_a_prefix_of_the_same_permutation(tmp_path):
    """With ``limit`` the kept images are the first of the permutation that the full set uses."""
    rng = np.random.default_rng(0)
    perm = rng.permutation(1797)
    digits.generate(tmp_path, seed=0, limit=30, n_test=6)
    test_ids = {r["id"] for r in load(tmp_path / "test.json")}
    assert test_ids == {f"digits_{i:04d}" for i in perm[:6]}


def test_shape_scenes_stay_in_their_quadrants_and_never_overlap():
    rng = np.random.default_rng(0)
    size, half = 128, 64
    for _ in range(200):
        scene = shapes.sample_scene(rng, size, 4)
        assert len({o.position for o in scene}) == len(scene) == len({(o.shape, o.color) for o in scene})
        for o in scene:
            q = shapes.POSITIONS.index(o.position)
            x0, y0, x1, y1 = o.box
            ox, oy = half * (q % 2), half * (q // 2)
            assert ox < x0 < x1 < ox + half and oy < y0 < y1 < oy + half
            assert 0.35 * half - 1 <= x1 - x0 <= 0.45 * half + 1


def test_shapes_instruct_has_two_to_four_distinct_turns(tmp_path):
    shapes.generate(tmp_path, seed=0, n_train=60, n_test=1)
    for r in load(tmp_path / "instruct.json"):
        questions = [m["value"] for m in r["conversations"][::2]]
        assert 2 <= len(questions) <= 4 and len(set(questions)) == len(questions)


def test_shapes_patch_labels(tmp_path):
    shapes.generate(tmp_path, seed=0, n_train=20, n_test=5, max_shapes=1, label_grid=5, label_top_k=3)
    labels = load(tmp_path / "patch_labels.json")
    grid, vocab = labels["grid"], labels["words"]
    assert grid == 5 and len(set(vocab)) == len(vocab) and "background" in vocab
    captions = {
        r["id"]: r["conversations"][1]["value"]
        for f in ("pretrain", "test_captions")
        for r in load(tmp_path / f"{f}.json")
    }
    assert set(labels["images"]) == set(captions)
    background_only = 0
    for rid, cells in labels["images"].items():
        assert len(cells) == grid * grid
        for cell in cells:
            scores = [s for _, s in cell]
            assert 1 <= len(cell) <= 3 and all(0 <= s <= 1 for s in scores) and scores == sorted(scores, reverse=True)
            assert all(w in vocab and (w == "background" or w in captions[rid]) for w, _ in cell)
            background_only += cell == [["background", 1.0]]
    assert background_only  # one shape in one quadrant leaves whole cells empty


def test_shapes_patch_label_scores_are_coverage_of_the_rendered_mask(tmp_path):
    shapes.generate(tmp_path, seed=1, n_train=6, n_test=2, max_shapes=2, label_grid=2, label_top_k=1)
    labels = load(tmp_path / "patch_labels.json")
    for rid, cells in labels["images"].items():
        assert len(cells) == 4 and all(len(c) == 1 for c in cells)
        with Image.open(tmp_path / "images" / f"{rid}.png") as im:
            white = (np.asarray(im) == 255).all(axis=2)  # no shape colour is white and nothing is antialiased
        h = white.shape[0] // 2
        quads = [white[r * h : (r + 1) * h, c * h : (c + 1) * h] for r in range(2) for c in range(2)]
        for cell, quad in zip(cells, quads):
            assert cell[0][0] == "background" and cell[0][1] == pytest.approx(quad.mean(), abs=1e-4)


@pytest.mark.parametrize(
    "name,knobs,match",
    [
        ("digits", {"n_test": 5000}, "n_test=5000"),
        ("digits", {"n_test": 0}, "n_test=0"),
        ("digits", {"limit": 20, "n_test": 20}, "n_test=20"),
        ("digits", {"limit": 1}, "limit=1"),
        ("digits", {"image_size": 8}, "image_size=8"),
        ("digits", {"image_size": "64"}, "image_size='64'"),
        ("shapes", {"max_shapes": 5}, "max_shapes=5"),
        ("shapes", {"max_shapes": 0}, "max_shapes=0"),
        ("shapes", {"image_size": 15}, "image_size=15"),
        ("shapes", {"n_train": 0}, "n_train=0"),
        ("shapes", {"n_test": -1}, "n_test=-1"),
        ("shapes", {"label_grid": 0}, "label_grid=0"),
        ("shapes", {"label_top_k": 0}, "label_top_k=0"),
    ],
)
def test_bad_knobs_raise_naming_the_knob_the_value_and_what_is_allowed(tmp_path, name, knobs, match):
    with pytest.raises(ValueError, match=re.escape(match) + " is not allowed: an integer"):
        GENERATE[name](tmp_path / "out", **knobs)
    assert not (tmp_path / "out").exists(), "a bad knob must fail before anything is written"


def test_a_generation_killed_half_way_leaves_no_info_so_the_next_run_writes_the_set_again(tmp_path, monkeypatch):
    """info.json is written last: a regeneration for another seed killed half way had left the old seed's info.json
    over half-new files, and the next run of the old seed kept them as its set."""
    from alignlm.data import synthetic

    small = {"n_train": 3, "n_test": 2, "image_size": 32}
    shapes.generate(tmp_path / "shapes", seed=0, **small)
    saved = []

    def dies_after_two(pixels, path):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(path)

    monkeypatch.setattr(synthetic, "save_png", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        shapes.generate(tmp_path / "shapes", seed=1, **small)
    monkeypatch.undo()
    assert saved and not (tmp_path / "shapes" / "info.json").exists()
    cfg = {"data_root": str(tmp_path), "offline_datasets": ["shapes"], "offline_dataset_args": {"shapes": small}}
    ensure_offline_datasets(OmegaConf.create({**cfg, "seed": 0}))
    fresh = tmp_path / "fresh"
    shapes.generate(fresh / "shapes", seed=0, **small)
    assert (tmp_path / "shapes" / "test.json").read_bytes() == (fresh / "shapes" / "test.json").read_bytes()


def test_a_set_whose_info_a_full_disk_left_empty_is_written_again_naming_it(tmp_path, alignlm_log):
    """info.json was written in place: a full disk left it 0 bytes, and every rerun then stopped on a JSONDecodeError
    that named no file. It is written whole or not at all, and one that cannot be read is a set written again."""
    small = {"shapes": {"n_train": 3, "n_test": 2, "image_size": 32}}
    cfg = OmegaConf.create({"data_root": str(tmp_path), "offline_datasets": ["shapes"], "offline_dataset_args": small})
    cfg.seed = 0
    info = tmp_path / "shapes" / "info.json"
    with mock.patch.object(Path, "write_text", side_effect=OSError(28, "No space left on device")):
        with pytest.raises(OSError, match="No space left"):
            shapes.generate(tmp_path / "shapes", seed=0, **small["shapes"])
    assert not info.exists() and not list((tmp_path / "shapes").glob(".*tmp*"))  # nothing half-written stays
    ensure_offline_datasets(cfg)
    info.write_bytes(b"")  # as an alignlm that wrote it in place left it
    ensure_offline_datasets(cfg)
    assert f"regenerating {tmp_path / 'shapes'}: its info.json cannot be read (JSONDecodeError: Expecting value" in (
        alignlm_log.text
    )
    assert load(info)["seed"] == 0


def test_a_set_a_run_reads_is_not_written_again_under_it(tmp_path):
    """Seed sweeps started together on one data_root: the seed-1 run wrote the set again while the seed-0 run trained
    on it, which then trained and was scored on a mix of the two seeds' images and questions, exit 0. A run holds its
    sets as read until it ends; another that would write one again is refused, and the set is left as it was."""
    small = {"shapes": {"n_train": 3, "n_test": 2, "image_size": 32}}
    cfg = {"data_root": str(tmp_path), "offline_datasets": ["shapes"], "offline_dataset_args": small}
    test_json = tmp_path / "shapes" / "test.json"
    with contextlib.ExitStack() as readers:  # the seed-0 run, under way
        ensure_offline_datasets(OmegaConf.create({**cfg, "seed": 0}), readers)
        written = test_json.read_bytes()
        ensure_offline_datasets(OmegaConf.create({**cfg, "seed": 0}))  # the same set asked for: read beside it
        with pytest.raises(ConfigError, match=r"shapes is being read by a run in progress .* data_root of its own"):
            ensure_offline_datasets(OmegaConf.create({**cfg, "seed": 1}))
        with pytest.raises(ConfigError, match="being read by a run in progress"):
            shapes.generate(tmp_path / "shapes", seed=1, **small["shapes"])  # `alignlm data` too
        assert test_json.read_bytes() == written and load(tmp_path / "shapes" / "info.json")["seed"] == 0
    ensure_offline_datasets(OmegaConf.create({**cfg, "seed": 1}))  # that run ended
    assert load(tmp_path / "shapes" / "info.json")["seed"] == 1


def test_offline_dataset_seed_holds_one_draw_of_the_data_for_every_run_seed(tmp_path):
    """Varying the training seed redrew the offline sets (their seed was the run's): a seed study of the training
    alone, or SIMA's seeds from a model finetuned on seed 0's split, had no way to keep the data."""
    small = {"shapes": {"n_train": 3, "n_test": 2, "image_size": 32}}
    cfg = {"data_root": str(tmp_path), "offline_datasets": ["shapes"], "offline_dataset_args": small}
    ensure_offline_datasets(OmegaConf.create({**cfg, "seed": 0, "offline_dataset_seed": None}))
    written = (tmp_path / "shapes" / "test.json").read_bytes()
    ensure_offline_datasets(OmegaConf.create({**cfg, "seed": 5, "offline_dataset_seed": 0}))
    assert (tmp_path / "shapes" / "test.json").read_bytes() == written
    assert load(tmp_path / "shapes" / "info.json")["seed"] == 0
    ensure_offline_datasets(OmegaConf.create({**cfg, "seed": 5, "offline_dataset_seed": None}))
    assert load(tmp_path / "shapes" / "info.json")["seed"] == 5


def test_a_set_a_finished_stage_of_the_run_trained_on_is_not_written_again_before_the_refusal(tmp_path):
    """A run drawn with seed 1 before offline_dataset_seed's default became 0, rerun: the set was written again with
    seed 0 first, and the rerun refused for the changed files only then: the draw its stages (and every checkpoint
    sharing the folder) trained on was gone. Refused first now, naming the knob, the set left as it was."""
    small = {"shapes": {"n_train": 3, "n_test": 2, "image_size": 32}}
    cfg = {
        "data_root": str(tmp_path),
        "offline_datasets": ["shapes"],
        "offline_dataset_args": small,
        "output_dir": str(tmp_path / "outputs"),
        "run_name": "r",
        "run": ["pretrain", "finetune"],
        "stages": {
            "pretrain": {"data": {"sources": [{"path": str(tmp_path / "shapes" / "pretrain.json")}]}},
            "finetune": {"data": {"sources": [{"path": str(tmp_path / "other.json")}]}},
        },
    }
    ensure_offline_datasets(OmegaConf.create({**cfg, "seed": 1, "offline_dataset_seed": None}))
    written = (tmp_path / "shapes" / "test.json").read_bytes()
    (tmp_path / "outputs" / "r" / "finetune" / "final").mkdir(parents=True)  # reads no file of the set
    ensure_offline_datasets(OmegaConf.create({**cfg, "seed": 1, "offline_dataset_seed": None}))
    (tmp_path / "outputs" / "r" / "pretrain" / "checkpoints" / "step_000002").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"holds the set that stages \['pretrain'\] of this run trained on, written "
                       r"with seed=1; this config asks for seed=0.*offline_dataset_seed=null"):  # fmt: skip
        ensure_offline_datasets(OmegaConf.create({**cfg, "seed": 1, "offline_dataset_seed": 0}))
    assert (tmp_path / "shapes" / "test.json").read_bytes() == written


def test_a_knob_that_only_adds_files_is_written_again_under_a_finished_stage(tmp_path):
    """+exp=demo and +exp=som share data/shapes and differ in ``som`` alone, which changes none of the files demo's
    stages read: after the SoM run wrote its tagged scenes, rerunning the finished demo run was refused."""
    small = {"n_train": 3, "n_test": 2, "image_size": 32}
    cfg = {
        "data_root": str(tmp_path),
        "offline_datasets": ["shapes"],
        "output_dir": str(tmp_path / "outputs"),
        "run_name": "r",
        "run": ["pretrain"],
        "offline_dataset_seed": 0,
        "seed": 0,
        "stages": {"pretrain": {"data": {"sources": [{"path": str(tmp_path / "shapes" / "pretrain.json")}]}}},
    }
    ensure_offline_datasets(OmegaConf.create({**cfg, "offline_dataset_args": {"shapes": small}}))
    read = {f: (tmp_path / "shapes" / f).read_bytes() for f in ("pretrain.json", "instruct.json", "test.json")}
    (tmp_path / "outputs" / "r" / "pretrain" / "final").mkdir(parents=True)
    for som in (True, False):
        ensure_offline_datasets(OmegaConf.create({**cfg, "offline_dataset_args": {"shapes": {**small, "som": som}}}))
        assert (tmp_path / "shapes" / "som.json").exists() == som
        assert {f: (tmp_path / "shapes" / f).read_bytes() for f in read} == read
