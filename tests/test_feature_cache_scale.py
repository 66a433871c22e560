"""The vision-feature cache at LLaVA-1.5 size (558k images): what filling holds in memory, and what a stage's start-up
costs per image, on tiny sets that show the per-image and per-shard counts."""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import compose, write_colour_set


def frozen(tiny_model):
    model = tiny_model()
    model.frozen_parts.add("vision")
    return model


def colour_dataset(model, data: Path):
    from alignlm.data.llava import LlavaDataset
    from alignlm.data.records import Source
    from alignlm.data.templates import get_template

    args = (model.tokenizer, get_template("plain"), model.image_spec, model.num_image_tokens)
    return LlavaDataset([Source(str(data))], *args)


def attach(model, data: Path, cache: Path, dataset=None):
    from accelerate import Accelerator

    from alignlm.training.feature_cache import attach_feature_cache

    dataset = colour_dataset(model, data) if dataset is None else dataset
    attach_feature_cache(model, dataset, True, cache, compose().model.vision, Accelerator(cpu=True))
    return dataset


def shards(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)


def test_filling_writes_the_features_and_index_it_always_wrote(tiny_model, tmp_path, monkeypatch):
    """The shard is gathered in one buffer now, not concatenated from the batches: the same bytes of features and the
    same index as the tower's batches concatenated (as filling did), an unreadable image left out as before."""
    from alignlm.data.feature_cache import file_stamp
    from alignlm.data.images import image_size
    from alignlm.data.records import DataError
    from alignlm.training import feature_cache

    def readable(dataset, batch):  # each image read alone; one that fails left out, as filling always did
        kept, sizes, pixels = [], [], []
        for p in batch:
            try:
                pixels.append(dataset.load_visuals([p])["pixel_values"])
            except DataError:
                continue
            kept.append(p)
            sizes.append(image_size(p))
        return kept, sizes, torch.cat(pixels)

    monkeypatch.setattr(feature_cache, "BATCH", 6)  # 20 images: three whole batches and a part
    colours = write_colour_set(tmp_path / "colours", n=20)
    (tmp_path / "colours" / "images" / "7.png").write_bytes(b"not a png")
    model = frozen(tiny_model)
    attach(model, colours["pretrain"], tmp_path / "cache")
    dataset = colour_dataset(model, colours["pretrain"])  # reads the images
    paths = sorted((tmp_path / "colours" / "images").glob("*.png"))
    expected, kept, sizes = [], [], []
    with torch.no_grad():
        for b in range(0, len(paths), 6):
            batch_kept, batch_sizes, pixels = readable(dataset, paths[b : b + 6])
            expected.append(model.vision.eval()(pixels))
            kept += batch_kept
            sizes += batch_sizes
    (shard,) = shards(tmp_path / "cache")
    with safe_open(str(shard), "pt") as f:
        meta, stored = f.metadata(), f.get_tensor("features")
    whole = torch.cat(expected)
    assert stored.dtype == whole.dtype and stored.shape == whole.shape and len(kept) == 19
    assert stored.contiguous().view(torch.uint8).numpy().tobytes() == whole.view(torch.uint8).numpy().tobytes()
    assert meta == {
        "ids": json.dumps([str(p.resolve()) for p in kept]),
        "stamps": json.dumps([list(file_stamp(p)) for p in kept]),
        "sizes": json.dumps([list(s) for s in sizes]),
        "folder": str(shard.parent.resolve()),
    }


