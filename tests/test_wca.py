"""WCA: crops are where and as large as asked, the score reduces to the plain cosine when every crop is the whole image
and the class prompt is the only description, and `alignlm wca` reports both with paired differences."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from alignlm.commands import main
from alignlm.methods.wca.score import WCAConfig, class_texts, descriptions_for, random_crops, scores
from alignlm.models.encoders import load_encoder


def test_crops_keep_their_scale_and_stay_inside_the_image():
    image = Image.new("RGB", (60, 40))
    crops = random_crops(image, 50, (0.4, 0.9), np.random.default_rng(0))
    assert len(crops) == 50
    for c in crops:
        assert 0.4 * 60 - 1 <= c.size[0] <= 0.9 * 60 + 1 and 0.4 * 40 - 1 <= c.size[1] <= 0.9 * 40 + 1
    again = random_crops(image, 50, (0.4, 0.9), np.random.default_rng(0))
    assert [c.size for c in crops] == [c.size for c in again]


def test_wca_is_the_plain_score_with_whole_image_crops_and_the_prompt_as_the_only_description(tiny_clip):
    encoder = load_encoder(str(tiny_clip))
    classes = ["red", "green", "blue"]
    prompts = [f"a {c} square" for c in classes]
    p, per_class = class_texts(encoder, prompts, descriptions_for(classes, ["a {c} square"]), tau=0.1)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    plain, wca = scores(encoder, image, p, per_class, WCAConfig(crops=4, scale=(1.0, 1.0)), np.random.default_rng(0))
    assert torch.allclose(plain, wca, atol=1e-5)
    p, per_class = class_texts(encoder, prompts, descriptions_for(classes, ["a {c} square", "the colour {c}"]), tau=0.1)
    assert per_class.embeddings.shape == p.shape  # one weighted, renormalised embedding a class
    assert torch.allclose(per_class.embeddings.norm(dim=-1), torch.ones(3))


def test_descriptions_from_templates_or_a_mapping():
    assert descriptions_for(["1", "2"], ["the digit {c}", "{c}."]) == [["the digit 1", "1."], ["the digit 2", "2."]]
    assert descriptions_for(["a"], {"a": ["x", "y"]}) == [["x", "y"]]
    with pytest.raises(ValueError, match="lack classes"):
        descriptions_for(["a", "b"], {"a": ["x"]})


def test_the_command_reports_plain_and_wca_per_seed(tiny_clip, colour_set, tmp_path):
    out = tmp_path / "wca.json"
    args = ["wca", "--encoder", str(tiny_clip), "--set", str(colour_set["test"]), "--prompt", "a {c} square"]
    assert (
        main(
            [
                *args,
                "--descriptions",
                "a {c} square",
                "the colour {c}",
                "--crops",
                "3",
                "--seeds",
                "0",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["n"] == 12 and report["classes"] == ["red", "green", "blue"] and len(report["runs"]) == 2
    assert all(0 <= r["plain"] <= 1 and 0 <= r["wca"] <= 1 for r in report["runs"])
    assert report["runs"][0]["plain"] == report["runs"][1]["plain"]  # the crops' seed moves WCA only
    assert report["config"]["normalise"] is True and report["config"]["tau_crop"] == 0.1  # the knobs it scored with


def test_one_seed_reports_no_spread_over_seeds(tiny_clip, colour_set, tmp_path, capsys):
    """One seed once printed "(SE nan)" and wrote NaN into the report."""
    out = tmp_path / "wca.json"
    args = ["wca", "--encoder", str(tiny_clip), "--set", str(colour_set["test"]), "--descriptions", "a {c} square"]
    assert main([*args, "--crops", "2", "--seeds", "3", "--out", str(out)]) == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    assert summary.startswith("over 1 seed: WCA - plain") and "SE" not in summary and "nan" not in summary
    assert json.loads(out.read_text())["se_over_seeds"] is None


def test_a_set_mixing_question_types_is_refused_naming_them(colour_set, tmp_path):
    """Classes came from the first record: a shapes test set without --qtype died with "'purple' is not in list"."""
    records = json.loads(colour_set["test"].read_text())[:4]
    for i, r in enumerate(records):
        r["meta"]["qtype"] = "color"
        if i % 2:
            r.update(answer="2", meta={"choices": ["1", "2", "3"], "qtype": "count"})
    mixed = colour_set["test"].with_name("mixed.json")  # beside the images: only the classes can fail
    mixed.write_text(json.dumps(records))
    args = ["wca", "--encoder", str(tmp_path / "unread"), "--set", str(mixed), "--descriptions", "a {c}"]
    with pytest.raises(
        SystemExit, match=r"has 2 different choice lists .* --qtype \(question types present: color, count\)"
    ):
        main(args)
    records = [r for r in records if r["meta"]["qtype"] == "color"]
    records[1]["answer"] = "purple"
    mixed.write_text(json.dumps(records))
    with pytest.raises(SystemExit, match=r"record 't2' answers 'purple', not one of its choices"):
        main(args)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--crops", "0"], "crops=0 must be a whole number >= 1"),  # once: a made-up result, exit 0
        (["--crops", "-2"], "crops=-2 must be a whole number >= 1"),
        (
            ["--scale", "2", "1"],
            r"scale=\(2.0, 1.0\) must be LOW HIGH with 0 < LOW <= HIGH <= 1",
        ),  # once: numpy's error
        (["--scale", "0", "0.5"], r"scale=\(0.0, 0.5\)"),
        (["--tau-crop", "0"], "tau_crop=0.0 must be a finite number > 0"),
        (["--tau-text", "-1"], "tau_text=-1.0 must be a finite number > 0"),
    ],
)
def test_the_command_refuses_knobs_that_cannot_score_before_reading_anything(tmp_path, flags, message):
    missing = str(tmp_path / "missing")  # neither the set nor the encoder is read: the knobs fail first
    with pytest.raises(SystemExit, match=f"alignlm wca: WCA {message}"):
        main(["wca", "--encoder", missing, "--set", missing, "--descriptions", "a {c}", *flags])
    with pytest.raises(ValueError, match="crops=0"):
        WCAConfig(crops=0)


def test_the_command_decodes_each_image_when_it_scores_it_on_the_asked_device(
    tiny_clip, colour_set, tmp_path, monkeypatch, capsys
):
    """Decoding the whole set before scoring held ~1.2 MB per 640x480 image (57 GB for 50k): loads and scores now
    alternate, with the same results as images decoded up front."""
    from alignlm.commands import wca as wca_command
    from alignlm.methods.wca import score as wca_score

    events, devices = [], []
    load, encode, build = wca_command.load_rgb, wca_score.scores, wca_command.load_encoder
    monkeypatch.setattr(wca_command, "load_rgb", lambda p: events.append("load") or load(p))
    monkeypatch.setattr(wca_score, "scores", lambda *a: events.append("score") or encode(*a))
    monkeypatch.setattr(wca_command, "load_encoder", lambda e, device: devices.append(device) or build(e, device))
    args = ["wca", "--encoder", str(tiny_clip), "--set", str(colour_set["test"]), "--descriptions", "a {c} square"]
    out = tmp_path / "wca.json"
    assert main([*args, "--crops", "2", "--seeds", "0", "1", "--device", "cpu", "--out", str(out)]) == 0
    assert events == ["load", "score"] * 24 and devices == ["cpu"]
    report = json.loads(out.read_text())
    monkeypatch.undo()
    shot = wca_command.zero_shot
    monkeypatch.setattr(wca_command, "zero_shot", lambda encoder, images, *a: shot(encoder, list(images), *a))
    upfront = tmp_path / "upfront.json"
    assert main([*args, "--crops", "2", "--seeds", "0", "1", "--out", str(upfront)]) == 0
    assert json.loads(upfront.read_text())["runs"] == report["runs"]


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu0", "'gpu0': not a device torch knows; use cpu, cuda or cuda:N"), ("cuda:0", "no CUDA device")],
)
def test_the_command_refuses_a_device_it_cannot_use(device, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["wca", "--encoder", "e", "--set", "s", "--descriptions", "a {c}", "--device", device])
    assert message in capsys.readouterr().err


def _loop_wca(crops: torch.Tensor, w: torch.Tensor, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The per-class loop WCA scored with before its one product: the reference the product must agree with."""
    return torch.stack([w @ (crops @ d.T) @ v for d, v in rows])


