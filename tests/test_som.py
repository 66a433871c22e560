"""Set-of-Mark data: tagged copies of the shapes training scenes, listing records in tag order, the other files
unchanged, regeneration when the config asks for other knobs, and the ``+exp=som`` switch."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from alignlm.data.shapes import SOM_Q, generate
from alignlm.pipeline import ensure_offline_datasets
from tests.conftest import compose


@pytest.fixture(scope="module")
def som_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("som")
    generate(root / "plain", n_train=40, n_test=5)
    generate(root / "som", n_train=40, n_test=5, som=True)
    return root / "plain", root / "som"


def test_som_adds_tagged_images_and_leaves_every_other_file_byte_identical(som_sets):
    plain, som = som_sets
    for name in ("pretrain", "instruct", "test", "test_captions", "patch_labels"):
        assert (plain / f"{name}.json").read_bytes() == (som / f"{name}.json").read_bytes(), name
    for image in (plain / "images").iterdir():
        assert image.read_bytes() == (som / "images" / image.name).read_bytes()
    assert not (plain / "som.json").exists()
    info = json.loads((som / "info.json").read_text())
    assert info["knobs"]["som"] is True and info["counts"]["som"] == 40 and info["counts"]["images"] == 85


def test_listing_names_every_object_in_tag_order_and_the_tags_sit_on_the_objects(som_sets):
    plain, som = som_sets
    captions = {r["id"]: r["conversations"][1]["value"] for r in json.loads((plain / "pretrain.json").read_text())}
    orders = set()
    for rec in json.loads((som / "som.json").read_text()):
        question, answer = (t["value"] for t in rec["conversations"])
        assert question == "<image>\n" + SOM_Q
        lines = answer.split("\n")
        assert [int(line.split(".")[0]) for line in lines] == list(range(1, len(lines) + 1))
        named = [line.split(". ", 1)[1] for line in lines]
        train_id = rec["id"].replace("shapes_som_", "shapes_train_")
        in_caption = re.findall(r"\ban? (\w+ \w+) in the", captions[train_id], flags=re.IGNORECASE)
        assert sorted(named) == sorted(in_caption)  # the same objects as the plain scene, each once
        orders.add(tuple(in_caption.index(n) for n in named))
        # the tagged image differs from the plain one only inside the objects' boxes
        marked = np.asarray(Image.open(som / rec["image"])).astype(int)
        original = np.asarray(Image.open(plain / "images" / f"{train_id}.png")).astype(int)
        changed = np.argwhere((marked != original).any(-1))
        assert len(changed) > 0
        background = original[changed[:, 0], changed[:, 1]]
        assert (background == 255).all(-1).mean() < 0.1  # tags sit on their objects, barely over an edge
    assert len(orders) > 3  # tags come in varied orders, not always the caption's


def test_offline_sets_are_regenerated_when_the_config_asks_for_other_knobs(tmp_path):
    cfg = compose(f"data_root={tmp_path}", "offline_datasets=[shapes]", "+offline_dataset_args.shapes.n_train=12")
    ensure_offline_datasets(cfg)
    assert not (tmp_path / "shapes" / "som.json").exists()
    stamp = (tmp_path / "shapes" / "info.json").stat().st_mtime_ns
    ensure_offline_datasets(cfg)  # same knobs: left alone
    assert (tmp_path / "shapes" / "info.json").stat().st_mtime_ns == stamp
    ensure_offline_datasets(
        compose(
            f"data_root={tmp_path}",
            "offline_datasets=[shapes]",
            "+offline_dataset_args.shapes={n_train: 12, som: true}",
        )
    )
    assert len(json.loads((tmp_path / "shapes" / "som.json").read_text())) == 12
    # back to som off and fewer scenes: what only the earlier set had is gone, not read by a config naming it
    ensure_offline_datasets(
        compose(f"data_root={tmp_path}", "offline_datasets=[shapes]", "+offline_dataset_args.shapes.n_train=8")
    )
    assert not (tmp_path / "shapes" / "som.json").exists()
    images = sorted(p.name for p in (tmp_path / "shapes" / "images").iterdir())
    named = {
        r["image"].split("/")[-1]
        for f in ("pretrain", "test")
        for r in json.loads((tmp_path / "shapes" / f"{f}.json").read_text())
    }
    assert (
        set(images) == named
        and len(images) == json.loads((tmp_path / "shapes" / "info.json").read_text())["counts"]["images"]
    )


def test_exp_som_mixes_the_listing_records_into_finetuning_only():
    cfg = compose("+exp=som")
    assert cfg.offline_dataset_args.shapes.som is True
    finetune = [s.path for s in cfg.stages.finetune.data.sources]
    assert any(p.endswith("shapes/som.json") for p in finetune)
    assert not any(s.path.endswith("som.json") for s in cfg.stages.pretrain.data.sources)
    assert all(s.path.endswith("test.json") for s in cfg.eval.sets)  # held-out questions stay unmarked


def test_som_must_be_a_bool(tmp_path):
    with pytest.raises(ValueError, match="som must be true or false"):
        generate(tmp_path, n_train=2, n_test=1, som="yes")


def test_each_set_of_mark_tag_is_drawn_on_the_object_the_listing_names_with_it():
    """The listing names tag k with the object that got tag k: drawing the scene's tags is, inside each object's
    box, drawing that object's tag alone (a tag drawn on another object makes the listing's answer unreadable)."""
    from alignlm.data.shapes import Shape, draw_marks, draw_scene

    scene = [
        Shape("square", "red", "top left", (4, 4, 28, 28)),
        Shape("circle", "blue", "bottom right", (36, 36, 60, 60)),
    ]
    pixels, _ = draw_scene(64, scene)
    tags = [1, 2]
    both = draw_marks(pixels, scene, tags)
    for obj, tag in zip(scene, tags):
        alone = draw_marks(pixels, [obj], [tag])
        x0, y0, x1, y1 = obj.box
        assert np.array_equal(both[y0:y1, x0:x1], alone[y0:y1, x0:x1]), (obj, tag)
