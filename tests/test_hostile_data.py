"""Hostile data: files and texts written to make a reader do what the data's owner wants, not what training does.

A PostScript "image" that ran Ghostscript, captions whose control-token text became control tokens outside training,
answers whose ``<image>`` took the image's place in SIMA's critic, and a system prompt the exported chat template
garbled."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from alignlm.constants import IGNORE_INDEX, IMAGE_TOKEN
from alignlm.data.collate import Skipped
from alignlm.data.images import image_size, load_rgb
from alignlm.data.llava import LlavaDataset
from alignlm.data.records import UNREADABLE_IMAGE, DataError, Source
from alignlm.data.templates import get_template, special_ids, to_turns, tokenize

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n(any PostScript program here) print\nshowpage\n"
HOSTILE_CAPTION = "A <s>red</s> square <image>"


@pytest.fixture(scope="module")
def model():
    from alignlm.models.build import build_model
    from tests.conftest import compose

    return build_model(compose().model)


@pytest.fixture
def fake_gs(tmp_path, monkeypatch) -> Path:
    """A ``gs`` first on PATH that writes down every call, and fails as a broken Ghostscript would: the file whose
    existence says Ghostscript was run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ran = tmp_path / "gs_ran.txt"
    gs = bin_dir / "gs"
    gs.write_text(f'#!/bin/sh\necho "$*" >> {ran}\n[ "$1" = --version ] && exit 0\nexit 1\n')
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return ran


def _one_image_set(root: Path, image: str, answer: str = "A red square.") -> Path:
    path = root / "data.json"
    record = {"id": "r0", "image": image, "conversations": [{"from": "human", "value": "<image>"}]}
    record["conversations"].append({"from": "gpt", "value": answer})
    path.write_text(json.dumps([record]))
    return path


def test_a_postscript_image_never_runs_ghostscript_and_is_an_unreadable_image(model, tmp_path, fake_gs):
    """Pillow opened every format it knows: an EPS file named .png went to Ghostscript, and a failing ``gs``'s
    CalledProcessError escaped ``on_error: skip`` as well as ``raise``. Only raster formats are read now."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.png").write_bytes(EPS)
    path = _one_image_set(tmp_path, "images/0.png")
    args = ([Source(str(path))], model.tokenizer, get_template("plain"), model.image_spec, model.num_image_tokens)
    skipped = LlavaDataset(*args, on_error="skip")[0]
    assert isinstance(skipped, Skipped) and skipped.cause == UNREADABLE_IMAGE and "0.png" in skipped.reason
    with pytest.raises(DataError, match=r"id=r0 .*cannot read image .*0\.png: not an image of the formats read"):
        LlavaDataset(*args, on_error="raise")[0]
    for read in (load_rgb, image_size):
        with pytest.raises(DataError, match="not an image of the formats read") as e:
            read(tmp_path / "images" / "0.png")
        assert e.value.cause == UNREADABLE_IMAGE
    assert not fake_gs.exists()


def test_a_decoders_error_of_any_type_is_an_unreadable_image(tmp_path, monkeypatch):
    """A reader's error that is not an OSError or ValueError (Pillow's readers raise SyntaxError, EOFError,
    struct.error, ...) escaped ``load_rgb`` and ``on_error: skip`` as a crash."""
    from PIL import PngImagePlugin

    Image.new("RGB", (4, 4), (200, 0, 0)).save(tmp_path / "0.png")

    def broken(self):
        raise EOFError("no more frames")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", broken)
    with pytest.raises(DataError, match=r"cannot read image .*0\.png: EOFError: no more frames") as e:
        load_rgb(tmp_path / "0.png")
    assert e.value.cause == UNREADABLE_IMAGE


def test_an_lmms_eval_task_reads_its_images_as_alignlm_eval_does(tmp_path, fake_gs):
    """The lmms-eval task's ``doc_to_visual`` opened images with every Pillow format, Ghostscript's included."""
    import importlib.util

    from alignlm.evaluation.lmms import TASK_UTILS

    (tmp_path / "utils.py").write_text(TASK_UTILS)
    spec = importlib.util.spec_from_file_location("hostile_lmms_task_utils", tmp_path / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    (tmp_path / "eps.png").write_bytes(EPS)
    with pytest.raises(DataError, match="not an image of the formats read"):
        utils.doc_to_visual({"image": str(tmp_path / "eps.png")})
    assert not fake_gs.exists()
    Image.new("RGBA", (4, 2), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    [image] = utils.doc_to_visual({"image": str(tmp_path / "clear.png")})
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)  # on white, as load_rgb gives eval


def _trained_caption_ids(model, caption: str) -> list[int]:
    """The caption's tokens as training supervises them under ``plain`` (less the template's closing newline)."""
    tok = model.tokenizer
    turns = to_turns([{"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": caption}])
    ids, labels = tokenize(get_template("plain").render(turns, tok), tok)
    supervised = ids[labels != IGNORE_INDEX].tolist()
    assert tok.decode(supervised[-1:]) == "\n"
    return supervised[:-1]


def test_vlaps_word_prior_reads_control_token_text_in_a_caption_as_training_does(model):
    """VLAP's word prior parsed ``<s>``, ``</s>`` and ``<image>`` in a caption as control tokens; training reads the
    same characters as plain text."""
    from alignlm.objectives.vlap import token_counts

    tok = model.tokenizer
    trained = _trained_caption_ids(model, HOSTILE_CAPTION)
    assert not set(trained) & special_ids(tok)
    counts = token_counts([HOSTILE_CAPTION, "red"], tok, len(tok))
    expected = torch.bincount(torch.tensor(trained + _trained_caption_ids(model, "red")), minlength=len(tok))
    assert counts.tolist() == expected.tolist()


def test_the_probe_reads_control_token_text_in_a_caption_as_training_does(model, tmp_path):
    """The probe's caption tokens parsed ``<s>``, ``</s>`` and ``<image>`` in a caption as control tokens."""
    from alignlm.models.probes import ProbeSet, extract

    trained = [_trained_caption_ids(model, c) for c in (HOSTILE_CAPTION, "red")]
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "0.png")
    feats = extract(model, ProbeSet(["a", "b"], [tmp_path / "0.png"] * 2, [HOSTILE_CAPTION, "red"]), tokens=True)
    assert feats.text_lengths.tolist() == [len(t) for t in trained]
    with torch.no_grad():
        words = model.llm.get_input_embeddings()(torch.tensor(trained[0])).float()
    torch.testing.assert_close(feats.text_mean[0], words.mean(dim=0))


