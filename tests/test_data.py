"""LLaVA data pipeline: image expansion, padding, mixtures, and every kind of bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alignlm.constants import IGNORE_INDEX
from alignlm.data.collate import Collator, Skipped
from alignlm.data.images import ImageSpec, pad_to_square, preprocess
from alignlm.data.llava import LlavaDataset
from alignlm.data.records import DataError, Source, mixture_index, reference_captions
from alignlm.data.templates import get_template


@pytest.fixture(scope="module")
def model():
    from alignlm.models.build import build_model
    from tests.conftest import compose

    return build_model(compose().model)


def dataset(model, records, root: Path, template="vicuna_v1", **kw) -> LlavaDataset:
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return LlavaDataset(
        [Source(str(path))], model.tokenizer, get_template(template), model.image_spec, model.num_image_tokens, **kw
    )


def record(rid: str, image="images/0.png", question="<image>\nWhat color?", answer="red"):
    return {
        "id": rid,
        "image": image,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "images" / "0.png")
    Image.new("RGB", (10, 10), (0, 0, 255)).save(tmp_path / "images" / "1.png")
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return tmp_path


def test_each_image_expands_to_its_visual_tokens(model, root):
    two = {
        "id": "two",
        "image": ["images/0.png", "images/1.png"],
        "conversations": [{"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "no"}],
    }
    ds = dataset(
        model,
        [
            record("a"),
            two,
            {
                "id": "text",
                "conversations": record("x")["conversations"][:0]
                + [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
            },
        ],
        root,
    )
    for i, n_img in enumerate([1, 2, 0]):
        s = ds[i]
        slots = s["input_ids"] == model.image_token_id
        assert s["n_images"] == n_img and int(slots.sum()) == n_img * model.num_image_tokens
        assert (s["labels"][slots] == IGNORE_INDEX).all()
        assert (s["pixel_values"] is None) == (n_img == 0)
    batch = Collator(model.tokenizer.pad_token_id)([ds[0], ds[1], ds[2]])
    assert batch["pixel_values"].shape[0] == 3 and batch["image_counts"].tolist() == [1, 2, 0]
    out = model(batch)  # the whole batch (several images and text-only) runs through the model
    assert torch.isfinite(out.lm_loss)


def test_image_added_before_first_question_when_record_has_no_placeholder(model, root):
    ds = dataset(model, [record("a", question="What color?")], root)
    assert int((ds[0]["input_ids"] == model.image_token_id).sum()) == model.num_image_tokens


@pytest.mark.parametrize("template", ["vicuna_v1", "chat"])
def test_a_record_opening_with_a_system_turn_gets_its_image_in_the_first_question(model, root, template):
    rec = record("sys", question="What color?")
    rec["conversations"].insert(0, {"from": "system", "value": "Be terse."})
    s = dataset(model, [rec], root, template=template, on_error="raise")[0]
    assert int((s["input_ids"] == model.image_token_id).sum()) == model.num_image_tokens  # was 0: in the system text


def test_a_system_turn_after_the_first_is_malformed_not_dropped(model, root):
    late = record("late")
    late["conversations"].append({"from": "system", "value": "Now answer in French."})
    late["conversations"].append({"from": "human", "value": "Again?"})
    late["conversations"].append({"from": "gpt", "value": "rouge"})
    ds = dataset(model, [record("a"), late, record("b")], root)
    assert (
        len(ds) == 2
        and ds.report.counts == {"malformed record": 1}
        and ds.report.examples["malformed record"] == ["late"]
    )
    with pytest.raises(DataError, match=r"conversations\[2\] is a system turn: only the first turn may be one"):
        dataset(model, [late], root, on_error="raise")


def test_placeholder_count_mismatch(model, root):
    ds = dataset(model, [record("bad", question="<image><image> two?")], root, on_error="raise")
    with pytest.raises(DataError, match="id=bad.*2 <image> placeholders but 1 images"):
        ds[0]


@pytest.mark.parametrize(
    "image,match",
    [("images/missing.png", "missing.png does not exist"), ("images/corrupt.png", "cannot read image .*corrupt.png")],
)
def test_bad_images_skip_or_raise(model, root, image, match):
    ds = dataset(model, [record("ok"), record("bad", image=image)], root)
    skipped = ds[1]
    assert isinstance(skipped, Skipped) and skipped.id == "bad" and re.search(match, skipped.reason)
    assert skipped.cause == ("missing image" if "missing" in image else "unreadable image")
    batch = Collator(0)([ds[0], skipped])
    assert batch["ids"] == ["ok"] and [s.id for s in batch["skipped"]] == ["bad"]
    strict = dataset(model, [record("bad", image=image)], root, on_error="raise")
    with pytest.raises(DataError, match="id=bad"):
        strict[0]


def test_malformed_records_fail_at_start_up(model, root):
    records = [record("ok"), {"id": "noconv"}, {"id": "badrole", "conversations": [{"from": "bot", "value": "x"}]}, 7]
    ds = dataset(model, records, root, min_usable_fraction=0.0)
    assert len(ds) == 1 and ds.report.counts == {"malformed record": 3}
    assert ds.report.examples["malformed record"][:2] == ["noconv", "badrole"]
    with pytest.raises(DataError, match="record 1 .*id='noconv'.*conversations"):
        dataset(model, records, root, on_error="raise")
    with pytest.raises(DataError, match="only 1 of 4 records .* below data.min_usable_fraction=0.5"):
        dataset(model, records, root)


def test_bad_json_line_is_counted_under_skip_and_named_under_raise(model, root):
    path = root / "d.jsonl"
    path.write_text(json.dumps(record("a")) + "\n{oops\n" + json.dumps(record("b")) + "\n")
    args = ([Source(str(path))], model.tokenizer, get_template("plain"), model.image_spec, model.num_image_tokens)
    ds = LlavaDataset(*args)
    assert len(ds) == 2 and ds.report.counts == {"invalid JSON line": 1}
    assert ds.report.examples["invalid JSON line"] == [f"{path}:2"]
    with pytest.raises(DataError, match="d.jsonl:2"):
        LlavaDataset(*args, on_error="raise")


def test_bytes_that_are_not_utf8_are_refused_not_replaced(model, root):
    latin1 = json.dumps(record("a", answer="caf\u00e9"), ensure_ascii=False).encode("latin-1")
    jsonl = root / "d.jsonl"
    jsonl.write_bytes(json.dumps(record("b")).encode() + b"\n" + latin1 + b"\n")
    args = ([Source(str(jsonl))], model.tokenizer, get_template("plain"), model.image_spec, model.num_image_tokens)
    ds = LlavaDataset(*args)  # the line was once read with U+FFFD in place of the byte, and trained on
    assert len(ds) == 1 and ds.report.examples["invalid JSON line"] == [f"{jsonl}:2"]
    with pytest.raises(DataError, match="d.jsonl:2: not valid JSON \\(not UTF-8 at byte"):
        LlavaDataset(*args, on_error="raise")
    for name, data, match in [
        ("l.json", b"[" + latin1 + b"]", "l.json: not UTF-8 text"),
        ("t.json", b"[{},]", "t.json:1"),
    ]:
        (root / name).write_bytes(data)
        with pytest.raises(DataError, match=match) as e:  # a DataError, so `alignlm train` exits 65 naming the file
            LlavaDataset([Source(str(root / name))], *args[1:])
        assert e.value.cause == "invalid JSON line"


def test_a_max_length_that_cannot_hold_an_image_is_refused_at_start_up(model, root):
    with pytest.raises(DataError, match=f"max_length={model.num_image_tokens} cannot hold one image's"):
        dataset(model, [record("a")], root, max_length=model.num_image_tokens)  # every step ran, then "no step trained"
    text_only = {"id": "t", "conversations": record("x")["conversations"][:0] + [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}  # fmt: skip
    assert len(dataset(model, [text_only], root, max_length=model.num_image_tokens)) == 1


def test_unknown_on_error_policy(model, root):
    with pytest.raises(ValueError, match="skip.*raise"):
        dataset(model, [record("a")], root, on_error="ignore")


def test_overlong_sample_truncates_text_but_never_visual_tokens(model, root):
    long_answer = " ".join(["red"] * 200)
    first_answer_pos = int(
        np.flatnonzero(dataset(model, [record("long", answer=long_answer)], root)[0]["labels"] != IGNORE_INDEX)[0]
    )
    limit = first_answer_pos + 5
    ds = dataset(model, [record("long", answer=long_answer)], root, max_length=limit)
    s = ds[0]
    assert len(s["input_ids"]) == limit
    assert int((s["input_ids"] == model.image_token_id).sum()) == model.num_image_tokens
    assert (s["labels"] != IGNORE_INDEX).any()
    short = model.num_image_tokens + 1  # room for the image alone, but the template's text comes first
    cut_inside = dataset(model, [record("long", answer=long_answer)], root, max_length=short)
    assert isinstance(cut_inside[0], Skipped) and "split visual tokens" in cut_inside[0].reason
    strict = dataset(model, [record("long", answer=long_answer)], root, max_length=short, on_error="raise")
    with pytest.raises(DataError, match=f"id=long.*max_length={short}"):
        strict[0]


def test_pad_to_square_uses_mean_colour_and_keeps_aspect():
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    sq = pad_to_square(img, (10, 20, 30))
    assert sq.size == (20, 20)
    assert sq.getpixel((0, 0)) == (10, 20, 30) and sq.getpixel((10, 10)) == (255, 0, 0)
    spec = ImageSpec(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = preprocess(img, spec)
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x[:, 0, 0], torch.zeros(3), atol=2 / 255)  # the mean colour normalises to ~0 (8-bit rounding)


def test_mixture_weights():
    """Whole weights repeat a source; a fractional part is a pool of one more copy, of which an epoch draws its share."""
    idx, pools = mixture_index([10, 4], [2.0, 0.5])
    src = idx[:, 0]
    assert (src == 0).sum() == 20 and (src == 1).sum() == 4 and pools == [(20, 24, 2)]
    assert mixture_index([10, 4], [1.0, 0.0])[1] == [] and (mixture_index([10, 4], [1.0, 0.0])[0][:, 0] == 0).all()
    with pytest.raises(ValueError, match="weight"):
        mixture_index([3], [-1.0])


def test_left_padding_for_generation(model, root):
    ds = dataset(
        model,
        [record("a"), record("b", question="<image>\nWhat color is this, exactly, in one word?")],
        root,
        for_generation=True,
    )
    batch = Collator(model.tokenizer.pad_token_id, padding_side="left")([ds[0], ds[1]])
    assert (batch["attention_mask"][:, -1] == 1).all() and batch["attention_mask"][0, 0] == 0
    text = model.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert text.endswith("ASSISTANT:")


def test_an_evaluation_record_with_no_user_turn_is_malformed_at_start_up(model, root):
    """It passed start-up and failed when asked, with ``max() arg is an empty sequence`` naming no record."""
    records = [
        record("asked"),
        {"id": "only-answer", "answer": "red", "conversations": [{"from": "gpt", "value": "red"}]},
    ]
    with pytest.raises(DataError, match=r"record 1 \(id='only-answer'\): an evaluation record needs a user turn"):
        dataset(model, records, root, for_generation=True, on_error="raise")
    ds = dataset(model, records, root, for_generation=True)
    assert len(ds) == 1 and ds.report.counts == {"malformed record": 1} and ds[0]["id"] == "asked"


def test_reference_captions_are_a_list_of_texts_never_the_characters_of_one(model, root):
    """A string ``captions`` was split into its characters and ``[null, 3]`` became 'None' and '3': an exact caption
    scored BLEU 0. Refused naming the record, and by an evaluation set at start-up, before anything is generated."""
    captioned = {**record("c1"), "captions": ["A red square.", "A square in red."]}
    assert reference_captions(captioned) == ["A red square.", "A square in red."]
    assert reference_captions(record("c1")) == ["red"]  # no captions: the last answer
    for captions in ("A red square.", [None, 3], [], ["A red square.", " "]):
        with pytest.raises(DataError, match="record id='c1': 'captions' must be a non-empty list of non-empty strings"):
            reference_captions({**captioned, "captions": captions})
    with pytest.raises(DataError, match=r"id='c1'\): 'captions' must be a non-empty list"):
        dataset(model, [{**captioned, "captions": "A red square."}], root, for_generation=True, on_error="raise")
