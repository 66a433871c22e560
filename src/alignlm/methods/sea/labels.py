"""SEA's per-patch word labels: one file beside the data, written by ``alignlm sea-labels`` or the ``sea_labels``
prepare step, read by the ``sea`` data hook (``methods/sea/hook.py``).

A labels file is a single safetensors file (``<data dir>/sea_labels.safetensors`` by convention):

- ``words``  int32 ``[n_images, cells, k]``: index into the word list, -1 where a cell has fewer candidates;
- ``scores`` float32 ``[n_images, cells, k]``: the candidates' scores, descending within a cell;
- ``stamps`` int64 ``[n_images, 2]``: each image's size and modification time (ns) before the labels were computed
  from it, -1 where it could not be stat'ed (absent from files written before it was recorded), so that labels of an
  image edited or regenerated since are never served: each lookup checks its image (a stage's sample with one is bad
  data, skipped or raised per ``data.on_error``), and ``alignlm sea-eval`` checks the images it scores before it
  loads a model;
- metadata ``alignlm.sea_labels``: JSON ``{version, source, grid: [rows, cols], words, images, info, provenance}``.

``cells = rows * cols`` in row-major order. ``images`` are image paths relative to the labels file's folder,
so one file serves every record (caption, QA) showing an image, and images of other folders never collide.
Labels come from a *source*, a function ``(data files, k, **knobs) -> LabelSet`` registered in ``SOURCES``:
``annotations`` (labels shipped with the data, as the ``shapes`` set writes them) and ``dual_encoder``
(dense patch features of a CLIP-like model against text embeddings of a word list). A new labeller is one
function and one line in ``SOURCES``; the file format and everything that reads it stay as they are.

``provenance`` (``methods/provenance.py``) records the knobs the labels were made with and digests of what they were
made from (the data and annotation files, the images, the encoder), so the prepare step never serves labels of scenes
the data no longer shows.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from alignlm.config import Bounds, ConfigError
from alignlm.data.feature_cache import Stamp, file_stamp
from alignlm.data.images import MAX_PIXELS, ImageReading, check_aspect_ratio, decoded_batches, prepared
from alignlm.data.records import MISSING_IMAGE, DataError, record_images
from alignlm.files import PartialRows, partial_folder, replace_file, sole_writer
from alignlm.methods.provenance import (
    KEY,
    as_json,
    changed_inputs,
    check_knobs,
    encoder_identity,
    file_digest,
    files_digest,
    stamps_digest,
    why_again,
)
from alignlm.models.device import default_device, device_problem
from alignlm.models.encoders import DualEncoder, device_of, load_encoder

log = logging.getLogger(__name__)

VERSION = 1
META_KEY = "alignlm.sea_labels"
DEFAULT_NAME = "sea_labels.safetensors"
CANDIDATES = Bounds(1)  # k, the candidate words kept per patch
# what to do about labels of images changed since: a copy without its times counts as a change, as for every stamp
REWRITE = (
    "write the labels again (`alignlm sea-labels`, or the stage's sea_labels prepare step); a copy that did not keep "
    "modification times counts as a change: copy with `cp -p` or `rsync -a`"
)
SORT_ROWS = 1024  # images sorted at once when writing: bounds the sort's temporaries, whatever the set's size


def check_shapes(words: tuple[int, ...], scores: tuple[int, ...], n_images: int, cells: int, where: str) -> None:
    """Refuse arrays that do not line up with the image list and the grid: a lookup would serve another image's row."""
    if words != scores or len(words) != 3 or words[:2] != (n_images, cells):
        raise DataError(
            f"{where}: SEA labels need words and scores of shape [{n_images} images, {cells} cells, k]; got "
            f"{words} and {scores}"
        )


def check_candidates(ids: np.ndarray, scores: np.ndarray, n_words: int, images: Sequence[Any], where: str) -> None:
    """Refuse word ids outside the word list and non-finite candidate scores, naming the first bad image and cell:
    either one fails a training step far from its cause (an IndexError, a NaN draw)."""
    bad = (ids < -1) | (ids >= n_words)
    if bad.any():
        i, c, j = np.argwhere(bad)[0]
        raise DataError(
            f"{where}: image {images[i]} cell {c} has word id {ids[i, c, j]}; ids must be in [-1, {n_words}) "
            f"(the word list has {n_words} words; -1 = no candidate)"
        )
    bad = (ids >= 0) & ~np.isfinite(scores)
    if bad.any():
        i, c, j = np.argwhere(bad)[0]
        raise DataError(
            f"{where}: image {images[i]} cell {c} has score {scores[i, c, j]}; candidate scores must be finite numbers"
        )


