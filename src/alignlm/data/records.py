"""Reading LLaVA-format records: files, sources of a mixture, a record's images and caption, and the bad-input error.

Every layer that reads records (the training dataset, the label and level makers of the methods, the encoders' fitting,
the probes, ``alignlm embed``) goes through these functions, so a record means the same thing everywhere.
"""

from __future__ import annotations

import codecs
import json
import math
import operator
import os
import re
import stat
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from alignlm.config import ConfigError
from alignlm.constants import IMAGE_TOKEN
from alignlm.data.templates import role_of, to_turns, unicode_problem

# Why a record or sample was left out: the keys of every per-cause count (stage table, summary.json, log).
MALFORMED = "malformed record"
INVALID_JSON = "invalid JSON line"
OUTSIDE_ROOT = "image path outside its image_root"
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
IMAGE_TOO_LARGE = "image over data.max_image_pixels"
TOO_LONG = "too long to cut"
TRUNCATED = "truncated to data.max_length (kept)"


class DataError(ValueError):
    """Bad input data, with the record that caused it and the cause it is counted under."""

    def __init__(self, message: str, cause: str = MALFORMED) -> None:
        super().__init__(message)
        self.cause = cause


def cause_of(error: Exception) -> str:
    """The count an error of a sample goes to."""
    return str(getattr(error, "cause", None) or MALFORMED)


@dataclass(frozen=True)
class Source:
    """One file of a mixture; ``weight`` 2.0 repeats it twice per epoch, 0.5 keeps a seeded half."""

    path: str
    image_root: str | None = None
    weight: float = 1.0
    allow_outside_root: bool = False  # image paths may be absolute or climb out of image_root with '..'

    @classmethod
    def from_config(cls, node: Any, key: str) -> Source:
        """A ``data.sources`` entry, ``{path, image_root, weight, allow_outside_root}``; another key is refused (a
        mistyped ``weigth: 0.1`` trained the source at weight 1, saying nothing). The weight is a finite number >= 0
        and ``allow_outside_root`` a boolean, checked here, before the first stage trains: the text ``'false'`` had read
        as true (the image-root guard off), and a weight of nan, inf or -1 failed only when its stage built its data."""
        known = [f.name for f in fields(cls)]
        if not isinstance(node, Mapping) or "path" not in node or set(node) - set(known):
            extra = sorted(set(node) - set(known)) if isinstance(node, Mapping) else []
            raise ConfigError(
                f"{key}={dict(node) if isinstance(node, Mapping) else node!r}: a source is a mapping with a path and "
                f"any of {known[1:]}{f'; {extra} is not one of them' if extra else ''}"
            )
        weight = node.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise ConfigError(
                f"{key}.weight={weight!r} must be a finite number >= 0 (copies of the source per epoch; 0 leaves "
                "it out)"
            )
        allow = node.get("allow_outside_root", False)
        if not isinstance(allow, bool):
            raise ConfigError(
                f"{key}.allow_outside_root={allow!r} must be true or false (a boolean, not the text of one)"
            )
        return cls(str(node["path"]), node.get("image_root"), float(weight), allow)

    @cached_property  # read for every record at start-up
    def root(self) -> Path:
        """The folder the records' image paths are relative to: ``image_root``, else the file's own folder."""
        return Path(self.image_root) if self.image_root else Path(self.path).parent

    def image_paths(self, record: dict[str, Any]) -> list[Path]:
        """A record's image files under this source's root (``image_paths`` with the source's permission)."""
        return image_paths(record, self.root, self.allow_outside_root)

    def root_text(self) -> str:
        """Where this source's image paths are read from, for a message about an image that is not there: the
        ``image_root`` as given and made absolute, or, with none given, the data file's folder (a pairs file written
        elsewhere than its images needs an ``image_root``, and the message must say which folder was looked in)."""
        where = os.path.abspath(self.root)
        if self.image_root:
            return f"its image_root {self.image_root!r} ({where})"
        return f"the folder of {self.path} ({where}), as the source sets no image_root"


