"""SEA: label files (annotations, a saved dual encoder), labels in the batch, the objective's properties (docs/methods.md),
and a tiny `+exp=sea` run that writes its own labels and trains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignlm.commands import main
from alignlm.data.build import build_dataset
from alignlm.data.collate import Collator
from alignlm.data.images import PADDED
from alignlm.data.records import DataError
from alignlm.methods.sea.labels import LabelSet, SeaLabels, write_labels
from alignlm.methods.sea.objective import SEAObjective, sample_labels, sea_logits, sea_loss
from tests.conftest import DeviceWaits, compose, make_batch, waits_in_training_steps


def tiny_clip(path: Path) -> Path:
    """A random tiny CLIPModel and a local tokenizer saved to ``path``, loadable by path like a hub checkpoint."""
    from transformers import CLIPConfig, CLIPModel

    from alignlm.models.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=32,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---- label files ---------------------------------------------------------------------------------------------------


def test_labels_from_annotations_match_the_shapes_patch_labels(shapes_root):
    shapes = shapes_root / "shapes"
    labels = SeaLabels(shapes / "sea_labels.safetensors")
    ann = json.loads((shapes / "patch_labels.json").read_text())
    assert labels.source == "annotations" and labels.grid == (4, 4) and labels.k == 5 and labels.words == ann["words"]
    assert len(labels.index) == 10  # 8 train + 2 test images
    ids, scores = labels.lookup(shapes / "images" / "shapes_train_00003.png")
    assert ids.shape == scores.shape == (16, 5)
    for cell, cands in enumerate(ann["images"]["shapes_train_00003"]):
        cands = sorted(cands, key=lambda ws: -ws[1])
        assert [labels.words[i] for i in ids[cell] if i >= 0] == [w for w, _ in cands]
        assert scores[cell, : len(cands)].tolist() == pytest.approx([s for _, s in cands])
        assert (ids[cell, len(cands) :] == -1).all()
    assert labels.lookup(shapes_root / "elsewhere.png") is None


def test_the_prepare_step_writes_labels_again_when_the_data_is_regenerated_under_the_same_paths(tmp_path):
    """The pipeline regenerates an offline set written with other generator knobs: the same ids and image paths show
    other scenes, so labels kept from before would pull tokens toward words of objects that are not there."""
    from alignlm.data.shapes import generate
    from alignlm.methods.sea.labels import ensure_labels, from_annotations

    shapes = tmp_path / "shapes"
    generate(shapes, n_train=8, n_test=2, image_size=32, label_grid=4, seed=0)
    path, data = shapes / "sea_labels.safetensors", [str(shapes / "pretrain.json")]
    assert main(["sea-labels", "annotations", "--data", *data]) == 0  # the default annotations beside the data
    stamp = path.stat().st_mtime_ns
    node = {"path": path, "source": "annotations", "data": data, "annotations": str(shapes / "patch_labels.json")}
    ensure_labels(**node)  # the recipe names the same annotations explicitly: nothing changed, the file is kept
    assert path.stat().st_mtime_ns == stamp

    generate(shapes, n_train=8, n_test=2, image_size=32, label_grid=4, seed=1, max_shapes=1)
    ensure_labels(**node)
    served, truth = SeaLabels(path), from_annotations(data, 5)
    assert served.words == truth.words and len(served.index) == len(truth.images) == 8
    for i, image in enumerate(truth.images):
        ids, _ = served.lookup(image)
        for cell in range(served.cells):
            assert set(ids[cell].tolist()) == set(truth.word_ids[i, cell].tolist()), (image, cell)


def test_labels_that_record_nothing_of_their_inputs_are_written_again_saying_so(shapes_root, tmp_path, caplog):
    """A labels file written before they recorded their inputs was told as one whose annotations, data and images had
    all changed since (an upgrade audit: labels of an older alignlm, nothing changed)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from alignlm.methods.provenance import KEY
    from alignlm.methods.sea.labels import META_KEY, ensure_labels

    shapes = shapes_root / "shapes"
    path, data = tmp_path / "labels.safetensors", [str(shapes / "pretrain.json")]
    node = {"path": path, "source": "annotations", "data": data, "annotations": str(shapes / "patch_labels.json")}
    ensure_labels(**node)
    with safe_open(str(path), "pt") as f:
        meta, tensors = json.loads(f.metadata()[META_KEY]), {k: f.get_tensor(k) for k in f.keys()}
    del meta[KEY]
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
    with caplog.at_level("WARNING", logger="alignlm"):
        ensure_labels(**node)
    assert "they record nothing of what they were made from (written before they did); writing them again" in (
        caplog.text
    )
    assert "changed" not in caplog.text and SeaLabels(path).provenance is not None


def test_the_prepare_step_refuses_labels_made_with_other_knobs_naming_the_knob(shapes_root, tmp_path):
    """k, the source and a source's own choices make another variant of the labels: the step never serves the old
    file for them, and never overwrites it (it may be wanted beside the new one)."""
    from alignlm.methods.sea.labels import ensure_labels

    shapes = shapes_root / "shapes"
    path, data = tmp_path / "labels.safetensors", [str(shapes / "pretrain.json")]
    ensure_labels(path, "annotations", data, k=5, annotations=str(shapes / "patch_labels.json"))
    with pytest.raises(
        ValueError, match=r"labels.safetensors was written with k=5, but the sea_labels step asks for k=2"
    ):
        ensure_labels(path, "annotations", data, k=2, annotations=str(shapes / "patch_labels.json"))
    with pytest.raises(ValueError, match=r"with source='annotations', but the sea_labels step asks for source='dual_"):
        ensure_labels(path, "dual_encoder", data, k=5, model="no/such-model", words=["red"])
    assert SeaLabels(path).k == 5 and SeaLabels(path).source == "annotations"


def test_a_words_argument_that_reads_as_a_missing_file_is_refused(shapes_root, tmp_path):
    """A mistyped word-list path split on commas was a one-word list: labels that give SEA nothing to learn."""
    clip = tiny_clip(tmp_path / "clip")
    out = tmp_path / "labels.safetensors"
    args = ["sea-labels", "dual_encoder", "--model", str(clip), "--data", str(shapes_root / "shapes" / "pretrain.json")]
    for typo in (str(tmp_path / "wrods.txt"), "wrods.txt", "lists/words"):
        with pytest.raises(SystemExit, match=r"--words .*: no such file"):
            main([*args, "--out", str(out), "--words", typo])
    assert not out.exists()
    assert main([*args, "--out", str(out), "--words", "red, green,blue"]) == 0  # comma-separated words still work
    assert SeaLabels(out).words == ["red", "green", "blue"]


