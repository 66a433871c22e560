"""SIMA: self-generated answers judged by the model itself become preference records a dpo stage trains on, and the
critic check scores the judge against the reference answers."""

from __future__ import annotations

import json

import pytest

from alignlm.commands import main
from alignlm.data.build import build_dataset
from alignlm.evaluation.preferences import judge_agreement
from alignlm.methods.sima.generate import critic_question
from alignlm.models.build import build_model
from alignlm.pipeline import run
from tests.conftest import compose, tiny_overrides


def test_the_critic_check_counts_only_pairs_with_one_right_answer():
    def pair(a, b, chosen, consistent=True, p_first=0.9, p_second=0.9):
        return {
            "answer": "red",
            "a": a,
            "b": b,
            "chosen": chosen,
            "consistent": consistent,
            "p_a_first": p_first,
            "p_a_second": p_second,
        }

    pairs = [
        pair("red", "blue", "red"),  # right
        pair("blue", "Red.", "blue", consistent=False, p_first=0.9, p_second=0.2),  # wrong; normalisation: Red. == red
        pair("blue", "green", "blue"),  # both wrong: not informative
        pair("red", "the red", "red"),  # both right: not informative
    ]
    report = judge_agreement(pairs)
    assert report["pairs"] == 4 and report["informative"] == 2 and report["agreement"] == 0.5
    assert report["a_right"] == 0.5 and report["chose_a"] == 1.0
    assert report["informative_consistent"] == 1 and report["agreement_consistent"] == 1.0
    assert report["consistent"] == 3 and report["prefers_first_shown"] == pytest.approx(5 / 8)


def test_the_critic_question_names_the_reference_both_answers_and_the_three_criteria():
    text = critic_question("What color is it?", "red", "blue", "red")
    assert "Reference answer: red" in text and "Answer A: blue" in text and "Answer B: red" in text
    assert all(word in text for word in ("objects", "relationships", "attributes")) and text.endswith("Reply A or B.")


def test_sima_generate_writes_records_a_dpo_stage_reads(colour_set, tmp_path):
    overrides = tiny_overrides(colour_set, tmp_path, "run=[finetune]", "stages.finetune.init_from=null", "eval.sets=[]")
    run(compose(*overrides, "stages.finetune.data.template=chat"))
    final = tmp_path / "t" / "finetune" / "final"
    out = tmp_path / "sima"
    args = ["sima", "generate", str(final), "--set", f"colours={colour_set['instruct']}", "--out", str(out)]
    assert main([*args, "--limit", "8", "--samples", "3", "--keep-inconsistent"]) == 0
    critic = json.loads((out / "colours.critic.json").read_text())
    records = json.loads((out / "colours.json").read_text())
    assert critic and len(records) == len(critic)  # nothing dropped with --keep-inconsistent
    for p in critic:
        assert (
            0 <= p["p_a_first"] <= 1
            and 0 <= p["p_a_second"] <= 1
            and p["a"] != p["b"]
            and p["chosen"] in (p["a"], p["b"])
        )
    cfg = compose(
        *overrides,
        "+stage@stages.dpo=dpo",
        f"stages.dpo.data.sources=[{{path:{out / 'colours.json'},image_root:{colour_set['instruct'].parent}}}]",
    )
    dataset = build_dataset(cfg.stages.dpo.data, build_model(cfg.model), 0)
    assert len(dataset) == len(records) and isinstance(dataset[0], tuple)
    report = json.loads((out / "critic_check.json").read_text())["colours"]
    assert report["pairs"] == len(critic)
