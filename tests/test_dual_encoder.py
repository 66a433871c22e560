"""The offline dual encoder: InfoNCE, the grouped recall protocol, and (slow) a fit with the real frozen towers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from alignlm.models.encoder_fit import fit_encoder, fit_heads, grouped_recall, info_nce


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
    # collapsed features tie every item: a tie is a miss, as in the alignment metrics' retrieval (topk broke ties by
    # index, so each query "found" the first items, its own group among them: recall@1 0.5 for nothing learned)
    flat = torch.ones(4, 3)
    r = grouped_recall(flat, flat, ["a", "a", "c", "d"], ks=(1, 2))
    assert r["i2t_recall@1"] == r["t2i_recall@1"] == r["i2t_recall@2"] == 0.0


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
    with pytest.raises(ValueError, match="temperature must be in"):
        fit_heads(_Heads(), img, txt, epochs=1, temperature=0.0)


@pytest.mark.parametrize(
    "knob,message",
    [
        ({"dim": 0}, "dim=0 must be a whole number >= 1"),  # once: a chance-level encoder, exit 0
        ({"epochs": -1}, "epochs=-1 must be a whole number >= 1"),
        ({"batch_size": 0}, "batch_size=0 must be a whole number >= 1"),
        ({"limit": 0}, r"limit=0 must be a whole number >= 1 \(or null: all\)"),
        ({"lr": float("inf")}, "lr=inf must be a finite number > 0"),
    ],
)
def test_fit_refuses_counts_below_one_before_the_towers_load(tmp_path, knob, message):
    """The prepare steps call ``fit_encoder`` with config values, not through the command's flag checks."""
    with pytest.raises(ValueError, match=f"dual-encoder {message}"):
        fit_encoder([str(tmp_path / "missing.json")], tmp_path / "enc", **knob)
    assert not (tmp_path / "enc").exists()


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
