"""High-norm artifact tokens: the filter (mask, replace by neighbours), its switch, register tokens, the probe."""

from __future__ import annotations

import pytest
import torch

from alignlm.export.hf_llava import ExportError, check_exportable
from alignlm.models.artifacts import ArtifactFilter, artifact_report, norm_ratios
from alignlm.models.build import build_model
from alignlm.models.vision import EfficientNetLiteTower, HFVisionTower
from tests.conftest import compose


def planted(prefix: int = 1, side: int = 4, d: int = 8, where: tuple[int, ...] = (5,)) -> torch.Tensor:
    """Unit-norm-ish tokens with 20x outliers at the given patch positions (and a large prefix token)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, prefix + side * side, d, generator=g)
    x = x / x.norm(dim=-1, keepdim=True)
    x[:, :prefix] *= 50  # CLS / registers are never filtered, however large
    for p in where:
        x[:, prefix + p] *= 20
    return x


def test_norm_ratios_are_over_the_median_patch_norm_of_each_image():
    x = planted()
    patches, prefix = norm_ratios(x, 1)
    assert patches.shape == (2, 16) and prefix.shape == (2, 1)
    torch.testing.assert_close(patches[:, 5], torch.full((2,), 20.0), rtol=1e-5, atol=0)
    torch.testing.assert_close(prefix[:, 0], torch.full((2,), 50.0), rtol=1e-5, atol=0)


def test_mask_zeroes_only_the_outliers_and_keeps_the_prefix():
    x = planted()
    y = ArtifactFilter("mask", 4.0, prefix=1)(x)
    assert torch.equal(y[:, 0], x[:, 0]) and (y[:, 1 + 5] == 0).all()
    others = [i for i in range(17) if i != 6]
    assert torch.equal(y[:, others], x[:, others])


def test_replace_takes_the_mean_of_the_kept_3x3_neighbours():
    x = planted(where=(5, 6))  # two adjacent outliers on the 4x4 grid: (1,1) and (1,2)
    y = ArtifactFilter("replace", 4.0, prefix=1)(x)
    patches = x[:, 1:].reshape(2, 4, 4, -1)
    for pos, (r, c) in ((5, (1, 1)), (6, (1, 2))):
        rows = [(i, j) for i in range(r - 1, r + 2) for j in range(c - 1, c + 2) if (i, j) not in ((1, 1), (1, 2))]
        want = torch.stack([patches[:, i, j] for i, j in rows if 0 <= i < 4 and 0 <= j < 4]).mean(0)
        torch.testing.assert_close(y[:, 1 + pos], want)
    keep = [i for i in range(17) if i not in (6, 7)]
    assert torch.equal(y[:, keep], x[:, keep])


def test_replace_falls_back_to_the_image_mean_without_a_square_grid():
    x = planted(prefix=0, side=3)[:, :8]  # 8 patches: no square grid
    y = ArtifactFilter("replace", 4.0, prefix=0)(x)
    kept = torch.cat([x[:, :5], x[:, 6:]], dim=1).mean(1)
    torch.testing.assert_close(y[:, 5], kept)


def test_the_switch_filters_every_call_of_the_tower_and_adds_nothing_to_checkpoints():
    plain = build_model(compose("model=tiny").model)
    filtered = build_model(compose("model=tiny", "model.vision_artifacts={mode: mask, factor: 1.05}").model)
    assert set(plain.state_dict()) == set(filtered.state_dict())
    pixels = torch.randn(3, 3, 32, 32)
    raw, out = plain.vision(pixels), filtered.vision(pixels)
    outlier = norm_ratios(raw, 0)[0] > 1.05
    assert outlier.any() and (out[outlier] == 0).all() and torch.equal(out[~outlier], raw[~outlier])
    with pytest.raises(ExportError, match="vision_artifacts"):
        check_exportable(filtered)


@pytest.mark.parametrize(
    ("node", "match"),
    [
        ("{mode: drop}", "mode='drop' is not known"),
        ("{mode: mask, factor: 0.5}", "factor=0.5 must be a number > 1"),
        ("{mode: mask, threshold: 3}", "unknown keys"),
    ],
)
def test_bad_filter_knobs_are_refused(node, match):
    with pytest.raises(ValueError, match=match):
        build_model(compose("model=tiny", f"model.vision_artifacts={node}").model)


def register_tower(**kw) -> HFVisionTower:
    config = dict(
        model_type="dinov2_with_registers",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        num_register_tokens=4,
        mlp_ratio=2,
    )
    torch.manual_seed(0)
    return HFVisionTower(config=config, select_layer=-1, **kw).eval()


def test_register_tokens_are_dropped_unless_kept():
    pixels = torch.randn(2, 3, 32, 32)
    patch, cls_drop, cls_keep = (
        register_tower(select_feature="patch"),
        register_tower(select_feature="cls_patch"),
        register_tower(select_feature="cls_patch", registers="keep"),
    )
    hidden = cls_keep.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]  # [CLS, 4 regs, 16]
    assert (patch.num_patches, patch.num_prefix_tokens) == (16, 0)
    assert (cls_drop.num_patches, cls_drop.num_prefix_tokens) == (17, 1)
    assert (cls_keep.num_patches, cls_keep.num_prefix_tokens) == (21, 5)
    with torch.no_grad():
        torch.testing.assert_close(patch(pixels), hidden[:, 5:])
        torch.testing.assert_close(cls_drop(pixels), torch.cat([hidden[:, :1], hidden[:, 5:]], dim=1))
        torch.testing.assert_close(cls_keep(pixels), hidden)
    with pytest.raises(ValueError, match="registers='all' is not known"):
        register_tower(registers="all")


def test_probe_reports_each_layer_and_the_output_and_counts_planted_outliers():
    tower = register_tower(select_feature="patch")
    layers = tower.layer_tokens(torch.randn(1, 3, 32, 32))
    assert [n for n, _, _ in layers] == ["layer 0", "layer 1", "layer 2"] and {p for _, _, p in layers} == {5}

    def plant(module, args, output):  # one patch of every image 30x the others, from layer 1 on
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, 5 + 3] *= 30

    tower.model.encoder.layer[0].register_forward_hook(plant)
    report = artifact_report(tower, torch.randn(5, 3, 32, 32).split(2), factor=4.0)
    assert list(report) == ["layer 0", "layer 1", "layer 2", "output"]
    assert report["layer 0"]["outlier_share"] < 1 / 16 and report["layer 1"]["outlier_share"] >= 1 / 16
    assert report["layer 1"]["max_ratio"] > 4 and report["layer 1"]["prefix_ratio"] is not None
    assert report["output"]["prefix_ratio"] is None  # patch: the connector gets no prefix token


def test_the_cnn_tower_reports_every_block_and_its_head():
    tower = EfficientNetLiteTower(weights=None, image_size=64).eval()
    report = artifact_report(tower, [torch.randn(2, 3, 64, 64)], factor=4.0)
    names = list(report)
    assert names[0] == "block 0" and names[-2:] == ["head", "output"] and len(names) == len(tower.model._blocks) + 2
    assert report["head"] == report["output"]  # the head's map is what forward turns into tokens


def test_norm_ratios_divide_by_the_lower_middle_norm_of_an_even_count():
    """``norm_ratios``: the median of an even number of patch norms is torch.median's lower middle value."""
    import torch

    from alignlm.models.artifacts import norm_ratios

    tokens = torch.zeros(1, 1 + 4, 2)
    tokens[0, :, 0] = torch.tensor([6.0, 1.0, 2.0, 3.0, 4.0])  # a prefix, then patch norms 1..4
    patches, prefix = norm_ratios(tokens, 1)
    torch.testing.assert_close(patches[0], torch.tensor([0.5, 1.0, 1.5, 2.0]))
    torch.testing.assert_close(prefix[0], torch.tensor([3.0]))


def test_the_artifact_probe_reports_the_share_of_patches_not_of_images():
    """``artifact_report``: ``outlier_share`` is outliers over patch tokens (one in 16 here), ``max_ratio`` a mean
    over images."""
    import torch
    from torch import nn

    class Tower(nn.Module):
        num_prefix_tokens = 0

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x):
            tokens = torch.ones(x.shape[0], 16, 4) * self.w
            tokens[:, 3] *= 10  # one outlier patch per image
            return tokens

        def layer_tokens(self, x):
            return [("layer 0", self(x), 0)]

    from alignlm.models.artifacts import artifact_report

    report = artifact_report(Tower(), [torch.zeros(2, 3, 4, 4), torch.zeros(1, 3, 4, 4)], factor=4.0)
    assert report["output"]["outlier_share"] == pytest.approx(1 / 16)
    assert report["layer 0"]["max_ratio"] == pytest.approx(10.0) and report["output"]["prefix_ratio"] is None