def test_filling_holds_one_shard_not_its_batches_too(tiny_model, tmp_path, monkeypatch):
    """Filling kept every batch's features in a list, concatenated them (a second copy) and checked the whole shard's
    finiteness at once (2.4 times more in temporaries): 4.4 times a shard per rank at the peak, 21 GB at CLIP-L/336.
    While a shard is written now no batch's features are alive beside it, and the check goes a block at a time."""
    from alignlm.data import feature_cache as data_cache
    from alignlm.data.feature_cache import FeatureCache
    from alignlm.training import feature_cache

    monkeypatch.setattr(feature_cache, "BATCH", 4)
    monkeypatch.setattr(data_cache, "FINITE_ROWS", 4, raising=False)
    colours = write_colour_set(tmp_path / "colours", n=20)
    model = frozen(tiny_model)
    outputs: list[weakref.ref] = []
    model.vision.register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
    checked_rows: list[int] = []
    alive_at_write: list[int] = []
    write, isfinite = FeatureCache.write, torch.isfinite

    def counting_isfinite(tensor):
        checked_rows.append(len(tensor))
        return isfinite(tensor)

    def watched_write(self, *args, **kwargs):
        alive_at_write.append(sum(ref() is not None for ref in outputs))
        with monkeypatch.context() as inside:
            inside.setattr(torch, "isfinite", counting_isfinite)
            return write(self, *args, **kwargs)

    monkeypatch.setattr(FeatureCache, "write", watched_write)
    attach(model, colours["pretrain"], tmp_path / "cache")
    assert len(outputs) == 5 and alive_at_write == [0]
    assert checked_rows == []  # checked on the device as the batches came off the tower, not on the host here


def test_a_non_finite_batch_is_still_refused_and_nothing_is_written(tiny_model, tmp_path):
    from alignlm.data.records import DataError

    colours = write_colour_set(tmp_path / "colours", n=20)
    model = frozen(tiny_model)

    def poisoned(module, args, out):
        out = out.clone()
        out[-1, 0, 0] = float("nan")  # the last image of the last batch
        return out

    model.vision.register_forward_hook(poisoned)
    with pytest.raises(
        DataError, match=r"the tower's features of 20 images, e.g. .*/9\.png, are not finite: not cached"
    ):
        attach(model, colours["pretrain"], tmp_path / "cache")
    assert shards(tmp_path / "cache") == []


def test_keys_and_stamps_are_what_image_key_and_file_stamp_give(tmp_path, monkeypatch):
    """Start-up takes an image's key and stamp from one lstat and its folder's resolve: the keys of existing caches
    (resolved paths) and stamps (of the file a link names) stay what they were, whatever links are on the way."""
    from alignlm.data.feature_cache import file_stamp, image_key, keys_and_stamps

    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (real / "sub" / name).write_bytes(b"x" * 7)
    (tmp_path / "linked_dir").symlink_to(real / "sub")
    (real / "sub" / "link.png").symlink_to(real / "sub" / "b.png")
    (real / "sub" / "dangling.png").symlink_to(real / "gone.png")
    monkeypatch.chdir(real)
    paths = [
        real / "sub" / "a.png",
        tmp_path / "linked_dir" / "a.png",  # a linked folder
        real / "sub" / "link.png",  # a linked file: its key is the target's, its stamp the target's
        Path("sub/b.png"),  # relative to the working folder
        real / "sub" / ".." / "sub" / "b.png",
        tmp_path / "linked_dir" / ".." / "sub" / "a.png",  # .. after a link: the link's target's parent
        real / "sub" / "missing.png",
        real / "sub" / "dangling.png",
        real / "sub" / "..",
    ]
    assert list(keys_and_stamps(paths)) == [(p, image_key(p), file_stamp(p)) for p in paths]