JSON_LINES = (".jsonl", ".ndjson")  # file suffixes, in any case, of one record per line


def read_records(path: str | Path, bad_lines: list[tuple[int, str]] | None = None) -> list[Any]:
    """All records of a file, as :func:`iter_records` reads them, in a list."""
    return list(iter_records(path, bad_lines))


def iter_records(path: str | Path, bad_lines: list[tuple[int, str]] | None = None) -> Iterator[Any]:
    """The records of a ``.json`` file (a list) or a JSON Lines file (``.jsonl`` or ``.ndjson``, in any case), one at a
    time in order, with the line named on a parse error. A UTF-8 byte order mark at the start is not part of the text
    (it had cost a JSON Lines file its first record and failed a ``.json`` file).

    A ``.json`` list is read a chunk at a time and decoded record by record: parsing it whole held its bytes, its text
    and every record as Python objects at once (3.5 GB for LLaVA-665k's 1 GB, on each rank of a node), where a reader
    that keeps the records packed now holds one chunk and one record more. The records and the errors are those of
    ``json.loads`` of the whole file. A missing file or a folder is refused at the call, a fault in the text when the
    records are read up to it.

    ``bad_lines``: a list to collect ``(line number, why)`` of invalid JSONL lines instead of failing on the first.
    """
    path = Path(path)
    if not path.exists():  # a data error (exit status 65), like a file that holds no records
        raise DataError(f"data file {path} does not exist (run `alignlm data ...` to make the offline sets)")
    if path.is_dir():
        raise DataError(f"data file {path} is a folder; name a .json, .jsonl or .ndjson file of records")
    if not stat.S_ISREG(path.stat().st_mode):  # opening a FIFO waits, with no output, for a writer that may never come
        raise DataError(f"data file {path} is not a regular file (a FIFO or a device); name a file of records")
    return json_lines(path, bad_lines) if path.suffix.lower() in JSON_LINES else json_list(path)


def json_lines(path: Path, bad_lines: list[tuple[int, str]] | None) -> Iterator[Any]:
    """The records of a JSON Lines file, one per non-blank line (:func:`iter_records`)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                if line.strip():
                    yield json.loads(line)
            except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                why = json_problem(e)
                if bad_lines is None:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({why})", INVALID_JSON) from None
                bad_lines.append((lineno, why))


def json_problem(error: ValueError | RecursionError) -> str:
    """Why text did not decode, in a few words. Beside JSON errors and bytes that are not UTF-8, JSON that parses can
    still fail to decode: nesting deeper than Python's recursion limit, an integer of more than 4300 digits."""
    if isinstance(error, json.JSONDecodeError):
        return error.msg
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 at byte {error.start}"
    if isinstance(error, RecursionError):
        return "nested too deeply to decode"
    return str(error).split(":")[0]


READ_CHUNK = 1 << 20  # bytes of a .json file read at a time (a record longer than this waits for the chunks it spans)
NOT_SPACE = re.compile(r"[^ \t\n\r]")  # not the whitespace JSON allows between values (json's scanner skips the same)


class NotAList(Exception):
    """A ``.json`` file's text is not one JSON list: :func:`whole_file_error` says why."""


def json_list(path: Path) -> Iterator[Any]:
    """The elements of a ``.json`` file's top-level list, decoded one at a time (:func:`iter_records`)."""
    decoder = json.JSONDecoder()  # json.loads's own
    with path.open("rb") as f:
        text = ChunkedText(f)
        try:
            if text.next_char() != "[":
                raise NotAList
            text.pos += 1
            more = text.next_char() != "]"
            if not more:  # an empty list
                text.pos += 1
            while more:
                record, after = text.element(decoder)
                yield record
                more = after == ","
            if text.next_char():  # anything but whitespace after the list
                raise NotAList
        except (UnicodeDecodeError, NotAList):
            raise whole_file_error(path) from None
        except (ValueError, RecursionError) as e:  # a list element that parses but does not decode
            raise DataError(f"{path}: a record does not decode ({json_problem(e)})", INVALID_JSON) from None