@pytest.mark.parametrize("reference", ["Type <image> in the field.", "Write <image> twice: <image>."])
def test_sima_critic_copies_an_answers_image_placeholder_as_text(model, tmp_path, reference):
    """SIMA's critic copied the reference and both answers into a user turn, where ``<image>`` is the image's place:
    one took the image's slot from the text the judge reads, two refused the record (2 placeholders, 1 image)."""
    from alignlm.methods.sima.generate import critic_question

    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "0.png")
    text = critic_question("Which HTML tag shows a picture?", reference, "an <image> tag", "a div")
    path = tmp_path / "critic.json"
    path.write_text(json.dumps([{"id": "c0", "image": "0.png", "conversations": [{"from": "human", "value": text}]}]))
    template = get_template("vicuna_v1", image_first=False)
    args = ([Source(str(path))], model.tokenizer, template, model.image_spec, model.num_image_tokens)
    sample = LlavaDataset(*args, on_error="raise", for_generation=True)[0]
    ids = sample["input_ids"].tolist()
    assert ids.count(model.image_token_id) == model.num_image_tokens and sample["n_images"] == 1
    first = ids.index(model.image_token_id)
    assert "Two answers" not in model.tokenizer.decode(ids[:first])  # the image first, then the whole question
    read = model.tokenizer.decode([i for i in ids if i != model.image_token_id]).replace("\u2060", "")
    assert f"Reference answer: {reference}\nAnswer A: an <image> tag\n" in read  # its characters, as text


@pytest.mark.parametrize("name", ["vicuna_v1", "chat"])
def test_the_exported_chat_template_writes_any_system_prompt_as_training_does(model, name):
    """The system prompt was written into the exported template with JSON's ASCII escapes, whose surrogate pair for an
    emoji Jinja reads as two lone surrogates: garbled text the tokenizer refuses. Quotes, backslashes, newlines and
    Jinja's own delimiters in it stay text."""
    system = "Answer briefly \U0001f642, say \"hi\" \\ 'bye'\n{{ raise_exception('x') }} {% if true %}é{% endif %}"
    template = get_template(name, system=system)
    tok = copy.deepcopy(model.tokenizer)
    question = [{"from": "human", "value": "<image>\nWhat color is it?"}]
    trained = template.render(to_turns(question), tok, add_generation_prompt=True).text
    assert system in trained
    tok.chat_template = template.jinja(tok)
    exported = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert exported == trained
    assert tok(exported, add_special_tokens=False).input_ids == tok(trained, add_special_tokens=False).input_ids