@dataclass
class LabelSet:
    """Labels in memory: the arrays of the file plus the word list, grid and image keys (absolute paths)."""

    words: list[str]
    grid: tuple[int, int]
    images: list[Path]
    word_ids: np.ndarray  # int32 [n_images, cells, k], -1 = no candidate
    scores: np.ndarray  # float32 [n_images, cells, k]
    source: str
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"SEA labels from {self.source}"
        cells = self.grid[0] * self.grid[1]
        check_shapes(tuple(self.word_ids.shape), tuple(self.scores.shape), len(self.images), cells, where)
        check_candidates(self.word_ids, self.scores, len(self.words), self.images, where)
        if len(set(self.words)) != len(self.words):
            raise DataError("SEA label word list has duplicates")


def image_key(image: str | Path, root: Path) -> str:
    """An image's key in a labels file: its path relative to the file's (resolved) folder, POSIX separators."""
    return Path(os.path.relpath(Path(image).resolve(), root)).as_posix()


def _stamp_changed(stored: np.ndarray, image: str | Path) -> bool:
    """Whether an image's stamp now differs from the one stored when it was labelled; an image that cannot be stat'ed
    now is left to its own read (a missing image is bad data, per ``data.on_error``), one not stat'ed then to trust."""
    now = file_stamp(image)
    then = (int(stored[0]), int(stored[1]))
    return now is not None and then != (-1, -1) and now != then


def write_labels(
    path: str | Path,
    labels: LabelSet,
    provenance: dict[str, Any] | None = None,
    stamps: Mapping[str, Stamp | None] | None = None,
) -> Path:
    """Write a labels file atomically (a temporary name, then a rename), candidates sorted by score; ``provenance``
    (``{knobs, inputs}``, see :func:`make_labels`) goes into its metadata. ``stamps``: each image's stamp by its key
    in the file, taken before the source read it (:func:`label_inputs`; a pass can take hours, and an image
    regenerated during it keeps labels of the picture it showed before); where not given, the images are stat'ed now."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids, scores = sorted_candidates(labels.word_ids, labels.scores)
    root = path.parent.resolve()
    keys = [image_key(p, root) for p in labels.images]
    meta = {
        "version": VERSION,
        "source": labels.source,
        "grid": list(labels.grid),
        "words": labels.words,
        "images": keys,
        "info": labels.info,
        KEY: provenance,
    }
    taken = stamps if stamps is not None else dict(zip(keys, map(file_stamp, labels.images), strict=True))
    stamps_array = np.array([taken.get(key) or (-1, -1) for key in keys], dtype=np.int64).reshape(-1, 2)
    tensors = {"words": np.ascontiguousarray(ids), "scores": np.ascontiguousarray(scores), "stamps": stamps_array}

    def save(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
        tmp.chmod(0o644)  # readable like the data beside it

    return replace_file(path, save)


def _rank(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Scores as candidates rank: an empty slot (id -1) below every candidate."""
    return np.where(ids < 0, np.float32(-np.inf), scores)


def _is_sorted(ids: np.ndarray, scores: np.ndarray) -> bool:
    """Candidates already descending and every empty slot's score exactly +0.0 (its bits): sorting would change no
    byte."""
    ranked = _rank(ids, scores)
    return bool((ranked[..., :-1] >= ranked[..., 1:]).all()) and not np.where(ids < 0, scores.view(np.uint32), 0).any()


