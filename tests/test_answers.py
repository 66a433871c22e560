"""Answer scoring: the official VQA normalisation (lmms-eval 0.7.3's behaviour as the expectation), VQA accuracy,
multiple-choice letters, names-the-choice, odd answer types, and the offline sets' answers scoring as before."""

from __future__ import annotations

import pytest

from alignlm.data.digits import NUMERALS, WORDS
from alignlm.data.shapes import COLOURS, POSITIONS, SHAPES
from alignlm.evaluation.answers import choice_letter, names_only, normalize_answer, score_answer, vqa_accuracy
from alignlm.evaluation.evaluate import scored

LETTERS = ["A", "B", "C", "D"]


def test_vqa_normalisation_and_accuracy():
    assert normalize_answer("Seven.") == normalize_answer("7") == "7"
    assert normalize_answer("The Red  circle!") == "red circle"
    assert score_answer("an apple", "Apple") == 1.0 and score_answer("pear", "apple") == 0.0
    # VQA: min(1, matches / 3) over the ten leave-one-out subsets of ten human answers
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == 1.0
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert score_answer("yes", ["no"] * 10) == 0.0


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        # what lmms-eval 0.7.3's EvalAI answer processor scores (vqav2 / textvqa), ten identical human answers
        ("none", "0", 1.0),  # "none" is the number 0
        ("1000", "1,000", 1.0),  # a digit-comma-digit text loses its punctuation
        ("don't know", "dont know", 1.0),  # contractions are made uniform
        ("2.5", "2 5", 0.0),  # a decimal point is kept
        ("$5", "5", 0.0),  # marks outside the official list are kept
        ("50%", "50", 0.0),
        ("10:30", "1030", 0.0),
        ("it's red", "its red", 0.0),  # "its" is a word of its own
        ("t-shirt", "t shirt", 1.0),  # a mark inside a word becomes a space
        ("Red.", "red", 1.0),
        ("a", "none", 0.0),
    ],
)
def test_normalisation_follows_the_official_vqa_rules(prediction, answer, expected):
    assert score_answer(prediction, [answer] * 10) == expected


def test_the_official_punctuation_rule_by_example():
    assert normalize_answer("2.5") == "2.5" and normalize_answer("U.S.A.") == "usa"
    assert normalize_answer("t-shirt - red") == "tshirt red"  # a mark next to a space goes everywhere in the text
    assert normalize_answer("1,000 people") == "1000 people"
    assert normalize_answer("couldnt've") == normalize_answer("couldn'tve") == "couldn't've"


def test_a_lone_letter_is_an_answer_not_an_article():
    assert normalize_answer("A") == "a" and normalize_answer("the") == "the"
    assert score_answer("", "A") == 0.0 and score_answer("the", "A") == 0.0
    assert not names_only("", "A", LETTERS)
    assert normalize_answer("a cat") == "cat"  # an article next to other words still goes


@pytest.mark.parametrize(
    "prediction", ["B", "b", "(B)", "B.", "B)", "B) red", "(B) red", "Answer: B", "The answer is B", "the answer is b."]
)
def test_a_multiple_choice_prediction_is_scored_on_the_letter_it_picks(prediction):
    assert choice_letter(prediction) == "B"
    assert score_answer(prediction, "B", LETTERS) == 1.0 and score_answer(prediction, "A", LETTERS) == 0.0
    assert score_answer(prediction, "B") == 1.0  # a single-letter answer is enough to know the question is lettered
    assert names_only(prediction, "B", LETTERS) and not names_only(prediction, "A", LETTERS)


def test_words_that_only_look_like_letters_pick_none():
    assert choice_letter("A cat") is None
    assert choice_letter("The answer is a red circle") is None
    assert choice_letter("e.g. blue") is None
    assert score_answer("A cat", "A", LETTERS) == 0.0
    assert score_answer("(A) red", "red", ["red", "blue"]) == 1.0  # letters are read only on a lettered question