def test_a_started_stage_looks_at_each_image_and_reads_each_shard_once(tiny_model, tmp_path, monkeypatch):
    """Start-up with a filled cache looked at each image three times (what is left to compute, the hook's check,
    each image's stored size), each a stat and a resolve of every folder on its path, and read the index again
    after filling: 86 s per rank at 558k images. Now one metadata call per image and one read of each shard."""
    from alignlm.data.feature_cache import FeatureCache

    colours = write_colour_set(tmp_path / "colours", n=20)
    model = frozen(tiny_model)
    attach(model, colours["pretrain"], tmp_path / "cache")  # fills it
    images = str(tmp_path / "colours")
    calls: list[str] = []
    real_stat, real_lstat, check = os.stat, os.lstat, FeatureCache._check
    checked: list[Path] = []

    def stat(path, *args, **kwargs):
        if os.fspath(path).startswith(images):
            calls.append(os.fspath(path))
        return real_stat(path, *args, **kwargs)

    def lstat(path, *args, **kwargs):
        if os.fspath(path).startswith(images):
            calls.append(os.fspath(path))
        return real_lstat(path, *args, **kwargs)

    def counted_check(self, shard):
        checked.append(shard)
        return check(self, shard)

    monkeypatch.setattr(FeatureCache, "_check", counted_check)
    dataset = colour_dataset(model, colours["pretrain"])
    with monkeypatch.context() as counting:
        counting.setattr(os, "stat", stat)
        counting.setattr(os, "lstat", lstat)
        attach(model, colours["pretrain"], tmp_path / "cache", dataset)
    on_images = [c for c in calls if c.endswith(".png")]
    assert len(on_images) == 20 and len(set(on_images)) == 20  # one look at each image
    assert len(calls) - len(on_images) <= 3  # their folders: resolved once
    assert checked == shards(tmp_path / "cache")  # the one shard, read once
    assert dataset[0]["image_embeds"] is not None


def test_a_changed_image_still_misses_the_cache(tiny_model, tmp_path):
    """An image regenerated in place (same size on disk, another modification time) is computed again at the next
    start-up, and one changed while the stage runs is refused by its samples, not served stale."""
    from PIL import Image

    from alignlm.data.images import load_rgb, preprocess
    from alignlm.data.records import DataError

    colours = write_colour_set(tmp_path / "colours", n=20)
    model = frozen(tiny_model)
    attach(model, colours["pretrain"], tmp_path / "cache")
    edited = tmp_path / "colours" / "images" / "3.png"
    before = edited.stat()
    with Image.open(edited) as im:
        Image.new("RGB", im.size, (1, 2, 3)).save(edited)
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    dataset = attach(model, colours["pretrain"], tmp_path / "cache")
    first, second = shards(tmp_path / "cache")
    with safe_open(str(second), "pt") as f:
        assert f.metadata()["ids"] == f'["{edited.resolve()}"]'  # only the changed image computed again
    with torch.no_grad():
        live = model.vision.eval()(preprocess(load_rgb(edited), model.image_spec, "pad")[None])[0]
    torch.testing.assert_close(dataset[3]["image_embeds"][0], live)
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))  # changed during the stage
    with pytest.raises(DataError, match="changed after the cache was filled"):
        dataset.visual_hook.load_visuals([edited])


def test_refresh_reads_only_the_shards_other_ranks_wrote(tmp_path, monkeypatch):
    """After the ranks fill their shares, each reads the others' new shards into the index it has, not the whole
    folder again, and finds their images there without looking at the files again."""
    from alignlm.data import feature_cache
    from alignlm.data.feature_cache import FeatureCache, file_stamp

    images = []
    for i in range(4):
        images.append(tmp_path / f"{i}.png")
        images[-1].write_bytes(bytes(i + 1))
    mine = FeatureCache(tmp_path / "cache")
    mine.write("rank0", images[:2], [file_stamp(p) for p in images[:2]], torch.zeros(2, 3, 4))
    survey = mine.survey(images)
    assert list(survey.found) == images[:2] and list(survey.missing) == images[2:]
    FeatureCache(tmp_path / "cache").write(
        "rank1", images[2:], [file_stamp(p) for p in images[2:]], torch.ones(2, 3, 4)
    )
    checked = []
    check = FeatureCache._check
    monkeypatch.setattr(FeatureCache, "_check", lambda self, shard: checked.append(shard.name) or check(self, shard))
    for look in ("keys_and_stamps", "file_stamp", "image_key"):  # no image is looked at again
        monkeypatch.setattr(feature_cache, look, None)
    mine.refresh(survey)
    monkeypatch.undo()
    assert checked == ["rank1.safetensors"]
    assert list(survey.found) == images and survey.missing == {}
    assert torch.equal(mine.get(images[1:3]), torch.stack([torch.zeros(3, 4), torch.ones(3, 4)]))