def test_annotations_must_cover_every_record(shapes_root, tmp_path):
    recs = json.loads((shapes_root / "shapes" / "pretrain.json").read_text())
    recs[0]["id"] = "not_annotated"
    (tmp_path / "data.json").write_text(json.dumps(recs))
    with pytest.raises(DataError, match="no labels for 1 records"):
        main(
            [
                "sea-labels",
                "annotations",
                "--data",
                str(tmp_path / "data.json"),
                "--annotations",
                str(shapes_root / "shapes" / "patch_labels.json"),
                "--image-root",
                str(shapes_root / "shapes"),
            ]
        )


def test_labels_from_a_saved_clip_model(shapes_root, tmp_path):
    from transformers import CLIPModel

    from alignlm.data.images import load_rgb, preprocess
    from alignlm.models.encoders import HFDualEncoder

    clip = tiny_clip(tmp_path / "clip")
    words = ["red", "green", "blue", "circle", "square", "background"]
    data = str(shapes_root / "shapes" / "pretrain.json")
    for grid, cells in ((None, (4, 4)), (2, (2, 2))):
        out = tmp_path / f"labels_{grid}.safetensors"
        argv = [
            "sea-labels",
            "dual_encoder",
            "--model",
            str(clip),
            "--words",
            ",".join(words),
            "--data",
            data,
            "--k",
            "3",
            "--out",
            str(out),
        ]
        assert main(argv + (["--grid", str(grid)] if grid else [])) == 0
        labels = SeaLabels(out)
        assert labels.source == "dual_encoder" and labels.grid == cells and labels.k == 3 and labels.words == words
        assert len(labels.index) == 8
    # the 4x4 labels are the top-3 cosines of patch tokens -> post_layernorm -> visual_projection vs "a photo of a {w}"
    model, enc = CLIPModel.from_pretrained(clip).eval(), HFDualEncoder(str(clip))
    image = shapes_root / "shapes" / "images" / "shapes_train_00001.png"
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=preprocess(load_rgb(image), enc.image_spec)[None]).last_hidden_state
        patches = model.visual_projection(model.vision_model.post_layernorm(hidden[0, 1:]))
        tok = enc.tokenizer([f"a photo of a {w}" for w in words], padding=True, return_tensors="pt")
        text = model.get_text_features(**tok).pooler_output
    expect_scores, expect_ids = (F.normalize(patches, dim=-1) @ F.normalize(text, dim=-1).T).topk(3, dim=-1)
    ids, scores = SeaLabels(tmp_path / "labels_None.safetensors").lookup(image)
    assert torch.equal(ids, expect_ids)
    torch.testing.assert_close(scores, expect_scores, atol=1e-5, rtol=1e-5)


def test_annotations_with_a_non_finite_score_are_refused_naming_record_and_cell(shapes_root, tmp_path):
    """json reads NaN and Infinity; such a score once went into the file and failed the first step's draw."""
    shapes = shapes_root / "shapes"
    ann = json.loads((shapes / "patch_labels.json").read_text())
    ann["images"]["shapes_train_00002"][5][0][1] = float("nan")
    (tmp_path / "patch_labels.json").write_text(json.dumps(ann))
    out = tmp_path / "labels.safetensors"
    argv = ["sea-labels", "annotations", "--data", str(shapes / "pretrain.json"), "--out", str(out)]
    with pytest.raises(
        DataError, match=r"record shapes_train_00002 cell 5 gives word '\w+' the score nan; scores must"
    ):
        main([*argv, "--annotations", str(tmp_path / "patch_labels.json"), "--image-root", str(shapes)])
    assert not out.exists()


