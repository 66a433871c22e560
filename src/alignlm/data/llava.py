"""The LLaVA-format training dataset: records of a weighted mixture rendered, tokenized and masked per sample.

Records are read and validated at start-up (a malformed record, an invalid JSONL line, an image path that leaves its
``image_root``, ``<image>`` placeholders that do not match the images, or turns the template does not take is reported
with its file and index before step 1), in one pass that keeps each record packed (``records.PackedRecords``: no
Python object per record) and what its sample's id and length estimate need; a record is decoded, its images loaded
and its text tokenized lazily per sample. Images are not looked for at start-up, but for a few records spread over
each file (:data:`IMAGE_PROBES`): when none of those is there, nor the folder it would be in, the paths are read under
the wrong folder (a pairs file written away from its images, a mistyped ``image_root``) and start-up says so, naming
the path and the folder, where every sample was skipped as a missing image, step after step.
Missing, corrupt or oversized images and over-long samples follow ``on_error``: ``skip`` drops the sample and counts
it under its cause (``data/report.py``), ``raise`` stops with the record id. A stage whose usable records fall below
``min_usable_fraction`` fails at start-up. Truncation never cuts inside or before visual tokens, never leaves a sample
with nothing supervised, and is counted.

Methods add their own per-sample data through :class:`~alignlm.data.hooks.SampleHook` s; model parts that write an
input embedding of their own get a reserved slot token right after BOS (``slot_token_ids``), inserted by id.
"""

from __future__ import annotations

import logging
import os
import re
from array import array
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from alignlm.config import ConfigError
from alignlm.constants import ALIKE_ON_EVERY_RANK, IGNORE_INDEX, IMAGE_TOKEN
from alignlm.data.collate import Skipped
from alignlm.data.hooks import SampleHook
from alignlm.data.images import MAX_PIXELS, ImageSpec, check_aspect_ratio, load_rgb, preprocess
from alignlm.data.records import (
    INVALID_JSON,
    MALFORMED,
    MISSING_IMAGE,
    OUTSIDE_ROOT,
    TOO_LONG,
    DataError,
    PackedRecords,
    Source,
    cause_of,
    generation_problem,
    image_names,
    iter_records,
    mixture_index,
    preference_problem,
    record_id,
    root_problem,
    shape_problem,
)
from alignlm.data.report import DataReport
from alignlm.data.templates import Template, TemplateError, Turn, adds_bos, to_turns, tokenize

log = logging.getLogger(__name__)


def last_answer_only(labels: np.ndarray) -> np.ndarray:
    """``labels`` with every supervised token before the last contiguous supervised run masked out."""
    supervised = np.flatnonzero(labels != IGNORE_INDEX)
    if len(supervised) == 0:
        return labels
    breaks = np.flatnonzero(np.diff(supervised) > 1)
    start = int(supervised[breaks[-1] + 1]) if len(breaks) else int(supervised[0])
    out = labels.copy()
    out[:start] = IGNORE_INDEX
    return out


def answered(rec: dict[str, Any], key: str) -> dict[str, Any]:
    """A preference record's prompt answered with its ``key`` answer (``chosen`` or ``rejected``): a conversation
    ending with the assistant's turn."""
    return {**rec, "conversations": [*rec["conversations"], {"from": "gpt", "value": rec[key]}]}


def text_chars(rec: dict[str, Any]) -> int:
    """The characters of a record's turns' text (each ``value`` a string: checked at start-up), for length grouping."""
    return sum(len(turn["value"]) for turn in rec["conversations"])


ON_ERROR = ("skip", "raise")
IMAGE_PROBES = 16  # records per source, spread over it, whose first image start-up looks for (a stat each)


def check_error_policy(on_error: Any, min_usable_fraction: Any, key: str = "data") -> None:
    """``on_error`` is a policy the dataset knows and ``min_usable_fraction`` a fraction (checked for every stage
    before the first trains, and again when a dataset is built)."""
    if on_error not in ON_ERROR:
        raise ConfigError(f"{key}.on_error={on_error!r} is not known; choose one of {list(ON_ERROR)}")
    ok = isinstance(min_usable_fraction, (int, float)) and not isinstance(min_usable_fraction, bool)
    if not (ok and 0 <= min_usable_fraction <= 1):
        raise ConfigError(f"{key}.min_usable_fraction={min_usable_fraction!r} must be a number within [0, 1]")


