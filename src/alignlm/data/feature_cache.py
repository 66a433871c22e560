"""A cache of a frozen vision tower's features, read in place of the images (``data.feature_cache``).

While the tower is frozen its features of an image never change, so a stage that reads its images more than once
(several epochs, captions and questions about the same image, a sweep over connectors) can compute them once. The
cache is a folder per tower (named by its fingerprint, so another tower or other weights never hit it) of
safetensors shards: ``features`` ``[n, N, Dv]`` in the tower's output dtype (bf16 stays bf16, bit for bit), with the
images' resolved paths as ``ids``, their files' ``(size, mtime_ns)`` when read as ``stamps``, their ``(width,
height)`` as ``sizes`` and the cache folder's own resolved path as ``folder`` in the metadata: an image edited or
regenerated in place has another stamp, so it is not cached any more and is computed again (a stat per image, no
hashing of content); the sizes hold every cached image to the reading run's ``data.max_image_pixels`` without opening
it. A row serves the file that lies where its image lay, with its stamp: at the same resolved path, or, once the
folder has moved since the shard was written and the image is no longer there, at the same path relative to the
folder (:meth:`FeatureCache.moved`): a project moved with its cache (data and ``outputs/`` together, another mount
point, a renamed folder) hits, as does a cache moved away from images that stayed put. :class:`FeatureCacheHook`
serves them as ``image_embeds``; the training layer fills the cache (``training/feature_cache.py``), looking at each
image's file once per stage start (a :class:`Survey`) and handing what it saw to the hook.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alignlm.data.hooks import HookedDataset, SampleHook
from alignlm.data.images import check_crop_size, check_size, image_size, load_rgb
from alignlm.data.records import UNREADABLE_IMAGE, DataError, Source
from alignlm.files import replace_file

TENSOR = "features"
Stamp = tuple[int, int]  # an image file's (size, mtime_ns)
Size = tuple[int, int]  # an image's (width, height) as stored
Copy = tuple[Path, int, Stamp | None, Size | None]  # cached features: shard, row, the file's stamp when read, its size
FINITE_ROWS = 32  # rows checked for finiteness at a time: the temporaries of the check stay a block's, not a shard's


def image_key(path: str | Path) -> str:
    """An image's key in the cache: its resolved path."""
    return str(Path(path).resolve())


def keys_and_stamps(paths: Iterable[Path]) -> Iterator[tuple[Path, str, Stamp | None]]:
    """Each image's ``image_key`` and ``file_stamp`` from one ``lstat`` of its file and one resolve per folder: a file
    that is not a link resolves to its folder's resolved path and its name, and its lstat is its stat. A resolve
    lstats every component of a path, and start-up's three passes of a resolve and a stat made 24 metadata calls per
    image (86 s per rank at 558k images). A link, a name that is no file's (``..``) and a file that cannot be stat'ed
    take the whole way (``realpath``: ``image_key`` without the symlink-loop error, which left such a file unstat'ed)."""
    folders: dict[str, str] = {}
    for path in paths:
        folder, name = os.path.split(os.fspath(path))  # strings: a Path's parent is parsed anew, 10 us an image
        try:
            st: os.stat_result | None = os.lstat(path)
        except OSError:
            st = None
        if st is None or stat.S_ISLNK(st.st_mode) or name in ("", ".", ".."):
            yield path, os.path.realpath(path), file_stamp(path)
            continue
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        yield path, os.path.join(folders[folder], name), (st.st_size, st.st_mtime_ns)


