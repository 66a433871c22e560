"""LLaVA-format data: JSON / JSONL records, an image root, weighted mixtures, and a bad-input policy.

Records are read and validated at start-up (a malformed record is reported with its file and index
before step 1); images and tokenization happen lazily per sample. Missing or corrupt images and
over-long samples follow ``on_error``: ``skip`` drops the sample and counts it, ``raise`` stops with the
record id. Truncation never cuts inside or before visual tokens, and never leaves a sample with
nothing supervised.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from alignlm.constants import ALIGN_TOKEN, IGNORE_INDEX, IMAGE_TOKEN
from alignlm.data.collate import Skipped
from alignlm.data.images import load_rgb, preprocess
from alignlm.data.templates import Template, TemplateError, adds_bos, to_turns, tokenize
from alignlm.models.vision import ImageSpec

if TYPE_CHECKING:
    from alignlm.data.aligngpt_levels import LevelLabels
    from alignlm.data.sea_labels import SeaLabels

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")


class DataError(ValueError):
    """Bad input data, with the record that caused it."""


@dataclass(frozen=True)
class Source:
    """One file of a mixture; ``weight`` 2.0 repeats it twice per epoch, 0.5 keeps a seeded half."""

    path: str
    image_root: str | None = None
    weight: float = 1.0


def read_records(path: str | Path) -> list[Any]:
    """All records of a ``.json`` (a list) or ``.jsonl`` file, with the line named on a parse error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist (run `alignlm data ...` to make the offline sets)")
    if path.suffix == ".jsonl":
        records = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        return records
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def record_problem(record: Any) -> str | None:
    """Why a record is malformed, or None: checked for every record before training starts."""
    if not isinstance(record, dict):
        return f"record is a {type(record).__name__}, not an object"
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "missing or empty 'conversations' list"
    image = record.get("image")
    if image is not None and not (isinstance(image, str) or (isinstance(image, list) and all(isinstance(i, str) for i in image))):
        return f"'image' must be a path or a list of paths, got {image!r}"
    try:
        to_turns(conv)
    except TemplateError as e:
        return str(e)
    return None


def mixture_index(sizes: Sequence[int], weights: Sequence[float], seed: int) -> np.ndarray:
    """``(source, record)`` pairs for one epoch: integer part of each weight repeats the source, the rest is sampled."""
    rng = np.random.default_rng(seed)
    parts = []
    for s, (n, w) in enumerate(zip(sizes, weights)):
        if w < 0:
            raise ValueError(f"data source {s} has weight {w}; weights must be >= 0")
        whole, frac = int(w), w - int(w)
        idx = [np.arange(n)] * whole + [np.sort(rng.permutation(n)[: int(round(frac * n))])]
        rec = np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
        parts.append(np.stack([np.full_like(rec, s), rec], axis=1))
    return np.concatenate(parts).astype(np.int64)


