"""Follow-ups of the start-up checks: ``alignlm eval`` checks its sets' keys and ``generate()``'s settings as a run's
checks do (one list, one check); two ``eval.sets`` of one name, and an objective its constructor refuses, are refused
before the first stage trains; the documented DPO command and ``alignlm sima generate`` give the dpo stage the
finetune stage's prompt."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from alignlm import checks
from alignlm.checks import check_config
from alignlm.commands import main
from alignlm.config import ConfigError
from tests.conftest import compose

ROOT = Path(__file__).resolve().parents[1]
DPO = ("+exp=demo", "+stage@stages.dpo=dpo", "run=[pretrain,finetune,dpo]")


def test_eval_refuses_a_mistyped_generation_setting_before_loading_anything(tmp_path):
    """``--set generation.temprature=0.7`` passed alignlm eval's checks (its generation keys are transformers'), and
    generate() refused the keyword after the checkpoint was loaded."""
    out = tmp_path / "r"
    with pytest.raises(
        ConfigError,
        match=r"eval\.generation\.temprature is not a setting of transformers' generate\(\); did you mean 'temperature'",
    ):
        main(["eval", str(tmp_path / "no_checkpoint_here"), "--out", str(out), "--set", "generation.temprature=0.7"])
    assert not out.exists()  # refused before --out was made, before any checkpoint was looked for
    with pytest.raises(ConfigError, match=r"eval\.generation\.do_sample='maybe': choose one of \[True, False\]"):
        main(["eval", str(tmp_path / "no_checkpoint_here"), "--out", str(out), "--set", "generation.do_sample=maybe"])


def test_eval_and_the_start_up_checks_share_one_list_of_set_keys_and_one_name_check():
    from alignlm.commands import evaluate as command
    from alignlm.evaluation import evaluate, report

    assert command.EVAL_SET_KEYS is checks.EVAL_SET_KEYS and not hasattr(command, "SET_KEYS")
    assert report.check_set_names is evaluate.check_set_names is checks.check_set_names


def test_two_eval_sets_of_one_name_are_refused_at_start_up(tmp_path):
    """The report keeps a set's result under its name: the second of two sets named alike replaced the first, after
    every stage had trained and both were generated."""
    cfg = compose(
        "+exp=demo",
        f"output_dir={tmp_path}",
        "eval.sets=[{name:a,path:one.json},{name:a,path:two.json},{name:b,path:b}]",
    )
    with pytest.raises(ConfigError, match=re.escape("eval.sets name ['a'] more than once")):
        check_config(cfg)


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        (
            ("loss=ipo", "label_smoothing=0.1"),
            r"stages\.dpo\.objectives\.dpo: dpo label_smoothing=0\.1 is conservative DPO's, of loss=sigmoid; "
            r"loss=ipo has no labels to smooth",
        ),
        (("loss=ipoo",), r"stages\.dpo\.objectives\.dpo: dpo loss='ipoo' is not known; choose one of"),
        (("beta=0",), r"stages\.dpo\.objectives\.dpo\.beta=0 must be a finite number > 0"),
    ],
)
def test_an_objective_its_constructor_refuses_is_refused_before_the_first_stage_trains(tmp_path, knobs, message):
    """Objectives were built when their stage started: DPO's refusal came after pretrain and finetune had trained."""
    cfg = compose(*DPO, f"output_dir={tmp_path}", *(f"stages.dpo.objectives.dpo.{k}" for k in knobs))
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)
    check_config(compose(*DPO, f"output_dir={tmp_path}", "stages.dpo.objectives.dpo.loss=ipo"))  # alone, it builds


def test_the_dpo_stage_files_command_trains_on_the_finetune_stages_prompt():
    """stage/dpo.yaml's comment shows the DPO command; it lacked README's template_args override."""
    text = (ROOT / "configs" / "stage" / "dpo.yaml").read_text()
    (line,) = re.findall(r"^#\s+(alignlm train \+exp=demo \+stage@stages\.dpo=dpo.*)$", text, re.MULTILINE)
    words = shlex.split(line)[2:]
    assert "stages.dpo.data.template_args=${stages.finetune.data.template_args}" in words
    assert checks.prompt_changes(compose(*words)) == []


def test_sima_generate_prints_the_finetune_stages_prompt_for_the_dpo_stage():
    """``alignlm sima generate`` printed the sources override alone: trained with it, the dpo stage (stage/dpo.yaml)
    learnt the pairs without the system prompt they were answered and judged under."""
    from alignlm.commands.sima import dpo_prompt

    made = compose("+exp=demo")  # the checkpoint's config: the demo's finetune stage
    printed = dpo_prompt(made, "finetune")
    assert printed == "'stages.dpo.data.template_args=${stages.finetune.data.template_args}'"  # README's form
    trained = compose("+exp=demo", "+stage@stages.dpo=dpo", "run=[dpo]", *shlex.split(printed))
    assert trained.stages.dpo.data.template_args == made.stages.finetune.data.template_args
    assert dpo_prompt(compose(), "finetune") == ""  # stage/finetune.yaml's prompt: the dpo stage's own already
    assert dpo_prompt(made, "dpo") == ""