def file_stamp(path: str | Path) -> Stamp | None:
    """An image file's size and modification time: what tells the image whose features were cached from one edited
    or regenerated in place since (a stat, not a read); None when the file cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _refuse_non_finite(features: torch.Tensor, paths: Sequence[str | Path], finite: torch.Tensor | None = None) -> None:
    """Refuse features with a NaN or an infinity (cached, every later run had trained on them): by ``finite``, each
    row's flag, where the caller computed it on the device as the features came off the tower; else a block of rows
    at a time here (``isfinite`` of a whole shard held 2.4 times its bytes in temporaries, 12 GB at CLIP-L/336)."""
    rows = range(0, len(features), FINITE_ROWS)
    blocks = (
        [(0, finite)]
        if finite is not None
        else ((start, torch.isfinite(features[start : start + FINITE_ROWS]).flatten(1).all(1)) for start in rows)
    )
    for start, flags in blocks:
        if not bool(flags.all()):
            bad = start + int((~flags).nonzero()[0, 0])
            raise DataError(
                f"the tower's features of {len(paths)} images, e.g. {paths[bad]}, are not finite: not cached"
            )


def _is_pair(value: Any) -> bool:
    """A stored stamp or size: two whole numbers, or null (a stamp: an image to compute again; a size: not stored)."""
    return value is None or (isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value))


def _pairs(meta: dict[str, str], key: str, rows: int, shard: Path, what: str) -> list[tuple[int, int] | None]:
    """A shard's per-row stamps or sizes (``key`` in its metadata); all null where the shard was written before them."""
    values = json.loads(meta.get(key, "null"))
    values = [None] * rows if values is None else values
    if not isinstance(values, list) or len(values) != rows or not all(map(_is_pair, values)):
        raise DataError(f"feature cache shard {shard}: its {key} do not list one {what} per row of its {rows}")
    return [None if v is None else (v[0], v[1]) for v in values]


@dataclass
class Survey:
    """The stage's images as one look at each file at start-up found them (``keys_and_stamps``): the cached copy of
    each image as its file is now, else the image's key and stamp (what filling writes with, and what the shards
    other ranks wrote are matched by). Filling hands it to :class:`FeatureCacheHook`, so start-up never stats or
    resolves an image twice."""

    found: dict[Path, Copy] = field(default_factory=dict)
    missing: dict[Path, tuple[str, Stamp | None]] = field(default_factory=dict)