@pytest.mark.parametrize(
    ("prediction", "picks"),
    [
        ("Looking at each option, the answer is C", "C"),  # an "option" before the answer hid its letter
        ("Option A is wrong; the answer is B", "B"),  # the first "option" picked the letter it rejects
        ("Choices A and B are wrong. Answer: D", "D"),
        ("The answer is B, not option C", "B"),  # "answer" outranks a later option it weighs
        ("The answer is B. Option A is wrong.", "B"),
        ("The answer is not A, it is option C", "C"),  # no letter after "answer": the last option that has one
        ("I would answer A, but the answer is B", "B"),  # the last "answer" a letter follows
        ("(B) because option C is wrong", "B"),  # a leading marked letter first
    ],
)
def test_the_letter_is_the_one_after_the_last_answer_then_the_last_option(prediction, picks):
    assert choice_letter(prediction) == picks
    assert score_answer(prediction, picks, LETTERS) == 1.0


def test_names_only_counts_a_sentence_that_names_the_right_choice_alone():
    colours = ["red", "green", "blue"]
    assert names_only("The circle is red.", "red", colours)
    assert not names_only("It is red or blue", "red", colours)  # two choices named
    assert not names_only("reddish", "red", colours)  # whole words only
    assert names_only("In the top left corner.", "top left", ["top left", "top right", "bottom left"])
    assert not names_only("There are 10000", "1", ["1", "2", "3"])


def test_names_only_compares_normalised_choices_and_prefers_the_longer_one():
    assert names_only("red", "red", ["Red", "Green"])
    assert names_only("It is dark red.", "dark red", ["red", "dark red"])
    assert not names_only("It is dark red.", "red", ["red", "dark red"])
    assert not names_only("red, not dark red", "dark red", ["red", "dark red"])  # both named
    with pytest.raises(ValueError, match="empty after normalisation"):
        names_only("red", "red", ["red", "?"])


def test_a_numeric_answer_is_its_text_and_an_empty_list_is_refused():
    assert score_answer("7", 7) == 1.0 and score_answer("seven", 7) == 1.0 and score_answer("8", 7) == 0.0
    assert score_answer("2.5", 2.5) == 1.0 and score_answer("3", 3.0) == 1.0
    assert vqa_accuracy("7", [7] * 4) == 1.0
    with pytest.raises(ValueError, match="empty list"):
        score_answer("7", [])
    with pytest.raises(ValueError, match="empty list"):
        vqa_accuracy("7", [])
    for bad in (True, None, {"a": 1}, float("nan")):
        with pytest.raises(ValueError, match="not a string, a number or a list"):
            score_answer("7", bad)
    for empty in ("", " ", "?", ["yes", ""]):
        with pytest.raises(ValueError, match="empty after normalisation"):
            score_answer("", empty)


