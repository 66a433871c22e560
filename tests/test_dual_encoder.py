"""The offline dual encoder: InfoNCE, the grouped recall protocol, and (slow) a fit with the real frozen towers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alignlm.geometry.metrics import retrieval_recall
from alignlm.models import encoder_fit
from alignlm.models.encoder_fit import fit_encoder, fit_heads, grouped_recall, info_nce
from alignlm.models.encoders import OfflineDualEncoder


def test_info_nce_is_low_for_matched_pairs_and_symmetric():
    x = torch.eye(8)
    scale = torch.tensor(math.log(100.0))
    assert info_nce(x, x, scale) < 1e-3 < info_nce(x, x.roll(1, 0), scale)
    y = torch.randn(8, 8)
    torch.testing.assert_close(info_nce(x, y, scale), info_nce(y, x, scale))


def test_grouped_recall_counts_same_caption_hits_and_gives_exact_chance():
    img = torch.eye(4)
    assert grouped_recall(img, img, ["a", "b", "c", "d"], ks=(1,))["i2t_recall@1"] == 1.0
    # items 0 and 1 share a caption, so retrieving 1 for 0 is a hit
    txt = img[[1, 0, 2, 3]]
    r = grouped_recall(img, txt, ["a", "a", "c", "d"], ks=(1, 2))
    assert r["i2t_recall@1"] == r["t2i_recall@1"] == 1.0
    assert r["chance@1"] == pytest.approx((2 / 4 + 2 / 4 + 1 / 4 + 1 / 4) / 4)
    assert r["chance@2"] == pytest.approx((5 / 6 + 5 / 6 + 1 / 2 + 1 / 2) / 4)
    # collapsed features tie every item: ties are broken at random, as in the alignment metrics' retrieval, so they
    # score chance (topk broke them by index: the first items, its own group among them; a tie counted as a miss
    # scored 0, under chance)
    flat = torch.ones(4, 3)
    r = grouped_recall(flat, flat, ["a", "a", "c", "d"], ks=(1, 2))
    for k in (1, 2):
        assert r[f"i2t_recall@{k}"] == r[f"t2i_recall@{k}"] == pytest.approx(r[f"chance@{k}"], abs=1e-12)


def test_grouped_recall_breaks_ties_at_random_as_the_alignment_metrics_retrieval():
    """One image file under two captions that a perfect model embeds alike: each query ties its match with the other
    pair's. It ranks first half the time, as random tie-breaking gives (and geometry's retrieval); counted as a miss,
    a perfect model had scored 0 on every such pair."""
    img = torch.eye(5, dtype=torch.float64)
    img[1] = img[0]  # the same image file, captioned twice
    r = grouped_recall(img, img, list("abcde"), ks=(1, 2))
    assert r["t2i_recall@1"] == r["i2t_recall@1"] == pytest.approx((0.5 + 0.5 + 3) / 5)
    assert r["t2i_recall@2"] == r["i2t_recall@2"] == 1.0
    assert r["t2i_recall@1"] == pytest.approx(retrieval_recall(img, img, (1,))["t2i_recall@1"])
    # a query among tied wrong items: recall is the chance that one of its 2 right items is among the first k
    g = torch.ones(6, 2, dtype=torch.float64)
    r = grouped_recall(g, g, ["a", "a", "b", "c", "d", "e"], ks=(1, 2))
    assert r["i2t_recall@2"] == pytest.approx((2 * (1 - 6 / 15) + 4 * (1 - 10 / 15)) / 6)


class _Heads(nn.Module):
    """The trained part of the dual encoder, on toy features (what ``fit_heads`` touches)."""

    def __init__(self) -> None:
        super().__init__()
        self.image_head, self.text_head = nn.Linear(6, 4), nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


def test_fit_heads_learns_the_temperature_unless_it_is_fixed():
    torch.manual_seed(0)
    img, txt = torch.randn(64, 6), torch.randn(64, 5)
    learnt, fixed = _Heads(), _Heads()
    fit_heads(learnt, img, txt, epochs=3, batch_size=16)
    head_before = fixed.image_head.weight.clone()
    fit_heads(fixed, img, txt, epochs=3, batch_size=16, temperature=0.01)
    assert learnt.logit_scale.item() != pytest.approx(math.log(1 / 0.07))
    assert fixed.logit_scale.item() == pytest.approx(math.log(100.0))
    assert not torch.equal(fixed.image_head.weight, head_before)
    with pytest.raises(ValueError, match=r"temperature=0.0 must be a finite number in \(0, 1\] \(or null: learnt\)"):
        fit_heads(_Heads(), img, txt, epochs=1, temperature=0.0)
    # a schedule sized with a last batch of one pair, which is skipped, ended at a quarter of the peak rate
    ends: list[float] = []
    schedule = torch.optim.lr_scheduler.OneCycleLR

    class Recorded(schedule):
        def step(self, *args, **kwargs):
            super().step(*args, **kwargs)
            if self.last_epoch < self.total_steps:  # OneCycleLR refuses a step past its total
                ends.append(self.get_last_lr()[0])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.lr_scheduler, "OneCycleLR", Recorded)
        fit_heads(_Heads(), img[:5], txt[:5], epochs=10, batch_size=2)
    assert ends[-1] < 1e-6  # the last planned step taken: lr at its floor (it had stopped at 2.5e-4, a quarter)
    # a batch of one pair was skipped: batch_size=1 left the heads random with a loss of 0.0
    for rows, batch_size in ((64, 1), (1, 16)):
        with pytest.raises(ValueError, match=f"batch_size >= 2 and at least 2 pairs, got batch_size={batch_size} "):
            fit_heads(_Heads(), img[:rows], txt[:rows], epochs=1, batch_size=batch_size)


@pytest.mark.parametrize("pairs", [160, 96, 320])
def test_fit_heads_trains_a_schedule_of_any_length(pairs):
    """10 steps (160 pairs in batches of 32, 2 epochs) had failed in torch's one-cycle schedule with a
    ZeroDivisionError: its warmup tenth ended at step 1 exactly."""
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(pairs, 6, generator=g), torch.randn(pairs, 5, generator=g)
    losses = fit_heads(_Heads(), img, txt, epochs=2, batch_size=32)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize(
    "knob,message",
    [
        ({"dim": 0}, "dim=0 must be a whole number >= 1"),  # once: a chance-level encoder, exit 0
        ({"epochs": -1}, "epochs=-1 must be a whole number >= 1"),
        ({"batch_size": 0}, "batch_size=0 must be a whole number >= 2"),
        ({"batch_size": 1}, "batch_size=1 must be a whole number >= 2"),  # once: untrained heads, loss 0.0
        ({"limit": 0}, "limit=0 must be a whole number >= 1"),
        ({"lr": float("inf")}, "lr=inf must be a finite number > 0"),
        ({"temperature": 0.0}, r"temperature=0.0 must be a finite number in \(0, 1\]"),
    ],
)
def test_fit_refuses_counts_below_one_before_the_towers_load(tmp_path, knob, message):
    """The prepare steps call ``fit_encoder`` with config values, not through the command's flag checks."""
    with pytest.raises(ValueError, match=f"dual-encoder {message}"):
        fit_encoder([str(tmp_path / "missing.json")], tmp_path / "enc", **knob)
    assert not (tmp_path / "enc").exists()


