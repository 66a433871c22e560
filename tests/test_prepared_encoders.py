"""The encoders behind the prepare steps: the offline dual encoder a step fits (`fit`: AlignGPT's levels, ReVision's
encoder) is kept only while it was fitted with the step's knobs on the data as it is now, and ReVision's embedding
shards are known by the encoder's weights, not its name, and follow any change of the item lists."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from alignlm.config import ConfigError
from alignlm.methods import provenance
from alignlm.methods.aligngpt.levels import LevelLabels, ensure_levels
from alignlm.methods.provenance import encoder_identity
from alignlm.methods.revision.prepare import ensure_embeddings, ensure_encoder, ensure_realign
from alignlm.methods.revision.realign import ReAlignStats, fit
from alignlm.methods.revision.shards import list_shards
from alignlm.models.encoder_fit import fit_encoder
from alignlm.models.encoders import MANIFEST, OfflineDualEncoder
from tests.conftest import write_colour_set

PROVENANCE = "provenance"  # the manifest's record of how a folder was fitted
FIT = {"dim": 16, "image_size": 32, "epochs": 1, "batch_size": 8, "seed": 0, "device": "cpu"}


@pytest.fixture
def small_set(tmp_path) -> dict[str, Path]:
    """An 8-record colour set of this test's own: the tests edit its files."""
    return write_colour_set(tmp_path / "data", n=8)


@pytest.fixture
def fits(monkeypatch) -> list[Path]:
    """The folders fits wrote, as they write them (``OfflineDualEncoder.save``, twice a fit: before and after its
    held-out evaluation): a count, where file times may be too coarse to tell a rewrite."""
    saved, save = [], OfflineDualEncoder.save

    def counted(self, folder, report=None):
        saved.append(Path(folder))
        return save(self, folder, report)

    monkeypatch.setattr(OfflineDualEncoder, "save", counted)
    return saved


# ------------------------------------------------------------------------------------------- the fitted encoder


def test_a_fitted_encoder_is_kept_while_current_and_another_fit_knob_is_refused_naming_it(small_set, tmp_path, fits):
    """revision.fit fitted the encoder only when its folder was missing: a rerun asking for dim=64 and seed=1 kept
    the dim=16 encoder silently, and everything derived from it followed the old one."""
    enc = tmp_path / "dual_encoder"
    fit_knobs = {"train": [str(small_set["pretrain"])], **FIT}
    ensure_encoder(str(enc), fit_knobs)
    recorded = json.loads((enc / MANIFEST).read_text())[PROVENANCE]
    assert recorded["knobs"]["dim"] == 16 and set(recorded["inputs"]) == {"train", "images"}
    done = len(fits)
    ensure_encoder(str(enc), {**fit_knobs, "lr": 1e-3, "held_out": [], "device": "cpu"})  # defaults spelled out
    assert len(fits) == done
    with pytest.raises(
        ValueError, match=r"dual_encoder was written with revision.fit.dim=16, but the revision_encoder"
    ):
        ensure_encoder(str(enc), {**fit_knobs, "dim": 64})
    with pytest.raises(ValueError, match=r"revision.fit.seed=0, but .* asks for revision.fit.seed=1"):
        ensure_encoder(str(enc), {**fit_knobs, "seed": 1})
    assert len(fits) == done
    with pytest.raises(ValueError, match=r"revision.fit has a knob .* does not take.*'epoch'"):
        ensure_encoder(str(enc), {**fit_knobs, "epoch": 3})


def test_an_encoder_fitted_on_data_regenerated_since_is_fitted_again_with_a_warning(
    small_set, tmp_path, fits, alignlm_log
):
    """The pipeline regenerates an offline set under another seed: same file names, other captions and images. The
    encoder fitted on the old data was kept."""
    enc = tmp_path / "dual_encoder"
    fit_knobs = {"train": [str(small_set["pretrain"])], **FIT}
    ensure_encoder(str(enc), fit_knobs)
    before = json.loads((enc / MANIFEST).read_text())[PROVENANCE]["inputs"]
    records = json.loads(small_set["pretrain"].read_text())
    for rec in records:
        rec["conversations"][1]["value"] = "Another caption."
    small_set["pretrain"].write_text(json.dumps(records))
    ensure_encoder(str(enc), fit_knobs)
    after = json.loads((enc / MANIFEST).read_text())[PROVENANCE]["inputs"]
    assert after["train"] != before["train"] and after["images"] == before["images"]
    assert "was fitted on other train" in alignlm_log.text and "fitting it again" in alignlm_log.text

    done = len(fits)  # an image regenerated in place, under its name
    image = small_set["pretrain"].parent / "images" / "3.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    ensure_encoder(str(enc), fit_knobs)
    assert len(fits) > done
    assert json.loads((enc / MANIFEST).read_text())[PROVENANCE]["inputs"]["images"] != after["images"]


