"""``alignlm embed`` with a tiny random CLIPModel saved by the test (no hub): shards, ids, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from alignlm.commands import main
from alignlm.data.records import DataError
from alignlm.methods.revision.embed import collect_images, collect_texts, embed_items
from alignlm.methods.revision.shards import list_shards
from alignlm.models.encoders import HFDualEncoder


def test_collect_from_llava_json_and_text_files(tmp_path, colour_set):
    images = collect_images(colour_set["pretrain"])
    assert len(images) == 48 and images[0][0] == "images/0.png" and images[0][1].exists()
    texts = collect_texts(colour_set["pretrain"])
    assert texts[0] == ("p0", "A red square.")
    (tmp_path / "caps.txt").write_text("a cat\n\na dog\n")
    assert collect_texts(tmp_path / "caps.txt") == [("caps:0", "a cat"), ("caps:2", "a dog")]
    assert [i for i, _ in collect_images(colour_set["pretrain"].parent / "images")][:2] == ["0.png", "1.png"]
    # a caption that is not text is a data error (exit 65) naming the record, not a record without a caption
    (tmp_path / "null.json").write_text('[{"id": "b", "conversations": [{"from": "gpt", "value": null}]}]')
    with pytest.raises(DataError, match=r"null.json record b: no caption text"):
        collect_texts(tmp_path / "null.json")


def test_embed_writes_id_shards_matching_the_model_and_resumes(tmp_path, tiny_clip, colour_set, capsys):
    out = tmp_path / "emb"
    args = [
        "embed",
        "--encoder",
        str(tiny_clip),
        "--encoder-name",
        "tiny-clip",
        "--images",
        str(colour_set["pretrain"]),
        "--texts",
        str(colour_set["pretrain"]),
        "--out",
        str(out),
        "--shard-size",
        "20",
        "--batch-size",
        "7",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == {"items": 48, "shards": 3, "folder": str(out / "images")}
    images, texts = list_shards(out / "images"), list_shards(out / "texts")
    assert [s.rows for s in images] == [20, 20, 8] and [s.dim for s in texts] == [16] * 3
    assert texts[2].ids[-1] == "p47" and images[0].encoder == "tiny-clip"

    # the shards hold what the model gives for those items, whatever the batching
    encoder = HFDualEncoder(str(tiny_clip))
    x = np.concatenate(list(texts[1].chunks(100)))
    expected = encoder.encode_texts([t for _, t in collect_texts(colour_set["pretrain"])[20:40]])
    np.testing.assert_allclose(x, expected.numpy(), atol=1e-5)

    # a rerun skips finished shards and redoes only a missing one
    stamp = images[0].path.stat().st_mtime_ns
    images[1].path.unlink()
    assert main(args) == 0
    assert images[0].path.stat().st_mtime_ns == stamp and images[1].path.exists()


def test_a_changed_input_is_not_mistaken_for_a_finished_shard(tmp_path, tiny_clip):
    encoder = HFDualEncoder(str(tiny_clip), name="tiny")
    """A shard of other items is embedded again (refused before, whenever a changed list did not end at a shard's
    boundary), never taken for finished."""
    embed_items(encoder, "texts", [("a", "red"), ("b", "blue")], tmp_path, progress=False)
    (path,) = embed_items(encoder, "texts", [("a", "red"), ("c", "green")], tmp_path, progress=False)
    assert list_shards([path])[0].ids == ["a", "c"]


def test_the_encoder_is_where_its_weights_are(tiny_clip):
    """An encoder inside a model (``DualEncoderTower``) moves with it: inputs go where the weights are now."""
    encoder = HFDualEncoder(str(tiny_clip))
    assert encoder.device.type == "cpu"
    assert encoder.to("meta").device.type == "meta"


def test_unknown_model_type_is_refused(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a supported dual encoder"):
        HFDualEncoder(str(tmp_path))


def test_images_are_read_as_rgb(tmp_path, tiny_clip):
    Image.new("L", (40, 20), 128).save(tmp_path / "grey.png")
    encoder = HFDualEncoder(str(tiny_clip), name="tiny")
    (path,) = embed_items(encoder, "images", collect_images(tmp_path), tmp_path / "o", progress=False)
    assert list_shards(path)[0].ids == ["grey.png"]


def test_shards_past_a_shorter_item_list_are_removed(tmp_path, tiny_clip):
    """A longer list's last shards stayed beside a shorter list's, and everything reading the folder (ReAlign's fit,
    the caption lookup) took their items for this list's."""
    encoder = HFDualEncoder(str(tiny_clip), name="tiny")
    items = [(f"t{i}", f"caption {i}") for i in range(6)]
    embed_items(encoder, "texts", items, tmp_path, shard_size=2, progress=False)
    assert len(list_shards(tmp_path / "texts")) == 3
    paths = embed_items(encoder, "texts", items[:4], tmp_path, shard_size=2, progress=False)
    assert [s.path for s in list_shards(tmp_path / "texts")] == paths
    assert [s.ids for s in list_shards(tmp_path / "texts")] == [["t0", "t1"], ["t2", "t3"]]