# How PyTorch re-raises in the main process what a DataLoader worker raised: the worker's traceback as the message.
_FROM_WORKER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def error_message(error: DataError) -> str:
    """``error``'s message as it was raised, also when a DataLoader worker raised it: ``on_error: raise`` with loader
    workers (``num_workers: auto`` on CUDA) reached the user as PyTorch's re-raise, "Caught DataError in DataLoader
    worker process 1." and ~50 lines of the worker's traceback, where the same record without workers said one line.
    That message ends with the worker's exception as ``traceback`` formats it, ``<module>.<class>: <message>``: its
    message is what this returns (a message of its own is returned as it is)."""
    text = str(error)
    if not _FROM_WORKER.match(text):
        return text
    head = f"\n{type(error).__module__}.{type(error).__qualname__}: "
    at = text.rfind(head)
    return text[at + len(head) :].rstrip("\n") if at >= 0 else text


def check_image_folder(src: Source, records: PackedRecords, image_counts: np.ndarray) -> None:
    """Refuse a source whose image paths are read under the wrong folder: for :data:`IMAGE_PROBES` of its records
    with an image, spread over the file, neither the first image nor the folder it would be in exists.

    Why here: start-up checks every record's image paths as text only (it would otherwise stat every image of a
    665k-record mixture on every rank at every stage start and resume), so a wrong ``image_root`` showed only while
    training, as every sample skipped for a missing image ("no step trained ... missing image: 80"), naming neither
    the path nor the folder. A few stats tell that case apart: one image missing from a folder that holds the others
    is a missing image, counted or raised per ``on_error`` when its sample is drawn; a folder that is not there at all
    means the paths are read under another folder than the one they were written for.
    """
    with_images = np.flatnonzero(image_counts)
    if len(with_images) == 0:
        return
    picks = with_images[np.unique(np.linspace(0, len(with_images) - 1, IMAGE_PROBES).round().astype(np.int64))]
    base = os.path.abspath(src.root)  # names that start-up kept (inside the root, or allowed out), joined as text
    paths = [Path(os.path.normpath(os.path.join(base, image_names(records[int(at)])[0]))) for at in picks]
    if any(p.exists() or p.parent.is_dir() for p in paths):
        return
    others = f", nor those of the {len(paths) - 1} other records looked at across the file" if len(paths) > 1 else ""
    raise DataError(
        f"{src.path}: image {paths[0]} does not exist, nor does its folder{others}: the file's image paths are read "
        f"under {src.root_text()}; set the source's image_root to the folder they are relative to (data.sources "
        "entries are {path, image_root, weight})",
        MISSING_IMAGE,
    )


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
        hooks: Sequence[SampleHook] = (),
        slot_token_ids: Sequence[int] = (),
        image_only_slot_ids: Sequence[int] = (),
        max_image_pixels: int | None = MAX_PIXELS,
        min_usable_fraction: float = 0.5,
        preference: bool = False,
        image_aspect_ratio: str = "pad",
    ) -> None:
        check_error_policy(on_error, min_usable_fraction)
        # how a non-square image becomes the tower's square (data/images.py: ASPECT_RATIOS)
        self.image_aspect_ratio = check_aspect_ratio(image_aspect_ratio)
        self.tokenizer = tokenizer
        self.template = template
        self.image_spec = image_spec
        self.num_image_tokens = num_image_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.max_length = max_length
        self.on_error = on_error
        self.for_generation = for_generation
        self.seed = seed
        self.max_image_pixels = max_image_pixels
        self.preference = preference  # items are (chosen, rejected) sample pairs of one prompt
        self.sources = list(sources)
        # per source, its kept records (PackedRecords: no Python object per record for a forked worker to copy) and,
        # per kept record, numpy arrays of what the start-up pass read of it
        self.records: list[PackedRecords] = []
        # each kept record's index among all the records of its file: its fallback id ``<file>#<index>`` is the one
        # start-up names it by, whatever was left out before it
        self.file_index: list[np.ndarray] = []
        self.text_chars: list[np.ndarray] = []  # characters of its turns' text (length_estimates)
        self.image_counts: list[np.ndarray] = []  # its images as written
        self.report = DataReport()  # what start-up left out, by cause
        # reserved tokens after BOS, one per model part that writes its own input embedding there (ids, never text)
        self.slot_token_ids = [int(t) for t in slot_token_ids]
        self.image_only_slot_ids = {int(t) for t in image_only_slot_ids}  # of those, the ones text-only samples lack
        self.bos_token_id = tokenizer.bos_token_id if self.slot_token_ids and adds_bos(tokenizer) else None
        self.hooks = list(hooks)
        visual = [h for h in self.hooks if h.replaces_visuals]
        if len(visual) > 1:
            raise ValueError(
                f"data.hooks: {[type(h).__name__ for h in visual]} all replace the images; at most one may"
            )
        self.visual_hook = visual[0] if visual else None
        total = 0
        accepted: set[tuple[str, ...]] = set()  # role sequences the template rendered (startup_problem)
        for src in self.sources:
            bad_lines: list[tuple[int, str]] = []
            records = iter_records(src.path, bad_lines if on_error == "skip" else None)
            left_out, facts = self.report.left_out, array("q")
            self.records.append(PackedRecords.pack(self._kept(src, records, accepted, facts)))
            for lineno, why in bad_lines:
                where = f"{src.path}:{lineno}"
                self._drop(INVALID_JSON, where, f"{where}: not valid JSON ({why})", f"not valid JSON ({why})")
            file_index, chars, images = np.frombuffer(facts, dtype=np.int64).reshape(-1, 3).T.copy()
            self.file_index.append(file_index)
            self.text_chars.append(chars)
            self.image_counts.append(images)
            if self.visual_hook is None:  # a hook that replaces the images may need none of them
                check_image_folder(src, self.records[-1], images)
            # every record and line read was kept or counted under its cause (under on_error=raise, none was left out)
            total += len(self.records[-1]) + self.report.left_out - left_out
        if self.report.counts:
            log.warning(
                "left out %d of %d records at start-up: %s",
                self.report.left_out,
                total,
                "; ".join(self.report.lines()),
                extra=ALIKE_ON_EVERY_RANK,
            )
        usable = sum(len(r) for r in self.records)
        if total and usable < min_usable_fraction * total:
            raise DataError(
                f"only {usable} of {total} records of {[s.path for s in self.sources]} are usable, below "
                f"data.min_usable_fraction={min_usable_fraction}: {'; '.join(self.report.lines())}"
            )
        if max_length <= num_image_tokens and any(counts.any() for counts in self.image_counts):
            raise DataError(
                f"data.max_length={max_length} cannot hold one image's {num_image_tokens} visual tokens and a token "
                "of text: every record with an image would be cut away"
            )
        self.index, self.pools = mixture_index([len(r) for r in self.records], [s.weight for s in self.sources])
        if len(self.index) == 0:
            raise DataError(f"no usable records in {[s.path for s in self.sources]}")
        for hook in self.hooks:
            hook.bind(self)

    def _kept(
        self, src: Source, records: Iterator[Any], accepted: set[tuple[str, ...]], facts: array
    ) -> Iterator[dict[str, Any]]:
        """The records of ``src`` that start-up keeps, in order; each other one is dropped under its cause.

        ``records`` are read from the file one at a time (``records.iter_records``), so a record is held as a dict only
        until it is packed: the build's peak memory is the packed records and a chunk of the file. ``facts`` gets
        ``(index in the file, characters of its turns' text, images)`` of each kept record: what the samples' ids and
        length estimates need, read in this one pass. Under ``on_error=raise`` a record's fault is raised once the rest
        of the file is read, so a fault of the file itself (not UTF-8, not JSON, an invalid line) is the one named, as
        when the whole file was read before its records were checked.
        """
        base = os.path.abspath(src.root)
        for i, rec in enumerate(records):
            found = self.startup_problem(rec, src, accepted, base)
            if found is None:
                facts.extend((i, text_chars(rec), len(image_names(rec))))
                yield rec
                continue
            problem, cause = found
            rid = record_id(rec, src.path, i) if isinstance(rec, dict) else f"{src.path}#{i}"
            try:
                self._drop(cause, rid, f"{src.path} record {i} (id={rid!r}): {problem}", problem)
            except DataError:
                deque(records, maxlen=0)  # the rest of the file, read for its own faults only
                raise

    def startup_problem(
        self, rec: Any, src: Source, accepted: set[tuple[str, ...]], base: str
    ) -> tuple[str, str] | None:
        """Why a record can never become a sample, with the cause it is counted under, or None: the start-up check of
        every record, so what the docs call malformed counts towards ``min_usable_fraction`` and stops
        ``on_error=raise`` before step 1. ``accepted``: the role sequences the template has rendered so far; ``base``:
        the source's root made absolute (once per source).

        Beyond the record's own shape and image paths, its ``<image>`` placeholders must match its images and the
        template must take its turns, as :meth:`encode` places and renders them. The template is asked once per
        sequence of roles it accepted: its turn-order rules read the roles only, so a million records cost a handful
        of renders; a refusal that depends on the text itself is found when the sample is drawn, as is anything
        that needs tokenizing. With a data hook that replaces the images the number of images is the hook's, known
        per sample: the placeholders are then checked when the sample is drawn. The turns are read once and the
        image paths checked as text, never built (every rank builds its dataset at every stage start and resume).
        """
        if (problem := shape_problem(rec)) is not None:
            return problem, MALFORMED
        try:
            turns = to_turns(rec["conversations"])
        except TemplateError as e:
            return str(e), MALFORMED
        problem = preference_problem(rec) if self.preference else None
        if problem is None and self.for_generation:
            problem = generation_problem(rec)
        if problem is not None:
            return problem, MALFORMED
        names = image_names(rec)
        if not src.allow_outside_root and (problem := root_problem(names, src.root, base)) is not None:
            return problem, OUTSIDE_ROOT
        if self.preference:  # rendered with its chosen answer
            turns = to_turns(answered(rec, "chosen")["conversations"])
        try:
            turns = self.place_images(turns, None if self.visual_hook is not None else len(names))
            roles = tuple(t.role for t in turns)
            if roles not in accepted:
                self.template.render(turns, self.tokenizer, add_generation_prompt=self.for_generation)
                accepted.add(roles)
        except (DataError, TemplateError) as e:
            return str(e), cause_of(e)
        return None

    def _drop(self, cause: str, rid: str, message: str, reason: str) -> None:
        """A record left out at start-up: raised under ``on_error=raise`` (``message`` names the file and the record),
        else counted under its cause with its ``reason``, which the report keeps for the cause's first record."""
        if self.on_error == "raise":
            raise DataError(message, cause)
        self.report.add(cause, rid, reason=reason)

    def set_visual_hook(self, hook: SampleHook) -> None:
        """Add a hook that replaces the images after construction (the trainer's feature cache), and bind it."""
        if self.visual_hook is not None:
            raise ValueError(f"{type(self.visual_hook).__name__} already replaces this dataset's images")
        self.hooks.append(hook)
        self.visual_hook = hook
        hook.bind(self)

    def __len__(self) -> int:
        return len(self.index)

    def record(self, i: int) -> tuple[Source, dict[str, Any]]:
        """Sample ``i``'s source and record (decoded afresh on each call)."""
        s, r = self.index[i]
        return self.sources[s], self.records[s][r]

    def distinct_records(self) -> Iterator[tuple[Source, str, dict[str, Any]]]:
        """``(source, record id, record)`` of every usable record once, whatever the mixture weights (start-up checks),
        decoded one at a time: a list of them all held every record as dicts again."""
        for src, recs, index in zip(self.sources, self.records, self.file_index):
            for rec, at in zip(recs, index.tolist()):
                yield src, record_id(rec, src.path, at), rec

    def length_estimates(self) -> list[int]:
        """Cheap per-sample token-count estimates (characters / 4 plus visual tokens) for length grouping, from what
        the start-up pass read; a data hook that replaces the images is asked how many stand for each record."""
        per_record = [
            chars // 4 + self.visual_counts(src, recs, images) * self.num_image_tokens
            for src, recs, chars, images in zip(self.sources, self.records, self.text_chars, self.image_counts)
        ]
        starts = np.cumsum([0] + [len(r) for r in self.records])
        flat = np.concatenate(per_record) if per_record else np.zeros(0, dtype=np.int64)
        return flat[starts[self.index[:, 0]] + self.index[:, 1]].tolist()

    def visual_counts(self, src: Source, recs: PackedRecords, images: np.ndarray) -> np.ndarray:
        """How many visual inputs stand for each of a source's records: its images, or what a visual hook puts there
        (the images again where it puts one input per image: each record read again had cost 6.6 s at 558k)."""
        if self.visual_hook is None or self.visual_hook.one_per_image:
            return images
        return np.fromiter((len(self.visual_hook.visual_inputs(src, rec)) for rec in recs), np.int64, len(recs))

    def __getitem__(self, i: int) -> dict[str, Any] | tuple[dict[str, Any], dict[str, Any]] | Skipped:
        src, rec = self.record(i)
        s, r = self.index[i]
        rid = record_id(rec, src.path, self.file_index[s][r])
        try:
            return self.encode_pair(src, rec, rid) if self.preference else self.encode(src, rec, rid)
        except (DataError, TemplateError, OSError) as e:
            if self.on_error == "raise":
                raise DataError(f"record id={rid} in {src.path}: {e}", cause_of(e)) from e
            return Skipped(rid, f"{type(e).__name__}: {e}", cause_of(e))

    def visual_inputs(self, src: Source, rec: dict[str, Any]) -> list[Any]:
        """What stands for each image of a record, in order: its image files, or what a visual hook puts there."""
        if self.visual_hook is not None:
            return self.visual_hook.visual_inputs(src, rec)
        return src.image_paths(rec)

    def load_visuals(self, inputs: list[Any]) -> dict[str, torch.Tensor | None]:
        """The sample's visual fields: ``pixel_values`` ``[n_images, 3, H, W]`` (None for a text-only record)."""
        if self.visual_hook is not None:
            return self.visual_hook.load_visuals(inputs)
        return {"pixel_values": torch.stack([self._image(p) for p in inputs]) if inputs else None}

    def source_visuals(self, src: Source, inputs: list[Any]) -> dict[str, torch.Tensor | None]:
        """:meth:`load_visuals` of a record of ``src``: a missing image file is named with the folder its path was
        read under (``image_root``, or the data file's own folder when the source sets none), the usual mistake."""
        try:
            return self.load_visuals(inputs)
        except DataError as e:
            if e.cause != MISSING_IMAGE or self.visual_hook is not None:
                raise
            raise DataError(f"{e}: its path is read under {src.root_text()}", MISSING_IMAGE) from None

    def encode(self, src: Source, rec: dict[str, Any], rid: str, last_answer: bool = False) -> dict[str, Any]:
        """Render, tokenize, expand image placeholders and load images for one record; ``last_answer``: supervise its
        final assistant turn only, decided before the cut to ``max_length`` (a cut into the final answer's prompt
        would otherwise leave an earlier answer supervised: a preference pair's two sides the same sample)."""
        images = self.visual_inputs(src, rec)
        turns = self.dialog(rec, len(images))
        rendered = self.template.render(turns, self.tokenizer, add_generation_prompt=self.for_generation)
        ids, labels = tokenize(rendered, self.tokenizer)
        if last_answer:
            labels = last_answer_only(labels)
        if (slots := int((ids == self.image_token_id).sum())) != len(images):
            raise DataError(f"the template wrote {slots} {IMAGE_TOKEN} slots for {len(images)} images")
        if not self.for_generation and not (labels != IGNORE_INDEX).any():
            raise TemplateError(f"template {self.template.name!r} supervised no token of this record")
        if self.slot_token_ids:
            ids, labels = self._insert_slots(ids, labels, self.slots_for(bool(images)))
        ids, labels = self._expand_images(ids, labels)
        full_length = len(ids)
        ids, labels = self._fit_length(ids, labels)
        sample = {
            "truncated": len(ids) < full_length,
            "id": rid,
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            **self.source_visuals(src, images),
            "n_images": len(images),
        }
        for hook in self.hooks:
            sample.update(hook.fields(rid, rec, images))
        if "answer" in rec:
            sample["answer"] = rec["answer"]
            sample["meta"] = rec.get("meta", {})
        return sample

    def dialog(self, rec: dict[str, Any], n_images: int | None) -> list[Turn]:
        """The turns the template renders for a record that stands for ``n_images`` images (:meth:`place_images`)."""
        return self.place_images(to_turns(rec["conversations"]), n_images)

    def place_images(self, turns: list[Turn], n_images: int | None) -> list[Turn]:
        """A record's turns with its ``n_images`` images placed, and for generation cut after the last user turn. One
        function for the start-up check and :meth:`encode`, so both see the same conversation. ``None``: the number
        is not known yet (a hook's), the placeholders stay as written.

        An image's place is an ``<image>`` in a user turn (anywhere else the characters are text:
        ``templates.tokenize``); a record with images and no placeholder gets one per image before its first question
        (as LLaVA's evaluation scripts place one; its training shows the model no such image); any other mismatch of
        placeholders and images is a ``DataError``.
        """
        turns = list(turns)
        if n_images is not None:
            n_placeholders = sum(t.content.count(IMAGE_TOKEN) for t in turns if t.role == "user")
            if n_images and n_placeholders == 0:
                first = next((k for k, t in enumerate(turns) if t.role == "user"), None)
                if first is not None:
                    turns[first] = Turn("user", IMAGE_TOKEN * n_images + "\n" + turns[first].content)
                    n_placeholders = n_images
            if n_placeholders != n_images:
                raise DataError(f"{n_placeholders} {IMAGE_TOKEN} placeholders but {n_images} images")
        if self.for_generation:
            turns = turns[: max(i for i, t in enumerate(turns) if t.role == "user") + 1]
        return turns

    def encode_pair(self, src: Source, rec: dict[str, Any], rid: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """A preference record as two samples, its prompt answered with ``chosen`` and with ``rejected``, each
        supervising its final answer only (the template's labels of that last assistant turn: earlier assistant turns
        of the prompt are context, as the prompt is). A cut at ``data.max_length`` inside the answers' common start
        leaves two equal samples, a pair with no preference in it (its loss log 2 and no gradient, whatever the
        model): a ``DataError``, counted as too long."""
        chosen, rejected = (
            self.encode(src, answered(rec, key), rid, last_answer=True) for key in ("chosen", "rejected")
        )
        if torch.equal(chosen["input_ids"], rejected["input_ids"]) and torch.equal(
            chosen["labels"], rejected["labels"]
        ):
            raise DataError(
                f"the cut at data.max_length={self.max_length} leaves 'chosen' and 'rejected' the same tokens (it falls "
                "in the start their answers share)",
                TOO_LONG,
            )
        return chosen, rejected

    def _image(self, path: Path) -> torch.Tensor:
        padded = self.image_aspect_ratio == "pad"
        image = load_rgb(os.path.abspath(path), self.max_image_pixels, padded)  # an error names the whole path
        return preprocess(image, self.image_spec, self.image_aspect_ratio, self.max_image_pixels)

    def slots_for(self, with_images: bool) -> list[int]:
        """The slot tokens a sample gets: every extra part's, but those of parts only samples with an image get."""
        return [t for t in self.slot_token_ids if with_images or t not in self.image_only_slot_ids]

    def _insert_slots(
        self, ids: np.ndarray, labels: np.ndarray, slot_ids: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The reserved slot tokens ``slot_ids`` (label -100) right after the tokenizer's own BOS, or first when there
        is none. Text holding any reserved token is refused, whichever this sample gets.

        Placed by token id, never by string: the template's text is tokenized exactly as without them.
        """
        if np.isin(ids, np.asarray(self.slot_token_ids, dtype=ids.dtype)).any():
            raise DataError(
                f"the text contains a reserved token {self.tokenizer.convert_ids_to_tokens(self.slot_token_ids)}"
            )
        slots = np.asarray(slot_ids, dtype=ids.dtype)
        at = int(self.bos_token_id is not None and len(ids) > 0 and ids[0] == self.bos_token_id)
        return np.insert(ids, at, slots), np.insert(labels, at, np.full(len(slots), IGNORE_INDEX))

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
            raise DataError(
                f"{len(ids)} tokens exceed data.max_length={self.max_length} and a cut would split visual tokens",
                TOO_LONG,
            )
        if self.for_generation or not (labels[: self.max_length] != IGNORE_INDEX).any():
            raise DataError(
                f"{len(ids)} tokens exceed data.max_length={self.max_length} and a cut would leave no answer", TOO_LONG
            )
        return ids[: self.max_length], labels[: self.max_length]