def _colour_dataset(model, path: Path, image_root: Path | None = None, **kwargs) -> LlavaDataset:
    template = get_template("vicuna_v1")
    source = Source(str(path), str(image_root) if image_root else None)
    return LlavaDataset([source], model.tokenizer, template, model.image_spec, model.num_image_tokens, **kwargs)


def test_image_paths_read_under_the_wrong_folder_stop_start_up_naming_the_path_and_the_folder(model, tmp_path):
    """Records written away from their images (`alignlm sima generate --out prefs` of a set in data/digits), or an
    image_root mistyped: start-up checked the paths as text only, every sample was skipped as a missing image, step
    after step, and the stage ended "no step trained ... missing image: 80 (e.g. digits_0025, ...)", naming neither the
    path looked for nor the folder. A few records' images are looked for at start-up; one image missing from a folder
    that holds the others is still a missing image of its sample, named with its whole path and its folder."""
    from tests.conftest import write_colour_set

    sets = write_colour_set(tmp_path / "set", n=6)
    elsewhere = tmp_path / "prefs" / "instruct.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text(sets["instruct"].read_text())
    with pytest.raises(DataError, match="image .* does not exist, nor does its folder") as found:
        _colour_dataset(model, elsewhere)
    said = str(found.value)
    assert f"image {tmp_path / 'prefs' / 'images' / '0.png'} does not exist" in said
    assert "nor those of the 5 other records" in said and "as the source sets no image_root" in said
    assert f"the folder of {elsewhere} ({tmp_path / 'prefs'})" in said and found.value.cause == "missing image"
    with pytest.raises(DataError, match=f"read under its image_root '{tmp_path / 'nowhere'}'"):
        _colour_dataset(model, sets["instruct"], tmp_path / "nowhere", on_error="raise")
    assert len(_colour_dataset(model, elsewhere, sets["instruct"].parent)) == 6  # the right root reads them
    (tmp_path / "set" / "images" / "3.png").unlink()  # one image gone from a folder that holds the others
    ds = _colour_dataset(model, sets["instruct"])
    skipped = ds[3]
    assert isinstance(skipped, Skipped) and skipped.cause == "missing image"
    assert f"image {tmp_path / 'set' / 'images' / '3.png'} does not exist: its path is read under the folder of" in (
        skipped.reason
    )


def test_records_left_out_at_start_up_say_why_with_the_first_of_each_cause(model, tmp_path):
    """Preference pairs with an empty answer (a model that answered nothing) were refused as "malformed record: 80 (e.g.
    digits_0000, digits_0000, digits_0001)": only on_error=raise said what was wrong with them. The report keeps the
    first reason of each cause, in the log, the error, summary.json and a checkpoint's state, merged over ranks."""
    from alignlm.data.report import DataReport

    image = tmp_path / "0.png"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(image)
    prompt = [{"from": "human", "value": "<image>\nWhat colour?"}]
    pair = {"image": "0.png", "conversations": prompt, "chosen": "", "rejected": "red"}
    records = [{"id": f"r{i}", **pair} for i in range(3)]
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([*records, {"id": "r1", "image": "0.png", "conversations": "no"}]))
    with pytest.raises(DataError) as refused:
        _colour_dataset(model, path, preference=True)
    assert "only 0 of 4 records" in str(refused.value)
    assert (
        "malformed record: 4 (e.g. r0: a preference record needs a non-empty string 'chosen', got ''; also r1, r2)"
        in str(refused.value)
    )  # r1 twice (once for each reason) is one example
    report = DataReport()
    report.add("missing image", "a", reason="image /x/a.png does not exist")
    other = DataReport()
    other.add("missing image", "b", reason="image /x/b.png does not exist")
    other.add("unreadable image", "c")
    merged = DataReport.from_dict(report.merge(other).to_dict())
    assert merged.lines() == [
        "missing image: 2 (e.g. a: image /x/a.png does not exist; also b)",
        "unreadable image: 1 (e.g. c)",
    ]