def test_one_product_over_all_descriptions_scores_as_the_per_class_loop(tiny_clip):
    """Classes with different description counts (a mapping), one matrix on the encoder's device, one product: the
    unnormalised scores of the old loop over classes and descriptions, within float rounding."""
    import torch.nn.functional as F

    from alignlm.methods.wca.score import Descriptions

    encoder = load_encoder(str(tiny_clip))
    classes = ["red", "green", "blue"]
    texts = {"red": ["a red square"], "green": ["green", "a green thing", "the colour green"], "blue": ["blue", "sky"]}
    prompts = [f"a {c} square" for c in classes]
    p, described = class_texts(encoder, prompts, descriptions_for(classes, texts), 0.1, normalise=False)
    assert isinstance(described, Descriptions) and described.embeddings.shape[0] == 3
    assert described.embeddings.device == encoder.device == p.device
    rows = []
    for c, prompt in zip(classes, p):
        d = F.normalize(encoder.encode_texts(texts[c]).float(), dim=-1)
        rows.append((d, torch.softmax(d @ prompt / 0.1, dim=0)))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        crops = F.normalize(torch.randn(7, p.shape[1], generator=g), dim=-1)
        w = torch.softmax(torch.randn(7, generator=g), dim=0)
        torch.testing.assert_close(described.score(crops, w), _loop_wca(crops, w, rows), rtol=1e-5, atol=1e-6)
    image = Image.new("RGB", (40, 30), (30, 160, 40))
    plain, wca = scores(encoder, image, p, described, WCAConfig(crops=4), np.random.default_rng(1))
    assert plain.shape == wca.shape == (3,)