def test_an_image_that_appears_after_the_survey_is_cached_under_a_stamp_taken_before_it_is_read(tmp_path, monkeypatch):
    """An image start-up could not stat (still being written, a transient error) but readable when filling read it was
    written with no stamp, which matches nothing: the hook then said the cache lacked it and the stage stopped."""
    from types import SimpleNamespace

    from PIL import Image

    from alignlm.data.feature_cache import FeatureCache, FeatureCacheHook, file_stamp
    from alignlm.training import feature_cache as filling

    image, cache = tmp_path / "late.png", FeatureCache(tmp_path / "cache")
    survey = cache.survey([image])  # not there yet
    Image.new("RGB", (8, 8)).save(image)
    monkeypatch.setattr(filling, "shard_features", lambda model, dataset, part, acc, workers: (list(part), [(8, 8)], torch.zeros(1, 2, 3), torch.ones(1, dtype=torch.bool)))  # fmt: skip
    model = SimpleNamespace(vision=torch.nn.Identity())
    filling.fill(model, None, cache, survey, [image], SimpleNamespace(process_index=0, device=torch.device("cpu"), num_processes=1))  # fmt: skip
    assert survey.missing[image][1] == file_stamp(image)
    cache.refresh(survey)
    FeatureCacheHook(cache, 10**8, None, survey).bind(None)  # found, not "lacks 1 images"


# ---- filling reads images in data-loader workers, checks finiteness on the device (fix D3)


def test_filling_with_workers_writes_the_shard_of_the_serial_fill(tiny_model, tmp_path, monkeypatch):
    """The images are read by ``num_workers`` processes (in order) and the features' finiteness is computed as they
    come off the tower: the same shard bytes and index as filling in the rank's process, an unreadable image left
    out, and no host pass over the shard."""
    from alignlm.data import images as images_mod
    from alignlm.training import feature_cache

    monkeypatch.setattr(feature_cache, "BATCH", 6)
    colours = write_colour_set(tmp_path / "colours", n=20)
    (tmp_path / "colours" / "images" / "7.png").write_bytes(b"not a png")
    model = frozen(tiny_model)
    stored = {}
    for workers in (0, 2):
        monkeypatch.setattr(images_mod, "loader_workers", lambda *a, w=workers: w)
        monkeypatch.setattr(feature_cache, "loader_workers", lambda *a, w=workers: w)
        attach(model, colours["pretrain"], tmp_path / f"cache{workers}")
        (shard,) = shards(tmp_path / f"cache{workers}")
        with safe_open(str(shard), "pt") as f:
            stored[workers] = ({k: v for k, v in f.metadata().items() if k != "folder"}, f.get_tensor("features"))
    assert stored[0][0] == stored[2][0] and len(json.loads(stored[0][0]["ids"])) == 19
    assert torch.equal(stored[0][1], stored[2][1])


def test_non_finite_features_flagged_on_the_device_are_refused_naming_an_image(tmp_path):
    from alignlm.data.feature_cache import FeatureCache
    from alignlm.data.records import DataError

    with pytest.raises(DataError, match="b.png"):
        FeatureCache(tmp_path).write(
            "x", ["a.png", "b.png"], [None, None], torch.zeros(2, 3), finite=torch.tensor([True, False])
        )
    assert not list(tmp_path.glob("*.safetensors"))


def test_filling_the_cache_draws_nothing_from_the_global_random_stream(tiny_model, tmp_path):
    """The fill's loader took its workers' seed from torch's global stream, which the stage had just seeded: every
    random draw after it (SEA's labels, dropout) moved, and the run that filled a cache trained to other numbers
    than its rerun, which read it."""
    colours = write_colour_set(tmp_path / "colours", n=8)
    model = frozen(tiny_model)
    torch.manual_seed(0)
    attach(model, colours["pretrain"], tmp_path / "cache")
    assert shards(tmp_path / "cache")  # filled here
    after_fill = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_fill, torch.rand(3))
