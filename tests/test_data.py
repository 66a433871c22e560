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
from alignlm.data.records import (
    DataError,
    Source,
    assistant_text,
    mixture_index,
    read_records,
    record_caption,
    reference_captions,
)
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
    with pytest.raises(DataError, match="id='bad'.*2 <image> placeholders but 1 images"):
        dataset(model, [record("bad", question="<image><image> two?")], root, on_error="raise")


def test_placeholders_and_turns_the_template_refuses_are_left_out_at_start_up(model, root):
    """Placeholders that do not match the images and turns the template does not take passed start-up and were
    skipped only when drawn: never counted towards min_usable_fraction, never stopping on_error=raise before step 1."""
    reversed_turns = {
        "id": "reversed",
        "image": "images/0.png",
        "conversations": [{"from": "gpt", "value": "red"}, {"from": "human", "value": "<image>"}],
    }
    records = [
        record("ok"),
        record("two", question="<image>\n<image>\nWhat color?"),  # two placeholders, one image
        record("none", image=None),  # a placeholder, no image
        reversed_turns,
    ]
    ds = dataset(model, records, root, min_usable_fraction=0.0)
    assert len(ds) == 1 and ds[0]["id"] == "ok"
    assert ds.report.counts == {"malformed record": 2, "conversation the template cannot render": 1}
    assert ds.report.examples["malformed record"] == ["two", "none"]
    with pytest.raises(DataError, match="only 1 of 4 records .* below data.min_usable_fraction=0.5"):
        dataset(model, records, root)
    with pytest.raises(DataError, match=r"record 1 \(id='reversed'\): template 'vicuna_v1': turns must alternate"):
        dataset(model, [record("ok"), reversed_turns], root, on_error="raise")
    two_turns = record("qa")
    two_turns["conversations"] += [{"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]
    with pytest.raises(DataError, match="template 'plain' needs one user turn then one assistant turn"):
        dataset(model, [record("ok"), two_turns], root, template="plain", on_error="raise")
    # a preference record is checked with its answer appended, as it is drawn
    prompt = {**record("pref"), "chosen": "red", "rejected": "blue"}
    prompt["conversations"] = prompt["conversations"][:1]
    assert len(dataset(model, [prompt], root, preference=True, on_error="raise")) == 1


def test_a_record_keeps_its_fallback_id_after_records_before_it_were_left_out(model, root):
    """A record without an id is ``<file>#<index among all its file's records>`` at start-up; a sample counted its
    index among the records kept, so after one was left out a skipped sample named its neighbour."""
    records = [record("a"), {"conversations": "oops"}, record("b"), record("c", image="images/missing.png")]
    for r in records:
        r.pop("id", None)
    ds = dataset(model, records, root, min_usable_fraction=0.0)
    path = root / "data.json"
    assert ds.report.examples["malformed record"] == [f"{path}#1"]
    assert [rid for _, rid, _ in ds.distinct_records()] == [f"{path}#0", f"{path}#2", f"{path}#3"]
    skipped = [s for s in (ds[i] for i in range(len(ds))) if isinstance(s, Skipped)]
    assert [s.id for s in skipped] == [f"{path}#3"] and "missing.png" in skipped[0].reason


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


def test_json_that_parses_but_does_not_decode_is_an_invalid_line(model, root):
    """A line nested deeper than Python's recursion limit, or holding an integer of 5000 digits, ended start-up with a
    RecursionError or ValueError naming no file, even under on_error=skip."""
    deep, big = "[" * 5000 + "]" * 5000, '{"id": ' + "7" * 5000 + "}"
    path = root / "d.jsonl"
    path.write_text("\n".join([json.dumps(record("a")), deep, big, json.dumps(record("b"))]) + "\n")
    args = ([Source(str(path))], model.tokenizer, get_template("plain"), model.image_spec, model.num_image_tokens)
    ds = LlavaDataset(*args)
    assert len(ds) == 2 and ds.report.examples["invalid JSON line"] == [f"{path}:2", f"{path}:3"]
    with pytest.raises(DataError, match="d.jsonl:2: not valid JSON \\(nested too deeply to decode\\)"):
        LlavaDataset(*args, on_error="raise")
    for text, why in ((deep, "nested too deeply to decode"), (big, "Exceeds the limit \\(4300 digits\\)")):
        (root / "l.json").write_text(f"[{json.dumps(record('a'))}, {text}]")
        with pytest.raises(DataError, match=f"l.json: a record does not decode \\({why}") as e:
            LlavaDataset([Source(str(root / "l.json"))], *args[1:])
        assert e.value.cause == "invalid JSON line"


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


def test_a_fractional_weight_rounds_to_the_nearest_record_and_never_silently_to_none():
    """Python's round took a half record down to none (1 record at 0.5, 2 at 0.25), and a share under half a record
    (3 records at 0.1) dropped the source from every epoch without a word; 2.5 records went to 2. A half now rounds
    up, and a positive weight that still gives no record is refused, naming the weight that would."""
    from alignlm.config import ConfigError

    assert mixture_index([100, 1], [1.0, 0.5])[1] == [(100, 101, 1)]
    assert mixture_index([100, 2], [1.0, 0.25])[1] == [(100, 102, 1)]
    assert mixture_index([100, 5], [1.0, 0.5])[1] == [(100, 105, 3)]
    with pytest.raises(
        ConfigError, match=r"weight 0.1 over its 3 usable records: 0.3 records an epoch.*at least 0.167"
    ):
        mixture_index([100, 3], [1.0, 0.1])
    assert mixture_index([100, 3], [1.0, 1.1])[1] == []  # its whole copy is seen; the tenth rounds to none


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


def test_roles_are_read_in_any_case_by_the_caption_readers_as_by_training(model, root):
    """A record with "Human"/"GPT" turns trained (``to_turns`` lowercases) but read as captionless: the encoder fit got
    empty captions, AlignGPT dropped every level and ``reference_captions`` raised."""
    rec = record("r", answer="a red square")
    rec["conversations"][0]["from"], rec["conversations"][1]["from"] = "Human", "GPT"
    ds = dataset(model, [rec], root, template="plain", on_error="raise")
    trained = model.tokenizer.decode(ds[0]["input_ids"][ds[0]["labels"] != IGNORE_INDEX])
    assert trained.strip() == "a red square"
    assert record_caption(rec) == assistant_text(rec) == "a red square" and reference_captions(rec) == ["a red square"]
    rec["conversations"][1]["from"] = "Assistant"
    assert record_caption(rec) == "a red square" and reference_captions(rec) == ["a red square"]


def _surrogate_records() -> list[tuple[dict, str]]:
    """Records holding a lone UTF-16 surrogate (valid JSON as ``"\\ud83d"``), and what start-up says of each."""
    unicode = r"is not valid Unicode \(a lone surrogate at character"
    return [
        (record("answer", answer="smile \ud83d here"), rf"conversations\[1\].value {unicode} 6\)"),
        (record("question", question="<image>\nQ \udc80"), rf"conversations\[0\].value {unicode} 10\)"),
        (record("path", image="images/x\ud83d.png"), rf"'image' {unicode} 8\)"),
        (record("paths", image=["images/0.png", "\ud83d.png"]), rf"'image'\[1\] {unicode} 0\)"),
    ]


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "chat"])
def test_a_lone_surrogate_is_a_malformed_record_at_start_up(model, root, template):
    """It passed start-up and, drawn, raised a TypeError (the tokenizer) or UnicodeEncodeError (the file system) that
    on_error=skip did not catch: the stage ended."""
    bad = _surrogate_records()
    if template == "plain":  # plain takes one question and one image
        bad = [(r, m) for r, m in bad if r["id"] != "paths"]
    # dataset() writes the records with json.dumps, which escapes a lone surrogate: valid JSON text
    ds = dataset(model, [record("ok"), *(r for r, _ in bad)], root, template=template, min_usable_fraction=0.0)
    assert len(ds) == 1 and ds.report.counts == {"malformed record": len(bad)}
    assert ds.report.examples["malformed record"] == [r["id"] for r, _ in bad][:3]
    assert ds[0]["id"] == "ok"
    for rec, message in bad:
        with pytest.raises(DataError, match=rf"id='{rec['id']}'\): {message}"):
            dataset(model, [rec], root, template=template, on_error="raise")
    prompt = {**record("pref"), "chosen": "red", "rejected": "blue \ud83d"}
    prompt["conversations"] = prompt["conversations"][:1]
    with pytest.raises(DataError, match=r"id='pref'\): 'rejected' is not valid Unicode"):
        dataset(model, [prompt], root, template=template, preference=True, on_error="raise")