def test_a_climb_back_out_of_a_linked_folder_opens_the_file_the_root_check_approved(tmp_path):
    """With ``coco`` a link to another disk (LLaVA's layout), ``coco/../private.png`` passed the root check on its text
    (``root/private.png``) while the probe, SEA and V2L readers opened it through the link: ``disk/private.png``,
    outside the root and another file than training read."""
    from alignlm.data.records import image_paths, record_images
    from alignlm.models.probes import load_probe_set

    (tmp_path / "disk" / "coco").mkdir(parents=True)
    (root := tmp_path / "llava").mkdir()
    os.symlink(tmp_path / "disk" / "coco", root / "coco")
    Image.new("RGB", (8, 8), (255, 0, 255)).save(tmp_path / "disk" / "private.png")  # outside the root
    Image.new("RGB", (8, 8), (0, 0, 255)).save(root / "private.png")  # the file the text names
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "disk" / "coco" / "a.png")
    data = [json.loads(_one_image_set(root, "coco/a.png").read_text())[0] | {"id": f"ok{i}"} for i in range(3)]
    data.append({"id": "x", "image": "coco/../private.png", "conversations": data[0]["conversations"]})
    (root / "data.json").write_text(json.dumps(data))
    assert image_paths(data[3], root) == [root / "private.png"]
    assert record_images([root / "data.json"])[-1] == ("x", [(root / "private.png").resolve()])
    probe = load_probe_set(root / "data.json")
    assert load_rgb(probe.images[-1]).getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("value", [None, ["a", "b"], 3])
def test_a_caption_that_is_not_text_is_refused_not_read_as_its_python_spelling(tmp_path, value):
    """The probe and caption scoring read a null assistant value as the caption "None" (a list, a number likewise);
    training refuses the record as malformed."""
    from alignlm.data.records import record_caption, reference_captions
    from alignlm.models.probes import load_probe_set

    record = {"id": "n", "image": "0.png", "conversations": [{"from": "human", "value": "<image>"}]}
    record["conversations"].append({"from": "gpt", "value": value})
    with pytest.raises(DataError, match=r"record id='n': an assistant turn's value is a \w+ .*, not text"):
        reference_captions(record)
    assert record_caption(record) is None  # no caption: its readers skip and count it, or name it
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    answered = [*record["conversations"][:1], {"from": "gpt", "value": "a"}]
    good = [{**record, "id": str(i), "conversations": answered} for i in range(3)]
    (tmp_path / "p.json").write_text(json.dumps([*good, record]))
    with pytest.raises(DataError, match="not text"):
        load_probe_set(tmp_path / "p.json")
    # the dual encoder's fit and AlignGPT's levels leave it out (they had paired the image with "None")
    from alignlm.methods.aligngpt.levels import caption_pairs
    from alignlm.models.encoder_fit import _pairs

    assert [p.name for p in _pairs([tmp_path / "p.json"])[0]] == ["0.png"] * 3
    pairs, skipped = caption_pairs([tmp_path / "p.json"])
    assert len(pairs) == 3 and skipped["no caption"] == 1


def test_a_tall_image_a_crop_stage_trains_on_is_read_by_the_probe_too(model, tmp_path):
    """Under ``crop`` training checks the image itself against max_image_pixels; the probe and SEA's labels checked
    the square it would pad to (300x8000: 64 M over 50 M) and stopped."""
    from alignlm.data.images import ImageReading, prepared

    Image.new("RGB", (300, 8000), (0, 0, 255)).save(tmp_path / "tall.png")
    assert prepared(model.image_spec, ImageReading("crop"), tmp_path / "tall.png").shape[0] == 3
    with pytest.raises(DataError, match="padded to a square"):
        prepared(model.image_spec, ImageReading("pad"), tmp_path / "tall.png")


def test_a_data_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    """A source named a FIFO passed the start-up check and the run then waited at open() for ever, with no output."""
    from alignlm.data.records import iter_records

    os.mkfifo(tmp_path / "fifo.jsonl")
    with pytest.raises(DataError, match="fifo.jsonl is not a regular file"):
        iter_records(tmp_path / "fifo.jsonl")