class ChunkedText:
    """A file's UTF-8 text, read a chunk at a time: ``text[pos:]`` is read and not yet parsed."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()  # a byte order mark at the start is no text
        self.text, self.pos, self.ended = "", 0, False

    def read(self) -> None:
        """Read on: a chunk, or as much again as the text not yet parsed when that is longer (a record of many chunks
        is decoded from its start a few times, not once per chunk). Raises ``UnicodeDecodeError``."""
        data = self.file.read(max(READ_CHUNK, len(self.text) - self.pos))
        self.ended = not data
        self.text = self.text[self.pos :] + self.decoder.decode(data, final=self.ended)
        self.pos = 0

    def next_char(self) -> str:
        """The next character that is not whitespace, ``pos`` moved onto it; '' at the end of the file."""
        while True:
            self.pos = after_space(self.text, self.pos)
            if self.pos < len(self.text) or self.ended:
                return self.text[self.pos : self.pos + 1]
            self.read()

    def element(self, decoder: json.JSONDecoder) -> tuple[Any, str]:
        """The list's next element and the ',' or ']' after it, ``pos`` past that. An element is taken only once the
        character after it is read: a number or a word at the end of a chunk may go on in the next one (``12|34``,
        ``tr|ue``), and text that does not parse may parse with more of it. Text that does not parse to the end of the
        file raises ``NotAList``."""
        while True:
            self.next_char()
            try:
                value, end = decoder.raw_decode(self.text, self.pos)
                after = after_space(self.text, end)
                if after < len(self.text) and self.text[after] in ",]":
                    self.pos = after + 1
                    return value, self.text[after]
            except json.JSONDecodeError:
                pass
            if self.ended:
                raise NotAList
            self.read()


def after_space(text: str, pos: int) -> int:
    """The first position from ``pos`` on that is not whitespace, ``len(text)`` if there is none."""
    found = NOT_SPACE.search(text, pos)
    return found.start() if found else len(text)


def whole_file_error(path: Path) -> DataError:
    """Why a ``.json`` file is not a JSON list of records, said as parsing it whole says it: the first byte that is not
    UTF-8 (before any JSON error, wherever that is), the line of the first JSON error, or what the file holds instead
    of a list. Only a file that is refused is read whole."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        return DataError(f"{path}: not UTF-8 text (byte {e.start})", INVALID_JSON)
    except json.JSONDecodeError as e:
        hint = " (one record per line? name it .jsonl)" if e.msg == "Extra data" else ""
        return DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}){hint}", INVALID_JSON)
    except (ValueError, RecursionError) as e:
        return DataError(f"{path}: does not decode ({json_problem(e)})", INVALID_JSON)
    return DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")


# how PackedRecords writes a record: UTF-8 text as it is (a caption in Chinese takes 3 bytes a character, not the 6 of
# an escape), no spaces; one encoder for every record (json.dumps builds one per call)
RECORD_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