def test_wca_makes_no_per_class_product(tiny_clip, monkeypatch):
    """An image's WCA score is a fixed number of products, however many classes: the loop made one per class."""
    encoder = load_encoder(str(tiny_clip))
    classes = [f"c{i}" for i in range(12)]
    p, described = class_texts(encoder, classes, descriptions_for(classes, ["a {c}", "the {c}"]), 0.1)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    encoder.encode_images([image])  # warm: only the scoring's own products are counted below
    calls = []
    matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append(1) or matmul(a, b))
    monkeypatch.setattr(encoder, "encode_images", lambda images: torch.randn(len(images), p.shape[1]))
    scores(encoder, image, p, described, WCAConfig(crops=3), np.random.default_rng(0))
    assert len(calls) <= 5


def test_an_images_crops_and_scores_do_not_depend_on_the_images_before_it(tiny_clip, monkeypatch):
    """One crop stream over the set gave an image other crops, and another WCA score, when the set was reordered or
    filtered (--qtype, --limit); each image now draws from its own stream under the seed."""
    from alignlm.methods.wca import score as wca_score

    encoder = load_encoder(str(tiny_clip))
    classes = ["red", "green", "blue"]
    noise = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    images = [Image.fromarray(a) for a in noise]  # crops of a textured image differ from each other
    labels, keys = [0, 1, 2], ["a", "b", "c"]
    prompts, described = [f"a {c} square" for c in classes], descriptions_for(classes, ["a {c} square", "{c}"])
    config = WCAConfig(crops=3, scale=(0.3, 0.6))
    seen: dict[tuple[int, int], torch.Tensor] = {}
    score = wca_score.scores

    def watched(encoder, image, *rest):
        plain, wca = score(encoder, image, *rest)
        seen[(seed, images.index(image))] = wca
        return plain, wca

    monkeypatch.setattr(wca_score, "scores", watched)
    for seed in (0, 1):
        wca_score.zero_shot(encoder, images, labels, prompts, described, config, seed, keys)
    first = dict(seen)
    seed = 0
    wca_score.zero_shot(encoder, images[::-1], labels[::-1], prompts, described, config, seed, keys[::-1])
    assert all(torch.equal(first[(0, i)], seen[(0, i)]) for i in range(3))
    assert not torch.equal(first[(0, 2)], first[(1, 2)])  # another seed, other crops