def _unrecorded_folder(enc: Path, train: Path, **knobs) -> dict[str, bytes]:
    """A folder as fits wrote it before folders recorded their fit (their manifest without its provenance), and its
    files' bytes."""
    fit_encoder([str(train)], enc, **{**FIT, **knobs})
    manifest = json.loads((enc / MANIFEST).read_text())
    del manifest[PROVENANCE]
    (enc / MANIFEST).write_text(json.dumps(manifest))
    return {p.name: p.read_bytes() for p in enc.iterdir()}


def test_a_folder_fitted_before_folders_recorded_their_fit_with_other_knobs_is_refused_untouched(small_set, tmp_path):
    """A dim=8 encoder fitted before folders recorded their fit, named by a step whose fit asks for dim=16: it was
    fitted again in place with a warning, the user's encoder overwritten (heads and manifest, dim 8 -> 16)."""
    enc = tmp_path / "dual_encoder"
    kept = _unrecorded_folder(enc, small_set["pretrain"], dim=8)
    fit_knobs = {"train": [str(small_set["pretrain"])], **FIT}
    with pytest.raises(
        ConfigError,
        match=r"dual_encoder holds a dual encoder fitted with revision.fit.dim=8 .* asks for revision.fit.dim=16; "
        r".*point revision.encoder at another folder .* or set revision.fit: null",
    ):
        ensure_encoder(str(enc), fit_knobs)
    with pytest.raises(ConfigError, match=r"revision.fit.temperature=None .* asks for revision.fit.temperature=0.05"):
        ensure_encoder(str(enc), {**fit_knobs, "dim": 8, "temperature": 0.05})
    assert {p.name: p.read_bytes() for p in enc.iterdir()} == kept


def test_a_folder_fitted_before_folders_recorded_their_fit_with_the_same_knobs_is_used_as_it_is(
    small_set, tmp_path, monkeypatch, alignlm_log
):
    """The same folder named by a step whose fit gives the knobs its manifest records: used as it is, with one
    warning that what it was fitted on cannot be checked, not fitted again (it was, as a file recording nothing)."""
    enc = tmp_path / "dual_encoder"
    kept = _unrecorded_folder(enc, small_set["pretrain"], temperature=0.05)
    monkeypatch.setattr(provenance, "fit_encoder", lambda *a, **k: pytest.fail("the folder was fitted again"))
    ensure_encoder(str(enc), {"train": [str(small_set["pretrain"])], **FIT, "temperature": 0.05})
    assert {p.name: p.read_bytes() for p in enc.iterdir()} == kept
    # each record once: the handler sits on the alignlm logger and, under pytest, on the root it propagates to
    warnings = [r.getMessage() for r in {id(r): r for r in alignlm_log.records}.values()]
    assert len(warnings) == 1
    assert "records nothing of how it was fitted" in warnings[0] and "used as it is, not fitted again" in warnings[0]
    assert "provenance is unknown" in warnings[0] and "(revision.fit.train)" in warnings[0]
    assert "name, dim, image_size, temperature match revision.fit" in warnings[0]


def test_the_levels_step_refits_its_encoder_on_regenerated_data_and_refuses_other_fit_knobs(small_set, tmp_path, fits):
    """aligngpt_levels.fit had the same gap: the levels of a regenerated set were scored by the old encoder."""
    enc, out = tmp_path / "dual_encoder", tmp_path / "levels.json"
    data = [str(small_set["pretrain"])]
    node = {"out": out, "data": data, "encoder": str(enc), "num_levels": 2, "device": "cpu"}
    fit_knobs = {"train": data, **FIT}
    ensure_levels(**node, fit=fit_knobs)
    done = len(fits)
    with pytest.raises(ValueError, match=r"aligngpt_levels.fit.epochs=1, but the aligngpt_levels step asks for "):
        ensure_levels(**node, fit={**fit_knobs, "epochs": 2})
    records = json.loads(small_set["pretrain"].read_text())
    for rec in records:
        rec["conversations"][1]["value"] = "A square."
    small_set["pretrain"].write_text(json.dumps(records))
    ensure_levels(**node, fit=fit_knobs)
    assert len(fits) > done
    assert LevelLabels(out).provenance["inputs"]["encoder"] == encoder_identity(str(enc))  # scored by the refit


# ------------------------------------------------------------------------------------------- embedding shards


def _halves(colour_set: dict[str, Path], root: Path) -> tuple[Path, Path]:
    """The colour set's captions split in two files of 16 records, its images shared."""
    records = json.loads(colour_set["pretrain"].read_text())
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").symlink_to(colour_set["pretrain"].parent / "images", target_is_directory=True)
    first, second = root / "first.json", root / "second.json"
    first.write_text(json.dumps(records[:16]))
    second.write_text(json.dumps(records[16:32]))
    return first, second