def test_an_empty_image_path_is_a_malformed_record_not_the_image_folder(model, root):
    """``"image": ""`` named the data folder, then was skipped when drawn as "unreadable image ... not a regular
    file"."""
    records = [record("ok"), record("empty", image="", question="Q"), record("in_list", image=["images/0.png", ""])]
    ds = dataset(model, records, root, min_usable_fraction=0.0)
    assert len(ds) == 1 and ds.report.examples == {"malformed record": ["empty", "in_list"]}
    for rec, message in zip(records[1:], ("'image' is an empty path", r"'image'\[1\] is an empty path")):
        with pytest.raises(DataError, match=rf"id='{rec['id']}'\): {message}"):
            dataset(model, [rec], root, on_error="raise")
    assert len(dataset(model, [record("none", image=[], question="Q")], root)) == 1  # an empty list: no image


def test_json_lines_named_json_is_told_to_be_named_jsonl(root):
    lines = root / "lines.json"
    lines.write_text(json.dumps(record("a")) + "\n" + json.dumps(record("b")) + "\n")
    with pytest.raises(DataError, match=r"lines.json:2: not valid JSON \(Extra data\) \(one record per line\? name it"):
        read_records(lines)
    (root / "broken.json").write_text("[{},")
    with pytest.raises(DataError, match=r"broken.json:1: not valid JSON \([^)]*\)$"):
        read_records(root / "broken.json")