def test_opening_a_labels_file_checks_it_against_its_metadata(shapes_root, tmp_path):
    """A file written elsewhere with word ids past the word list once opened and served them: a step's IndexError.
    Shapes are checked at open; word ids and scores per row as it is read."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(shapes_root / "shapes" / "sea_labels.safetensors"), "np") as f:
        meta, ids, scores = f.metadata(), f.get_tensor("words"), f.get_tensor("scores")
    first = json.loads(meta["alignlm.sea_labels"])["images"][0]
    broken = {
        "word_id": (
            np.where(ids >= 0, 99, ids),
            scores,
            rf"image {first} cell 0 has word id 99; ids must be in \[-1, 10\)",
        ),
        "score": (ids, np.where(ids >= 0, np.inf, scores), rf"image {first} cell 0 has score inf; candidate scores"),
        "grid": (ids[:, :8], scores[:, :8], r"shape \[10 images, 16 cells, k\]; got \(10, 8, 5\) and \(10, 8, 5\)"),
        "images": (ids[:9], scores[:9], r"shape \[10 images, 16 cells, k\]; got \(9, 16, 5\)"),
        "2-d": (ids[..., 0], scores[..., 0], r"got \(10, 16\) and \(10, 16\)"),
        # a float id was cut to another word (2.7 -> 2) and a NaN one past the range check to no candidate
        "float_ids": (ids.astype(np.float32), scores, r"integer word ids and floating-point scores; got words F32"),
        "int_scores": (ids, scores.astype(np.int32), r"got words I32 and scores I32"),
        "word_list": (ids, scores, r"the metadata's word list must be a list of strings; got 'redbluegreen"),
    }
    for name, (bad_ids, bad_scores, message) in broken.items():
        path = tmp_path / f"{name}.safetensors"
        arrays = {"words": np.ascontiguousarray(bad_ids), "scores": np.ascontiguousarray(bad_scores)}
        if name == "word_list":  # a string was read as a list of letters
            bad = json.loads(meta["alignlm.sea_labels"])
            save_file(
                arrays, str(path), metadata={**meta, "alignlm.sea_labels": json.dumps({**bad, "words": "redbluegreen"})}
            )
        else:
            save_file(arrays, str(path), metadata=meta)
        if name in ("word_id", "score"):  # values are checked row by row as they are read: a bad row, a bad sample
            labels = SeaLabels(path)
            with pytest.raises(DataError, match=f"{path}: .*{message}"):
                labels.lookup(labels.root / first)
            continue
        with pytest.raises(DataError, match=f"{path}: .*{message}"):
            SeaLabels(path)


def test_constant_accuracy_counts_word_0_in_cells_with_empty_slots(shapes_root, tiny_model, tmp_path):
    """Every token lists word 0 ("red"), so answering "red" always is right: constant_acc 1.0. The empty slots (-1)
    once erased word 0 from every cell with fewer than k candidates, reporting 0.5."""
    from alignlm.methods.sea.token_words import token_word_report

    images = sorted((shapes_root / "shapes" / "images").glob("shapes_test_*.png"))
    ids = np.full((len(images), 16, 3), -1, dtype=np.int32)
    ids[:, :, 0] = 0
    ids[:, ::2, 1] = 1  # every other cell also lists "blue"
    labels = LabelSet(["red", "blue", "green"], (4, 4), images, ids, np.where(ids >= 0, 0.5, 0.0), "annotations")
    path = write_labels(tmp_path / "word0.safetensors", labels)
    report = token_word_report(tiny_model().eval(), SeaLabels(path), images)
    assert report["tokens"] == 2 * 16 and report["constant_acc"] == 1.0
    report = token_word_report(tiny_model().eval(), SeaLabels(path), images, exclude=["red"])
    assert report["tokens"] == 16 and report["constant_acc"] == 1.0  # only the "blue" cells stay labelled


# ---- labels in the batch -------------------------------------------------------------------------------------------


def test_dataset_puts_labels_on_the_visual_tokens(shapes_root, tiny_model, colour_set):
    model = tiny_model()
    shapes = shapes_root / "shapes"
    data_cfg = {
        "sources": [{"path": str(shapes / "pretrain.json")}, {"path": str(colour_set["pretrain"])}],
        "hooks": {
            "sea": {"_target_": "alignlm.methods.sea.hook.SeaLabelHook", "path": str(shapes / "sea_labels.safetensors")}
        },
    }
    ds = build_dataset(data_cfg, model, seed=0)
    labels = SeaLabels(shapes / "sea_labels.safetensors")
    shape_item = next(i for i in range(len(ds)) if ds[i]["id"].startswith("shapes"))
    colour_item = next(i for i in range(len(ds)) if not ds[i]["id"].startswith("shapes"))
    a, b = ds[shape_item], ds[colour_item]
    assert a["sea_words"].shape == a["sea_scores"].shape == (1, model.num_image_tokens, 5)
    expect = labels.lookup(shapes / "images" / f"{a['id']}.png")[0]
    assert torch.equal(a["sea_words"][0], expect)
    assert (b["sea_words"] == -1).all()  # an image the file does not label
    batch = Collator(model.tokenizer.pad_token_id, hooks=ds.hooks)([a, b])
    assert batch["sea_words"].shape == (2, 16, 5) and batch["sea_words"].dtype == torch.long
    assert torch.equal(batch["sea_words"][0], expect) and (batch["sea_words"][1] == -1).all()
    # without the sea hook the batch has no SEA fields, and objective sea refuses to start
    plain = build_dataset({"sources": data_cfg["sources"]}, model, seed=0)
    assert "sea_words" not in plain[0]
    with pytest.raises(ValueError, match="stage.data.hooks.sea"):
        SEAObjective().setup(model, plain)


def test_a_micro_batch_without_a_labelled_image_measures_no_accuracy(shapes_root, tiny_model, colour_set):
    """``sea/acc`` of a micro-batch whose images the labels file does not cover (the digits of ``+exp=sea``) was a
    measured 0, pulling the step's mean down; the hook counts labelled images on the host, and such a micro-batch
    measures nothing (its loss is 0 either way)."""
    model = tiny_model()
    shapes = shapes_root / "shapes"
    path = str(shapes / "sea_labels.safetensors")
    data_cfg = {
        "sources": [{"path": str(shapes / "pretrain.json")}, {"path": str(colour_set["pretrain"])}],
        "hooks": {"sea": {"_target_": "alignlm.methods.sea.hook.SeaLabelHook", "path": path}},
    }
    ds = build_dataset(data_cfg, model, seed=0)
    objective = SEAObjective(k=5)
    objective.set_words(model, SeaLabels(path).words)
    collate = Collator(model.tokenizer.pad_token_id, hooks=ds.hooks)
    shape_items = [ds[i] for i in range(len(ds)) if ds[i]["id"].startswith("shapes")][:2]
    colour_items = [ds[i] for i in range(len(ds)) if not ds[i]["id"].startswith("shapes")][:2]
    unlabelled, labelled = collate(colour_items), collate([colour_items[0], shape_items[0]])
    assert unlabelled["sea_labelled"] == 0 and labelled["sea_labelled"] == 1
    none = objective(unlabelled, model(unlabelled), model)
    assert "acc" not in none.metrics and none.loss.item() == 0.0
    assert "acc" in objective(labelled, model(labelled), model).metrics


def test_grid_to_token_mapping_skips_pooled_tokens_and_checks_counts(shapes_root):
    labels = SeaLabels(shapes_root / "shapes" / "sea_labels.safetensors")
    image = shapes_root / "shapes" / "images" / "shapes_train_00000.png"
    # EfficientNet with cls_patch: one pooled token first, then the 4x4 map
    ids, _ = labels.place_on_tokens(num_image_tokens=17, num_patches=17, num_prefix_tokens=1).for_images([image])
    assert (ids[0, 0] == -1).all() and torch.equal(ids[0, 1:], labels.lookup(image)[0])
    assert labels.place_on_tokens(16, 16, 0).offset == 0
    with pytest.raises(DataError, match=r"4x4 grid \(16 cells per image\) but the model gives 25 visual tokens"):
        labels.place_on_tokens(25, 25, 0)
    with pytest.raises(DataError, match="17 tokens, 0 of them CLS"):
        labels.place_on_tokens(17, 17, 0)


# ---- the objective (docs/methods.md, SEA properties) ---------------------------------------------------------------


def test_sampling_frequency_matches_softmax_of_scores():
    torch.manual_seed(0)
    n, t = 40000, 0.1
    words = torch.tensor([[3, 7, 1, -1]]).repeat(n, 1)
    scores = torch.tensor([[0.5, 0.42, 0.3, 0.9]]).repeat(n, 1)  # the -1 slot's score must never matter
    picked = sample_labels(words, scores, t)
    freq = torch.stack([(picked == w).float().mean() for w in (3, 7, 1)])
    expect = torch.softmax(torch.tensor([0.5, 0.42, 0.3]) / t, 0)
    torch.testing.assert_close(freq, expect, atol=0.01, rtol=0)
    assert (picked >= 0).all()
    none = sample_labels(torch.full((5, 3), -1), torch.zeros(5, 3), t)
    assert (none == -1).all()


def test_sampling_takes_large_finite_scores():
    """``score / t_sample`` overflowed to inf for a finite score of 3e38, and the draw failed mid-step on a NaN
    probability; the best candidate is taken to 0 first."""
    words = torch.tensor([[3, 7, -1], [1, -1, -1]])
    picked = sample_labels(words, torch.tensor([[3e38, -3e38, 0.0], [1e38, 0.0, 0.0]]), 0.01)
    assert picked.tolist() == [3, 1]


def test_loss_is_minimal_when_tokens_equal_their_label_embedding():
    g = torch.Generator().manual_seed(0)
    word_emb = torch.randn(6, 64, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 2, -1])
    exact = word_emb[labels.clamp(min=0)] * torch.rand(9, 1, generator=g).add(
        0.5
    )  # scale is irrelevant: V is normalised

    def loss(v: torch.Tensor) -> float:
        return sea_loss(v, labels, word_emb, 0.07)[0].item()

    best = loss(exact)
    assert best < 1e-3
    for _ in range(20):
        assert loss(exact + 0.3 * torch.randn(exact.shape, generator=g)) > best
    assert loss(exact[torch.tensor([1, 2, 3, 4, 5, 0, 1, 3, 8])]) > 1.0  # every token on another label's word
    assert loss(torch.randn(exact.shape, generator=g)) > best


def test_duplicate_labels_are_one_class_never_a_negative():
    """The classes are the batch's distinct labels: the same as a softmax over those words alone."""
    g = torch.Generator().manual_seed(1)
    word_emb, v = torch.randn(5, 32, generator=g), torch.randn(4, 32, generator=g)
    logits = sea_logits(v[:3], torch.tensor([2, 2, 4]), word_emb, 0.07)
    assert logits.shape == (3, 5) and (logits[:, [0, 1, 3]] == torch.finfo(torch.float32).min).all()
    alone = F.normalize(v[:3], dim=-1) @ F.normalize(word_emb[[2, 4]], dim=-1).T / 0.07  # the two words drawn
    per_token = F.cross_entropy(logits, torch.tensor([2, 2, 4]), reduction="none")
    torch.testing.assert_close(per_token, F.cross_entropy(alone, torch.tensor([0, 0, 1]), reduction="none"))
    more = sea_logits(v, torch.tensor([2, 2, 4, 1]), word_emb, 0.07)  # a new word is a new negative
    assert F.cross_entropy(more[:1], torch.tensor([2])) > per_token[0]