class _Encoder:
    """A dual encoder of fixed unit vectors: texts by a table, images in the order given (the whole image, then
    its crops)."""

    def __init__(self, texts: dict[str, list[float]], views: list[list[float]]) -> None:
        self.texts, self.views = texts, torch.tensor(views)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.texts[t] for t in texts])

    def encode_images(self, images: list) -> torch.Tensor:
        assert len(images) == len(self.views)
        return self.views


def test_wca_weighs_crops_like_the_image_and_descriptions_like_the_prompt_more_as_the_module_says():
    """WCA(x, c) = sum_i sum_j softmax_i(cos(x_i, x) / tau_crop) softmax_j(cos(d_cj, p_c) / tau_text) cos(x_i, d_cj),
    by hand on fixed vectors: a description far from its class prompt weighed more (a flipped sign), or a crop
    weight multiplied by the temperature (uniform weights), scored other numbers."""
    import torch.nn.functional as F

    from alignlm.methods.wca.score import WCAConfig, class_texts, scores

    texts = {"p0": [1.0, 0.0, 0.0], "p1": [0.0, 1.0, 0.0], "d00": [1.0, 0.0, 0.0], "d01": [0.0, 0.0, 1.0],
             "d10": [0.0, 1.0, 0.0], "d11": [0.6, 0.8, 0.0]}  # fmt: skip
    views = [[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.6, 0.8]]  # the whole image, then two crops
    enc = _Encoder(texts, views)
    p, described = class_texts(enc, ["p0", "p1"], [["d00", "d01"], ["d10", "d11"]], tau=0.5, normalise=False)
    config = WCAConfig(crops=2, tau_crop=0.25, tau_text=0.5, normalise=False)
    plain, wca = scores(enc, Image.new("RGB", (8, 8)), p, described, config, np.random.default_rng(0))
    _, official = class_texts(enc, ["p0", "p1"], [["d00", "d01"], ["d10", "d11"]], tau=0.5)
    _, cosine = scores(enc, Image.new("RGB", (8, 8)), p, official, config, np.random.default_rng(0))
    t = {k: F.normalize(torch.tensor(v), dim=0) for k, v in texts.items()}
    x = F.normalize(torch.tensor(views), dim=1)
    w = torch.softmax(x[1:] @ x[0] / 0.25, 0)
    expected, cosines = [], []
    for c, ds in enumerate((["d00", "d01"], ["d10", "d11"])):
        d = torch.stack([t[n] for n in ds])
        v = torch.softmax(d @ t[f"p{c}"] / 0.5, 0)
        assert v[0] > v[1]  # the description closer to the class prompt weighs more
        expected.append(sum(w[i] * v[j] * (x[1 + i] @ d[j]) for i in range(2) for j in range(2)))
        cosines.append(F.cosine_similarity(w @ x[1:], v @ d, dim=0))  # the official code's: each side renormalised
    torch.testing.assert_close(wca, torch.stack(expected).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cosine, torch.stack(cosines).float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cosine, wca)
    torch.testing.assert_close(plain, torch.stack([x[0] @ t["p0"], x[0] @ t["p1"]]).float())
