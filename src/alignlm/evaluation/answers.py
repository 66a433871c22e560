"""Answer normalisation for exact-match scoring, in the spirit of the VQA evaluation script.

Lower-case, strip punctuation and articles, map number words to digits, so that "Seven." and "7" match.
"""

from __future__ import annotations

import re

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Canonical form of a short answer."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match after normalisation."""
    return normalize_answer(prediction) == normalize_answer(answer)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy (Antol et al. 2015): ``min(1, matches / 3)`` against each leave-one-out subset of the
    human answers, averaged; a single reference answer reduces to exact match."""
    if len(answers) == 1:
        return float(is_correct(prediction, answers[0]))
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    return sum(min(1.0, (sum(hits) - h) / 3.0) for h in hits) / len(hits)


def names_only(prediction: str, answer: str, choices: list[str]) -> bool:
    """Whether the prediction names the right choice and no other (whole words after normalisation): "The circle is
    red." names red. A lenient score for models that answer in sentences; exact match stays the headline."""
    pred = f" {normalize_answer(prediction)} "
    named = {c for c in choices if f" {normalize_answer(c)} " in pred}
    return named == {answer}


def score_answer(prediction: str, answer: str | list[str]) -> float:
    """One question's score: exact match for one reference, VQA accuracy for a list of human answers."""
    return vqa_accuracy(prediction, [answer] if isinstance(answer, str) else [str(a) for a in answer])