def test_tokens_without_a_label_are_left_out_and_none_gives_zero():
    g = torch.Generator().manual_seed(2)
    word_emb, v = torch.randn(5, 32, generator=g), torch.randn(4, 32, generator=g, requires_grad=True)
    loss, acc = sea_loss(v, torch.tensor([3, -1, 1, -1]), word_emb, 0.07)
    want, _ = sea_loss(v[[0, 2]], torch.tensor([3, 1]), word_emb, 0.07)
    torch.testing.assert_close(loss, want)
    assert 0 <= acc.item() <= 1
    none, none_acc = sea_loss(v, torch.full((4,), -1), word_emb, 0.07)
    none.backward()
    assert none.item() == 0 and none_acc.item() == 0 and torch.isfinite(v.grad).all()


def test_the_loss_is_float32_under_bf16_autocast():
    """A GPU's default precision: the logits stay in float32 (bf16 would be coarse at tau 0.07, and could not even
    hold the float32 floor that masks the undrawn words)."""
    g = torch.Generator().manual_seed(3)
    word_emb, v = torch.randn(6, 32, generator=g), torch.randn(8, 32, generator=g, requires_grad=True)
    labels = torch.tensor([0, 2, 2, -1, 5, 0, -1, 3])
    want = sea_loss(v, labels, word_emb, 0.07)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, acc = sea_loss(v, labels, word_emb, 0.07)
    assert loss.dtype == torch.float32 and loss.item() == want.item()
    loss.backward()
    assert torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


def test_objective_shapes_and_gradient_reaches_the_connector_only(tiny_model):
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(True)
    for p in model.vision.parameters():  # frozen as in every stage config
        p.requires_grad_(False)
    model.frozen_parts = {"vision"}
    obj = SEAObjective(k=3)
    obj.set_words(model, ["red", "green", "blue", "circle", "square"])
    assert obj.word_emb.shape == (5, model.llm.config.hidden_size) and not obj.word_emb.requires_grad
    batch = make_batch(model, [1, 2])
    m = model.num_image_tokens
    g = torch.Generator().manual_seed(0)
    batch["sea_words"] = torch.randint(-1, 5, (3, m, 5), generator=g)
    batch["sea_scores"] = torch.rand(3, m, 5, generator=g)
    out = model(batch)
    with DeviceWaits() as waits:  # on a GPU the objective neither reads from the device nor sizes a tensor by data
        term = obj(batch, out, model)
        term.loss.backward()
    assert waits.seen == []
    assert term.loss.shape == () and torch.isfinite(term.loss) and 0 <= term.metrics["acc"] <= 1
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connector.parameters())
    assert all(p.grad is None or not p.grad.any() for p in model.llm.parameters())
    assert all(p.grad is None for p in model.vision.parameters())
    # a batch without images (zero image) or without labelled tokens gives a zero loss that still reaches the graph
    batch["sea_words"] = torch.full((3, m, 5), -1)
    assert obj(batch, model(batch), model).loss.item() == 0.0
    with pytest.raises(ValueError, match="sea_words cover"):
        obj({**batch, "sea_words": batch["sea_words"][:2], "sea_scores": batch["sea_scores"][:2]}, out, model)


