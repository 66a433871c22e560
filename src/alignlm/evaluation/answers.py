"""Answer scoring for question sets: the official VQA normalisation, VQA accuracy, and multiple-choice letters.

``normalize_answer`` follows the rules of the official VQA evaluation (Antol et al. 2015; the EvalAI answer processor
that lmms-eval uses for VQAv2 and TextVQA), so that accuracies on VQA-style sets are comparable with published ones:
lower-case; the listed punctuation marks are removed where one stands next to a space (or anywhere once the text holds
a digit-comma-digit, so "1,000" is "1000") and replaced by a space otherwise ("t-shirt" is "t shirt"); a period goes
unless a digit follows it ("2.5" stays, "Red." is "red"); other marks ($ % : ') are kept; "none" and the number words
up to ten become digits; articles go; a contraction written without its apostrophe gets it back ("dont" is "don't").

Deliberate differences: an answer made of articles only keeps them, so the multiple-choice letter "A" stays "a"
instead of vanishing (the official rules would let an empty prediction match it), and on a question answered by
letter a capital "A" standing alone is the letter, not an article (``normalize_answer(letters=True)``). Others
(docs/evaluation.md): "," and "?" follow the punctuation rule as in Antol et al.'s ``vqaEval.py`` (lmms-eval's
processor deletes them first), and "im", "ive", "shes" get their apostrophe back (the official scripts list "Im" and
"Ive" capitalised, which never match lower-cased text, and have no "shes").

Multiple-choice questions whose choices (or answer) are single letters are scored on the letter the prediction picks:
"(B)", "B.", "B) red", "Answer: B", "The answer is B" and "Option A is wrong; the answer is B" all answer B (the rule:
:func:`choice_letter`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from itertools import product

_PUNCTUATION = frozenset(';/[]"{}()=+\\_-><@`,?!')  # the official list
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # any period but a decimal point
_NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()
_NUMBERS = {"none": "0"} | {w: str(i) for i, w in enumerate(_NUMBER_WORDS)}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions whose apostrophe-less spelling is no other English word ("its", "well", "were", "shed" are left alone).
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've "
    "he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't "
    "must've needn't not've o'clock oughtn't shan't she'd've she's should've shouldn't shouldn't've somebody'd've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll "
    "why're why's won't would've wouldn't wouldn't've y'all y'all'd've y'all'll you'd you'd've you'll you're you've"
).split()


def _spellings(word: str) -> set[str]:
    """Every spelling of a contraction with some of its apostrophes left out ("couldnt've", "couldntve", ...)."""
    parts = word.split("'")
    return {"".join(p + s for p, s in zip(parts, (*seps, ""))) for seps in product(("'", ""), repeat=len(parts) - 1)}


_CONTRACTIONS = {spelling: word for word in _CONTRACTED for spelling in _spellings(word) if spelling != word}


def _strip_punctuation(text: str) -> str:
    """The official punctuation rule: a mark that stands next to a space anywhere in the text (or any mark, once the
    text holds a digit-comma-digit) is removed; the others become spaces; then periods go, except decimal points."""
    drop_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    dropped = {m for m in _PUNCTUATION if drop_all or f"{m} " in text or f" {m}" in text}
    spaced = "".join("" if c in dropped else " " if c in _PUNCTUATION else c for c in text)
    return _PERIOD.sub("", spaced)


def normalize_answer(text: str, letters: bool = False) -> str:
    """Canonical form of a short answer under the official VQA rules (module docstring), so "Seven." matches "7".
    ``letters``: the text answers a question by letter, where a capital "A" standing alone is the choice A, not an
    article ("A is correct", "A and B"): dropped as one, names-choice never credited A in a sentence, and "A, B"
    matched the answer B exactly."""
    articles = _ARTICLES - {"a"} if letters and _CAPITAL_A.search(text) else _ARTICLES
    words = [_NUMBERS.get(w, w) for w in _strip_punctuation(text.lower().strip()).split()]
    kept = [w for w in words if w not in articles] or words  # a lone letter "A" is an answer, not an article
    return " ".join(_CONTRACTIONS.get(w, w) for w in kept)


_CAPITAL_A = re.compile(r"(?<![A-Za-z'])A(?![A-Za-z'])")


def is_correct(prediction: str, answer: str, letters: bool = False) -> bool:
    """Exact match after normalisation (``letters``: :func:`normalize_answer`'s)."""
    return normalize_answer(prediction, letters) == normalize_answer(answer, letters)


def _as_text(value: object) -> str | None:
    """A JSON answer or choice as text (None when it is neither a string nor a finite number): numbers as they would
    be written (``7``, ``2.5``; ``2.0`` is ``2``), so that an answer and its choices, read from the same kind of JSON
    number, are the same text."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else str(value)
    return None


def choice_texts(choices: Sequence[object]) -> list[str]:
    """A record's ``meta.choices`` as text, written as its answer is: ``[1.0, 2.0]`` is ``["1", "2"]``, which the
    answer ``2.0`` (written "2") names; ``str`` wrote "2.0", which no prediction of the right answer named."""
    texts = [_as_text(c) for c in choices]
    bad = [c for c, t in zip(choices, texts) if t is None]
    if bad:
        raise ValueError(f"choice {bad[0]!r} is not a string or a number")
    return [t for t in texts if t is not None]


def _reference(value: object) -> str:
    """One reference answer as text (:func:`_as_text`); a reference with nothing left after normalisation ("", "?")
    would be matched by an empty prediction, so it is refused."""
    text = _as_text(value)
    if text is None:
        raise ValueError(f"answer {value!r} is not a string, a number or a list of them")
    if not normalize_answer(text):
        raise ValueError(f"answer {value!r} is empty after normalisation; an empty prediction would match it")
    return text


def reference_answers(answer: object) -> list[str]:
    """A record's ``answer`` as reference strings: a string or a number is one reference, a list the human answers
    of a VQA-style question; an empty list has nothing to score against and is refused."""
    if isinstance(answer, list):
        if not answer:
            raise ValueError("answer is an empty list; a list of human answers needs at least one")
        return [_reference(a) for a in answer]
    return [_reference(answer)]


def vqa_accuracy(prediction: str, answers: object, letters: bool = False) -> float:
    """VQA accuracy (Antol et al. 2015): ``min(1, matches / 3)`` against each leave-one-out subset of the
    human answers, averaged; a single reference answer (a list of one, a string or a number) reduces to exact match.
    Summed exactly (``fsum``): a plain sum rounded by which annotators matched (0.6 against 0.6000000000000001), and
    two answers of one score differed in a paired comparison."""
    refs = reference_answers(answers)
    if len(refs) == 1:
        return float(is_correct(prediction, refs[0], letters))
    pred = normalize_answer(prediction, letters)
    hits = [normalize_answer(a, letters) == pred for a in refs]
    return math.fsum(min(1.0, (sum(hits) - h) / 3.0) for h in hits) / len(hits)


_LETTER = re.compile(r"([A-Za-z])")
# "answer", "answer is", "answer:", then at most one hedge before the letter ("answer: I think B", "answer is likely C")
_ANSWER_LEAD = re.compile(
    r"\banswer\b(?:\s+is)?\s*:?\s*(?:(?:I\s+think|I\s+believe|probably|likely|most\s+likely|it\s+is|it's)\s+)?",
    re.IGNORECASE,
)
_CHOICE_LEAD = re.compile(r"\b(?:option|choice)\b(?:\s+is)?\s*:?\s*", re.IGNORECASE)
_MARKED_LETTER = re.compile(r"(?:\(([A-Za-z])\)|([A-Za-z])[.):])(?=[\s.,;:!]|$)")  # "(B)", "B.", "B)", "B:"
_BARE_LETTER = re.compile(r"(?:([A-Z])(?=[\s.,;:!]|$)|([a-z])(?=[.!]?$))")  # "B ...", or a lower-case "b" that ends
_COMMA_LETTER = re.compile(r"([A-Z]),")  # "B, because ...": unless another choice follows (_HEDGE)
# Another choice after a letter: after a word offering an alternative ("B, or maybe C if ...", "B, Or possibly C", "B
# or C"), wherever words follow it; after "and" or "also", or right after the comma, only standing alone (before
# punctuation, the end, "or" or "and") or marked "(C)" right after the comma: "A, B", "B and C." and "B, (C)" are
# hedges, "B, A green circle", "B, C is wrong", "B and A is wrong" and "B, also A is a distractor" are not; "B, not C"
# is B
_ALT, _CONJ = r"(?:or|maybe|perhaps|possibly|probably|either)", r"(?:and|also)"
_ALONE = r"(?=\s*(?:[,;.:!?)]|$)|\s+(?i:or|and)\b)"
_HEDGE = re.compile(
    rf"\s*(?:(?i:(?:{_CONJ}\s+)?{_ALT}\s+(?:{_ALT}\s+)?)\(?([A-Z])\)?(?![A-Za-z'])"
    rf"|(?i:{_CONJ}\s+(?:{_CONJ}\s+)?)(?:\(([A-Z])\)|([A-Z])){_ALONE}"
    rf"|\(([A-Z])\)|([A-Z]){_ALONE})"
)


def _picked(found: re.Match[str] | None, letters: Collection[str] | None) -> str | None:
    """The upper-case letter ``found`` holds, or None where it holds none of ``letters`` (any letter when None)."""
    letter = next(g for g in found.groups() if g).upper() if found else None
    return letter if letter is not None and (letters is None or letter in letters) else None


def _letter_after(lead: re.Pattern[str], text: str, letters: Collection[str] | None) -> str | None:
    """The letter after the last match of ``lead`` that a letter of ``letters`` follows (marked, or bare and
    upper-case), or None where another choice follows it there ("the answer is B or C": a hedge picks none)."""
    found = None
    for m in lead.finditer(text):
        rest = text[m.end() :]
        letter = _MARKED_LETTER.match(rest) or _BARE_LETTER.match(rest)
        picked = _picked(letter, letters)
        if picked is not None:  # "B." ends its sentence: what follows weighs the options ("B. A and C are wrong")
            ended = letter.group(0)[-1] in ".:"
            found = None if not ended and _hedged(rest, letter.end(), letters) else picked
    return found


def _hedged(text: str, at: int, letters: Collection[str] | None) -> bool:
    """Whether another choice's letter follows position ``at`` of ``text`` (after a comma, if one is there):
    :data:`_HEDGE`."""
    hedge = _HEDGE.match(text, at + (text[at : at + 1] == ","))
    return hedge is not None and (letters is None or next(g for g in hedge.groups() if g) in letters)


_QUOTED_LETTER = re.compile(r"[\"'\u2018\u2019\u201c\u201d]([A-Za-z])[\"'\u2018\u2019\u201c\u201d]")


def _before_comma(text: str, letters: Collection[str] | None) -> re.Match[str] | None:
    """A letter that leads ``text`` before a comma, unless another choice's letter follows it there ("A, B", "B, or
    maybe C": a hedge picks none); a word after the comma is no choice ("B, a green circle", "B, I think", "B, A green
    circle", "B, C is wrong")."""
    found = _COMMA_LETTER.match(text)
    return None if found is None or _hedged(text, found.end(), letters) else found


def choice_letter(prediction: str, letters: Collection[str] | None = None) -> str | None:
    """The letter a multiple-choice prediction picks, upper-case, or None when it picks none.

    Only ``letters`` (upper-case; any letter when None) are picked: of four choices, the pronoun in "Answer: I think
    so" picks none (it had picked I). A letter counts when it is the whole prediction ("b"), leads it
    marked ("(B)", "B.", "B) red"), or leads it before a comma that no other choice follows ("B, because it is red";
    "A, B" and "B, or maybe C" pick neither). Else it is the
    letter after the last "answer" a letter follows ("Answer: B", "Looking at each option, the answer is C", "the
    answer is B, not option C", a hedge between: "My answer: I think B"; "the answer is B or C" picks none), and
    without one, after the last "option" or "choice" a letter follows ("Option A is
    wrong; option B"): a prediction that names its answer says so last, and "answer" outranks the options it weighs.
    After these words an upper-case letter counts bare too, so that the article in "the answer is a red circle" is no
    letter. Markdown emphasis and quotes around a letter are read through ("**B**", "**B.** green", "Answer: 'B'"),
    as instruction-tuned models write them: they had picked no letter and scored 0.
    """
    text = _QUOTED_LETTER.sub(r"\1", prediction.replace("**", "").replace("`", "")).strip()
    leading = _LETTER.fullmatch(text) or _MARKED_LETTER.match(text) or _before_comma(text, letters)
    return (
        _picked(leading, letters)
        or _letter_after(_ANSWER_LEAD, text, letters)
        or _letter_after(_CHOICE_LEAD, text, letters)
    )


def _lettered(references: Sequence[str], choices: Sequence[str]) -> bool:
    """Whether a question is answered by letter: its choices are single letters, or its reference answers are letters
    (with option texts as choices, a ScienceQA-style record: the answer "B" or "(B)" names the second option)."""
    if choices and _single_letters(choices):
        return True
    if choices:
        return all(_option_letter(r, choices) for r in references)
    return _single_letters(references)


def _single_letters(texts: Sequence[str]) -> bool:
    """Whether every one of ``texts`` is a single letter (surrounding whitespace aside)."""
    return all(_LETTER.fullmatch(t.strip()) for t in texts)


def _option_letter(answer: str, choices: Sequence[str]) -> str | None:
    """The letter by which ``answer`` names one of the option texts ``choices`` ("B", "(B)", "B."), or None where the
    answer is itself one of them (the blood type "O" of A, B, AB, O; the element "C" of Co, Cu, Ca, C)."""
    text = answer.strip()
    if normalize_answer(text) in {normalize_answer(c) for c in choices}:
        return None
    return choice_letter(text) if _LETTER.fullmatch(text) or _MARKED_LETTER.fullmatch(text) else None


def _choice_letters(choices: Sequence[str]) -> set[str] | None:
    """The letters that name one of ``choices``: the choices themselves where they are letters, else A, B, ... one per
    option text; None (any letter) without choices."""
    if not choices:
        return None
    if _single_letters(choices):
        return {c.strip().upper() for c in choices}
    return {chr(ord("A") + i) for i in range(len(choices))}


def _as_scored(prediction: str, references: Sequence[str], choices: Sequence[str]) -> str:
    """The prediction as it is scored: on a question answered by letter, the letter it picks (if any)."""
    letter = choice_letter(prediction, _choice_letters(choices)) if _lettered(references, choices) else None
    return letter or prediction


def _whole(phrase: str) -> re.Pattern[str]:
    """``phrase`` as whole words of a normalised text."""
    return re.compile(rf"(?<!\S){re.escape(phrase)}(?!\S)")


def names_only(prediction: str, answer: str, choices: Sequence[str]) -> bool:
    """Whether the prediction names the right choice and no other (whole words after normalisation): "The circle is
    red." names red. A lenient score for models that answer in sentences; exact match stays the headline.

    Longer choices are found first and blanked out, so "dark red" names "dark red" but not also "red", while "red, not
    dark red" names both. On a question answered by letter, the prediction's letter is what it names.
    """
    letter = None if _single_letters(choices) else _option_letter(answer, choices)
    if letter is not None:  # the letter of one of the option texts: named by that letter or that text
        index = ord(letter) - ord("A")
        if not 0 <= index < len(choices):
            raise ValueError(f"answer {answer!r} is the letter of none of its {len(choices)} choices")
        picked = choice_letter(prediction, _choice_letters(choices))
        if picked is not None:
            return picked == letter
        answer = choices[index]
    # a capital A standing alone is a word where a choice is "A" (a letter question, the blood type A): an article
    # dropped, "The blood type is A" had named nothing
    keep_a = _lettered([answer], choices) or any(c.strip() == "A" for c in choices)
    forms = {normalize_answer(c, keep_a): c for c in choices}
    if "" in forms:
        raise ValueError(f"choice {forms['']!r} is empty after normalisation; every choice must be an answer")
    if normalize_answer(answer, keep_a) not in forms:  # names-choice would be 0 whatever the prediction
        raise ValueError(
            f"answer {answer!r} is none of its choices {list(choices)}, nor the letter of one (B, (B) or B.)"
        )
    text = normalize_answer(_as_scored(prediction, [answer], choices), keep_a)
    named = set()
    for form in sorted(forms, key=lambda f: (len(f.split()), len(f)), reverse=True):
        pattern = _whole(form)
        if pattern.search(text):
            named.add(form)
            text = pattern.sub("|", text)
    return named == {normalize_answer(answer, keep_a)}


def score_answer(prediction: str, answer: object, choices: Sequence[str] = ()) -> float:
    """One question's score: exact match for one reference (a string or a number), VQA accuracy for a list of human
    answers; with single-letter ``choices`` (or a single-letter answer), on the letter the prediction picks."""
    refs = reference_answers(answer)
    return vqa_accuracy(_as_scored(prediction, refs, choices), refs, _lettered(refs, choices))
