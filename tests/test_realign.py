"""ReAlign (docs/methods.md, ReAlign and ReVision): the statistics, the mapping's properties, shard streaming and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignlm.commands import main
from alignlm.methods.revision.realign import CentroidSum, Moments, ReAlignStats, apply, covariance_map, fit, moments
from alignlm.methods.revision.shards import list_shards, shard_metadata, write_shard

DIM = 32


def cone(n: int, centre: torch.Tensor, spread: float, seed: int) -> torch.Tensor:
    """Float32 embeddings clustered around ``centre`` (a modality's cone), with arbitrary lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.rand(n, 1, generator=g) * 5 + 0.5
    return ((centre + spread * torch.randn(n, DIM, generator=g)) * lengths).float()


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    image_dir, text_dir = torch.randn(DIM, generator=g), torch.randn(DIM, generator=g)
    images = cone(700, F.normalize(image_dir, dim=0), 0.08, 1)
    texts = cone(500, F.normalize(text_dir, dim=0), 0.15, 2)
    return images, texts


def write_set(root, x: torch.Tensor, sizes: list[int], suffix: str = ".npy", encoder: str = "toy"):
    root.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, size in enumerate(sizes):
        part = x[start : start + size]
        meta = (
            shard_metadata([f"r{start + j}" for j in range(size)], encoder, "x") if suffix == ".safetensors" else None
        )
        write_shard(root / f"shard_{i:03d}{suffix}", part, meta)
        start += size
    assert start == len(x)
    return root


def fit_tensors(tmp_path, images, texts, **kw) -> ReAlignStats:
    return fit(
        write_set(tmp_path / "img", images, [len(images)]), write_set(tmp_path / "txt", texts, [len(texts)]), **kw
    )


def test_identity_when_text_and_image_statistics_are_equal(tmp_path, pair):
    images, _ = pair
    stats = fit_tensors(tmp_path, images, images)
    # exact up to the 1e-10 guard in s = sqrt(T_x / (T_y + 1e-10))
    assert stats.s == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(stats.mu1, stats.mu_x, rtol=0, atol=1e-9)
    torch.testing.assert_close(stats(images), F.normalize(images.double(), dim=-1), rtol=0, atol=1e-9)


def test_statistics_match_the_closed_form_in_float64(tmp_path, pair):
    images, texts = pair
    stats = fit_tensors(tmp_path, images, texts)
    x, y = F.normalize(images.double(), dim=-1), F.normalize(texts.double(), dim=-1)
    mu_x, mu_y = x.mean(0), y.mean(0)
    t_x, t_y = ((x - mu_x) ** 2).sum(1).mean().item(), ((y - mu_y) ** 2).sum(1).mean().item()
    assert stats.T_x == pytest.approx(t_x, rel=1e-12) and stats.T_y == pytest.approx(t_y, rel=1e-12)
    assert stats.s == pytest.approx((t_x / (t_y + 1e-10)) ** 0.5, rel=1e-12)
    y1 = F.normalize((y - mu_y) * stats.s + mu_x, dim=-1)
    torch.testing.assert_close(stats.mu1, y1.mean(0), rtol=0, atol=1e-13)
    expected = F.normalize(y1 - y1.mean(0) + mu_x, dim=-1)
    torch.testing.assert_close(stats(texts), expected, rtol=0, atol=1e-13)
    for v in (stats.mu_x, stats.mu_y, stats.mu1, stats(texts)):
        assert v.dtype == torch.float64
    assert (stats.n_image, stats.n_text, stats.encoder) == (700, 500, "unknown")


def test_centroid_gap_closes_and_outputs_are_unit_and_finite(tmp_path, pair):
    images, texts = pair
    stats = fit_tensors(tmp_path, images, texts)
    y2 = stats(texts)
    before = (stats.mu_y - stats.mu_x).norm().item()
    after = (y2.mean(0) - stats.mu_x).norm().item()
    assert before > 0.5 and after < 1e-2 * before
    assert torch.isfinite(y2).all()
    torch.testing.assert_close(y2.norm(dim=-1), torch.ones(len(y2), dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_shard_merge_equals_one_pass(tmp_path, pair, suffix):
    images, texts = pair
    one = fit(write_set(tmp_path / "i1", images, [700], suffix), write_set(tmp_path / "t1", texts, [500], suffix))
    many = fit(
        write_set(tmp_path / "i2", images, [3, 250, 1, 446], suffix),
        write_set(tmp_path / "t2", texts, [499, 1], suffix),
        rows=64,
    )
    for name in ("mu_x", "mu_y", "mu1"):
        torch.testing.assert_close(getattr(many, name), getattr(one, name), rtol=0, atol=1e-14)
    for name in ("s", "T_x", "T_y"):
        assert getattr(many, name) == pytest.approx(getattr(one, name), rel=1e-13)
    # records from separate "ranks", merged in any grouping, give the one-pass moments too
    shards = list_shards(tmp_path / "i2")
    parts = [moments([s]) for s in shards]
    merged = (parts[0].merge(parts[2])).merge(parts[1].merge(parts[3]))
    whole = moments(shards)
    assert merged.count == whole.count == 700
    torch.testing.assert_close(merged.mean, whole.mean, rtol=0, atol=1e-14)
    assert merged.trace == pytest.approx(whole.trace, rel=1e-13)
    sums = CentroidSum.of(torch.ones(2, DIM, dtype=torch.float64)).merge(CentroidSum.empty(DIM))
    assert sums.count == 2 and torch.equal(sums.mean, torch.ones(DIM, dtype=torch.float64))


def test_moments_stay_accurate_for_a_tight_cone():
    """Chan's merge keeps T when the spread is tiny next to the centroid (the shortcut formula cancels)."""
    x = F.normalize(
        torch.ones(4000, DIM, dtype=torch.float64) + 1e-6 * torch.randn(4000, DIM, dtype=torch.float64), dim=-1
    )
    exact = ((x - x.mean(0)) ** 2).sum(1).mean().item()
    total = Moments.empty(DIM)
    for part in x.split(333):
        total = total.merge(Moments.of(part.clone()))
    assert total.trace == pytest.approx(exact, rel=1e-6)


def test_zero_or_non_finite_rows_are_reported_with_their_place(tmp_path, pair):
    images, texts = pair
    texts = texts.clone()
    texts[17] = float("nan")
    with pytest.raises(ValueError, match="1 embeddings are not finite: not written"):
        write_set(tmp_path / "refused", texts, [len(texts)])  # alignlm never writes such a shard
    (tmp_path / "txt").mkdir()
    np.save(tmp_path / "txt" / "shard_000.npy", texts.numpy())  # another tool's
    with pytest.raises(ValueError, match=r"shard_000.npy: row 17 "):
        fit(write_set(tmp_path / "img", images, [len(images)]), tmp_path / "txt")
    (tmp_path / "int").mkdir()  # another tool's whole numbers were read as embeddings
    np.save(tmp_path / "int" / "shard_000.npy", (texts.nan_to_num() * 100).int().numpy())
    with pytest.raises(ValueError, match=r"shard_000.npy: embeddings of dtype int32 are not supported"):
        fit(tmp_path / "img", tmp_path / "int")


def test_cli_fit_then_apply_writes_stats_and_aligned_shards(tmp_path, pair, capsys):
    images, texts = pair
    write_set(tmp_path / "img", images, [400, 300], ".safetensors", encoder="toy-clip")
    write_set(tmp_path / "txt", texts, [200, 300], ".safetensors", encoder="toy-clip")
    stats_path = tmp_path / "stats.safetensors"
    assert (
        main(
            [
                "realign",
                "fit",
                "--images",
                str(tmp_path / "img"),
                "--texts",
                str(tmp_path / "txt"),
                "--out",
                str(stats_path),
                "--chunk-rows",
                "128",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["encoder"] == "toy-clip" and (summary["n_image"], summary["n_text"]) == (700, 500)
    stats = ReAlignStats.load(stats_path)
    assert stats.mu_x.dtype == torch.float64 and stats.encoder == "toy-clip"
    assert (
        main(
            [
                "realign",
                "apply",
                "--stats",
                str(stats_path),
                "--texts",
                str(tmp_path / "txt"),
                "--out",
                str(tmp_path / "aligned"),
            ]
        )
        == 0
    )
    out = list_shards(tmp_path / "aligned")
    assert [s.rows for s in out] == [200, 300] and out[1].ids[0] == "r200" and out[0].encoder == "toy-clip"
    got = torch.cat([torch.from_numpy(np.concatenate(list(s.chunks(1000)))) for s in out])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), stats(texts), rtol=0, atol=1e-6)


def test_shards_from_different_encoders_are_refused(tmp_path, pair):
    images, texts = pair
    img = write_set(tmp_path / "img", images, [700], ".safetensors", encoder="clip")
    txt = write_set(tmp_path / "txt", texts, [500], ".safetensors", encoder="siglip")
    with pytest.raises(ValueError, match="different encoders"):
        fit(img, txt)


def test_apply_keeps_npy_format(tmp_path, pair):
    images, texts = pair
    stats = fit_tensors(tmp_path, images, texts)
    (path,) = apply(stats, tmp_path / "txt", tmp_path / "out", rows=100)
    assert path.suffix == ".npy"
    np.testing.assert_allclose(np.load(path), stats(texts).float().numpy(), atol=1e-7)


# --------------------------------------------------------------- Anchor + Covariance (extension, opt-in)


def test_covariance_map_is_the_trace_scale_for_isotropic_sets():
    n, mean = 10, torch.zeros(DIM, dtype=torch.float64)
    image = Moments(n, mean, 0.0, n * 0.04 * torch.eye(DIM, dtype=torch.float64))
    text = Moments(n, mean, 0.0, n * 0.01 * torch.eye(DIM, dtype=torch.float64))
    text.m2 = text.comoment.trace().item()
    torch.testing.assert_close(covariance_map(image, text, 0.0), 2.0 * torch.eye(DIM, dtype=torch.float64))


def test_covariance_step_gives_text_the_image_covariance(tmp_path, pair):
    images, texts = pair
    stats = fit_tensors(tmp_path, images, texts, covariance=0.0)
    y = F.normalize(texts.double(), dim=-1)
    x = F.normalize(images.double(), dim=-1)
    moved = (y - stats.mu_y) @ stats.A.T  # the affine part of Anchor + Covariance, before normalising
    torch.testing.assert_close(torch.cov(moved.T, correction=0), torch.cov(x.T, correction=0), rtol=0, atol=1e-10)
    same = fit_tensors(tmp_path / "same", images, images, covariance=0.0)
    torch.testing.assert_close(same(images), x, rtol=0, atol=1e-8)  # equal statistics: identity
    out = stats(texts)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(out), dtype=torch.float64), rtol=0, atol=1e-12)
    assert (out.mean(0) - stats.mu_x).norm() < 0.2 * (stats.mu_y - stats.mu_x).norm()


def test_covariance_statistics_merge_across_shards_and_survive_save_load(tmp_path, pair):
    images, texts = pair
    one = fit(write_set(tmp_path / "i1", images, [700]), write_set(tmp_path / "t1", texts, [500]), covariance=0.5)
    many = fit(
        write_set(tmp_path / "i2", images, [3, 250, 1, 446]),
        write_set(tmp_path / "t2", texts, [499, 1]),
        rows=64,
        covariance=0.5,
    )
    torch.testing.assert_close(many.A, one.A, rtol=0, atol=1e-10)
    torch.testing.assert_close(many.mu1, one.mu1, rtol=0, atol=1e-12)
    back = ReAlignStats.load(one.save(tmp_path / "stats.safetensors"))
    assert back.covariance == 0.5 and back.A.dtype == torch.float64
    torch.testing.assert_close(back(texts), one(texts), rtol=0, atol=0)
    assert ReAlignStats.load(fit_tensors(tmp_path / "t", images, texts).save(tmp_path / "t.safetensors")).A is None


def test_a_low_rank_text_covariance_needs_shrinkage(tmp_path, pair):
    images, texts = pair
    few = texts[torch.arange(len(texts)) % 5]  # five distinct captions: rank 4 < DIM
    with pytest.raises(ValueError, match="rank 4 < 32.*shrinkage"):
        fit_tensors(tmp_path, images, few, covariance=0.0)
    assert torch.isfinite(fit_tensors(tmp_path / "ok", images, few, covariance=1.0)(few)).all()
    with pytest.raises(ValueError, match=">= 0"):
        fit_tensors(tmp_path / "neg", images, texts, covariance=-1.0)


def test_cli_fit_takes_the_covariance_shrinkage(tmp_path, pair, capsys):
    images, texts = pair
    write_set(tmp_path / "img", images, [700])
    write_set(tmp_path / "txt", texts, [500])
    assert (
        main(
            [
                "realign",
                "fit",
                "--images",
                str(tmp_path / "img"),
                "--texts",
                str(tmp_path / "txt"),
                "--out",
                str(tmp_path / "s.safetensors"),
                "--covariance",
                "1.0",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["covariance"] == 1.0
    assert ReAlignStats.load(tmp_path / "s.safetensors").A.shape == (DIM, DIM)


def test_fitting_under_an_initialised_process_group_reads_every_shard_and_joins_no_collective(
    tmp_path, pair, monkeypatch
):
    """The pipeline's prepare step runs on the main process alone while the other ranks wait: a fit that took its
    rank's share of the shards and gathered the others' records waited for ranks that never came (until the timeout)."""
    from alignlm.methods.revision.prepare import ensure_realign

    images, texts = pair
    write_set(tmp_path / "emb" / "images", images, [300, 200, 200], ".safetensors")
    write_set(tmp_path / "emb" / "texts", texts, [250, 250], ".safetensors")
    alone = fit(tmp_path / "emb" / "images", tmp_path / "emb" / "texts")

    def collective(*args, **kwargs):
        raise AssertionError("a collective that the waiting ranks never join")

    dist = torch.distributed
    for name, value in (("is_initialized", lambda: True), ("get_world_size", lambda *a: 2), ("get_rank", lambda *a: 0)):
        monkeypatch.setattr(dist, name, value)
    for name in ("all_gather_object", "all_reduce", "all_gather", "broadcast_object_list", "barrier"):
        monkeypatch.setattr(dist, name, collective)
    ensure_realign(str(tmp_path / "emb"), str(tmp_path / "realign.safetensors"))
    stats = ReAlignStats.load(tmp_path / "realign.safetensors")
    assert (stats.n_image, stats.n_text) == (700, 500)
    torch.testing.assert_close(stats.mu1, alone.mu1)


@pytest.mark.parametrize("command", ["fit", "apply"])
def test_the_cli_refuses_a_launch_of_several_processes(tmp_path, pair, monkeypatch, command):
    """Under torchrun every rank read every shard and all wrote the same file through one temporary name."""
    images, texts = pair
    write_set(tmp_path / "img", images, [700], ".safetensors")
    write_set(tmp_path / "txt", texts, [500], ".safetensors")
    fit(tmp_path / "img", tmp_path / "txt").save(tmp_path / "stats.safetensors")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = {
        "fit": ["--images", str(tmp_path / "img"), "--out", str(tmp_path / "out.safetensors")],
        "apply": ["--stats", str(tmp_path / "stats.safetensors"), "--out", str(tmp_path / "out")],
    }[command]
    with pytest.raises(SystemExit, match=rf"alignlm realign {command} runs in one process, but it was launched as 2"):
        main(["realign", command, "--texts", str(tmp_path / "txt"), *args])
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "out").exists()


def test_the_covariance_step_applies_the_map_transposed_to_the_rows(tmp_path):
    """Anchor + Covariance is y1 = norm((y - mu_y) A^T + mu_x), A not symmetric: the test of the covariance map
    computed ``@ A.T`` itself, so ``anchor_`` applying ``A`` went unseen."""
    g = torch.Generator().manual_seed(0)
    images = cone(300, F.normalize(torch.randn(32, generator=g), dim=0), 0.08, 1)
    texts = cone(200, F.normalize(torch.randn(32, generator=g), dim=0), 0.15, 2)
    stats = fit_tensors(tmp_path, images, texts, covariance=0.0)
    assert (stats.A - stats.A.T).abs().max() > 1e-3  # not symmetric: the orientation matters
    y = F.normalize(texts.double(), dim=-1)
    want = F.normalize((y - stats.mu_y) @ stats.A.T + stats.mu_x, dim=-1)
    torch.testing.assert_close(stats.anchor_(y.clone()), want, rtol=0, atol=1e-10)