def test_sea_objective_config_defaults():
    """The documented defaults in the objective config (docs/methods.md); the shapes recipe samples its coverage-fraction labels at 1.0."""
    assert compose("+objective@x=sea").x.t_sample == 0.1
    cfg = compose("+exp=sea")
    sea = cfg.stages.pretrain.objectives.sea
    assert (sea.weight, sea.k, sea.t_sample, sea.tau) == (1.0, 5, 1.0, 0.07)
    assert set(cfg.stages.pretrain.objectives) == {"lm", "sea"} and set(cfg.stages.finetune.objectives) == {"lm"}
    assert set(compose("+exp=baseline").stages.pretrain.objectives) == {"lm"}


# ---- end to end ----------------------------------------------------------------------------------------------------


def test_a_resumed_sea_run_samples_the_labels_an_uninterrupted_one_samples(shapes_root, tmp_path):
    """SEA draws its labels from torch's global stream, which a resume restores (the data loader once drew from it
    after the restore: losses off by 5e-2 from step 3 on)."""
    from tests.test_reliability import assert_resume_is_exact

    base = ["+exp=sea", "model=tiny", f"data_root={shapes_root}", "offline_datasets=[]", f"output_dir={tmp_path}",
            "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=4", "stages.pretrain.per_device_batch_size=4",
            "stages.pretrain.data.sources=[{path:${data_root}/shapes/pretrain.json}]"]  # fmt: skip
    assert_resume_is_exact(base, tmp_path, "pretrain")


