"""How well a judge's preferences agree with the truth, for preference pairs made from answers that have a reference.

For each judged pair of answers ``a`` / ``b`` to a question with a reference answer: the pairs where exactly one of
the two answers is correct (exact match after normalisation) are the informative ones, and agreement is the share of
those where the judge preferred the correct answer (0.5 is a coin; ``a_right`` is what always preferring answer
``a`` would get, the baseline when ``a`` is special, such as SIMA's greedy answer). Also reported: how many pairs had both orders of
the judgement agree (``consistent``), and how often the judge preferred whichever answer it was shown first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alignlm.evaluation.answers import is_correct


def judge_agreement(pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``pairs``: ``{answer, a, b, chosen, consistent, p_a_first, p_a_second}`` per judged pair."""
    informative = [p for p in pairs if is_correct(p["a"], p["answer"]) != is_correct(p["b"], p["answer"])]
    agree = [is_correct(p["chosen"], p["answer"]) for p in informative]
    a_right = [is_correct(p["a"], p["answer"]) for p in informative]
    kept = [is_correct(p["chosen"], p["answer"]) for p in informative if p["consistent"]]
    # p_a_first: p(a better) when a is shown first; p_a_second: p(a better) when a is shown second
    first_shown = [(p["p_a_first"] > 0.5) for p in pairs] + [(p["p_a_second"] <= 0.5) for p in pairs]
    return {
        "pairs": len(pairs),
        "consistent": sum(p["consistent"] for p in pairs),
        "informative": len(informative),
        "agreement": sum(agree) / len(agree) if agree else None,
        "a_right": sum(a_right) / len(a_right) if a_right else None,  # a judge that always picks `a` agrees this often
        "chose_a": sum(p["chosen"] == p["a"] for p in informative) / len(informative) if informative else None,
        "informative_consistent": len(kept),
        "agreement_consistent": sum(kept) / len(kept) if kept else None,
        "prefers_first_shown": sum(first_shown) / len(first_shown) if first_shown else None,
    }