def test_numeric_choices_are_written_as_the_answer_is():
    """``meta.choices`` of JSON floats were written ``str(2.0)`` = "2.0" while the answer ``2.0`` was "2": names-choice
    never credited the right answer."""
    from alignlm.evaluation.answers import choice_texts

    assert choice_texts([1.0, 2.0, 2.5, 3, "four"]) == ["1", "2", "2.5", "3", "four"]
    assert names_only("There are 2.", "2", choice_texts([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="choice None is not a string or a number"):
        choice_texts(["a", None])


@pytest.mark.parametrize(
    "choices",
    [list(NUMERALS), ["1", "2", "3"], list(COLOURS), list(SHAPES), list(POSITIONS)],
    ids=["digits", "shapes count", "shapes colour", "shapes shape", "shapes position"],
)
def test_the_offline_sets_answers_score_as_before(choices):
    """Every answer the digits / shapes generators write, in the forms a model gives it, still matches itself and no
    other choice, exactly and as the named choice (the demo's figures do not move)."""
    for answer in choices:
        for form in (answer, answer.capitalize(), f"{answer}.", answer.upper(), f"The {answer}."):
            assert [score_answer(form, other) for other in choices] == [float(c == answer) for c in choices]
            assert names_only(f"It is {form}", answer, choices)
    assert all(score_answer(word, digit) == 1.0 for word, digit in zip(WORDS, NUMERALS))


@pytest.mark.parametrize("sentence", ["{} is correct.", "I choose {}", "{}, because the circle is red"])
def test_a_sentence_names_the_letter_a_as_it_names_the_others(sentence):
    """On a letter question the capital A is the choice, not an article: "A is correct." had named nothing while
    "B is correct." named B (names-choice lost every A of a set: 0.75 for a model always right)."""
    letters = ["A", "B", "C", "D"]
    for letter in letters:
        assert names_only(sentence.format(letter), letter, letters), letter
        assert not names_only(sentence.format(letter), "B" if letter != "B" else "C", letters)


@pytest.mark.parametrize("two", ["A, B", "A and B", "A B"])
def test_an_answer_naming_two_letters_matches_neither(two):
    """ "A, B" had matched the answer B exactly, its A dropped as an article."""
    assert score_answer(two, "B", ["A", "B", "C"]) == 0.0 and not names_only(two, "B", ["A", "B", "C"])


@pytest.mark.parametrize("prediction", ["B", "B) green", "Answer: B", "The answer is B", "B. green", "green"])
def test_a_letter_answer_of_option_texts_is_scored_by_its_letter(prediction):
    """A ScienceQA-style record (the answer "B", the option texts as choices) had been scored as exact match on the
    text: "B) green" scored 0, and names-choice was 0 whatever the prediction."""
    record = {"answer": "B", "meta": {"choices": ["red", "green", "blue"]}}
    score, named, n = scored(prediction, record)
    assert (score, named, n) == (0.0 if prediction == "green" else 1.0, 1.0, 3)
    assert scored("A) red", record)[:2] == (0.0, 0.0)


def test_a_letter_answer_that_is_itself_a_choice_is_scored_as_that_choice():
    """The blood type O of A, B, AB, O and the element C of Co, Cu, Ca, C are choices, not letters of options: they
    had been refused (O: "the letter of none of its 4 choices") or read as the third option (Ca credited for C)."""
    blood = {"answer": "O", "meta": {"choices": ["A", "B", "AB", "O"]}}
    assert scored("O", blood)[:2] == (1.0, 1.0) and scored("AB", blood)[:2] == (0.0, 0.0)
    type_a = {"answer": "A", "meta": {"choices": ["A", "B", "AB", "O"]}}
    assert scored("The blood type is A", type_a)[1] == 1.0 and scored("The blood type is O", type_a)[1] == 0.0
    element = {"answer": "C", "meta": {"choices": ["Co", "Cu", "Ca", "C"]}}
    assert scored("It is C.", element)[1] == 1.0 and scored("Ca", element)[1] == 0.0


@pytest.mark.parametrize("answer", ["(B)", "B."])
def test_a_marked_letter_answer_of_option_texts_names_its_option(answer):
    record = {"answer": answer, "meta": {"choices": ["cat", "dog"]}}
    assert scored("(B)", record)[:2] == (1.0, 1.0) and scored("dog", record)[1] == 1.0
    assert scored("cat", record)[:2] == (0.0, 0.0)


def test_an_answer_that_is_none_of_its_choices_is_refused():
    """Its names-choice score was 0 whatever the model answered."""
    with pytest.raises(ValueError, match=r"answer 'purple' is none of its choices \['red', 'green'\], nor the letter"):
        scored("", {"answer": "purple", "meta": {"choices": ["red", "green"]}})
    with pytest.raises(ValueError, match="answer 'E' is the letter of none of its 2 choices"):
        scored("", {"answer": "E", "meta": {"choices": ["red", "green"]}})


def test_vqa_accuracy_does_not_depend_on_which_annotators_matched():
    """A plain sum had rounded 2 matches of 10 to 0.6 or 0.6000000000000001 by their places: a paired comparison
    counted two answers of one score as a difference."""
    scores = set()
    for first in range(9):
        answers = ["blue"] * 10
        answers[first] = answers[first + 1] = "red"
        scores.add(vqa_accuracy("red", answers))
    assert len(scores) == 1


def test_export_check_refuses_an_unscorable_set_before_loading_anything(tmp_path, monkeypatch):
    """It had scored after both models generated every answer, and then failed with a traceback."""
    import json

    from alignlm.data.records import DataError
    from alignlm.evaluation import export_check

    questions = tmp_path / "q.json"
    record = {"id": "q0", "conversations": [{"from": "human", "value": "?"}], "answer": "E"}
    questions.write_text(json.dumps([record | {"meta": {"choices": ["cat", "dog"]}}]))
    monkeypatch.setattr(export_check, "resolve", lambda *_: pytest.fail("loaded a checkpoint"))
    with pytest.raises(DataError, match="answer 'E' is the letter of none of its 2 choices"):
        export_check.compare_with_export("ck", tmp_path / "out", questions)


@pytest.mark.parametrize("prediction", ["**B**", "**B.** green", "Answer: 'B'", "`B`", "The answer is \u201cB\u201d."])
def test_a_letter_in_markdown_emphasis_or_quotes_is_read(prediction):
    """Instruction-tuned models write "**B**": it had picked no letter and scored 0."""
    assert choice_letter(prediction) == "B"
    assert score_answer(prediction, "B", ["A", "B", "C"]) == 1.0 and names_only(prediction, "B", ["A", "B", "C"])


@pytest.mark.parametrize(
    "prediction",
    [
        "B, because the circle is red",
        "**B**, the red one",
        "B, not C",
        "B, a green circle",
        "B, I think",
        "B, A green circle",  # an option text's capital article: no second choice
        "B, C is wrong",
    ],
)
def test_a_leading_letter_before_a_comma_is_picked(prediction):
    """ "B, because ..." had picked no letter and scored 0; "A, B" still picks neither (above), nor a hedge. A capital
    after the comma is a second choice only marked or standing alone: "B, A green circle" had scored 0."""
    assert choice_letter(prediction, set(LETTERS)) == choice_letter(prediction) == "B"
    assert score_answer(prediction, "B", LETTERS) == 1.0
    assert score_answer(prediction, "B", ["red", "green", "blue"]) == 1.0


@pytest.mark.parametrize(
    "hedge",
    [
        "B, or maybe C",
        "B, (C)",
        "B, and C",
        "B, or possibly C",
        "B, Or maybe C",
        "B, C.",
        "B, A or C",
        "B, C?",
        "B, or maybe C if the circle is red",  # after a hedge word, a letter before more words is still a choice
        "B, or C would also fit",
        "B, maybe C too",
    ],
)
def test_a_letter_before_a_comma_and_another_choice_is_a_hedge(hedge):
    assert choice_letter(hedge, set(LETTERS)) is None and score_answer(hedge, "B", LETTERS) == 0.0


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("My answer: I think B", "B"),  # had picked none
        ("The answer is probably B", "B"),
        ("The answer is most likely (C).", "C"),
        ("answer: it is D", "D"),
        ("Answer: it is a square", None),  # the article is no letter
        ("The answer is B or C", None),  # a hedge after "answer" picks none, as one before a comma does (it was B)
        ("The answer is B, or maybe C", None),
        ("Answer: A. Final answer: B or C", None),  # the last answer is the one given, hedged
        ("The answer is B, not option C", "B"),
        ("Answer: B. C is wrong", "B"),
        # a sentence that ends with the letter, or "and"/"also" before an option weighed, is no hedge (a first
        # version had read these as hedges and scored them 0)
        ("The answer is B. A and C are incorrect because neither shows a circle.", "B"),
        ("The answer is B.\n\nA. A red square - incorrect\nC. A blue circle - incorrect", "B"),
        ("Answer: B. C, the green one, is wrong.", "B"),
        ("The answer is B and A is wrong.", "B"),
        ("The answer is (B) and (A) is wrong.", "B"),
        ("The answer is D. Either A or B could seem right, but", "D"),
        ("B, and A is wrong since the dog is brown.", "B"),
        ("B, also A is a distractor.", "B"),
        ("The answer is B and C.", None),
    ],
)
def test_an_answer_after_a_hedge_word_is_read_and_one_hedged_between_two_choices_is_not(prediction, letter):
    assert choice_letter(prediction, {"A", "B", "C", "D"}) == letter


def test_a_letter_that_names_no_choice_is_not_picked():
    """Of four choices, the pronoun in "Answer: I think so" had been picked as the letter I ("I think" before the
    answer is a hedge now, whatever the choices)."""
    four = {"A", "B", "C", "D"}
    assert choice_letter("Answer: I think so") is None and choice_letter("Answer: I think so", four) is None
    assert choice_letter("E", four) is None and choice_letter("Answer: E. Option B", four) == "B"
    assert not names_only("Answer: I think so", "B", ["red", "green", "blue"])