def test_exp_sea_writes_its_labels_and_trains(shapes_root, tmp_path):
    from alignlm.pipeline import run
    from tests.conftest import read_losses

    root = tmp_path / "data"
    (root / "shapes").mkdir(parents=True)
    for item in (shapes_root / "shapes").iterdir():  # the tiny set without its labels file
        if item.name != "sea_labels.safetensors":
            (root / "shapes" / item.name).symlink_to(item)
    args = [
        "+exp=sea",
        "model=tiny",
        f"data_root={root}",
        "offline_datasets=[]",
        f"output_dir={tmp_path / 'out'}",
        "run_name=sea_t",
        "run=[pretrain]",
        "eval.sets=[]",
        "stages.pretrain.max_steps=3",
        "stages.pretrain.per_device_batch_size=4",
        "stages.pretrain.data.sources=[{path:${data_root}/shapes/pretrain.json}]",
    ]
    run(compose(*args))
    assert SeaLabels(root / "shapes" / "sea_labels.safetensors").grid == (4, 4)
    rows = [json.loads(r) for r in (tmp_path / "out" / "sea_t" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("loss/sea" in r and "sea/acc" in r for r in rows)
    # a batch whose sampled labels are all one word (background) has one class and a zero loss
    assert all(r["loss/sea"] >= 0 for r in rows) and rows[0]["loss/sea"] > 0
    assert len(read_losses(tmp_path / "out" / "sea_t" / "pretrain")) == 3
    # whole steps (the labels hook's batches, the objective, CUDA's fused AdamW): nothing waits for a GPU
    fused = compose(*args, "run_name=waits", "stages.pretrain.fused_optimizer=true")
    ops, logged = waits_in_training_steps(fused, "pretrain")
    assert ops.seen == [] and all("loss/sea" in r[1] for r in logged)
    # the measurement command reads the checkpoint back and reports token-word accuracy beside a reference level
    final, report = tmp_path / "out" / "sea_t" / "pretrain" / "final", tmp_path / "report.json"
    assert (
        main(
            [
                "sea-eval",
                str(final),
                str(final),
                "--labels",
                str(root / "shapes" / "sea_labels.safetensors"),
                "--data",
                str(root / "shapes" / "test_captions.json"),
                "--exclude-words",
                "background",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    figures = json.loads(report.read_text())[str(final)]
    assert (
        figures["all words"]["tokens"] == 2 * 16 and figures["all words"]["constant_acc"] == 1.0
    )  # every cell lists background
    assert figures["without background"]["tokens"] < 2 * 16
    assert all(0 <= f[k] <= 1 for f in figures.values() for k in ("token_word_acc", "top_word_acc", "constant_acc"))


def _old_write_order(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """write_labels' whole-array sort before it went by blocks: the bytes a labels file must keep."""
    ids, scores = ids.astype(np.int32), scores.astype(np.float32)
    scores = np.where(ids < 0, -np.inf, scores)
    order = np.argsort(-scores, axis=-1, kind="stable")
    ids, scores = np.take_along_axis(ids, order, -1), np.take_along_axis(scores, order, -1)
    return ids, np.where(ids < 0, 0.0, scores).astype(np.float32)


def _label_set(ids: np.ndarray, scores: np.ndarray, tmp_path, grid: tuple[int, int] = (2, 2)) -> LabelSet:
    images = [tmp_path / f"{i}.png" for i in range(len(ids))]
    return LabelSet([f"w{i}" for i in range(8)], grid, images, ids, scores, "test")


@pytest.mark.parametrize("already_sorted", [True, False])
def test_written_labels_are_the_bytes_of_the_whole_array_sort_sorted_or_not(tmp_path, monkeypatch, already_sorted):
    """Blocks (a smaller block size here than at scale) and a sorted source left as it is write the same file."""
    from safetensors.numpy import load_file

    from alignlm.methods.sea import labels as sea_labels

    monkeypatch.setattr(sea_labels, "SORT_ROWS", 3, raising=False)
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((10, 4, 5)).astype(np.float32)
    ids = rng.integers(-1, 8, (10, 4, 5))
    if already_sorted:  # a top-k source: descending, empty slots last with score 0 (and one -0.0, which is not +0.0)
        ids[..., :3], ids[..., 3:] = rng.integers(0, 8, (10, 4, 3)), -1
        scores = -np.sort(-scores, axis=-1)
        scores[..., 3:] = 0.0
        scores[7, 1, 4] = -0.0
    else:
        scores[ids < 0] = 2.5  # an empty slot's score is dropped
    out = write_labels(tmp_path / "l.safetensors", _label_set(ids, scores, tmp_path))
    written, (want_ids, want_scores) = load_file(str(out)), _old_write_order(ids, scores)
    assert written["words"].dtype == np.int32 and written["scores"].dtype == np.float32
    assert written["words"].tobytes() == want_ids.tobytes() and written["scores"].tobytes() == want_scores.tobytes()


def test_writing_sorted_labels_holds_no_copy_of_them(tmp_path, monkeypatch):
    """At LLaVA-558k (576 cells, k=5) write_labels held ~46 bytes per entry for a 13 GB file: int64 sort order,
    take_along_axis copies and a float64 where. A top-k source's arrays are written as they are; the order check
    holds one block's temporaries (a tenth of the images here)."""
    import tracemalloc

    from alignlm.methods.sea import labels as sea_labels

    monkeypatch.setattr(sea_labels, "SORT_ROWS", 40, raising=False)

    n, cells, k = 400, 576, 5
    scores = -np.sort(-np.random.default_rng(0).random((n, cells, k), dtype=np.float32), axis=-1)
    ids = np.tile(np.arange(k, dtype=np.int32), (n, cells, 1))
    labels = _label_set(ids, scores, tmp_path, (24, 24))
    tracemalloc.start()
    try:
        write_labels(tmp_path / "l.safetensors", labels)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / ids.size < 2, f"{peak / ids.size:.1f} bytes per entry at the peak"


class _PatchEncoder:
    """A dual encoder whose patch features are fixed per image (its path's digits), on whatever device it was put."""

    name = "patches"

    def __init__(self) -> None:
        from alignlm.data.images import ImageSpec

        self.image_spec = ImageSpec(8, (0.5,) * 3, (0.5,) * 3)

    def encode_texts(self, texts):
        return torch.eye(4)[: len(texts)] + 0.01

    def patch_embeddings(self, pixel_values):
        g = torch.Generator().manual_seed(int(pixel_values.sum() * 1000) % 1000)
        return torch.randn(len(pixel_values), 3, 3, 4, generator=g)


class _ColourEncoder:
    """A dual encoder whose 4 x 4 patch features are the patches' mean colours, and whose words are colours."""

    name = "colours"
    words = {"red": [1, -1, -1, 0], "green": [-1, 1, -1, 0], "blue": [-1, -1, 1, 0], "background": [0, 0, 0, 1]}

    def __init__(self) -> None:
        from alignlm.data.images import ImageSpec

        self.image_spec = ImageSpec(32, (0.5,) * 3, (0.5,) * 3)

    def encode_texts(self, texts):
        return torch.tensor([self.words[t.split()[-1]] for t in texts], dtype=torch.float32)

    def patch_embeddings(self, pixel_values):
        rgb = F.avg_pool2d(pixel_values, 8).permute(0, 2, 3, 1)
        return torch.cat([rgb, torch.full_like(rgb[..., :1], 0.3)], -1)


def test_dual_encoder_labels_describe_the_patches_of_images_made_square_as_the_stage_makes_them(tmp_path):
    """Labels were made on padded images while SEA's pretraining stage crops: on a 2:1 image of red | green | blue
    stripes, 12 of 16 cells labelled what the token's patch does not show. Made as the stage makes its images (crop by
    default) and recorded; a file made otherwise is refused where it would be laid on tokens."""
    from PIL import Image

    from alignlm.config import ConfigError
    from alignlm.data.images import preprocess
    from alignlm.methods.sea.labels import from_dual_encoder

    stripes = np.zeros((32, 64, 3), np.uint8)
    stripes[:, :16], stripes[:, 16:48], stripes[:, 48:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    Image.fromarray(stripes).save(tmp_path / "wide.png")
    record = {"id": "w", "image": "wide.png", "conversations": [{"from": "human", "value": "<image>"}]}
    (tmp_path / "data.json").write_text(
        json.dumps([record | {"conversations": [*record["conversations"], {"from": "gpt", "value": "x"}]}])
    )
    encoder, words = _ColourEncoder(), list(_ColourEncoder.words)
    shown = {}
    for mode in ("crop", "pad"):
        pixels = preprocess(Image.open(tmp_path / "wide.png").convert("RGB"), encoder.image_spec, mode)[None]
        cosines = (
            F.normalize(encoder.patch_embeddings(pixels).flatten(1, 2), dim=-1)
            @ F.normalize(encoder.encode_texts(words), dim=-1).T
        )
        shown[mode] = cosines.argmax(-1)[0].numpy()
    crop = from_dual_encoder([tmp_path / "data.json"], 1, encoder, words, num_workers=0)
    padded = from_dual_encoder([tmp_path / "data.json"], 1, encoder, words, num_workers=0, image_aspect_ratio="pad")
    assert (crop.word_ids[0, :, 0] == shown["crop"]).all() and (padded.word_ids[0, :, 0] == shown["pad"]).all()
    assert (shown["crop"] != shown["pad"]).sum() == 12
    write_labels(tmp_path / "pad.safetensors", padded)
    write_labels(tmp_path / "crop.safetensors", crop)
    SeaLabels(tmp_path / "crop.safetensors").check_aspect_ratio("crop", "the stage")
    with pytest.raises(ConfigError, match="made on pad-squared images, but the stage makes them crop"):
        SeaLabels(tmp_path / "pad.safetensors").check_aspect_ratio("crop", "the stage")


def test_dual_encoder_labels_fill_int32_arrays_a_sorted_write_keeps_as_they_are(shapes_root):
    """Fewer words than k: the slots past them are empty; the arrays are the final dtype, and sorted already."""
    from alignlm.methods.sea.labels import from_dual_encoder, sorted_candidates

    data = [str(shapes_root / "shapes" / "pretrain.json")]
    labels = from_dual_encoder(data, 5, _PatchEncoder(), ["a", "b", "c"], batch_size=3)
    assert labels.word_ids.dtype == np.int32 and labels.scores.dtype == np.float32
    assert labels.word_ids.shape == (8, 9, 5) and (labels.word_ids[..., 3:] == -1).all()
    assert (labels.scores[..., 3:] == 0).all() and (labels.word_ids[..., :3] >= 0).all()
    ids, scores = sorted_candidates(labels.word_ids, labels.scores)
    assert ids is labels.word_ids and scores is labels.scores


def test_dual_encoder_labels_refuse_a_missing_image_before_the_encoder_loads(shapes_root, tmp_path, monkeypatch):
    import shutil

    from alignlm.methods.sea import labels as sea_labels

    folder = tmp_path / "shapes"
    shutil.copytree(shapes_root / "shapes", folder)
    (folder / "images" / "shapes_train_00001.png").unlink()
    monkeypatch.setattr(sea_labels, "load_encoder", lambda *a, **kw: pytest.fail("the encoder loaded"))
    with pytest.raises(DataError, match="1 images of the data are not files, the first .*shapes_train_00001.png"):
        sea_labels.make_labels(
            tmp_path / "l.safetensors", "dual_encoder", [folder / "pretrain.json"], model="m", words=["red"]
        )


def test_dual_encoder_labels_run_the_encoder_on_the_device_knob_which_makes_no_variant(shapes_root, monkeypatch):
    from alignlm.methods.sea import labels as sea_labels

    asked = []
    monkeypatch.setattr(sea_labels, "load_encoder", lambda model, **kw: asked.append(kw["device"]) or _PatchEncoder())
    data = [str(shapes_root / "shapes" / "pretrain.json")]
    sea_labels.from_dual_encoder(data, 2, "m", ["a", "b"], device="cpu")
    sea_labels.from_dual_encoder(data, 2, "m", ["a", "b"])
    assert asked == ["cpu", sea_labels.default_device()]
    knobs = sea_labels.label_knobs("dual_encoder", 2, {"model": "m", "words": ["a"], "device": "cpu"})
    assert "device" not in knobs
    with pytest.raises(ValueError, match="SEA labels device='gpu0': not a device torch knows; use cpu, cuda or cuda:N"):
        sea_labels.from_dual_encoder(data, 2, "m", ["a", "b"], device="gpu0")


def test_the_sea_labels_command_passes_device(shapes_root, tmp_path, monkeypatch):
    from alignlm.methods.sea import labels as sea_labels

    asked = []
    monkeypatch.setattr(sea_labels, "load_encoder", lambda model, **kw: asked.append(kw["device"]) or _PatchEncoder())
    argv = ["sea-labels", "dual_encoder", "--model", "m", "--words", "a,b", "--device", "cpu"]
    argv += ["--data", str(shapes_root / "shapes" / "pretrain.json"), "--out", str(tmp_path / "l.safetensors")]
    assert main(argv) == 0 and asked == ["cpu"]


# ---- sea-eval on a device, one arg max -----------------------------------------------------------------------------


def test_sea_eval_runs_each_checkpoint_on_the_asked_device_and_refuses_one_it_cannot_use(
    shapes_root, tiny_model, monkeypatch, capsys
):
    """load_model leaves a checkpoint on the CPU, and sea-eval measured it there with a GPU beside it: it now moves it
    to ``--device``, by default eval's (``default_device``), and refuses a device it cannot use before loading."""
    from alignlm.commands import sea as sea_command

    shapes, devices, loads = shapes_root / "shapes", [], []
    figures = {"token_word_acc": 0.5, "top_word_acc": 0.5, "constant_acc": 0.5, "tokens": 1.0}
    monkeypatch.setattr(sea_command, "load_model", lambda *a: loads.append(a[0]) or tiny_model().eval())
    monkeypatch.setattr(sea_command, "final_image_reading", lambda ck: PADDED)
    monkeypatch.setattr(
        sea_command, "token_word_report", lambda model, *a: devices.append(next(model.parameters()).device) or figures
    )
    monkeypatch.setattr(sea_command, "default_device", lambda: "meta")  # stands in for the GPU eval would take
    args = ["sea-eval", "r/a/s/final", "--labels", str(shapes / "sea_labels.safetensors")]
    args += ["--data", str(shapes / "test_captions.json")]
    assert main(args) == 0 and devices == [torch.device("meta")]
    assert main([*args, "--device", "cpu"]) == 0 and devices[1:] == [torch.device("cpu")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loads.clear()
    with pytest.raises(SystemExit):
        main([*args, "--device", "cuda:0"])
    assert "argument --device: 'cuda:0': this machine has no CUDA device" in capsys.readouterr().err and loads == []


def test_labels_of_images_regenerated_since_are_refused_by_sea_eval_and_never_served_to_a_stage(
    tmp_path, tiny_model, monkeypatch
):
    """The prepare step writes labels again when the images change; sea-eval, and a stage given a labels file without
    that step, had scored and trained on labels of the pictures the paths showed before (one digest over the whole
    set cannot tell which images a tool uses): each image's stamp is kept in the file, checked by sea-eval before it
    loads a model and by each lookup (a stage's sample is bad data, skipped and counted or raised per on_error). A
    missing image is left to its own read; a stage pays no stat of every image at its start."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from alignlm.commands import sea as sea_command
    from alignlm.data.collate import Skipped
    from alignlm.data.shapes import generate

    shapes = tmp_path / "shapes"
    generate(shapes, n_train=8, n_test=2, image_size=32, label_grid=4, seed=0)
    labels = shapes / "sea_labels.safetensors"
    data = [str(shapes / "pretrain.json"), str(shapes / "test_captions.json")]
    assert main(["sea-labels", "annotations", "--data", *data]) == 0
    figures = {"token_word_acc": 0.5, "top_word_acc": 0.5, "constant_acc": 0.5, "tokens": 1.0}
    monkeypatch.setattr(sea_command, "load_model", lambda *a: tiny_model().eval())
    monkeypatch.setattr(sea_command, "final_image_reading", lambda ck: PADDED)
    monkeypatch.setattr(sea_command, "token_word_report", lambda *a: figures)
    args = ["sea-eval", "r/a/s/final", "--labels", str(labels), "--data", data[1], "--device", "cpu"]
    hooks = {"sea": {"_target_": "alignlm.methods.sea.hook.SeaLabelHook", "path": str(labels)}}
    stage_data = {"sources": [{"path": data[0]}], "hooks": hooks}

    def served() -> list[bool]:
        ds = build_dataset(stage_data, tiny_model(), seed=0)
        return [not isinstance(ds[i], Skipped) for i in range(len(ds))]

    assert main(args) == 0 and served() == [True] * 8  # unchanged images pass
    (shapes / "images" / "shapes_train_00003.png").unlink()  # missing: its own cause, not a changed picture
    assert main(args) == 0 and sum(served()) == 7

    generate(shapes, n_train=8, n_test=2, image_size=32, label_grid=4, seed=1, max_shapes=1)  # same paths, new scenes
    with pytest.raises(SystemExit, match=r"sea_labels.safetensors: 2 of the images of .*test_captions.json changed "):
        main(args)
    ds = build_dataset(stage_data, tiny_model(), seed=0)
    assert isinstance(ds[0], Skipped) and "changed since it was labelled" in ds[0].reason
    with pytest.raises(DataError, match=r"image images/shapes_train_\d+.png changed since it was labelled"):
        build_dataset({**stage_data, "on_error": "raise"}, tiny_model(), seed=0)[0]

    # a file written before the stamps were kept cannot tell, and is read as before
    with safe_open(str(labels), "np") as f:
        meta = f.metadata()
    save_file({k: v for k, v in load_file(str(labels)).items() if k != "stamps"}, str(labels), metadata=meta)
    assert main(args) == 0 and served() == [True] * 8


def test_labels_keep_the_stamps_their_images_had_before_the_source_read_them(tmp_path, monkeypatch):
    """The stamps were taken when the file was written, after a pass of hours: an image regenerated during it kept
    labels of the picture it showed before under its new stamp, and every check let them through."""
    from alignlm.data.shapes import generate
    from alignlm.methods.sea import labels as sea_labels

    shapes = tmp_path / "shapes"
    generate(shapes, n_train=4, n_test=1, image_size=32, label_grid=4, seed=0)
    image = shapes / "images" / "shapes_train_00001.png"
    source = sea_labels.SOURCES["annotations"]

    def regenerating(*args, **kwargs):
        labelled = source(*args, **kwargs)
        image.write_bytes(image.read_bytes() + b"\0")  # regenerated while the labels were computed
        return labelled

    monkeypatch.setitem(sea_labels.SOURCES, "annotations", regenerating)
    path = sea_labels.make_labels(shapes / "labels.safetensors", "annotations", [str(shapes / "pretrain.json")])
    with pytest.raises(DataError, match=r"1 of the images of the set changed since they were labelled"):
        SeaLabels(path).check_unchanged([image], "the set")


def test_token_word_report_takes_each_tokens_nearest_word_once_and_scores_as_the_metric(shapes_root, tiny_model):
    """Both accuracies come from one arg max per token (each once ran its own [T, V] product and arg max), with the
    figures of ``geometry.metrics.token_word_accuracy`` on the labelled tokens."""
    from alignlm.data.images import load_rgb, preprocess
    from alignlm.geometry.metrics import token_word_accuracy
    from alignlm.methods.sea.objective import word_embeddings
    from alignlm.methods.sea.token_words import token_word_report

    model, labels = tiny_model().eval(), SeaLabels(shapes_root / "shapes" / "sea_labels.safetensors")
    images = sorted((shapes_root / "shapes" / "images").glob("shapes_*.png"))[:6]
    calls, argmax = [], torch.Tensor.argmax
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "argmax", lambda self, *a, **k: calls.append(1) or argmax(self, *a, **k))
        report = token_word_report(model, labels, images, batch_size=len(images))
    assert len(calls) == 1
    with torch.no_grad():
        pixels = torch.stack([preprocess(load_rgb(p), model.image_spec, "pad") for p in images])
        tokens = model.connector(model.vision(pixels)).tokens.flatten(0, 1)
    rows = [[w for w in row if w >= 0] for row in labels.for_images(images)[0].flatten(0, 1).tolist()]
    kept = [i for i, row in enumerate(rows) if row]
    words = word_embeddings(model, labels.words)
    assert report["tokens"] == len(kept)
    assert report["token_word_acc"] == token_word_accuracy(tokens[kept], words, [rows[i] for i in kept])
    assert report["top_word_acc"] == token_word_accuracy(tokens[kept], words, [rows[i][:1] for i in kept])
    assert token_word_report(model, labels, images, batch_size=4) == report  # batches of tokens: the same figures


# ---- dual-encoder labels: images read by data-loader workers (fix D3)


def test_dual_encoder_labels_with_workers_equal_the_serial_ones_an_unreadable_image_stops(shapes_root, tmp_path):
    """``num_workers`` processes read and preprocess the images, in order: the same labels as read in this process;
    an image that exists but cannot be read stops the pass naming it, as before."""
    import shutil

    from alignlm.data.records import DataError
    from alignlm.methods.sea.labels import from_dual_encoder, label_knobs

    data = [str(shapes_root / "shapes" / "pretrain.json")]
    serial = from_dual_encoder(data, 2, _PatchEncoder(), ["a", "b", "c"], batch_size=3, num_workers=0)
    parallel = from_dual_encoder(data, 2, _PatchEncoder(), ["a", "b", "c"], batch_size=3, num_workers=2)
    assert (serial.word_ids == parallel.word_ids).all() and (serial.scores == parallel.scores).all()
    assert "num_workers" not in label_knobs("dual_encoder", 2, {"num_workers": 2})  # not a variant of the labels
    folder = tmp_path / "shapes"
    shutil.copytree(shapes_root / "shapes", folder)
    (folder / "images" / "shapes_train_00001.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="shapes_train_00001"):
        from_dual_encoder([str(folder / "pretrain.json")], 2, _PatchEncoder(), ["a"], batch_size=3, num_workers=2)


def test_the_sea_objective_without_its_labels_hook_is_refused_before_anything_trains(tmp_path):
    """``+objective@stages.finetune.objectives.sea=sea`` on a recipe without the labels hook was refused when the
    finetuning stage began, after pretraining had trained."""
    from alignlm.checks import check_config
    from alignlm.config import ConfigError

    with pytest.raises(ConfigError, match=r"stages.finetune.objectives.sea needs the data hook .*SeaLabelHook among"):
        check_config(compose(f"output_dir={tmp_path}", "+exp=demo", "+objective@stages.finetune.objectives.sea=sea"))
    check_config(compose(f"output_dir={tmp_path}", "+exp=sea"))  # the recipe has it


def test_a_words_embedding_is_the_mean_of_all_its_sub_tokens():
    """A label word the tokenizer splits (" circle" in three pieces) is the mean of its pieces' input embeddings, not
    its first piece's (no word of the tiny vocabulary split)."""
    from types import SimpleNamespace

    from torch import nn

    from alignlm.methods.sea.objective import word_embeddings

    table = nn.Embedding(10, 3)
    vocab = {" red": [1, 2], " circle": [3, 4, 5], " sky": [6]}
    model = SimpleNamespace(
        llm=SimpleNamespace(get_input_embeddings=lambda: table),
        tokenizer=lambda text, add_special_tokens=False: {"input_ids": vocab[text]},
    )
    w = table.weight.detach()
    want = torch.stack([w[[1, 2]].mean(0), w[[3, 4, 5]].mean(0), w[6]])
    torch.testing.assert_close(word_embeddings(model, ["red", "circle", "sky"]), want)
