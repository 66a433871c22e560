"""Score a trained model on LLaVA-format sets: greedy (or sampled) answers vs reference answers or captions.

Two kinds of set share one generation path:
- ``qa``: each record carries ``answer`` (a string or a number, or a list of human answers scored VQA-style) and,
  optionally, ``meta.choices`` (all valid answers for its question type), from which the chance level is computed,
  so every accuracy is printed next to what guessing would get;
- ``caption``: the reference captions are the record's ``captions`` list, else its last assistant turn; scored
  with BLEU-4 and CIDEr-D.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from alignlm.config import ConfigError
from alignlm.data.records import DataError, read_records, record_id, reference_captions
from alignlm.evaluation.answers import choice_texts, names_only, reference_answers, score_answer
from alignlm.evaluation.captions import bleu, cider_d
from alignlm.evaluation.paired import POOLED
from alignlm.models.generation import AnswerKeeper, generate_set

KINDS = ("auto", "qa", "caption")
N_EXAMPLES = 5


def set_kind(path: str, kind: str = "auto") -> str:
    """``qa`` when the set's records carry answers, else ``caption`` (``kind`` other than auto is kept)."""
    if kind not in KINDS:
        raise ValueError(f"eval set kind={kind!r} is not known; choose one of {list(KINDS)}")
    if kind != "auto":
        return kind
    records = read_records(path)
    return "qa" if records and "answer" in records[0] else "caption"


def check_set_names(sets: Sequence[Mapping[str, Any]]) -> None:
    """Each set has a name of its own: the report keeps a set's scores under its name, so the last of two sets of one
    name replaced the first, after both were generated. Here, below the report, so that the start-up checks of a
    training run (``checks.py``) refuse them too without importing the report and its plots."""
    names = [str(s["name"]) for s in sets]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"eval.sets name {twice} more than once; give each set a name of its own")
    if POOLED in names:  # the comparison's row of all sets pooled: a set of that name had two rows, or was replaced
        raise ConfigError(f"eval.sets has a set named {POOLED!r}, the name of all sets pooled; give it another")


def score_key(rid: str, record: Mapping[str, Any]) -> str:
    """The key of a question's score: its ``id``, or for a record without one ``#<index>``, its place in the set.
    The set's name is the key above it, so a report that named the set's file by another path (relative, absolute)
    still pairs with this one question by question, where ``<file>#<index>`` (the id the data layer gives it) did
    not."""
    if record.get("id") is not None:
        return str(rid)
    return "#" + str(rid).rpartition("#")[2]


def scored(prediction: str, record: Mapping[str, Any]) -> tuple[float, float | None, int]:
    """One question's score, its names-only score (None unless it has ``meta.choices`` and one answer) and how many
    choices it has. Raises ``ValueError`` for what the record holds, whatever the prediction: an answer or a choice
    that cannot be scored (:func:`check_answers` asks with an empty prediction)."""
    choices = choice_texts((record.get("meta") or {}).get("choices") or [])
    refs = reference_answers(record["answer"])
    score = score_answer(prediction, refs, choices)
    named = (
        float(names_only(prediction, refs[0], choices)) if choices and not isinstance(record["answer"], list) else None
    )
    return score, named, len(choices)


def check_answers(name: str, path: str, limit: int | None = None) -> None:
    """Every question of a set's first ``limit`` records can be scored, checked from the file before any model is
    loaded: a reference answer alignlm refuses (one annotator's "?" among ten) was found after the whole set had been
    generated. A record that is no object is left to the dataset, which names it."""
    for i, record in enumerate(read_records(path)[:limit]):
        if not isinstance(record, dict):
            continue
        rid = record_id(record, path, i)
        if "answer" not in record:
            raise DataError(
                f"eval set {name!r} ({path}) record id={rid} has no 'answer'; a question set needs one per record"
            )
        try:
            scored("", record)
        except ValueError as e:
            raise DataError(f"eval set {name!r} ({path}) record id={rid}: {e}") from e