class FeatureCache:
    """The shards of one tower's folder, looked up by image path (as its file is now); rows are read lazily."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.home = os.path.realpath(self.folder)  # where the shards are now, written into each new one as ``folder``
        # every cached copy of an image: shard, row, the file's stamp when it was read (one per edit of the image)
        # and the image's size (None in a shard written before sizes were)
        self.where: dict[str, list[Copy]] = {}
        self.layout: tuple[tuple[int, ...], str] | None = None  # (shape of one image's features, dtype), all shards
        self.indexed: set[Path] = set()  # the shards in ``where``
        self._index_new_shards()
        self._handles: dict[Path, Any] = {}

    def _index_new_shards(self) -> None:
        """Add the folder's shards not indexed yet to ``where`` (all of them when the cache is opened); a row of a
        shard written where the folder was before is indexed where its image is now too, when it left its own path
        (:meth:`moved`; a stat per row of such a shard, none for a folder that stayed)."""
        for shard in sorted(self.folder.glob("*.safetensors")) if self.folder.exists() else []:
            if shard not in self.indexed:
                ids, stamps, sizes, written_in = self._check(shard)
                elsewhere = written_in is not None and written_in != self.home
                for row, (key, stamp, size) in enumerate(zip(ids, stamps, sizes)):
                    copy = (shard, row, stamp, size)
                    self.where.setdefault(key, []).append(copy)
                    if elsewhere and stamp is not None and file_stamp(key) != stamp:
                        self.where.setdefault(self.moved(key, written_in), []).append(copy)
                self.indexed.add(shard)

    def moved(self, key: str, written_in: str) -> str:
        """Where the image of ``key``, cached while this folder was ``written_in``, lies now if it moved with the
        folder: at the same path relative to it (``outputs/feature_cache/<tower>`` -> ``../../../data/a.png``).

        Why this key, and no false hit: a row serves an image only at its own place, its resolved path as cached, or
        that path relative to the cache once its own place no longer holds it (the image left with the folder), and
        only a file with the stamp read there. Two images present at once never share a place, so two sources with
        the same names under other roots never share features; a copied cache, or one moved beside other images of
        the same names while its own stayed, serves only the images it was filled from. What tells the image at its
        new place is what tells it at its own path: its file's size and modification time to the nanosecond, kept
        by a move (``mv``, ``rsync -a``, a remount). Keying an image by its path relative to its source's root would
        serve one set's features to another set with the same names wherever the two lay (files of the same size,
        extracted from archives with the same times); keying it by a hash of its bytes would read every image at
        each start-up."""
        return os.path.normpath(os.path.join(self.home, os.path.relpath(key, written_in)))

    def _check(self, shard: Path) -> tuple[list[str], list[Stamp | None], list[Size | None], str | None]:
        """A shard's ids, stamps, sizes and the folder it was written in (None in a shard written before folders
        were: its rows serve only the paths they name), once its index, rows, shape and dtype agree (a damaged shard
        fails here, at start-up, not at the step that first reads it)."""
        try:
            with safe_open(str(shard), "pt") as f:
                meta = f.metadata() or {}
                ids = json.loads(meta.get("ids", "[]"))
                written_in = meta.get("folder")
                if TENSOR not in f.keys():
                    raise ValueError(f"no {TENSOR!r} tensor")
                part = f.get_slice(TENSOR)
                shape, dtype = tuple(part.get_shape()), str(part.get_dtype())
        except Exception as e:  # noqa: BLE001 - whatever the file holds, the message names it
            raise DataError(f"feature cache shard {shard} cannot be read: {type(e).__name__}: {e}") from e
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(ids) != shape[0]:
            raise DataError(f"feature cache shard {shard}: its index does not list one image per row of {shape}")
        if written_in is not None and not os.path.isabs(written_in):
            raise DataError(f"feature cache shard {shard}: its folder {written_in!r} is not an absolute path")
        # stamps null: written before stamps, every row computed again; sizes null: read from the header when needed
        stamps = _pairs(meta, "stamps", shape[0], shard, "(size, mtime_ns)")
        sizes = _pairs(meta, "sizes", shape[0], shard, "(width, height)")
        if not dtype.startswith(("F", "BF")):
            raise DataError(f"feature cache shard {shard} holds {dtype} features; a tower's features are floats")
        if self.layout is not None and (shape[1:], dtype) != self.layout:
            raise DataError(
                f"feature cache shard {shard} holds {shape[1:]} {dtype} features per image, the folder's others "
                f"{self.layout[0]} {self.layout[1]}"
            )
        self.layout = (shape[1:], dtype)
        return ids, stamps, sizes, written_in

    def __getstate__(self) -> dict[str, Any]:  # data-loader workers open their own handles
        return {**self.__dict__, "_handles": {}}

    def _match(self, key: str, stamp: Stamp | None) -> Copy | None:
        """The cached copy of the image of ``key`` read with this stamp (its file as it is now), if any."""
        if stamp is None:
            return None
        return next((copy for copy in self.where.get(key, []) if copy[2] == stamp), None)

    def survey(self, paths: Iterable[Path]) -> Survey:
        """Each image looked at once: its cached copy as its file is now, or its key and stamp."""
        survey = Survey()
        for path, key, stamp in keys_and_stamps(dict.fromkeys(paths)):
            copy = self._match(key, stamp)
            if copy is None:
                survey.missing[path] = (key, stamp)
            else:
                survey.found[path] = copy
        return survey

    def refresh(self, survey: Survey) -> None:
        """Index the shards written since the cache was opened by other ranks (this one's are indexed as written) and
        move the images they hold from ``survey.missing`` to ``survey.found``: no shard is read twice, no image
        looked at again."""
        self._index_new_shards()
        for path, (key, stamp) in list(survey.missing.items()):
            if (copy := self._match(key, stamp)) is not None:
                survey.found[path] = copy
                del survey.missing[path]

    def get(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """``[len(paths), N, Dv]`` features of these images."""
        rows = []
        for p in paths:
            stamp = file_stamp(p)
            found = None if stamp is None else self._match(image_key(p), stamp)
            if found is None:
                raise DataError(
                    f"image {p} has no features in the feature cache {self.folder} for its file as it is now (size, "
                    f"modification time {stamp}): it changed after the cache was filled; rerun to recompute",
                    UNREADABLE_IMAGE,
                )
            shard, row, _, _ = found
            if shard not in self._handles:
                self._handles[shard] = safe_open(str(shard), "pt")
            features = self._handles[shard].get_slice(TENSOR)[row]
            if not bool(torch.isfinite(features).all()):  # written finite: the shard changed since (0.1 ms a row)
                raise DataError(
                    f"image {p}: its cached features in {shard} are not finite (the shard changed after it was "
                    "written); delete the shard to compute them again",
                    UNREADABLE_IMAGE,
                )
            rows.append(features)
        return torch.stack(rows)

    def write(
        self,
        name: str,
        paths: Sequence[str | Path],
        stamps: Sequence[Stamp | None],
        features: torch.Tensor,
        sizes: Sequence[Size | None] | None = None,
        keys: Sequence[str] | None = None,
        finite: torch.Tensor | None = None,
    ) -> Path:
        """One more shard (atomically: a temporary name, then a rename); ``stamps``: each file's, taken before it was
        read (an edit while it is read then counts as a change next time); ``sizes``: each image's (width, height)
        (None: not known, read from its header when a limit needs it); ``keys``: the images' ``image_key`` where the
        caller has them (a survey's), else resolved here; ``finite``: whether each row is finite, where the caller
        computed it on the device as the features came off the tower (checked here on the host, 3.2 ms an image at
        CLIP-L/336, when it did not). ``features`` is saved as it is, without a copy."""
        _refuse_non_finite(features, paths, finite)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.safetensors"
        keys = [image_key(p) for p in paths] if keys is None else list(keys)
        sizes = [None] * len(keys) if sizes is None else [None if s is None else list(s) for s in sizes]
        meta = {
            "ids": json.dumps(keys),
            "stamps": json.dumps(list(stamps)),
            "sizes": json.dumps(sizes),
            "folder": self.home,
        }
        replace_file(
            path, lambda tmp: save_file({TENSOR: features.detach().cpu().contiguous()}, str(tmp), metadata=meta)
        )
        for row, (key, stamp, size) in enumerate(zip(keys, stamps, sizes)):
            self.where.setdefault(key, []).append((path, row, stamp, None if size is None else (size[0], size[1])))
        self.indexed.add(path)
        return path


class FeatureCacheHook(SampleHook):
    """Each image of a record is read from the cache as ``image_embeds``; the files themselves are not opened, but for
    the images the cache left out because they cannot be read, once at start-up for their error: their samples then
    fail as without the cache (skipped and counted under its cause, or raised naming the record: ``data.on_error``).
    So do the samples of a cached image over this run's ``data.max_image_pixels`` (a cache filled under a larger
    limit had served them), known from the size stored with its features."""

    replaces_visuals = True
    one_per_image = True

    def __init__(
        self, cache: FeatureCache, max_pixels: int | None, crop_side: int | None = None, survey: Survey | None = None
    ) -> None:
        self.cache = cache
        self.max_pixels = max_pixels  # the dataset's data.max_image_pixels
        self.crop_side = crop_side  # the tower's side when the stage crops (data.image_aspect_ratio=crop), else None
        self.survey = survey  # filling's look at every image of the dataset bound (``FeatureCache.survey``), or None
        self.unreadable: dict[Path, tuple[str, str]] = {}  # image path -> (message, cause) of its DataError

    def bind(self, dataset: HookedDataset) -> None:
        """Every image is cached and within ``data.max_image_pixels``, or cannot be read (kept with its error, raised
        by the samples that need it). The images are those filling surveyed when it did, else the dataset's records
        are read for them (each listing of 558k records' images took 20 s)."""
        if self.survey is None:
            images = (p for src, _, rec in dataset.distinct_records() for p in src.image_paths(rec))
            self.survey = self.cache.survey(images)
        survey, self.survey = self.survey, None  # start-up's alone: not carried into every data-loader worker
        lacking = []
        for path in survey.missing:
            try:
                self.check(path, load_rgb(path, self.max_pixels, self.crop_side is None).size)
            except DataError as e:
                self.unreadable[path] = (str(e), e.cause)
            else:
                lacking.append(path)
        if self.max_pixels:
            for path, (_, _, _, size) in survey.found.items():
                try:
                    self.check(path, image_size(path) if size is None else size)
                except DataError as e:
                    self.unreadable[path] = (str(e), e.cause)
        if lacking:
            raise DataError(f"the feature cache {self.cache.folder} lacks {len(lacking)} images, e.g. {lacking[:2]}")

    def check(self, path: Path, size: tuple[int, int]) -> None:
        """The dataset's size limits for an image of ``size`` (as shown): its padded square, and under ``crop`` its
        resize before the crop (``images.check_crop_size``): a thin strip the cache left out for the second had been
        taken for an image it lacked, which stopped the stage, where without the cache its samples are skipped."""
        check_size(path, size, self.max_pixels, self.crop_side is None)
        if self.crop_side is not None:
            check_crop_size(path, size, self.crop_side, self.max_pixels)

    def visual_inputs(self, source: Source, record: dict[str, Any]) -> list[Path]:
        return source.image_paths(record)

    def load_visuals(self, inputs: list[Path]) -> dict[str, torch.Tensor | None]:
        for path in inputs:
            if (error := self.unreadable.get(path)) is not None:
                raise DataError(*error)
        return {"pixel_values": None, "image_embeds": self.cache.get(inputs) if inputs else None}
