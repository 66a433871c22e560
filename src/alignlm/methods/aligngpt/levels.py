"""AlignGPT's per-sample alignment levels (docs/methods.md, AlignGPT): one JSON file beside the data, written by
``alignlm aligngpt-levels`` or the ``aligngpt_levels`` prepare step, read by the ``levels`` data hook in pretraining.

Every image-caption record is scored with a dual encoder, the cosine of its global image and caption embeddings, and
the scores are bucketed into ``L`` equal-count bins *(ours)*: by rank, level ``k`` holds the ``k``-th ``1/L`` of the
pairs, so each level embedding trains on the same number of samples whatever range the encoder's cosines span. File:

    {"format": "alignlm.aligngpt_levels", "version": 1, "num_levels": L, "encoder": name, "similarity": "cosine",
     "edges": [L-1 floats], "counts": [L ints], "data": [files], "skipped": {reason: count}, "levels": {id: level},
     "provenance": {"knobs": {"num_levels": L}, "inputs": {"data": digest, "images": digest, "encoder": digest}}}

``edges[k-1]`` is the lowest score in level ``k``. Records are keyed by their ``id``. A record with no image, several
images, no caption or an unreadable image gets no level (counted under ``skipped``); a stage that trains on it skips
it per ``data.on_error``. ``provenance`` (``methods/provenance.py``) is what the levels were made from: the prepare step
writes them again when the data, the images or the encoder changed since, and refuses a file of another ``L``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alignlm.config import COUNT, Bounds, KnobsOf
from alignlm.data.images import decoded_batches
from alignlm.data.records import DataError, image_names, image_paths, iter_records, record_caption
from alignlm.files import PartialRows, partial_folder, replace_text, sole_writer
from alignlm.methods.provenance import (
    KEY,
    changed_inputs,
    check_knobs,
    encoder_identity,
    ensure_fitted_encoder,
    files_digest,
    stamps_digest,
    why_again,
)
from alignlm.models.device import default_device
from alignlm.models.encoder_fit import fit_encoder
from alignlm.models.encoders import DualEncoder, device_of, image_steps, load_encoder

log = logging.getLogger(__name__)

FORMAT = "alignlm.aligngpt_levels"
LEVELS = Bounds(2)  # num_levels: AlignGPT needs two levels at least (the flag, the knob)
VERSION = 1


def equal_count_levels(scores: np.ndarray, num_levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Levels ``0..L-1`` by rank (bin sizes differ by at most one; ties keep input order) and the ``L-1`` bin edges."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    LEVELS.check("num_levels", num_levels, whole=True, note=": AlignGPT needs at least 2 levels")
    if n < num_levels:
        raise DataError(f"{n} scored pairs cannot fill {num_levels} equal-count levels; give more data or fewer levels")
    order = np.argsort(scores, kind="stable")
    levels = np.empty(n, dtype=np.int64)
    levels[order] = np.arange(n) * num_levels // n
    first = -(-np.arange(1, num_levels) * n // num_levels)  # the first rank of each level 1..L-1: ceil(k * n / L)
    return levels, scores[order[first]]


def caption_pairs(
    data: Sequence[str | Path], image_root: str | Path | None = None
) -> tuple[list[tuple[str, Path, str]], Counter]:
    """``(record id, image path, caption)`` of every single-image caption record, and why the others were left out.

    The caption is ``data.records.record_caption`` (a LLaVA pretraining record's first assistant turn).
    An id seen twice is an error: the levels file is keyed by id.
    """
    pairs: list[tuple[str, Path, str]] = []
    skipped: Counter = Counter()
    where: dict[str, str] = {}
    for path in map(Path, data):
        root = Path(image_root) if image_root else path.parent
        for i, rec in enumerate(iter_records(path)):
            if not isinstance(rec, dict) or "id" not in rec:
                raise DataError(f"{path} record {i} has no 'id'; AlignGPT levels are keyed by record id")
            rid = str(rec["id"])
            if rid in where:
                raise DataError(
                    f"record id {rid!r} appears in {where[rid]} and {path}; levels need ids unique across files"
                )
            where[rid] = str(path)
            images = image_names(rec)  # one path or a list of one: the same single image
            caption = record_caption(rec) or ""
            if not images:
                skipped["no image"] += 1
            elif len(images) > 1:
                skipped["several images"] += 1
            elif not caption:
                skipped["no caption"] += 1
            else:
                pairs.append((rid, image_paths(rec, root)[0], caption))
    return pairs, skipped


def level_inputs(
    data: Sequence[str | Path], encoder: str | DualEncoder, image_root: str | Path | None = None
) -> dict[str, str]:
    """Digests of what levels are made from: the data files' bytes, the scored images' sizes and modification times,
    and the encoder (a local folder's files' stamps, an object's weights, or a hub name)."""
    pairs, _ = caption_pairs(data, image_root)
    return {
        "data": files_digest(data),
        "images": stamps_digest(p[1] for p in pairs),
        "encoder": encoder_identity(encoder),
    }


@torch.no_grad()
def pair_scores(
    encoder: DualEncoder,
    images: Sequence[Path],
    captions: Sequence[str],
    batch_size: int = 64,
    num_workers: int | str = "auto",
    progress: PartialRows | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of each image with its caption, and a mask of the pairs whose image could be read.

    ``num_workers`` (``data.images.loader_workers``: auto, by the encoder's device) processes read and preprocess the
    images ahead of the encoder, in order: read one at a time in this process, they were 86 % of the time at
    LLaVA-558k with a bf16 CLIP-L on a GPU. ``progress`` (:func:`make_levels` gives one beside the levels file) keeps
    the scores on the disk while the pass runs, an unreadable image's NaN among them, so a killed pass (an hour of a
    GPU at LLaVA-558k) resumes at its first unscored batch; none keeps them in memory only."""
    prepare, encode = image_steps(encoder)
    progress = PartialRows(None, {}) if progress is None else progress
    n = len(images)
    first = progress.resume(n, {"scores": np.float64})
    scores = progress.arrays.get("scores")
    if scores is None:
        scores = progress.allocate({"scores": ((n,), np.float64)})["scores"]
    batches = decoded_batches(images[first:], prepare, batch_size, device_of(encoder), num_workers)
    steps = zip(range(first, n, batch_size), batches)
    try:
        for start, batch in tqdm(
            steps, total=-(-n // batch_size), initial=first // batch_size, desc="aligngpt levels", unit="batch"
        ):
            index = [first + j for j in batch.index]  # where the batch's readable images stand in ``images``
            for j, e in batch.errors.items():
                log.warning("aligngpt levels: cannot read %s (%s); the record gets no level", images[first + j], e)
            block = np.full(min(batch_size, n - start), np.nan)  # NaN: an unreadable image, no score
            if index:
                img = F.normalize(encode(batch.items).float(), dim=-1)
                txt = F.normalize(encoder.encode_texts([captions[j] for j in index]).float(), dim=-1)
                block[[j - start for j in index]] = (img * txt).sum(-1).double().numpy()
            scores[start : start + len(block)] = block
            progress.commit(start + len(block))
    finally:
        progress.save()  # the batches scored, also when the pass stopped on an error
    scores = np.array(scores)  # in memory: the kept file goes once the levels are written
    return scores, ~np.isnan(scores)


def make_levels(
    out: str | Path,
    data: Sequence[str | Path],
    encoder: str | DualEncoder,
    num_levels: Annotated[int, LEVELS] = 8,
    batch_size: Annotated[int, COUNT] = 64,
    image_root: str | Path | None = None,
    device: str | None = None,
) -> Path:
    """Score, bucket and write a levels file; the one entry the CLI and the pipeline call.

    ``encoder``: an ``alignlm dual-encoder fit`` folder, a Hugging Face CLIP / SigLIP name or folder, or an object
    with ``name``, ``encode_images`` and ``encode_texts``.
    """
    if not data:
        raise ValueError("AlignGPT levels need at least one LLaVA data file whose image-caption pairs to score")
    inputs = level_inputs(data, encoder, image_root)  # before loading: a name, not the loaded object's weights
    if isinstance(encoder, str):
        encoder = load_encoder(encoder, device=device or default_device())
    pairs, skipped = caption_pairs(data, image_root)
    out = Path(out)
    with sole_writer(out, f"scoring {out}"):
        progress = PartialRows(partial_folder(out), {"format": FORMAT, "inputs": inputs})  # what the scores are made of
        scores, ok = pair_scores(encoder, [p[1] for p in pairs], [p[2] for p in pairs], batch_size, progress=progress)
        if (~ok).any():
            skipped["unreadable image"] += int((~ok).sum())
        kept = [p[0] for p, good in zip(pairs, ok) if good]
        levels, edges = equal_count_levels(scores[ok], num_levels)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "num_levels": int(num_levels),
            "encoder": encoder.name,
            "similarity": "cosine",
            "edges": [round(float(e), 6) for e in edges],
            "counts": np.bincount(levels, minlength=num_levels).tolist(),
            "data": [str(d) for d in data],
            "skipped": dict(skipped),
            "levels": dict(zip(kept, levels.tolist())),
            KEY: {"knobs": {"num_levels": int(num_levels)}, "inputs": inputs},
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        replace_text(out, json.dumps(meta))  # a kill never leaves a half file that looks whole
        progress.remove()
    log.info("aligngpt levels: %d pairs in %d levels -> %s (skipped %s)", len(kept), num_levels, out, dict(skipped))
    return out


class LevelLabels:
    """A levels file opened for lookup by record id."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(
                f"AlignGPT levels file {self.path} does not exist; write it with `alignlm aligngpt-levels`, "
                "or give the stage an aligngpt_levels prepare step so the pipeline writes it"
            )
        meta = json.loads(self.path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DataError(f"{self.path} is not an alignlm AlignGPT levels file (no format {FORMAT!r})")
        if meta.get("version") != VERSION:
            raise DataError(
                f"{self.path}: levels format version {meta.get('version')} is not supported (expected {VERSION})"
            )
        whole = (meta.get("num_levels"), *(meta.get("levels") or {}).values())  # 2.9 was read as level 2, "3" as 3
        if not isinstance(meta.get("levels"), dict) or not all(type(v) is int for v in whole):
            bad = next((v for v in whole if type(v) is not int), meta.get("levels"))
            raise DataError(f"{self.path}: num_levels and every level must be whole numbers; got {bad!r}")
        self.num_levels: int = meta["num_levels"]
        self.encoder: str = str(meta["encoder"])
        self.edges: list[float] = list(meta["edges"])
        self.counts: list[int] = list(meta["counts"])
        self.skipped: dict[str, int] = dict(meta.get("skipped", {}))
        self.provenance: dict[str, Any] | None = meta.get(KEY)  # None: written before files recorded it
        self.levels: dict[str, int] = {str(k): v for k, v in meta["levels"].items()}
        bad = [k for k, v in self.levels.items() if not 0 <= v < self.num_levels]
        if bad:
            raise DataError(f"{self.path}: levels of {bad[:3]} are outside 0..{self.num_levels - 1}")

    def get(self, record_id: str) -> int | None:
        """The level of a record, or None when the file has none for it."""
        return self.levels.get(record_id)

    def check(self, num_levels: int) -> LevelLabels:
        """Fail at start-up when the file was bucketed for another ``L`` than the model's; returns self."""
        if num_levels != self.num_levels:
            raise DataError(
                f"{self.path} holds {self.num_levels} levels but model.align_levels.num_levels={num_levels}; "
                "point the levels hook at a file made with that many (or delete this one so the "
                "aligngpt_levels prepare step rewrites it)"
            )
        return self


def ensure_levels(
    out: str | Path,
    data: Sequence[str | Path],
    encoder: str | DualEncoder,
    num_levels: Annotated[int, LEVELS] = 8,
    batch_size: Annotated[int, COUNT] = 64,
    image_root: str | Path | None = None,
    device: str | None = None,
    fit: Annotated[dict[str, Any] | None, KnobsOf(fit_encoder, ("out",))] = None,
) -> Path:
    """The ``aligngpt_levels`` prepare step: write the levels file when it is missing or what it was made from
    changed (the data regenerated under the same ids, another or a refitted encoder); a file of another
    ``num_levels`` is refused.

    ``fit`` (``alignlm dual-encoder fit`` knobs) fits the offline dual encoder into the folder ``encoder`` first when
    it holds none or one fitted on other data, and refuses one fitted with other knobs
    (``provenance.ensure_fitted_encoder``); null never fits (``encoder`` is then a CLIP / SigLIP name or a folder).
    """
    out = Path(out)
    if isinstance(encoder, (str, Path)):
        ensure_fitted_encoder(encoder, fit, "aligngpt_levels", "aligngpt_levels.fit")
    with sole_writer(out, f"scoring {out}"):
        if out.exists():
            stored = LevelLabels(out).provenance
            if stored is not None:
                check_knobs(out, stored.get("knobs", {}), {"num_levels": int(num_levels)}, "aligngpt_levels")
            recorded = None if stored is None else stored.get("inputs")
            changed = changed_inputs(recorded, level_inputs(data, encoder, image_root))
            if not changed:
                return out
            log.warning("aligngpt levels %s: %s; writing them again", out, why_again(recorded, changed))
        return make_levels(out, data, encoder, num_levels, batch_size, image_root, device)