def answer_accuracy(
    model: Any,
    name: str,
    path: str,
    data_cfg: Mapping[str, Any],
    batch_size: int = 16,
    max_new_tokens: int = 8,
    limit: int | None = None,
    generation: Mapping[str, Any] | None = None,
    seed: int = 0,
    num_workers: int = 0,
    keep: AnswerKeeper | None = None,
) -> dict[str, Any]:
    """Accuracy (exact match, or VQA accuracy for lists of answers), chance level, a few examples, and every
    question's score by id (``scores``, keyed by :func:`score_key`), so that two checkpoints can be compared question
    by question. Sets with ``meta.choices`` also get ``choice_accuracy`` and ``choice_scores``: the answer counts when
    the prediction names the right choice and no other, for models that answer in sentences.

    ``chance`` is the mean of ``1 / len(choices)`` over the ``chance_n`` records that have choices (0.0 when none
    has): a record without choices has no guessing level, and counting it as 0 would understate the others'.

    ``keep``: where each batch's answers are kept as it finishes, and read back by a run resumed (see
    :func:`~alignlm.models.generation.generate_set`).
    """
    preds = generate_set(
        model, path, data_cfg, batch_size, max_new_tokens, limit, generation, seed, num_workers=num_workers, keep=keep
    )
    correct, examples, scores, seen = 0.0, [], {}, Counter[str]()
    guesses: list[float] = []
    choice_scores: dict[str, float] = {}
    for rid, pred, rec in preds:
        if "answer" not in rec:
            raise ValueError(f"{path} record id={rid} has no 'answer'; a question set needs one per record")
        base = score_key(rid, rec)
        seen[base] += 1  # a repeated id gets "#k" from its second occurrence on, so no score is lost
        key = base if seen[base] == 1 else f"{base}#{seen[base] - 1}"
        try:
            score, named, n_choices = scored(pred, rec)
        except ValueError as e:
            raise ValueError(f"{path} record id={rid}: {e}") from e
        if named is not None:
            choice_scores[key] = named
        correct += score
        scores[key] = score
        if n_choices:
            guesses.append(1.0 / n_choices)
        if len(examples) < N_EXAMPLES:
            examples.append({"id": rid, "prediction": pred, "answer": rec["answer"], "correct": score == 1.0})
    n = len(preds)
    return {
        "name": name,
        "kind": "qa",
        "n": n,
        "accuracy": correct / max(n, 1),
        "chance": sum(guesses) / max(len(guesses), 1),
        "chance_n": len(guesses),
        "examples": examples,
        "scores": scores,
    } | (
        {
            "choice_accuracy": sum(choice_scores.values()) / len(choice_scores),
            "choice_n": len(choice_scores),  # the records with choices: the lenient score's denominator, not n
            "choice_scores": choice_scores,
        }
        if choice_scores
        else {}
    )


def caption_scores(
    model: Any,
    name: str,
    path: str,
    data_cfg: Mapping[str, Any],
    batch_size: int = 16,
    max_new_tokens: int = 32,
    limit: int | None = None,
    generation: Mapping[str, Any] | None = None,
    seed: int = 0,
    num_workers: int = 0,
    keep: AnswerKeeper | None = None,
) -> dict[str, Any]:
    """BLEU-4 and CIDEr-D of generated captions against the set's references, with a few examples (``keep``: as for
    :func:`answer_accuracy`)."""
    preds = generate_set(
        model, path, data_cfg, batch_size, max_new_tokens, limit, generation, seed, num_workers=num_workers, keep=keep
    )
    hyps = [p for _, p, _ in preds]
    refs = [reference_captions(rec) for _, _, rec in preds]
    examples = [{"id": rid, "prediction": p, "reference": r[0]} for (rid, p, _), r in zip(preds[:N_EXAMPLES], refs)]
    return {
        "name": name,
        "kind": "caption",
        "n": len(preds),
        "bleu4": bleu(hyps, refs),
        "cider": cider_d(hyps, refs),
        "examples": examples,
    }