class LlavaDataset(Dataset):
    """Lazy LLaVA-style dataset: one item = token ids, labels (assistant turns only) and preprocessed images."""

    def __init__(
        self,
        sources: Sequence[Source],
        tokenizer: Any,
        template: Template,
        image_spec: ImageSpec,
        num_image_tokens: int,
        max_length: int = 2048,
        on_error: str = "skip",
        for_generation: bool = False,
        seed: int = 0,
        sea_labels: SeaLabels | None = None,
        align_token_id: int | None = None,
        align_levels: LevelLabels | None = None,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"data.on_error={on_error!r} is not known; choose one of {list(ON_ERROR)}")
        self.tokenizer = tokenizer
        self.template = template
        self.image_spec = image_spec
        self.num_image_tokens = num_image_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.max_length = max_length
        self.on_error = on_error
        self.for_generation = for_generation
        self.sources = list(sources)
        self.records: list[list[Any]] = []
        self.malformed: list[str] = []
        for src in self.sources:
            kept = []
            for i, rec in enumerate(read_records(src.path)):
                problem = record_problem(rec)
                if problem is None:
                    kept.append(rec)
                    continue
                where = f"{src.path} record {i} (id={rec.get('id') if isinstance(rec, dict) else None!r})"
                if on_error == "raise":
                    raise DataError(f"{where}: {problem}")
                self.malformed.append(f"{where}: {problem}")
            self.records.append(kept)
        if self.malformed:
            log.warning("skipped %d malformed records at start-up, first: %s", len(self.malformed), self.malformed[0])
        self.index = mixture_index([len(r) for r in self.records], [s.weight for s in self.sources], seed)
        if len(self.index) == 0:
            raise DataError(f"no usable records in {[s.path for s in self.sources]}")
        self.sea_labels = sea_labels  # placed on the model's visual tokens; adds sea_words / sea_scores per image
        if sea_labels is not None:
            n = sum(sea_labels.coverage(self._image_paths(s, r)) for s, recs in zip(self.sources, self.records) for r in recs)
            if n == 0:
                raise DataError(f"SEA labels {sea_labels.path} label none of the images of {[s.path for s in self.sources]}")
            log.info("SEA labels %s cover %d image uses of this stage's data", sea_labels.path, n)
        # AlignGPT: one <align> slot per sample after BOS (the model writes its level token there); per-sample levels
        self.align_token_id = align_token_id
        self.bos_token_id = tokenizer.bos_token_id if align_token_id is not None and adds_bos(tokenizer) else None
        self.align_levels = align_levels
        if align_levels is not None:
            self._check_level_coverage(align_levels)

    def _check_level_coverage(self, levels: LevelLabels) -> None:
        """Start-up: a levels file that covers none of the stage's records fails; gaps are reported, then skipped."""
        ids = [str(rec.get("id", f"{src.path}#{r}")) for src, recs in zip(self.sources, self.records) for r, rec in enumerate(recs)]
        missing = [rid for rid in ids if levels.get(rid) is None]
        if len(missing) == len(ids) or (missing and self.on_error == "raise"):
            raise DataError(f"AlignGPT levels {levels.path} have no level for {len(missing)} of the {len(ids)} records of "
                            f"{[s.path for s in self.sources]}, e.g. {missing[:3]}; write them for this data "
                            "(alignlm aligngpt-levels --data ...)")
        if missing:
            log.warning("AlignGPT levels %s have no level for %d of %d records (e.g. %s); those are skipped",
                        levels.path, len(missing), len(ids), missing[:3])

    def __len__(self) -> int:
        return len(self.index)

    def record(self, i: int) -> tuple[Source, dict[str, Any]]:
        s, r = self.index[i]
        return self.sources[s], self.records[s][r]

    def length_estimates(self) -> list[int]:
        """Cheap per-sample token-count estimates (characters / 4 plus visual tokens) for length grouping."""
        out = []
        for s, r in self.index:
            rec = self.records[s][r]
            chars = sum(len(str(m.get("value", ""))) for m in rec["conversations"])
            out.append(chars // 4 + len(self.visual_inputs(self.sources[s], rec)) * self.num_image_tokens)
        return out

    def __getitem__(self, i: int) -> dict[str, Any] | Skipped:
        src, rec = self.record(i)
        rid = str(rec.get("id", f"{src.path}#{self.index[i][1]}"))
        try:
            return self.encode(src, rec, rid)
        except (DataError, TemplateError, OSError) as e:
            if self.on_error == "raise":
                raise DataError(f"record id={rid} in {src.path}: {e}") from e
            return Skipped(rid, f"{type(e).__name__}: {e}")

    def visual_inputs(self, src: Source, rec: dict[str, Any]) -> list[Any]:
        """What stands for each image of a record, in order: here its image files (a subclass may differ)."""
        return self._image_paths(src, rec)

    def load_visuals(self, inputs: list[Any]) -> dict[str, torch.Tensor | None]:
        """The sample's visual fields: ``pixel_values`` ``[n_images, 3, H, W]`` (None for a text-only record)."""
        return {"pixel_values": torch.stack([self._image(p) for p in inputs]) if inputs else None}

    @staticmethod
    def _image_paths(src: Source, rec: dict[str, Any]) -> list[Path]:
        images = rec.get("image")
        images = [] if images is None else [images] if isinstance(images, str) else list(images)
        root = Path(src.image_root) if src.image_root else Path(src.path).parent
        return [root / p for p in images]

    def encode(self, src: Source, rec: dict[str, Any], rid: str) -> dict[str, Any]:
        """Render, tokenize, expand image placeholders and load images for one record."""
        images = self.visual_inputs(src, rec)
        turns = to_turns(rec["conversations"])
        n_placeholders = sum(t.content.count(IMAGE_TOKEN) for t in turns)
        if images and n_placeholders == 0:  # LLaVA convention: the image goes before the first question
            turns[0] = type(turns[0])(turns[0].role, IMAGE_TOKEN + "\n" + turns[0].content)
            n_placeholders = len(images)
        if n_placeholders != len(images):
            raise DataError(f"{n_placeholders} {IMAGE_TOKEN} placeholders but {len(images)} images")
        if self.for_generation:
            turns = turns[: max(i for i, t in enumerate(turns) if t.role == "user") + 1]
        rendered = self.template.render(turns, self.tokenizer, add_generation_prompt=self.for_generation)
        ids, labels = tokenize(rendered, self.tokenizer)
        if not self.for_generation and not (labels != IGNORE_INDEX).any():
            raise TemplateError(f"template {self.template.name!r} supervised no token of this record")
        if self.align_token_id is not None:
            ids, labels = self._insert_align_slot(ids, labels)
        ids, labels = self._expand_images(ids, labels)
        ids, labels = self._fit_length(ids, labels)
        sample = {"id": rid, "input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels), **self.load_visuals(images),
                  "n_images": len(images)}
        if self.sea_labels is not None:
            sample["sea_words"], sample["sea_scores"] = self.sea_labels.for_images(images)
        if self.align_levels is not None:
            level = self.align_levels.get(rid)
            if level is None:
                raise DataError(f"AlignGPT levels {self.align_levels.path} have no level for this record")
            sample["align_level"] = level
        if "answer" in rec:
            sample["answer"] = rec["answer"]
            sample["meta"] = rec.get("meta", {})
        return sample

    def _image(self, path: Path) -> torch.Tensor:
        try:
            return preprocess(load_rgb(path), self.image_spec)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {path}: {e}") from e

    def _insert_align_slot(self, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One ``<align>`` slot (label -100) right after the tokenizer's own BOS, or first when the sequence has none.

        Placed by token id, never by string: the template's text is tokenized as it would be without AlignGPT.
        """
        if (ids == self.align_token_id).any():
            raise DataError(f"the text contains the reserved {ALIGN_TOKEN} token")
        at = int(self.bos_token_id is not None and len(ids) > 0 and ids[0] == self.bos_token_id)
        return np.insert(ids, at, self.align_token_id), np.insert(labels, at, IGNORE_INDEX)

    def _expand_images(self, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        repeats = np.where(ids == self.image_token_id, self.num_image_tokens, 1)
        ids = np.repeat(ids, repeats)
        labels = np.repeat(labels, repeats)
        labels[ids == self.image_token_id] = IGNORE_INDEX
        return ids, labels

    def _fit_length(self, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(ids) <= self.max_length:
            return ids, labels
        image_pos = np.flatnonzero(ids == self.image_token_id)
        if len(image_pos) and image_pos[-1] >= self.max_length:
            raise DataError(f"{len(ids)} tokens exceed data.max_length={self.max_length} and a cut would split visual tokens")
        if self.for_generation or not (labels[: self.max_length] != IGNORE_INDEX).any():
            raise DataError(f"{len(ids)} tokens exceed data.max_length={self.max_length} and a cut would leave no answer")
        return ids[: self.max_length], labels[: self.max_length]