def test_captions_and_images_changed_under_the_same_ids_are_embedded_again(tmp_path, tiny_clip):
    """An offline set regenerated with other knobs keeps its ids: the old captions' and images' embeddings were
    served for the new ones."""
    encoder = HFDualEncoder(str(tiny_clip), name="tiny")
    embed_items(encoder, "texts", [("a", "a red square"), ("b", "a blue circle")], tmp_path, progress=False)
    (shard,) = embed_items(
        encoder, "texts", [("a", "two green lines"), ("b", "a blue circle")], tmp_path, progress=False
    )
    got = np.concatenate(list(list_shards(shard)[0].chunks(10)))
    np.testing.assert_allclose(got, encoder.encode_texts(["two green lines", "a blue circle"]).numpy(), atol=1e-5)

    folder = tmp_path / "pictures"
    folder.mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / "x.png")
    embed_items(encoder, "images", collect_images(folder), tmp_path, progress=False)
    Image.new("RGB", (48, 30), (0, 0, 255)).save(folder / "x.png")  # regenerated in place
    (shard,) = embed_items(encoder, "images", collect_images(folder), tmp_path, progress=False)
    got = np.concatenate(list(list_shards(shard)[0].chunks(10)))
    np.testing.assert_allclose(got, encoder.encode_images([Image.open(folder / "x.png")]).numpy(), atol=1e-5)


# ---- images read by data-loader workers (fix D3)


def test_embed_images_with_workers_writes_the_same_shards(tmp_path, tiny_clip, colour_set):
    """``num_workers`` processes read and preprocess the images (in order): the shards are those of the serial pass;
    an unreadable image still stops the pass, naming it."""
    from safetensors.torch import load_file

    encoder = HFDualEncoder(str(tiny_clip))
    items = collect_images(colour_set["pretrain"])[:9]
    serial = embed_items(encoder, "images", items, tmp_path / "a", shard_size=4, batch_size=3, num_workers=0)
    parallel = embed_items(encoder, "images", items, tmp_path / "b", shard_size=4, batch_size=3, num_workers=2)
    for x, y in zip(serial, parallel, strict=True):
        assert all((load_file(str(x))[k] == load_file(str(y))[k]).all() for k in load_file(str(x)))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        embed_items(encoder, "images", [*items[:2], ("x", broken)], tmp_path / "c", batch_size=2, num_workers=2)


def test_shards_that_recorded_the_weights_as_stored_are_kept_and_take_the_fingerprint_of_now(
    tmp_path, tiny_clip, colour_set, alignlm_log, monkeypatch
):
    """A shard written before the fingerprint took the weights at bf16's resolution holds the weights' fingerprint as
    stored: the same encoder, kept (nothing embedded again), and its record rewritten to this fingerprint, which the
    tower stored in bf16 under mixed precision matches (the old one only an fp32 tower did). In a folder that cannot
    be written (shared, read-only) it is kept as it is, with a warning: the rewrite had failed the prepare step."""
    from alignlm.methods.revision import embed
    from alignlm.methods.revision.shards import open_shard, write_shard
    from alignlm.models.encoders import weights_fingerprint

    encoder = HFDualEncoder(str(tiny_clip))
    items = collect_texts(colour_set["pretrain"])[:12]
    (path,) = embed_items(encoder, "texts", items, tmp_path, shard_size=20)
    shard = open_shard(path)
    before = weights_fingerprint(encoder, repr(encoder.image_spec))
    assert before != encoder.fingerprint()
    write_shard(path, np.array(shard.matrix()), {**shard.metadata, "encoder_fingerprint": before})
    with monkeypatch.context() as m:
        m.setattr(embed, "write_shard", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
        embed_items(encoder, "texts", items, tmp_path, shard_size=20)
    assert open_shard(path).encoder_fingerprint == before
    assert "kept as written, its encoder fingerprint of before" in alignlm_log.text
    embed_items(encoder, "texts", items, tmp_path, shard_size=20)
    again = open_shard(path)
    assert again.encoder_fingerprint == encoder.fingerprint()
    assert np.array_equal(np.array(again.matrix()), np.array(shard.matrix()))
    assert "embedding again" not in alignlm_log.text
