"""Shared writer for the offline datasets: knob checks, the seeded split, LLaVA records, PNGs and JSON files.

Every generator (``digits``, ``shapes``) writes the same folder layout through ``DatasetWriter``, so the demo
and the tests exercise the same loader as real LLaVA data, and the same seed always gives the same bytes:
``images/<id>.png``, ``pretrain.json`` (captions of train images), ``instruct.json`` (multi-turn QA on train
images), ``test.json`` (one held-out question per test image, with ``answer`` and ``meta.choices``),
``test_captions.json`` and ``info.json`` (seed, knobs, counts and the chance level of ``test.json``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from alignlm.config import ConfigError
from alignlm.constants import IMAGE_TOKEN
from alignlm.files import held_by_others, replace_text


class Question(NamedTuple):
    """One question about an image, with its answer, its type and every valid answer of that type (for chance)."""

    question: str
    answer: str
    qtype: str
    choices: tuple[str, ...]


def check_int(name: str, value: Any, low: int, high: int | None = None, why: str = "") -> None:
    """Raise a ValueError naming the generator knob, the value given and the allowed range, so the user can fix it."""
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not is_int or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
        raise ValueError(f"{name}={value!r} is not allowed: {allowed}{f' ({why})' if why else ''}")


def split(n: int, n_test: int, rng: np.random.Generator, limit: int | None = None) -> tuple[list[int], list[int]]:
    """Seeded disjoint (train, test) indices of ``range(n)``, each sorted; ``limit`` keeps a permutation prefix."""
    if limit is not None:
        check_int("limit", limit, 2, n, f"None keeps all {n} images")
    kept = n if limit is None else limit
    check_int("n_test", n_test, 1, kept - 1, f"{kept} images available, at least one must stay for training")
    perm = rng.permutation(n)[:kept]
    return sorted(perm[n_test:].tolist()), sorted(perm[:n_test].tolist())


def caption_record(rid: str, image: str, caption: str) -> dict[str, Any]:
    """A captioning record (pretraining): the image alone as the user turn, the caption as the answer."""
    return {
        "id": rid,
        "image": image,
        "conversations": [{"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": caption}],
    }


def qa_record(rid: str, image: str, qa: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """A multi-turn instruction record; the image placeholder goes before the first question only."""
    conversations = []
    for turn, (question, answer) in enumerate(qa):
        conversations.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if turn == 0 else question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": rid, "image": image, "conversations": conversations}


def held_out_record(
    rid: str, image: str, question: str, answer: str, qtype: str, choices: Sequence[str]
) -> dict[str, Any]:
    """A test question with its answer and every valid answer of its type, so scoring and chance need no guessing."""
    record = qa_record(rid, image, [(question, answer)])
    record.update(answer=answer, meta={"qtype": qtype, "choices": list(choices)})
    return record


def chance(tests: Sequence[dict[str, Any]]) -> float:
    """Expected accuracy of uniform guessing over each question's choices: the floor a model must beat."""
    return math.fsum(1.0 / len(r["meta"]["choices"]) for r in tests) / len(tests) if tests else 0.0


def write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    """Write JSON in key-insertion order, so the same data always gives the same bytes; whole or not at all (a full
    disk had left an empty ``info.json``, which every rerun then failed to parse)."""
    replace_text(path, json.dumps(obj, ensure_ascii=False, indent=indent))


def save_png(pixels: np.ndarray, path: Path) -> None:
    """Write an ``[H, W, 3]`` uint8 array as a PNG without metadata, byte-identical across runs."""
    Image.fromarray(pixels).save(path, format="PNG")


def readers_lock(out: str | Path) -> Path:
    """The lock a run holds shared on a set's folder while it reads the set (``pipeline.ensure_offline_datasets``)."""
    return Path(out) / ".readers.lock"


class DatasetWriter:
    """Writes one set's images as they come and collects its records; ``finish`` writes the JSON files. A folder a
    run is reading (its :func:`readers_lock` held) is refused: the set written again under it had changed that run's
    images and questions mid-run (a seed sweep started together on one ``data_root``)."""

    def __init__(self, out_dir: str | Path, name: str) -> None:
        self.out = Path(out_dir)
        self.name = name
        if held_by_others(readers_lock(self.out)):
            raise ConfigError(
                f"{self.out} is being read by a run in progress (it holds {readers_lock(self.out)}), and writing the "
                f"{name} set again there would change that run's images and questions under it. Wait for that run to "
                "end, or give this one a data_root of its own (a sweep over offline_dataset_seed, or with it null: "
                "data_root=data/seed_<seed>)"
            )
        self.files: dict[str, list[dict[str, Any]]] = {"pretrain": [], "instruct": [], "test": [], "test_captions": []}
        self.written: set[str] = set()  # image paths relative to ``out``
        (self.out / "images").mkdir(parents=True, exist_ok=True)
        # written last (``finish``): a generation killed half way over a set of another seed had left that set's
        # info.json over half-new files, which the next run then kept as the set its config asks for
        (self.out / "info.json").unlink(missing_ok=True)

    def _image(self, rid: str, pixels: np.ndarray) -> str:
        image = f"images/{rid}.png"
        save_png(pixels, self.out / image)
        self.written.add(image)
        return image

    def add_train(self, rid: str, pixels: np.ndarray, caption: str, questions: Sequence[Question]) -> None:
        """Save a train image with its caption (pretrain) and its questions as one conversation (instruct)."""
        image = self._image(rid, pixels)
        self.files["pretrain"].append(caption_record(rid, image, caption))
        self.files["instruct"].append(qa_record(rid, image, [(q.question, q.answer) for q in questions]))

    def add_qa(self, fname: str, rid: str, pixels: np.ndarray, qa: Sequence[tuple[str, str]]) -> None:
        """Save an image with one conversation into the extra record file ``fname`` (e.g. shapes' ``som``)."""
        self.files.setdefault(fname, []).append(qa_record(rid, self._image(rid, pixels), qa))

    def add_test(self, rid: str, pixels: np.ndarray, caption: str, question: Question) -> None:
        """Save a test image with its caption (test_captions) and its one held-out question (test)."""
        image = self._image(rid, pixels)
        self.files["test_captions"].append(caption_record(rid, image, caption))
        self.files["test"].append(held_out_record(rid, image, *question))

    def finish(
        self, seed: int, knobs: dict[str, Any], extra: dict[str, Any] | None = None, optional: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Write the record files, any ``extra`` JSON files (name -> object) and ``info.json``; return the summary.

        What an earlier generation into the same folder wrote and this one did not is removed: an ``optional`` record
        file this run did not write (shapes' ``som`` after ``som: false``), and this set's images (``<name>_*.png``)
        no record of this run names (the tagged scenes, or the tail of a larger set). A config naming the old file
        read records of a set nobody asked for. Other files in the folder (a prepare step's output) are left alone."""
        for fname in optional:
            if fname not in self.files:
                (self.out / f"{fname}.json").unlink(missing_ok=True)
        for image in (self.out / "images").glob(f"{self.name}_*.png"):
            if f"images/{image.name}" not in self.written:
                image.unlink()
        for fname, obj in {**self.files, **(extra or {})}.items():
            write_json(self.out / f"{fname}.json", obj)
        counts = {"images": len(self.written)}
        counts.update({k: len(v) for k, v in self.files.items()})
        summary = {
            "name": self.name,
            "seed": seed,
            "counts": counts,
            "knobs": knobs,
            "chance": chance(self.files["test"]),
        }
        write_json(self.out / "info.json", summary, indent=2)
        return summary