class _StubEncoder(_Heads):
    """The dual encoder with toy frozen features in place of the towers (what ``fit_encoder`` calls), saved as the
    real one saves."""

    def __init__(self, dim, image_size, name, device=None) -> None:
        super().__init__()
        self.dim, self.image_size, self.name = dim, image_size, name

    def image_features(self, images: list) -> torch.Tensor:
        return torch.stack([torch.tensor(im.getpixel((0, 0)) + (1, 1, 1), dtype=torch.float) for im in images])

    def text_features(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([torch.tensor([len(t), t.count("r"), t.count("e"), 1, 1], dtype=torch.float) for t in texts])

    save = OfflineDualEncoder.save


def _no_towers(*args, **kwargs):
    raise AssertionError("the towers loaded before the inputs were checked")


def _captions(path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return str(path)


def test_grouped_recall_of_fewer_items_than_k_is_one_with_chance_one():
    """A held-out set of 4 pairs: recall@5 holds the whole gallery (C(4, 5) = 0 was a ZeroDivisionError)."""
    torch.manual_seed(0)
    r = grouped_recall(torch.randn(4, 8), torch.randn(4, 8), ["a", "b", "c", "d"])
    assert r["chance@5"] == r["i2t_recall@5"] == r["t2i_recall@5"] == 1.0
    assert r["chance@1"] == pytest.approx(1 / 4)


def test_fit_refuses_fewer_than_two_training_pairs_or_an_empty_held_out_file_before_the_towers_load(
    tmp_path, colour_set, monkeypatch
):
    from alignlm.data.records import DataError

    monkeypatch.setattr(encoder_fit, "OfflineDualEncoder", _no_towers)
    records = json.loads(colour_set["pretrain"].read_text())
    one = _captions(tmp_path / "one_pair.json", records[:1])
    with pytest.raises(DataError, match=r"train=\[.*one_pair.json'\] gives 1 caption pairs .* at least 2"):
        fit_encoder([one], tmp_path / "enc", batch_size=8, image_root=colour_set["pretrain"].parent)
    with pytest.raises(DataError, match=r"\(limit=1\) gives 1 caption pairs"):
        fit_encoder([str(colour_set["pretrain"])], tmp_path / "enc", batch_size=8, limit=1)
    empty = _captions(tmp_path / "empty.json", [])
    with pytest.raises(DataError, match="held_out file .*empty.json gives 0 caption pairs"):
        fit_encoder([str(colour_set["pretrain"])], tmp_path / "enc", held_out=[empty], batch_size=8)
    assert not (tmp_path / "enc").exists()


def test_fit_takes_an_image_root_and_checks_the_paths_before_the_towers_load(tmp_path, colour_set, monkeypatch):
    """Captions in one folder with their images in another: refused (naming the root to set) before the towers
    load, and read under image_root / --image-root (the error said to name a root, which the fit could not take)."""
    from alignlm.commands import main
    from alignlm.data.records import DataError

    records = json.loads(colour_set["pretrain"].read_text())[:6]
    data = colour_set["pretrain"].parent
    captions = _captions(tmp_path / "ann" / "caps.json", records)
    monkeypatch.setattr(encoder_fit, "OfflineDualEncoder", _no_towers)
    with pytest.raises(DataError, match=r"caps.json'\]: 6 images are not files, the first .* --image-root"):
        fit_encoder([captions], tmp_path / "enc", batch_size=4)
    outside = _captions(tmp_path / "ann" / "outside.json", [{**r, "image": f"../{r['image']}"} for r in records])
    with pytest.raises(DataError, match="outside.json: image path '../images/0.png' leaves image_root"):
        fit_encoder([outside], tmp_path / "enc", batch_size=4)
    monkeypatch.setattr(encoder_fit, "OfflineDualEncoder", _StubEncoder)
    args = ["dual-encoder", "fit", "--train", captions, "--eval", captions, "--out", str(tmp_path / "enc")]
    assert main([*args, "--image-root", str(data), "--batch-size", "4", "--epochs", "2"]) == 0
    assert json.loads((tmp_path / "enc" / "dual_encoder.json").read_text())["report"]["train_pairs"] == 6


def test_fit_with_a_held_out_file_of_fewer_pairs_than_k_reports_and_the_heads_are_written_first(
    tmp_path, colour_set, monkeypatch
):
    """A held-out file of 4 pairs: a ZeroDivisionError after the fit, before anything was written. The heads are now
    written before the held-out evaluation, so a failing one keeps them."""
    records = json.loads(colour_set["pretrain"].read_text())
    four = _captions(tmp_path / "four_pairs.json", records[:4])
    monkeypatch.setattr(encoder_fit, "OfflineDualEncoder", _StubEncoder)
    knobs = {"held_out": [four], "batch_size": 8, "epochs": 2, "image_root": colour_set["pretrain"].parent}
    report = fit_encoder([str(colour_set["pretrain"])], tmp_path / "enc", **knobs)
    assert report[four]["n"] == 4 and report[four]["chance@5"] == 1.0
    assert json.loads((tmp_path / "enc" / "dual_encoder.json").read_text())["report"][four]["n"] == 4

    def failing(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(encoder_fit, "evaluate", failing)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        fit_encoder([str(colour_set["pretrain"])], tmp_path / "kept", **knobs)
    assert (tmp_path / "kept" / "heads.safetensors").is_file()
    assert json.loads((tmp_path / "kept" / "dual_encoder.json").read_text())["report"]["train_pairs"] == 48


def test_a_diverging_fit_stops_naming_the_batch_and_saves_nothing_non_finite(tmp_path, colour_set, monkeypatch):
    """At lr=1e6 the loss went NaN: the NaN heads were saved with a manifest that was no valid JSON (a bare NaN), the
    fit returned normally and the folder loaded. It stops at the first non-finite loss now, naming the batch; heads
    holding NaN are refused when saved and when loaded."""
    monkeypatch.setattr(encoder_fit, "OfflineDualEncoder", _StubEncoder)
    knobs = {"batch_size": 8, "epochs": 3, "lr": 1e6, "image_root": colour_set["pretrain"].parent}
    with pytest.raises(
        ValueError, match=r"dual-encoder fit: the loss of epoch \d+, batch \d+ is nan; nothing was saved"
    ):
        fit_encoder([str(colour_set["pretrain"])], tmp_path / "enc", **knobs)
    assert not (tmp_path / "enc" / "heads.safetensors").exists()
    enc = _StubEncoder(16, 32, "stub")
    with torch.no_grad():
        enc.logit_scale.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"weights hold NaN: \['logit_scale'\]"):
        enc.save(tmp_path / "nan")
    _StubEncoder(16, 32, "stub").save(tmp_path / "good")
    heads = load_file(str(tmp_path / "good" / "heads.safetensors"))
    heads["logit_scale"].fill_(float("inf"))
    save_file(heads, str(tmp_path / "good" / "heads.safetensors"))
    with pytest.raises(ValueError, match=r"weights hold inf: \['logit_scale'\]"):
        OfflineDualEncoder.load(tmp_path / "good")


@pytest.mark.slow
def test_fit_with_the_real_towers_writes_a_loadable_encoder(tmp_path, colour_set, capsys):
    from alignlm.commands import main
    from alignlm.models.encoders import load_encoder

    out = tmp_path / "enc"
    assert (
        main(
            [
                "dual-encoder",
                "fit",
                "--train",
                str(colour_set["pretrain"]),
                "--eval",
                str(colour_set["pretrain"]),
                "--out",
                str(out),
                "--image-size",
                "64",
                "--dim",
                "32",
                "--epochs",
                "30",
                "--batch-size",
                "16",
                "--temperature",
                "0.01",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["temperature"] == pytest.approx(0.01) and not report["temperature_learnt"]
    held = report[str(colour_set["pretrain"])]
    assert report["loss_last_epoch"] < report["loss_first_epoch"]
    assert held["i2t_recall@1"] > held["chance@1"] and held["t2i_recall@1"] > held["chance@1"]
    encoder = load_encoder(str(out), name="colours")
    assert encoder.name == "colours" and encoder.encode_texts(["A red square."]).shape == (1, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offline_image_features_own_their_storage_not_the_towers_whole_output(dtype):
    """The fit keeps every batch's pooled features: a view of the tower's [B, 1 + cells, C] output would keep all of
    it alive (17x the features at 128 px, 50x at 224)."""
    from types import SimpleNamespace

    tower_out = torch.randn(4, 1 + 49, 8).to(dtype)
    fake = SimpleNamespace(_pixels=lambda images: torch.zeros(len(images), 3, 2, 2), image_tower=lambda px: tower_out)
    features = OfflineDualEncoder.image_features(fake, [None] * 4)
    assert features.shape == (4, 8) and features.dtype == torch.float32
    assert features.untyped_storage().nbytes() == features.numel() * features.element_size()
    assert torch.equal(features, tower_out[:, 0].float())