def test_a_sources_switch_and_weight_are_checked_not_coerced():
    """``bool('false')`` turned the image-root guard off; a weight of nan, inf or -1 passed the start-up checks and
    failed only when its stage built its data, after the stages before it had trained."""
    from alignlm.config import ConfigError

    for value in ("false", "no", 0, None):
        with pytest.raises(ConfigError, match=r"data.sources\[0\].allow_outside_root=.* must be true or false"):
            Source.from_config({"path": "d.json", "allow_outside_root": value}, "data.sources[0]")
    for weight in (float("nan"), float("inf"), -1, "1", True):
        with pytest.raises(ConfigError, match=r"data.sources\[2\].weight=.* must be a finite number >= 0"):
            Source.from_config({"path": "d.json", "weight": weight}, "data.sources[2]")
    assert Source.from_config({"path": "d.json", "allow_outside_root": True, "weight": 0}, "s") == Source(
        "d.json", None, 0.0, True
    )
    assert Source.from_config({"path": "d.json", "weight": 2}, "s").weight == 2.0


def test_json_lines_files_are_known_by_any_case_of_jsonl_or_ndjson_and_a_bom_costs_nothing(model, root):
    """``.JSONL`` and ``.ndjson`` were parsed as one JSON document ("Extra data"); a UTF-8 byte order mark made the
    first line invalid JSON (a record lost) and a ``.json`` file unreadable."""
    from alignlm.data.records import read_records

    lines = "".join(json.dumps(record(f"r{i}")) + "\n" for i in range(3))
    for name in ("d.JSONL", "d.ndjson", "d.NDJSON"):
        (root / name).write_text(lines)
        assert [r["id"] for r in read_records(root / name)] == ["r0", "r1", "r2"]
    (root / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    args = (model.tokenizer, get_template("plain"), model.image_spec, model.num_image_tokens)
    ds = LlavaDataset([Source(str(root / "bom.jsonl"))], *args, on_error="raise")
    assert len(ds) == 3 and not ds.report.counts
    (root / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([record("a")]).encode())
    assert read_records(root / "bom.json")[0]["id"] == "a"


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that is only a header: its size costs nothing to read, and decoding it fails (no pixel data)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_pillows_own_limit_follows_max_image_pixels(tmp_path):
    """Pillow refuses an image over twice its MAX_IMAGE_PIXELS (~179 M pixels) whatever data.max_image_pixels said:
    null (no limit) or a larger limit still refused a 14000 x 14000 image, counted as over the setting."""
    from alignlm.data.images import load_rgb

    big = png_header(tmp_path / "big.png", 14000, 14000)
    before = Image.MAX_IMAGE_PIXELS
    for limit in (None, 400_000_000):
        with pytest.raises(DataError) as e:
            load_rgb(big, limit)
        assert e.value.cause == "unreadable image"  # past every size check, to decoding (the file holds no pixels)
    with pytest.raises(DataError, match="over data.max_image_pixels=50000000") as e:
        load_rgb(big)
    assert e.value.cause == "image over data.max_image_pixels"
    from alignlm.data.images import image_size

    assert image_size(big) == (14000, 14000) and Image.MAX_IMAGE_PIXELS == before  # restored after every read


def test_images_are_loaded_upright_and_transparency_on_white_as_transformers_loads_them(tmp_path):
    """EXIF orientation was ignored (a portrait photo trained sideways, transformers' load_image turns it upright),
    and convert('RGB') kept the colour under transparent pixels where the exported processor composites onto white
    (transformers' convert_to_rgb does from 5.19; earlier ones drop the alpha channel as convert('RGB') does)."""
    from transformers.image_utils import load_image

    from alignlm.data.images import load_rgb

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255  # 40 wide, 20 high, its left half white
    photo = Image.fromarray(stored)
    exif = photo.getexif()
    exif[0x0112] = 6  # Orientation: shown turned 90 degrees clockwise
    photo.save(tmp_path / "portrait.jpg", exif=exif.tobytes())
    upright = load_rgb(tmp_path / "portrait.jpg")
    assert upright.size == (20, 40)
    assert np.array_equal(np.asarray(upright), np.asarray(load_image(str(tmp_path / "portrait.jpg"))))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red hidden under full transparency
    rgba[2:6, 2:6, 3] = 255
    rgba[0, :, 3] = 128  # a half-transparent row
    images = {
        "rgba.png": Image.fromarray(rgba, "RGBA"),
        "la.png": Image.fromarray(rgba[..., [0, 3]], "LA"),
        "palette.png": Image.fromarray((rgba[..., 3] == 255).astype(np.uint8), "P"),  # index 0: transparent
    }
    images["palette.png"].putpalette([200, 0, 0, 0, 0, 255])
    for name, image in images.items():
        image.save(tmp_path / name, **({"transparency": 0} if image.mode == "P" else {}))
        loaded = np.asarray(load_rgb(tmp_path / name))
        rgba_image = Image.open(tmp_path / name).convert("RGBA")
        white = Image.new("RGBA", rgba_image.size, (255, 255, 255, 255))
        assert np.array_equal(loaded, np.asarray(Image.alpha_composite(white, rgba_image).convert("RGB"))), name
        assert loaded[7, 7].tolist() == [255, 255, 255], name  # transparent: white, not the colour under it


def test_a_feature_cache_holds_its_images_to_this_runs_max_image_pixels(root, monkeypatch):
    """Images served from the feature cache skipped data.max_image_pixels: a run with a lower limit trained on the
    images it refuses without the cache. The size is stored with the features (no image is opened to check it); a
    shard written without sizes has them read from the images' headers."""
    from accelerate import Accelerator

    from alignlm.data import feature_cache
    from alignlm.data.feature_cache import FeatureCache, FeatureCacheHook
    from alignlm.models.build import build_model
    from alignlm.training.feature_cache import attach_feature_cache
    from tests.conftest import compose

    frozen = build_model(compose().model)
    frozen.frozen_parts.add("vision")
    records = [record("wide"), record("square", image="images/1.png")]  # 20 x 10 (a square of 400) and 10 x 10
    acc = Accelerator(cpu=True)
    attach_feature_cache(frozen, dataset(frozen, records, root), True, root / "cache", {"name": "tiny"}, acc)
    (folder,) = (root / "cache").iterdir()

    def served(cache: FeatureCache) -> list:
        ds = dataset(frozen, records, root, max_image_pixels=100)
        ds.set_visual_hook(FeatureCacheHook(cache, ds.max_image_pixels))
        return [ds[0], ds[1]]

    wide, square = served(FeatureCache(folder))
    assert isinstance(wide, Skipped) and wide.cause == "image over data.max_image_pixels"
    assert "padded to a square 400, over data.max_image_pixels=100" in wide.reason
    assert square["image_embeds"] is not None

    def unopened(path):
        raise AssertionError(f"{path} opened")

    with monkeypatch.context() as patched:
        patched.setattr(feature_cache, "image_size", unopened)  # the sizes come from the shard
        assert [isinstance(s, Skipped) for s in served(FeatureCache(folder))] == [True, False]
    old = FeatureCache(root / "old")  # a shard written before sizes were stored
    paths = [root / "images" / "0.png", root / "images" / "1.png"]
    old.write("a", paths, [feature_cache.file_stamp(p) for p in paths], FeatureCache(folder).get(paths))
    assert [isinstance(s, Skipped) for s in served(FeatureCache(root / "old"))] == [True, False]


def test_the_feature_cache_of_a_tower_is_another_with_another_artifact_filter(model):
    """model.vision_artifacts (hooked on the tower's output) was no part of the cache's key: a run with another filter
    read the features an earlier run had cached unfiltered or filtered otherwise."""
    from alignlm.models.build import build_model
    from alignlm.training.feature_cache import tower_fingerprint
    from tests.conftest import compose

    cfg = compose().model
    prints = [tower_fingerprint(model, cfg.vision)]
    for node in ("{mode:mask,factor:4.0}", "{mode:replace,factor:4.0}", "{mode:mask,factor:2.0}"):
        prints.append(tower_fingerprint(build_model(compose(f"model.vision_artifacts={node}").model), cfg.vision))
    assert len(set(prints)) == 4
    assert tower_fingerprint(build_model(cfg), cfg.vision) == prints[0]  # without a filter: the key it always had


def test_readers_that_skip_start_up_checks_refuse_an_empty_or_surrogate_image_name():
    """`image_paths` is where every reader takes paths (encoder fit, AlignGPT levels, probes): an empty name read as
    the image folder there, and a lone surrogate reached the file system."""
    from alignlm.data.records import DataError, image_paths

    with pytest.raises(DataError, match="'image' is an empty path"):
        image_paths({"image": ""}, "/data")
    with pytest.raises(DataError, match=r"'image'\[1\] is not valid Unicode"):
        image_paths({"image": ["a.png", "\ud83d.png"]}, "/data")


ODD_RECORDS = [
    {
        "id": "u",
        "text": '日本語 · émoji 🐱 · \u0000 nul · "quoted" \\ back',
        "half": "\ud83d",  # a lone surrogate is valid JSON as an escape; start-up refuses it only in turns and names
        "nested": [[1, [2.5, None]], {"b": True, "a": False}],
        "numbers": [0, -1, 2**70, 1e308, -0.0, 5e-324, 0.1, float("inf")],
    },
    {"z": 1, "a": 2},  # key order kept
    {},
]


def test_packed_records_decode_to_exactly_the_records_they_were_made_of():
    """Records are held as one buffer of their JSON text and decoded per read (no Python object per record for a
    forked DataLoader worker to copy): every string, number and key order comes back as it was."""
    import pickle

    from alignlm.data.records import PackedRecords

    packed = PackedRecords.pack(ODD_RECORDS)
    assert len(packed) == 3 and list(packed) == ODD_RECORDS and packed[-3] == ODD_RECORDS[0]
    assert [list(r) for r in packed] == [list(r) for r in ODD_RECORDS]  # the order of the keys
    assert repr(packed[0]["numbers"]) == repr(ODD_RECORDS[0]["numbers"])  # -0.0 stays -0.0, 2**70 an int
    assert packed.data.dtype == np.uint8 and packed.ends.dtype == np.int64 and not packed.data.flags.writeable
    assert list(pickle.loads(pickle.dumps(packed))) == ODD_RECORDS  # what a spawned worker receives
    with pytest.raises(IndexError):
        packed[3]
    assert len(PackedRecords.pack([])) == 0


def test_the_dataset_holds_its_records_packed_and_gives_the_samples_it_gave_as_dicts(model, root):
    """`dataset.records[s]` is packed (numpy storage, no per-record object: a list of dicts had each forked worker copy
    ~2 GB of a 665k mixture); every sample, id, record and length estimate is the one the records as dicts give."""
    from alignlm.data.hooks import SampleHook
    from alignlm.data.records import PackedRecords

    two = {
        "id": "two",
        "image": ["images/0.png", "images/1.png"],
        "conversations": [{"from": "human", "value": "<image> and <image>: même?"}, {"from": "gpt", "value": "non 🐱"}],
        "meta": {"n": [1, 2.5, None]},
    }
    text = {"conversations": [{"from": "human", "value": "Hi ☃"}, {"from": "gpt", "value": "Hello"}]}  # no id
    records = [record("a"), {"id": "bad", "conversations": []}, two, text, record("b", answer="日本")]
    path = root / "data.json"
    path.write_text(json.dumps(records))
    args = (model.tokenizer, get_template("vicuna_v1"), model.image_spec, model.num_image_tokens)
    ds = LlavaDataset([Source(str(path)), Source(str(path), weight=2.0)], *args)
    for per_source in (ds.records, ds.file_index, ds.text_chars, ds.image_counts):
        assert len(per_source) == 2
    assert all(isinstance(recs, PackedRecords) and recs.data.dtype == np.uint8 for recs in ds.records)
    assert all(isinstance(a, np.ndarray) for a in (*ds.file_index, *ds.text_chars, *ds.image_counts))
    kept = [records[i] for i in (0, 2, 3, 4)]
    assert list(ds.records[0]) == kept and list(ds.records[1]) == kept
    ids = ["a", "two", f"{path}#3", "b"]
    assert [rid for _, rid, _ in ds.distinct_records()] == ids * 2
    assert len(ds) == 12 and ds.report.counts == {"malformed record": 2}
    for i in range(len(ds)):
        src, rec = ds.record(i)
        want = ds.encode(src, kept[i % 4], ids[i % 4])  # the record as read from the file, never packed
        got = ds[i]
        assert rec == kept[i % 4] and got.keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value

    def estimate(rec, n_visual):  # the estimate as it was computed from each record's dict
        return sum(len(str(m.get("value", ""))) for m in rec["conversations"]) // 4 + n_visual * model.num_image_tokens

    assert ds.length_estimates() == [estimate(kept[i % 4], [1, 2, 0, 1][i % 4]) for i in range(12)]

    class OnePseudoImage(SampleHook):
        replaces_visuals = True

        def visual_inputs(self, source, rec):
            return ["x"]

    ds.set_visual_hook(OnePseudoImage())  # a hook that replaces the images is asked how many stand for each record
    assert ds.length_estimates() == [estimate(kept[i % 4], 1) for i in range(12)]

    class EachImagesFeatures(OnePseudoImage):  # the feature cache's kind: one input per image
        one_per_image = True

        def visual_inputs(self, source, rec):
            raise AssertionError("every record read again to count its images (6.6 s at 558k)")

    ds.visual_hook = None
    ds.set_visual_hook(EachImagesFeatures())
    assert ds.length_estimates() == [estimate(kept[i % 4], [1, 2, 0, 1][i % 4]) for i in range(12)]


def test_start_up_reads_each_records_turns_once_and_builds_no_image_path(model, root, monkeypatch):
    """Building a dataset (every rank, every stage start and resume) read each record's turns twice and built its
    image paths twice, and length estimates built them a third time: 12 s of 100k records' 12 s start-up."""
    import alignlm.data.llava as llava
    import alignlm.data.records as records_module
    from alignlm.data.templates import to_turns

    calls = []

    def counted(conversations):
        calls.append(1)
        return to_turns(conversations)

    def no_paths(*args, **kwargs):
        raise AssertionError("start-up built an image path")

    monkeypatch.setattr(llava, "to_turns", counted)
    monkeypatch.setattr(records_module, "to_turns", counted)
    monkeypatch.setattr(records_module, "image_paths", no_paths)
    monkeypatch.setattr(Source, "image_paths", no_paths)
    records = [record(f"r{i}") for i in range(5)] + [record("out", image="../escape.png")]
    ds = dataset(model, records, root, min_usable_fraction=0.0)
    assert len(calls) == 6 and len(ds) == 5 and ds.report.counts == {"image path outside its image_root": 1}
    assert len(ds.length_estimates()) == 5
    with pytest.raises(DataError, match="image path '../escape.png' leaves image_root .* set allow_outside_root"):
        dataset(model, records, root, on_error="raise")


def random_json(rng, depth: int = 0) -> str:
    """A random JSON value as text, with random whitespace: nested lists and objects, strings with quotes, brackets,
    commas, escapes, unicode and lone surrogates, numbers of every form, the words."""

    def space() -> str:
        return "".join(rng.choice(" \t\n\r") for _ in range(rng.choice((0, 0, 1, 3))))

    kind = rng.randrange(8 if depth < 3 else 4)
    if kind == 0:
        return rng.choice(("true", "false", "null", "NaN", "Infinity", "-Infinity"))
    if kind == 1:
        return str(rng.randrange(-(10**25), 10**25)) + rng.choice(("", ".5", "e7", "E-3", ".25e+2", ".0"))
    if kind in (2, 3):
        text = "".join(rng.choice('"\\,[]{}: aé日🐱\ud83d\n\x00') for _ in range(rng.randrange(8)))
        return json.dumps(text, ensure_ascii=rng.random() < 0.5 or "\ud83d" in text)  # a surrogate as an escape
    items = [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind in (4, 5):
        return "[" + space() + ("," + space()).join(item + space() for item in items) + "]"
    pairs = [json.dumps(str(rng.randrange(4))) + space() + ":" + space() + item + space() for item in items]
    return "{" + space() + ("," + space()).join(pairs) + "}"


def test_a_json_list_is_read_record_by_record_as_json_loads_reads_it_whole(tmp_path, monkeypatch):
    """A `.json` file is read a chunk at a time (parsed whole it held its bytes, its text and every record at once:
    3.5 GB for LLaVA-665k, per rank): for any list, in any chunks, the records are json.loads's, in order; a number or
    a word split by a chunk's end is never taken early (`12|34` is 1234, `tr|ue` true)."""
    import random

    import alignlm.data.records as records_module
    from alignlm.data.records import iter_records

    rng, path = random.Random(0), tmp_path / "d.json"
    texts = ["[]", " [ ] ", "[12345, true, null, -1.5e-7]", '["a\\"],[", {"k": [1, [2]]}]', "[0]"]
    for _ in range(250):
        space = rng.choice(("", " ", "\n\r\t "))
        texts.append(space + "[" + space + ",".join(random_json(rng) + space for _ in range(rng.randrange(6))) + "]")
    for text in texts:
        data = (b"\xef\xbb\xbf" if rng.random() < 0.2 else b"") + text.encode()
        path.write_bytes(data)
        want = json.loads(data.decode("utf-8-sig"))
        for chunk in (rng.randint(1, 7), 1 << 20):
            monkeypatch.setattr(records_module, "READ_CHUNK", chunk)
            assert repr(list(iter_records(path))) == repr(want), (text, chunk)  # NaN, -0.0, key order, surrogates
        assert repr(read_records(path)) == repr(want)


def test_a_json_file_read_in_chunks_is_refused_as_when_it_was_read_whole(tmp_path, monkeypatch):
    """The errors of reading a `.json` file a chunk at a time are those of parsing it whole, whatever the chunks:
    the byte that is not UTF-8 (before a JSON error ahead of it), the line of the first JSON error, the hint for
    JSON Lines named .json, what the file holds instead of a list, a missing file and a folder."""
    import alignlm.data.records as records_module
    from alignlm.data.records import INVALID_JSON, iter_records

    cases = [
        (b"[1,\xff]", ": not UTF-8 text (byte 3)"),
        (b"\xef\xbb\xbf[1,\xff]", ": not UTF-8 text (byte 3)"),  # the offset parsing it whole gave, after the mark
        (b"[1 2,\xff]", ": not UTF-8 text (byte 5)"),
        (b"[\xc3", ": not UTF-8 text (byte 1)"),
        (b"[\n1,\n2\n\n,x]", ":5: not valid JSON (Expecting value)"),
        (b"[1,]", ":1: not valid JSON (Expecting value)"),
        (b"[1 2]", ":1: not valid JSON (Expecting ',' delimiter)"),
        (b'[{"a": 1}\n]\n{"b": 2}\n', ":3: not valid JSON (Extra data) (one record per line? name it .jsonl)"),
        (b'{"a": 1}\n{"b": 2}\n', ":2: not valid JSON (Extra data) (one record per line? name it .jsonl)"),
        (b'["abc', ":1: not valid JSON (Unterminated string starting at)"),
        (b"[tru]", ":1: not valid JSON (Expecting value)"),
        (b"\xef\xbb\xbf\xef\xbb\xbf[]", ":1: not valid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig))"),
        (b"", ":1: not valid JSON (Expecting value)"),
        (b'{"a": [1]}', ": expected a JSON list of records, got dict"),
        (b" 7 ", ": expected a JSON list of records, got int"),
    ]
    path = tmp_path / "d.json"
    for data, message in cases:
        path.write_bytes(data)
        for chunk in (1, 2, 3, 5, 7, 1 << 20):
            monkeypatch.setattr(records_module, "READ_CHUNK", chunk)
            with pytest.raises(DataError) as e:
                list(iter_records(path))
            assert str(e.value) == f"{path}{message}", (data, chunk)
            assert e.value.cause == (INVALID_JSON if "not" in message else "malformed record")
    with pytest.raises(DataError, match="nowhere.json does not exist"):
        iter_records(tmp_path / "nowhere.json")  # at the call, not at the first record
    with pytest.raises(DataError, match="is a folder"):
        iter_records(tmp_path)


def test_reading_a_json_file_for_a_dataset_holds_its_records_packed_never_all_parsed(model, root, monkeypatch):
    """Building a dataset parsed its `.json` file whole (bytes, text and every record as Python objects together)
    before packing the records: the build's peak was the whole parse's (3.5 GB for 665k records, on each rank). It is
    now about the packed records and a chunk of the file."""
    import tracemalloc

    import alignlm.data.records as records_module

    monkeypatch.setattr(records_module, "READ_CHUNK", 1 << 16, raising=False)
    turns = [{"from": ("human", "gpt")[t % 2], "value": f"turn {t} of a short talk"} for t in range(40)]
    path = root / "many.json"
    path.write_text(json.dumps([{"id": f"r{i}", "conversations": turns} for i in range(400)]))
    args = (model.tokenizer, get_template("vicuna_v1"), model.image_spec, model.num_image_tokens)
    tracemalloc.start()
    try:
        json.loads(path.read_bytes().decode("utf-8-sig"))
        whole = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        ds = LlavaDataset([Source(str(path))], *args)
        built = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(ds) == 400 and ds.records[0][399] == {"id": "r399", "conversations": turns}
    assert built < whole / 3, (built, whole, ds.records[0].data.nbytes)


def test_a_records_fault_is_named_after_the_faults_of_its_file_as_when_the_file_was_read_whole(model, root):
    """Records are checked as the file is read: under on_error=raise a bad line or text that is not UTF-8 further on
    is still the error named (the file was read whole before any record was checked), and every record and line read
    counts towards min_usable_fraction."""
    malformed = json.dumps({"id": "m", "conversations": []})
    lines = root / "d.jsonl"
    lines.write_text(malformed + "\n" + json.dumps(record("a")) + "\n{oops\n\n")
    args = (model.tokenizer, get_template("plain"), model.image_spec, model.num_image_tokens)
    with pytest.raises(DataError, match=r"d.jsonl:3: not valid JSON"):
        LlavaDataset([Source(str(lines))], *args, on_error="raise")
    with pytest.raises(DataError, match=r"only 1 of 3 records .* below data.min_usable_fraction=0.5"):
        LlavaDataset([Source(str(lines))], *args)
    ds = LlavaDataset([Source(str(lines))], *args, min_usable_fraction=0.0)
    assert len(ds) == 1 and ds.report.counts == {"malformed record": 1, "invalid JSON line": 1}
    listed = root / "d.json"
    listed.write_bytes(b"[" + malformed.encode() + b"," + json.dumps(record("b")).encode() + b',"\xff"]')
    with pytest.raises(DataError, match=r"d.json: not UTF-8 text \(byte"):
        LlavaDataset([Source(str(listed))], *args, on_error="raise")
    listed.write_text(f"[{malformed}, {json.dumps(record('b'))}]")
    with pytest.raises(DataError, match=r"record 0 \(id='m'\): missing or empty 'conversations'"):
        LlavaDataset([Source(str(listed))], *args, on_error="raise")


def test_a_cut_that_drops_only_the_last_visual_token_is_refused_not_kept(model, root):
    """``_fit_length``: a cut exactly at the last visual token (an earlier answer still supervised, so the no-answer
    check does not fire) splits the image; it is skipped as split visual tokens, never kept with one token fewer."""
    rec = record("late", question="<image>\nWhat color?")
    rec["conversations"] = [
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello there"},
    ] + rec["conversations"]
    full = dataset(model, [rec], root)[0]
    last = int(np.flatnonzero(full["input_ids"] == model.image_token_id)[-1])
    assert (full["labels"][:last] != IGNORE_INDEX).any()  # the first answer comes before the image
    cut = dataset(model, [rec], root, max_length=last)[0]
    assert isinstance(cut, Skipped) and "split visual tokens" in cut.reason
    kept = dataset(model, [rec], root, max_length=last + 1)[0]  # the whole image fits: kept, cut after it
    assert int((kept["input_ids"] == model.image_token_id).sum()) == model.num_image_tokens


def test_truncated_samples_are_counted_but_not_left_out():
    """``DataReport.left_out``: samples cut to max_length were trained on; only the other causes are left out."""
    from alignlm.data.records import TRUNCATED
    from alignlm.data.report import DataReport

    report = DataReport()
    report.add(TRUNCATED, "a", n=5)
    report.add("missing image", "b", n=2)
    assert report.left_out == 2 and report.to_dict()["left_out"] == 2


def test_a_fractional_pool_follows_its_sources_whole_copies():
    """``mixture_index``: a weight of 1.5 repeats the source once, its pool is the second copy (positions n..2n)."""
    from alignlm.data.records import mixture_index

    idx, pools = mixture_index([3, 4], [1.0, 1.5])
    assert len(idx) == 3 + 8 and pools == [(7, 11, 2)]
    assert (idx[7:11] == [[1, 0], [1, 1], [1, 2], [1, 3]]).all()


def test_a_record_of_several_images_and_no_placeholder_gets_one_per_image(model, root):
    """``place_images``: two images and no ``<image>``: both are placed before the first question, none skipped."""
    rec = record("two", image=["images/0.png", "images/1.png"], question="Same colour?")
    s = dataset(model, [rec], root, on_error="raise")[0]
    assert s["n_images"] == 2 and int((s["input_ids"] == model.image_token_id).sum()) == 2 * model.num_image_tokens