def sorted_candidates(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids and float32 scores with each cell's candidates by descending score, empty slots last with score 0.

    A block of ``SORT_ROWS`` images at a time, and arrays already in that order (a top-k source's) are returned as they
    are: at LLaVA-558k's 576 cells and k=5 a whole-array sort held several 13 GB copies at once."""
    ids, scores = np.asarray(ids, dtype=np.int32), np.asarray(scores, dtype=np.float32)
    out_ids, out_scores = ids, scores  # copied at the first block that needs sorting
    for start in range(0, len(ids), SORT_ROWS):
        rows = slice(start, start + SORT_ROWS)
        block_ids, block_scores = ids[rows], scores[rows]
        if _is_sorted(block_ids, block_scores):
            continue
        if out_ids is ids:
            out_ids, out_scores = ids.copy(), scores.copy()
        ranked = _rank(block_ids, block_scores)
        order = np.argsort(-ranked, axis=-1, kind="stable")
        block_ids, ranked = np.take_along_axis(block_ids, order, -1), np.take_along_axis(ranked, order, -1)
        out_ids[rows], out_scores[rows] = block_ids, np.where(block_ids < 0, np.float32(0.0), ranked)
    return out_ids, out_scores


class SeaLabels:
    """A labels file opened for lookup by image path; rows are read lazily (one open handle per process).

    Opening checks the arrays' shapes against the metadata (image list, grid); each row read is checked for word ids
    outside the word list and non-finite scores, so a bad row is a bad sample (skipped and counted, or raised naming
    the file, the image and the cell) rather than an IndexError or a NaN draw in a training step. Checking every value
    at open would read the whole file (gigabytes at LLaVA's scale) on every rank at every start.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(
                f"SEA labels file {self.path} does not exist; write it with `alignlm sea-labels`, "
                "or give the stage a sea_labels prepare step so the pipeline writes it"
            )
        with safe_open(str(self.path), "np") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            if raw is None:
                raise DataError(f"{self.path} is not an alignlm SEA labels file (no {META_KEY!r} metadata)")
            meta = json.loads(raw)
            if meta.get("version") != VERSION:
                raise DataError(
                    f"{self.path}: labels format version {meta.get('version')} is not supported (expected {VERSION})"
                )
            words = meta.get("words")
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise DataError(f"{self.path}: the metadata's word list must be a list of strings; got {words!r:.80}")
            self.words: list[str] = words
            self.grid: tuple[int, int] = (int(meta["grid"][0]), int(meta["grid"][1]))
            self.k: int = self.check_arrays(f, meta["images"])
        self.source: str = meta["source"]
        self.info: dict[str, Any] = meta.get("info", {})
        self.provenance: dict[str, Any] | None = meta.get(KEY)  # None: written before files recorded it
        self.root = self.path.parent.resolve()
        self.index = {key: i for i, key in enumerate(meta["images"])}
        self._handle: Any = None
        self.offset: int = 0
        self.num_tokens: int | None = None  # set by place_on_tokens

    @property
    def cells(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def aspect_ratio(self) -> str | None:
        """How the images were made square before their patches were labelled (``data.image_aspect_ratio``: a label
        describes the patch at its cell only in images made square the same way); None for annotations, which give
        each image's grid themselves. A dual encoder's file written before it was recorded labelled padded images."""
        return str(self.info.get("image_aspect_ratio", "pad")) if self.source == "dual_encoder" else None

    def check_aspect_ratio(self, aspect_ratio: str, where: str) -> None:
        """Refuse to lay these labels on images made square otherwise than theirs (``where`` names the setting)."""
        if self.aspect_ratio not in (None, aspect_ratio):
            raise ConfigError(
                f"SEA labels {self.path} were made on {self.aspect_ratio}-squared images, but {where} makes them "
                f"{aspect_ratio}: each visual token's label would describe another part of its image (padding, or "
                f"what the crop cut away); write them again with image_aspect_ratio={aspect_ratio} (`alignlm "
                "sea-labels dual_encoder --image-aspect-ratio`, or the sea_labels prepare step's knob)"
            )

    def check_arrays(self, handle: Any, images: list[str]) -> int:
        """Check the open file's arrays line up with its image list and grid (their values: per row, at lookup);
        returns ``k``."""
        missing = sorted({"words", "scores"} - set(handle.keys()))
        if missing:
            raise DataError(f"{self.path}: no {missing} array in the file; a SEA labels file holds words and scores")
        dtypes = {name: handle.get_slice(name).get_dtype() for name in ("words", "scores")}
        if not dtypes["words"].startswith(("I", "U")) or not dtypes["scores"].startswith(("F", "BF")):
            raise DataError(
                f"{self.path}: SEA labels need integer word ids and floating-point scores; got words {dtypes['words']} "
                f"and scores {dtypes['scores']} (a fractional or NaN word id would be cut to another word, or to none)"
            )
        shape = tuple(handle.get_slice("words").get_shape())
        check_shapes(shape, tuple(handle.get_slice("scores").get_shape()), len(images), self.cells, str(self.path))
        self.stamped = "stamps" in handle.keys()
        if self.stamped:
            stamps = handle.get_slice("stamps")
            if stamps.get_dtype() != "I64" or tuple(stamps.get_shape()) != (len(images), 2):
                raise DataError(
                    f"{self.path}: SEA labels' stamps must be int64 of shape [{len(images)} images, 2]; got "
                    f"{stamps.get_dtype()} {tuple(stamps.get_shape())}"
                )
        return int(shape[2])

    def __getstate__(self) -> dict[str, Any]:  # data-loader workers open their own handle
        return {**self.__dict__, "_handle": None}

    def key(self, image: str | Path) -> str:
        """The file's key for an image path: relative to the labels folder, POSIX separators."""
        return image_key(image, self.root)

    def lookup(self, image: str | Path) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(word ids [cells, k], scores [cells, k])`` of an image, or None when the file does not label it."""
        i = self.index.get(self.key(image))
        if i is None:
            return None
        if self._handle is None:
            self._handle = safe_open(str(self.path), "np")
        if self.stamped and _stamp_changed(self._handle.get_slice("stamps")[i : i + 1][0], image):
            raise DataError(
                f"SEA labels {self.path}: image {self.key(image)} changed since it was labelled (size or modification "
                f"time), so its labels describe another picture; {REWRITE}"
            )
        ids, scores = self._handle.get_slice("words")[i : i + 1], self._handle.get_slice("scores")[i : i + 1]
        check_candidates(ids, scores, len(self.words), [self.key(image)], str(self.path))
        return torch.from_numpy(ids[0]).long(), torch.from_numpy(scores[0]).float()

    def place_on_tokens(
        self, num_image_tokens: int, num_patches: int, num_prefix_tokens: int, connector_prefix: int = 0
    ) -> SeaLabels:
        """Fix where cell 0 lands among a model's visual tokens (cells follow in row-major order); returns self.

        Prefix tokens (the tower's CLS or pooled feature, a connector's whole-image tokens such as V2L's global words)
        describe no single patch and get no label. Counts that do not line up fail here, at start-up, naming both sides.
        """
        per_patch = num_image_tokens - connector_prefix
        if per_patch == self.cells:
            self.offset = connector_prefix
        elif per_patch == num_patches and num_patches - num_prefix_tokens == self.cells:
            self.offset = connector_prefix + num_prefix_tokens
        else:
            raise DataError(
                f"SEA labels {self.path} have a {self.grid[0]}x{self.grid[1]} grid ({self.cells} cells per image) but the "
                f"model gives {num_image_tokens} visual tokens per image (vision tower: {num_patches} tokens, "
                f"{num_prefix_tokens} of them CLS/pooled); write labels on the model's patch grid "
                "(alignlm sea-labels ... --grid) or pick a tower and connector whose patch tokens match the labels"
            )
        self.num_tokens = num_image_tokens
        return self

    def place_on_model(self, model: Any) -> SeaLabels:
        """:meth:`place_on_tokens` with an ``AlignLM``'s own counts (its tower's and its connector's prefix tokens)."""
        vision = model.vision
        return self.place_on_tokens(
            model.num_image_tokens, vision.num_patches, vision.num_prefix_tokens, model.connector.num_prefix_tokens
        )

    def for_images(self, images: Sequence[str | Path]) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels laid out on each image's visual tokens: ``[n_images, M, k]`` word ids (-1 = none) and scores."""
        if self.num_tokens is None:
            raise RuntimeError("call place_on_tokens(...) before for_images(...)")
        ids = torch.full((len(images), self.num_tokens, self.k), -1, dtype=torch.long)
        scores = torch.zeros((len(images), self.num_tokens, self.k), dtype=torch.float32)
        cells = slice(self.offset, self.offset + self.cells)
        for i, image in enumerate(images):
            found = self.lookup(image)
            if found is not None:
                ids[i, cells], scores[i, cells] = found
        return ids, scores

    def coverage(self, images: Sequence[str | Path]) -> int:
        """How many of these images the file labels (a stage whose data it does not cover fails at start-up)."""
        return sum(self.key(p) in self.index for p in images)

    def check_unchanged(self, images: Iterable[str | Path], where: str) -> None:
        """Refuse labels of images whose size or modification time differs from when they were labelled, naming how
        many and the first, before any is scored (``lookup`` checks each image it serves too); a file written before
        it recorded them cannot tell, and passes. A copy that did not keep modification times counts as a change, as
        it does for the feature cache and the prepare steps."""
        if not self.stamped:
            return
        with safe_open(str(self.path), "np") as f:
            stamps = f.get_tensor("stamps")
        changed = [
            self.key(image)
            for image in images
            if (i := self.index.get(self.key(image))) is not None and _stamp_changed(stamps[i], image)
        ]
        if changed:
            raise DataError(
                f"SEA labels {self.path}: {len(changed)} of the images of {where} changed since they were labelled"
                f" (size or modification time; the first: {changed[0]}), so their labels describe other pictures; "
                f"{REWRITE}"
            )


# ---- sources -------------------------------------------------------------------------------------------------------


def annotations_file(data: Sequence[str | Path], annotations: str | Path | None) -> Path:
    """The annotations a source reads: the one given, else ``patch_labels.json`` beside the first data file."""
    return Path(annotations) if annotations else Path(data[0]).parent / "patch_labels.json"


def from_annotations(
    data: Sequence[str | Path], k: int, annotations: str | Path | None = None, image_root: str | Path | None = None
) -> LabelSet:
    """Convert per-record patch annotations ``{grid, words, images: {id: [per cell: [[word, score], ...]]}}``.

    ``annotations`` defaults to ``patch_labels.json`` beside the first data file (what ``shapes`` writes). Every
    record of ``data`` with an image must be annotated, on the same grid, with words from the word list.
    """
    path = annotations_file(data, annotations)
    if not path.exists():
        raise FileNotFoundError(f"annotations file {path} does not exist")
    ann = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(ann, dict) or not {"grid", "words", "images"} <= set(ann):
        raise DataError(f"{path}: expected an object with grid, words and images")
    grid = (int(ann["grid"]), int(ann["grid"])) if isinstance(ann["grid"], int) else tuple(int(g) for g in ann["grid"])
    words = [str(w) for w in ann["words"]]
    word_index = {w: i for i, w in enumerate(words)}
    images: dict[Path, str] = {}
    for rid, paths in record_images(data, image_root):
        if len(paths) != 1:
            raise DataError(f"record {rid} has {len(paths)} images; per-record annotations label exactly one")
        images.setdefault(paths[0], rid)
    missing = [rid for rid in images.values() if rid not in ann["images"]]
    if missing:
        raise DataError(
            f"{path} has no labels for {len(missing)} records of {[str(d) for d in data]}, e.g. {missing[:3]}"
        )
    cells = grid[0] * grid[1]
    ids = np.full((len(images), cells, k), -1, dtype=np.int32)
    scores = np.zeros((len(images), cells, k), dtype=np.float32)
    for n, rid in enumerate(images.values()):
        per_cell = ann["images"][rid]
        if len(per_cell) != cells:
            raise DataError(
                f"{path}: record {rid} has {len(per_cell)} cells, the grid {grid[0]}x{grid[1]} needs {cells}"
            )
        for c, cands in enumerate(per_cell):
            for word, score in cands:
                if word not in word_index:
                    raise DataError(f"{path}: record {rid} cell {c} has word {word!r}, not in the word list {words}")
                if not math.isfinite(float(score)):
                    raise DataError(
                        f"{path}: record {rid} cell {c} gives word {word!r} the score {score}; scores must be finite "
                        "numbers"
                    )
            for j, (word, score) in enumerate(sorted(cands, key=lambda ws: -float(ws[1]))[:k]):
                ids[n, c, j], scores[n, c, j] = word_index[word], float(score)
    return LabelSet(words, grid, list(images), ids, scores, "annotations", {"annotations": str(path)})


def dual_encoder_scores(
    encoder: DualEncoder, pixel_values: torch.Tensor, text: torch.Tensor, k: int, grid: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Top-k words per patch by cosine: ``(ids [B, cells, k], scores [B, cells, k], (rows, cols))``, on the CPU.

    ``grid`` average-pools the patch features to ``grid x grid`` first, so labels can match a coarser training tower.
    The cosines and their top-k are computed where the encoder put the patches, ``text`` copied there (10k words of
    CLIP-L: 30 MB, about a millisecond next to the tower's batch): on the CPU, 32 CLIP-L/336 images against 10k words is 283 GFLOP, 4.5 s on the 2-core builder, which made a
    GPU encoder's labelling of LLaVA-558k CPU-bound for hours.
    """
    patches = encoder.patch_embeddings(pixel_values).float()
    text = text.to(patches.device)
    if grid is not None:
        patches = torch.nn.functional.adaptive_avg_pool2d(patches.permute(0, 3, 1, 2), grid).permute(0, 2, 3, 1)
    rows, cols = patches.shape[1:3]
    sims = (
        torch.nn.functional.normalize(patches.flatten(1, 2), dim=-1)
        @ torch.nn.functional.normalize(text.float(), dim=-1).T
    )
    scores, ids = sims.topk(min(k, text.shape[0]), dim=-1)
    return ids.cpu(), scores.cpu(), (rows, cols)


def from_dual_encoder(
    data: Sequence[str | Path],
    k: int,
    model: str | DualEncoder,
    words: Sequence[str] | str,
    prompt: str = "a photo of a {w}",
    grid: int | None = None,
    batch_size: int = 32,
    image_root: str | Path | None = None,
    trust_remote_code: bool = False,
    device: str | None = None,
    num_workers: int | str = "auto",
    progress: PartialRows | None = None,
    image_aspect_ratio: str = "crop",
    max_image_pixels: int | None = MAX_PIXELS,
) -> LabelSet:
    """Label every image of ``data`` with its patches' nearest words under a dual encoder.

    ``model`` is a Hugging Face CLIPModel / SiglipModel name or path, an ``alignlm dual-encoder fit`` folder, or any
    ``DualEncoder``; ``words`` a list or a
    text file with one word per line; ``prompt`` wraps each word before the text encoder. ``device`` is where a
    named model runs (default: the GPU unless there is none, ``models/device.py``; CLIP-L/336 on the CPU takes
    ~35 h for LLaVA-558k). Each batch's top-k goes straight into the final int32 / float32 arrays: per-batch lists
    concatenated at the end held several copies of a 13 GB result. ``num_workers`` (``data.images.loader_workers``:
    auto, by the encoder's device) processes read and preprocess the images ahead of the encoder, in order: read one
    at a time in this process, 5-7 ms an image kept the GPU waiting. ``progress`` (:func:`make_labels` gives one
    beside the labels file) keeps those arrays on the disk while the pass runs, so a killed pass resumes at its first
    unlabelled batch, not after an hour of a GPU's work redone; none keeps them in memory only.
    ``image_aspect_ratio``: how the images are made square first, as the stage that trains on the labels makes them
    (``data.image_aspect_ratio``; SEA's pretraining stage crops, as LLaVA-1.5's): labels of padded images laid on
    cropped ones described another part of each non-square image (12 of 16 cells of a 2:1 image). Recorded in the
    file, and checked where the labels are used. ``max_image_pixels``: that stage's ``data.max_image_pixels`` (None:
    no limit), so the pass reads every image the stage trains on.
    """
    image_aspect_ratio = check_aspect_ratio(image_aspect_ratio, "image_aspect_ratio")
    words = read_words(words)
    if "{w}" not in prompt:
        raise ValueError(f"prompt {prompt!r} must contain {{w}}, where each word goes")
    paths = sorted({p for _, images in record_images(data, image_root) for p in images})
    if not paths:
        raise DataError(f"no images in {[str(d) for d in data]}")
    check_images(paths)
    if isinstance(model, str):
        encoder = load_encoder(model, device=encoder_device(device), trust_remote_code=trust_remote_code)
    else:
        encoder = model
    progress = PartialRows(None, {}) if progress is None else progress
    with torch.no_grad():
        text = encoder.encode_texts([prompt.format(w=w) for w in words])
        try:
            reading = ImageReading(image_aspect_ratio, max_image_pixels)
            shape = label_rows(encoder, paths, text, k, grid, batch_size, num_workers, progress, reading)
        finally:
            progress.save()  # the rows done, also when an unreadable image stopped the pass
    info = {"model": model if isinstance(model, str) else type(model).__name__, "prompt": prompt, "pooled_grid": grid}
    info["image_aspect_ratio"] = image_aspect_ratio
    arrays = progress.arrays
    return LabelSet(list(words), shape, paths, arrays["words"], arrays["scores"], "dual_encoder", info)


def label_rows(
    encoder: DualEncoder,
    paths: Sequence[Path],
    text: torch.Tensor,
    k: int,
    grid: int | None,
    batch_size: int,
    num_workers: int | str,
    progress: PartialRows,
    reading: ImageReading,
) -> tuple[int, int]:
    """Fill ``progress``' ``words`` and ``scores`` arrays ``[n_images, cells, k]`` from its first row not done on;
    returns the grid ``(rows, cols)``.

    The grid is known once the encoder has seen a batch, so the arrays are made at the first batch and the grid kept
    with them (a pass resumed after its last batch still has it). Kept rows of another grid than this encoder gives
    (a hub model updated under its name) are dropped and the pass starts again: two grids never meet in one file."""
    n = len(paths)

    def kept_problem(arrays: Mapping[str, np.ndarray], info: Mapping[str, Any]) -> str | None:
        kept = info.get("grid")
        fits = isinstance(kept, list) and len(kept) == 2 and all(type(g) is int for g in kept)
        if fits and all(a.shape == (n, kept[0] * kept[1], k) for a in arrays.values()):
            return None
        return f"its arrays {[list(a.shape) for a in arrays.values()]} are not {n} images x grid {kept} x k={k}"

    first = progress.resume(n, {"words": np.int32, "scores": np.float32}, kept_problem)
    prepare = functools.partial(prepared, encoder.image_spec, reading)
    batches = decoded_batches(
        paths[first:], prepare, batch_size, device_of(encoder), num_workers, raise_unreadable=True
    )
    for start, batch in zip(range(first, n, batch_size), batches):  # an unreadable image stops the pass
        i, s, shape = dual_encoder_scores(encoder, batch.items, text, k, grid)
        if not progress.arrays:
            cells = (n, i.shape[1], k)
            progress.allocate({"words": (cells, np.int32), "scores": (cells, np.float32)}, {"grid": list(shape)})
        elif list(shape) != progress.info["grid"]:
            progress.restart(f"its rows have a {progress.info['grid']} grid, the encoder gives {list(shape)}")
            return label_rows(encoder, paths, text, k, grid, batch_size, num_workers, progress, reading)
        word_ids, score_arr, rows = progress.arrays["words"], progress.arrays["scores"], slice(start, start + len(i))
        if i.shape[-1] < k:  # fewer words than k: the slots past them stay empty (-1, 0)
            word_ids[rows], score_arr[rows] = -1, 0
        word_ids[rows, :, : i.shape[-1]], score_arr[rows, :, : s.shape[-1]] = i.numpy(), s.numpy()
        progress.commit(rows.stop)
    kept = progress.info["grid"]
    return kept[0], kept[1]


def check_images(paths: Sequence[Path]) -> None:
    """Every image a file, checked (a stat each) before the encoder loads: one missing image stopped the pass where it
    came, after hours of work, and kept nothing."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(
            f"SEA labels: {len(missing)} images of the data are not files, the first {str(missing[0])!r} (name the "
            "folder the paths are relative to with image_root / --image-root, or drop the records)",
            MISSING_IMAGE,
        )


def encoder_device(device: str | None) -> str:
    """The ``device`` knob checked (a name torch knows, a GPU this machine has), ``default_device()`` when unset."""
    if device is None:
        return default_device()
    problem = device_problem(device)
    if problem:
        raise ValueError(f"SEA labels device={device!r}: {problem}; use cpu, cuda or cuda:N, or leave it unset")
    return device


def read_words(words: Sequence[str] | str) -> list[str]:
    """A word list given inline or as a text file (one word per line, ``#`` comments)."""
    if isinstance(words, str):
        path = Path(words)
        if not path.exists():
            raise FileNotFoundError(f"word list {path} does not exist")
        words = [
            w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip() and not w.startswith("#")
        ]
    words = [str(w) for w in words]
    if not words:
        raise ValueError("the word list is empty")
    return words


SOURCES: dict[str, Callable[..., LabelSet]] = {"annotations": from_annotations, "dual_encoder": from_dual_encoder}


# the knobs of a source that name what it reads (their contents are inputs) or only how it computes: not variants
READ_KNOBS = ("annotations", "model", "image_root")
HOW_KNOBS = ("batch_size", "trust_remote_code", "device", "num_workers", "progress", "max_image_pixels")


def source_arguments(source: str, data: Sequence[str | Path], k: int, knobs: dict[str, Any]) -> dict[str, Any]:
    """A source's knobs with its defaults filled in; a knob it does not take is a TypeError naming it, as the call's."""
    if source not in SOURCES:
        raise ValueError(f"SEA label source {source!r} is not known; choose one of {sorted(SOURCES)}")
    bound = inspect.signature(SOURCES[source]).bind([str(d) for d in data], k, **knobs)
    bound.apply_defaults()
    return dict(list(bound.arguments.items())[2:])


def label_knobs(source: str, k: int, arguments: dict[str, Any]) -> dict[str, Any]:
    """The knobs that make a variant of the labels (a file made with others is refused): the source, ``k`` and the
    source's own choices, a word list as its words (whether given inline or as a file)."""
    knobs: dict[str, Any] = {"source": source, "k": int(k)}
    for name, value in arguments.items():
        if name not in READ_KNOBS + HOW_KNOBS:
            knobs[name] = read_words(value) if name == "words" else value
    return as_json(knobs)


def label_inputs(
    path: Path, data: Sequence[str | Path], arguments: dict[str, Any]
) -> tuple[dict[str, str], dict[str, Stamp | None]]:
    """Digests of what the labels are made from: the data files' bytes, the images (their keys in the file, sizes
    and modification times), the annotations' bytes and the encoder, where the source reads them; and each image's
    stamp by its key in the file, which the file keeps (taken here, before the source reads any image)."""
    images = sorted({p for _, paths in record_images(data, arguments.get("image_root")) for p in paths})
    root = path.parent.resolve()
    keys = [image_key(p, root) for p in images]
    taken = [file_stamp(p) for p in images]
    inputs = {"data": files_digest(data), "images": stamps_digest(images, keys, taken)}
    if "annotations" in arguments:
        inputs["annotations"] = file_digest(annotations_file(data, arguments["annotations"]))
    if "model" in arguments:
        inputs["model"] = encoder_identity(arguments["model"])
    return inputs, dict(zip(keys, taken, strict=True))


def label_provenance(
    out: Path, source: str, data: Sequence[str | Path], k: int, knobs: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Stamp | None]]:
    """The source's arguments, the ``{knobs, inputs}`` labels made from them record and the images' stamps; refuses a
    request that cannot make labels."""
    if not data:
        raise ValueError("SEA labels need at least one data file (LLaVA JSON) whose images to label")
    CANDIDATES.check("k", k, whole=True, note=": keep at least one candidate word per patch")
    arguments = source_arguments(source, data, k, knobs)
    inputs, stamps = label_inputs(out, data, arguments)
    return arguments, {"knobs": label_knobs(source, k, arguments), "inputs": inputs}, stamps


def make_labels(
    out: str | Path, source: str, data: Sequence[str | Path], k: Annotated[int, CANDIDATES] = 5, **knobs: Any
) -> Path:
    """Compute labels from a source and write them to ``out`` with what they were made from; the one entry the CLI
    and the pipeline call."""
    out = Path(out)
    arguments, provenance, stamps = label_provenance(out, source, data, k, knobs)
    with sole_writer(out, f"labelling {out}"):
        progress = PartialRows(partial_folder(out), provenance)  # kept under what the labels record they came from
        if "progress" in arguments:  # a source whose pass keeps its rows while it runs
            arguments["progress"] = progress
        path = write_labels(out, SOURCES[source]([str(d) for d in data], k, **arguments), provenance, stamps)
        progress.remove()
    return path


def ensure_labels(
    path: str | Path, source: str, data: Sequence[str | Path], k: Annotated[int, CANDIDATES] = 5, **knobs: Any
) -> Path:
    """The ``sea_labels`` prepare step: write the labels file from this recipe when it is missing or what it was made
    from changed since (the data regenerated under the same paths, an encoder refitted); a file made with other knobs
    is refused, naming the knob. Another process making it is waited for (``files.sole_writer``)."""
    path = Path(path)
    with sole_writer(path, f"labelling {path}"):
        if path.exists():
            stored = SeaLabels(path).provenance
            _, wanted, _ = label_provenance(path, source, data, k, knobs)
            if stored is not None:
                check_knobs(path, stored.get("knobs", {}), wanted["knobs"], "sea_labels")
            recorded = None if stored is None else stored.get("inputs")
            changed = changed_inputs(recorded, wanted["inputs"])
            if not changed:
                return path
            log.warning("SEA labels %s: %s; writing them again", path, why_again(recorded, changed))
        return make_labels(path, source, data, k, **knobs)