def test_an_item_list_narrowed_inside_a_shard_is_embedded_again(tiny_clip, colour_set, tmp_path, alignlm_log):
    """revision.images narrowed from two sets to one with the default shard_size: the one shard held other ids, and
    the step refused, asking for a --out folder the prepare step does not have."""
    first, second = _halves(colour_set, tmp_path)
    emb = tmp_path / "emb"
    node = {"encoder": str(tiny_clip), "embeddings": str(emb), "texts": [str(first)], "device": "cpu"}
    ensure_embeddings(**node, images=[str(first), str(second)])
    ensure_realign(str(emb), str(emb / "realign.safetensors"))
    assert ReAlignStats.load(emb / "realign.safetensors").n_image == 32
    ensure_embeddings(**node, images=[str(first)])
    ensure_realign(str(emb), str(emb / "realign.safetensors"))
    assert "holds other items than this item list puts there (32 ids, now 16" in alignlm_log.text
    assert [s.ids for s in list_shards(emb / "images")] == [[f"images/{i}.png" for i in range(16)]]
    stats = ReAlignStats.load(emb / "realign.safetensors")
    assert stats.n_image == 16
    torch.testing.assert_close(stats.mu_x, fit(emb / "images", emb / "texts").mu_x)


def test_the_same_encoder_named_another_way_keeps_its_shards(tiny_clip, colour_set, tmp_path, monkeypatch):
    """The same CLIP folder named relatively after absolutely: the shards' encoder was the path as spelled, and the
    step refused with a message naming one encoder twice. Shards of the same weights are kept, not embedded again,
    and relabelled, so the folder names one encoder and ReAlign (which refuses shards of two names) fits on it after
    shards of the new name join them."""
    from alignlm.methods.revision import embed
    from alignlm.models.encoders import HFDualEncoder

    first, second = _halves(colour_set, tmp_path)
    shutil.copytree(tiny_clip, tmp_path / "clip")
    emb = tmp_path / "emb"
    node = {"embeddings": str(emb), "texts": [str(first)], "shard_size": 8, "device": "cpu"}
    ensure_embeddings(encoder=str(tmp_path / "clip"), images=[str(first)], **node)
    ensure_realign(str(emb), str(emb / "realign.safetensors"))
    rows = {s.path: s.matrix().copy() for m in ("images", "texts") for s in list_shards(emb / m)}
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(embed, "decoded_batches", lambda *a, **k: pytest.fail("an image shard was embedded again"))
        m.setattr(HFDualEncoder, "encode_texts", lambda *a, **k: pytest.fail("a text shard was embedded again"))
        ensure_embeddings(encoder="clip", images=[str(first)], **node)
    shards = [s for m in ("images", "texts") for s in list_shards(emb / m)]
    assert {s.encoder for s in shards} == {"clip"} and {s.path for s in shards} == set(rows)
    for shard in shards:
        assert (shard.matrix() == rows[shard.path]).all()
    ensure_embeddings(encoder="clip", images=[str(first), str(second)], **node)  # two more image shards
    ensure_realign(str(emb), str(emb / "realign.safetensors"))
    stats = ReAlignStats.load(emb / "realign.safetensors")
    assert stats.n_image == 32 and stats.encoder == "clip"


def test_a_shard_of_another_encoder_is_refused_naming_both_and_the_folder_knob(tiny_clip, colour_set, tmp_path):
    """Another encoder (other weights under another name) is still refused, the folder untouched, with a message that
    tells the two apart and names the recipe's folder knob as well as the command's flag."""
    from transformers import CLIPModel

    first, _ = _halves(colour_set, tmp_path)
    other = tmp_path / "other_clip"
    shutil.copytree(tiny_clip, other)
    model = CLIPModel.from_pretrained(other)
    with torch.no_grad():
        model.visual_projection.weight.mul_(2)
    model.save_pretrained(other)
    emb = tmp_path / "emb"
    node = {"embeddings": str(emb), "images": [str(first)], "texts": [str(first)], "device": "cpu"}
    ensure_embeddings(encoder=str(tiny_clip), **node)
    kept = {p: p.stat().st_mtime_ns for p in emb.rglob("shard_*")}
    with pytest.raises(
        ValueError, match=r"holds embeddings of another encoder: .*tiny_clip.* this run's is .*other_clip"
    ):
        ensure_embeddings(encoder=str(other), **node)
    with pytest.raises(ValueError, match=r"revision.embeddings\) or delete this one"):
        ensure_embeddings(encoder=str(other), **node)
    assert {p: p.stat().st_mtime_ns for p in emb.rglob("shard_*")} == kept