class PackedRecords(Sequence[dict[str, Any]]):
    """Records held as one read-only buffer of their JSON text (UTF-8) and the offset where each ends, each decoded
    when it is read.

    Why: a list of dicts holds every string, list and number of every record as a Python object (3.8 KB a record like
    LLaVA-665k's, 2.5 GB for the mixture), and a forked DataLoader worker that reads one writes its reference count, so each
    worker came to hold its own copy of the pages it read (half of them per epoch, all after a full garbage
    collection: ~1-2 GB per worker at 665k). Two numpy arrays have no per-record object for a worker to write: its
    pages stay shared with the main process, and a record costs its JSON text and 8 bytes (detectron2's remedy).
    Decoding a record of 1 KB takes about 10 microseconds, next to the milliseconds of rendering and loading its sample.
    """

    def __init__(self, data: np.ndarray, ends: np.ndarray) -> None:
        self.data = data  # uint8: the records' JSON text, one after the other
        self.ends = ends  # int64 [n + 1]: record i is data[ends[i]:ends[i + 1]]

    @classmethod
    def pack(cls, records: Iterable[Any]) -> PackedRecords:
        """The records, in order, each written back as JSON: it decodes to an equal record (strings keep every
        character, a lone surrogate one too, numbers their value, objects the order of their keys)."""
        buffer, ends = bytearray(), array("q", [0])
        for record in records:
            buffer += RECORD_JSON.encode(record).encode("utf-8", "surrogatepass")
            ends.append(len(buffer))
        data, offsets = np.frombuffer(buffer, dtype=np.uint8), np.frombuffer(ends, dtype=np.int64)
        data.flags.writeable = offsets.flags.writeable = False
        return cls(data, offsets)

    def __len__(self) -> int:
        return len(self.ends) - 1

    def __getitem__(self, i: Any) -> dict[str, Any]:
        """Record ``i`` (an integer, negative from the end as a list's), decoded afresh: a change to it is not kept."""
        n, at = len(self), operator.index(i)
        at += n if at < 0 else 0
        if not 0 <= at < n:
            raise IndexError(f"record {i} of {n}")
        # json.loads decodes bytes with "surrogatepass", as pack encoded them
        return json.loads(self.data[self.ends[at] : self.ends[at + 1]].tobytes())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))


def record_id(record: Any, path: str | Path, index: int) -> str:
    """A record's ``id``, else ``<file>#<index>``."""
    rid = record.get("id") if isinstance(record, dict) else None
    return str(rid) if rid is not None else f"{path}#{index}"


def shape_problem(record: Any) -> str | None:
    """Why a record is malformed, its turns aside, or None: checked for every record before training starts, whose
    turns ``templates.to_turns`` then reads (once: the dataset's start-up pass keeps them for the template's check)."""
    if not isinstance(record, dict):
        return f"record is a {type(record).__name__}, not an object"
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "missing or empty 'conversations' list"
    image = record.get("image")
    if image is not None and not (
        isinstance(image, str) or (isinstance(image, list) and all(isinstance(i, str) for i in image))
    ):
        return f"'image' must be a path or a list of paths, got {image!r}"
    return image_name_problem(record)


def image_name_problem(record: dict[str, Any]) -> str | None:
    """Why one of a record's image names (strings, checked by :func:`shape_problem`) names no image file, or None: an
    empty one named the image folder itself, then skipped as an unreadable image; one with a lone surrogate passed
    start-up and ended the stage when the file system refused it."""
    image = record.get("image")
    for at, name in enumerate(image_names(record)):
        where = "'image'" if isinstance(image, str) else f"'image'[{at}]"
        if not name:
            return f"{where} is an empty path"
        if (problem := unicode_problem(name, where)) is not None:
            return problem
    return None


def preference_problem(record: dict[str, Any]) -> str | None:
    """Why a preference record (a prompt conversation ending with the user's turn, plus a ``chosen`` and a
    ``rejected`` answer) cannot be used, or None."""
    for key in ("chosen", "rejected"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            return f"a preference record needs a non-empty string {key!r}, got {record.get(key)!r}"
        if (problem := unicode_problem(record[key], repr(key))) is not None:
            return problem
    if record["chosen"].strip() == record["rejected"].strip():  # the templates strip answers: the same tokens
        return "'chosen' and 'rejected' are the same answer (whitespace at their ends is no part of an answer)"
    if to_turns(record["conversations"])[-1].role != "user":
        return "a preference record's 'conversations' must end with the user's turn (the answers are 'chosen' and 'rejected')"
    return None


def generation_problem(record: dict[str, Any]) -> str | None:
    """Why a record of an evaluation set cannot be asked and scored (the model answers up to its last user turn, and
    a caption set scores against its ``captions``), or None."""
    roles = [turn.role for turn in to_turns(record["conversations"])]
    if "user" not in roles:
        return f"an evaluation record needs a user turn for the model to answer; its turns are {roles}"
    return captions_problem(record)


def captions_problem(record: dict[str, Any]) -> str | None:
    """Why a record's ``captions`` (its reference captions, when present) cannot be scored against, or None: a string
    was read as its characters and ``[null, 3]`` as the texts 'None' and '3'."""
    captions = record.get("captions")
    if captions is None or (
        isinstance(captions, list) and captions and all(isinstance(c, str) and c.strip() for c in captions)
    ):
        return None
    return f"'captions' must be a non-empty list of non-empty strings, got {captions!r}"


def image_names(record: dict[str, Any]) -> list[str]:
    """The record's ``image`` entries as written, in reading order (one path, a list, or absent)."""
    images = record.get("image")
    return [] if images is None else [images] if isinstance(images, str) else list(images)


def image_paths(record: dict[str, Any], root: str | Path, allow_outside_root: bool = False) -> list[Path]:
    """The record's image files in reading order, under ``root``: every reader of records takes its paths here, so a
    path that leaves the root (absolute, or climbing out with ``..``) is refused wherever it is read, unless the data's
    owner allowed it."""
    if (problem := image_name_problem(record)) is not None:  # for readers that never ran shape_problem
        raise DataError(problem)
    names = image_names(record)
    if not allow_outside_root and (problem := root_problem(names, root)) is not None:
        raise DataError(problem, OUTSIDE_ROOT)
    # normalised as the check above reads them: "coco/../x.png" with coco a link elsewhere had been opened by the OS
    # through the link, outside the root, where the training dataset (which normalises) opened another file
    return [Path(os.path.normpath(os.path.join(root, name))) for name in names]


def root_problem(names: Sequence[str], root: str | Path, base: str | None = None) -> str | None:
    """Why one of these image names leaves ``root`` (:func:`outside_root`), or None: the check of
    :func:`image_paths`, without building the paths (the dataset's start-up pass checks every record here). ``base``:
    ``os.path.abspath(root)``, given by a caller that checks many records under one root."""
    base = os.path.abspath(root) if base is None else base
    bad = next((name for name in names if outside_root(name, base)), None)
    if bad is None:
        return None
    return (
        f"image path {bad!r} leaves image_root {str(root)!r} (name a root that holds it, or set allow_outside_root "
        "on the source)"
    )


def outside_root(name: str, base: str) -> bool:
    """Whether an image path as written leaves its root, ``base`` (absolute): absolute, or climbing out with ``..``
    (checked on the path's text; a link the data's owner placed inside the root is followed like any file, as LLaVA's
    layout links its image folders)."""
    joined = os.path.normpath(os.path.join(base, name))
    return joined != base and not joined.startswith(base.rstrip(os.sep) + os.sep)


def record_images(data: Sequence[str | Path], image_root: str | Path | None = None) -> list[tuple[str, list[Path]]]:
    """``(record id, absolute image paths)`` of every record with an image, over LLaVA data files."""
    out = []
    for path in data:
        root = Path(image_root) if image_root else Path(path).parent
        for i, rec in enumerate(read_records(path)):
            try:
                paths = image_paths(rec, root) if isinstance(rec, dict) else []
            except DataError as e:
                raise DataError(f"{path}: record id={record_id(rec, path, i)}: {e}", e.cause) from e
            if paths:
                out.append((record_id(rec, path, i), [p.resolve() for p in paths]))
    return out


def is_answer(turn: Any) -> bool:
    """Whether a record's turn, as written, is the assistant's: its ``from`` read as training reads it
    (``templates.role_of``, any case), so a record that trains gives its caption and reference alike."""
    return isinstance(turn, dict) and role_of(turn.get("from")) == "assistant"


def record_caption(record: dict[str, Any]) -> str | None:
    """A caption record's text: its ``caption`` or ``text`` field, else its first assistant turn without ``<image>``;
    None where it has none, or where that turn is not text (a null had been the caption "None"): its readers skip
    and count such a record, or name it, as training leaves a malformed record out."""
    for key in ("caption", "text"):
        if isinstance(record.get(key), str):
            return record[key]
    for turn in record.get("conversations") or []:
        if is_answer(turn):
            value = turn.get("value", "")
            return value.replace(IMAGE_TOKEN, "").strip() if isinstance(value, str) else None
    return None


def _text_of(turn: dict[str, Any], record: dict[str, Any]) -> str:
    """An assistant turn's ``value``, which must be a string: a null, a list or a number had been read as the caption
    "None", "['a', 'b']" or "3" (training refuses such a record as malformed)."""
    value = turn.get("value", "")
    if not isinstance(value, str):
        raise DataError(
            f"record id={record.get('id')!r}: an assistant turn's value is a {type(value).__name__} "
            f"({value!r:.40}), not text"
        )
    return value


def reference_captions(record: dict[str, Any]) -> list[str]:
    """A record's reference captions for scoring: its ``captions`` list, else its last assistant turn."""
    problem = captions_problem(record)
    if problem is not None:
        raise DataError(f"record id={record.get('id')!r}: {problem}")
    if record.get("captions") is not None:
        return list(record["captions"])
    turns = [_text_of(t, record) for t in record.get("conversations", []) if is_answer(t)]
    if not turns:
        raise DataError(
            f"record id={record.get('id')!r} has neither 'captions' nor an assistant turn to use as reference"
        )
    return [turns[-1]]


def assistant_text(record: dict[str, Any]) -> str:
    """Every assistant turn of a record, joined by newlines: the text the LM loss trains on."""
    return "\n".join(str(m.get("value", "")) for m in record["conversations"] if is_answer(m))


def epoch_share(n: int, weight: float) -> tuple[int, int]:
    """``(whole copies, records drawn from the pool)`` an epoch shows of a source of ``n`` records at ``weight``: the
    integer part repeats it, the fractional part draws ``frac * n`` records to the nearest whole one, a half up."""
    whole = int(weight)
    return whole, math.floor((weight - whole) * n + 0.5)


def mixture_index(sizes: Sequence[int], weights: Sequence[float]) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """``(source, record)`` pairs and the fractional pools of a weighted mixture of sources.

    A weight's integer part repeats its source; its fractional part adds one more copy of the source as a *pool*
    ``(start, stop, take)`` of index positions, of which each epoch draws ``take`` afresh (the sampler does, seeded
    by the epoch): a weight of 0.1 shows a different tenth each epoch, where a draw made once showed the same tenth
    all run and never the rest. ``take`` is ``frac * n`` to the nearest whole record, a half up (every epoch the same
    size, so the schedule's steps are known). A positive weight that rounds to no record at all is refused: the
    source was never seen, and nothing said so (Python's ``round`` also took a half record down to none).
    """
    parts, pools, at = [], [], 0
    for s, (n, w) in enumerate(zip(sizes, weights)):
        if w < 0:
            raise ValueError(f"data source {s} has weight {w}; weights must be >= 0")
        whole, take = epoch_share(n, w)
        if n and w > 0 and not whole and not take:
            raise ConfigError(
                f"data source {s} has weight {w} over its {n} usable records: {w * n:.3g} records an epoch, which "
                f"rounds to none, so it would never be seen; give it a weight of at least {0.5 / n:.3g} (half a "
                "record an epoch) or 0 to leave it out"
            )
        copies = whole + (take > 0)
        rec = np.tile(np.arange(n), copies)
        parts.append(np.stack([np.full_like(rec, s), rec], axis=1))
        if take:
            pools.append((at + whole * n, at + copies * n, take))
        at += copies * n
    index = np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 2), dtype=np.int64)
    return index, pools
