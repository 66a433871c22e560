"""Eval knobs read and applied as they are written: ``--set`` in the override grammar of ``alignlm train``,
``eval.generation`` settings that have names and values, ``--template`` without the stage's ``template_args``; and
DPO's ``label_smoothing``, which IPO has no use for."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from alignlm.commands import main
from alignlm.config import ConfigError
from alignlm.pipeline import run
from tests.conftest import compose, pretrain_on


def _eval_args(*argv: str) -> argparse.Namespace:
    """``alignlm eval`` arguments as its own parser reads them."""
    from alignlm.commands.evaluate import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["eval", "unused_checkpoint", *argv])


@pytest.mark.parametrize(
    "value", ["generation={do_sample:true,temperature:0.7}", "generation={do_sample: true, temperature: 0.7}"]
)
def test_set_reads_a_mapping_as_train_reads_an_override(value):
    """OmegaConf's dotlist read ``{do_sample:true,temperature:0.7}`` as YAML: the keys 'do_sample:true' and
    'temperature:0.7' with null values, and the report was greedy."""
    from alignlm.commands.evaluate import eval_config

    ecfg = eval_config(_eval_args("--set", value, "--set", "probe.layers=[0,-1]", "--set", "+generation.top_p=0.9"))
    assert ecfg["generation"] == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert ecfg["probe"]["layers"] == [0, -1]
    merged = eval_config(_eval_args("--set", "generation={temperature:0.7}"))  # a mapping merges, as in train
    assert merged["generation"] == {"do_sample": False, "temperature": 0.7}


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("probe.path=/data/a(1).json", r"--set 'probe.path=/data/a\(1\).json' is not key=value in the override gram"),
        ("~generation", r"--set '~generation' sets no eval knob"),
        ("batch_size=8,16", r"--set 'batch_size=8,16' sets no eval knob"),
    ],
)
def test_a_set_item_that_is_no_override_of_a_knob_is_refused(tmp_path, item, message):
    with pytest.raises(SystemExit, match=message):
        main(["eval", str(tmp_path / "no_checkpoint_here"), "--out", str(tmp_path / "r"), "--set", item])


@pytest.mark.parametrize(
    ("config", "sets", "message"),
    [
        (
            "generation: {do_sample:true,temperature:0.7}\n",  # YAML: two keys without values
            [],
            r"eval generation: keys \['do_sample:true', 'temperature:0.7'\] are not setting names",
        ),
        (None, ["generation.top_k=null"], r"eval generation: \['top_k'\] have no value \(null\)"),
        (None, ["generation=3"], "eval generation=3 must be a mapping of transformers generate"),
    ],
)
def test_generation_settings_without_a_name_or_a_value_are_refused_before_loading_anything(
    tmp_path, config, sets, message
):
    flags = [arg for item in sets for arg in ("--set", item)]
    if config is not None:
        (tmp_path / "eval.yaml").write_text(config)
        flags += ["--config", str(tmp_path / "eval.yaml")]
    with pytest.raises(SystemExit, match=message):
        main(["eval", str(tmp_path / "no_checkpoint_here"), "--out", str(tmp_path / "r"), *flags])


# ------------------------------------------------------------------------------ a checkpoint with template_args


@pytest.fixture(scope="module")
def system_final(colour_set, tmp_path_factory) -> Path:
    """The ``final/`` of a one-step stage trained with ``vicuna_v1`` and a system prompt of its own."""
    out = tmp_path_factory.mktemp("template_args")
    run(
        compose(
            *pretrain_on(
                colour_set,
                out,
                "mixed_precision=no",
                "eval.sets=[]",
                "stages.pretrain.max_steps=1",
                "stages.pretrain.per_device_batch_size=4",
                "stages.pretrain.data.template=vicuna_v1",
                "+stages.pretrain.data.template_args.system=Be brief.",
            )
        )
    )
    return out / "t" / "pretrain" / "final"


def test_another_template_is_built_without_the_stages_template_args(system_final):
    from alignlm.evaluation import checkpoints as C
    from alignlm.evaluation.report import eval_data_config

    (ck,) = C.resolve([str(system_final)])
    train_cfg = C.stage_config(ck)
    for template in (None, "vicuna_v1"):  # the stage's own template keeps its arguments
        data = eval_data_config(ck, train_cfg, {"template": template})
        assert (data["template"], data["template_args"]) == ("vicuna_v1", {"system": "Be brief."})
    data = eval_data_config(ck, train_cfg, {"template": "chat"})
    assert data["template"] == "chat" and "template_args" not in data


def test_eval_with_another_template_than_the_stages_answers(system_final, colour_set, tmp_path):
    """``--template plain`` kept the stage's template_args: ``TypeError: PlainTemplate() takes no arguments`` after
    the model had loaded. The sampled generation asked with ``--set`` is the one the report records."""
    out = tmp_path / "r"
    argv = ["eval", str(system_final), "--template", "plain", "--sets", f"t={colour_set['test']}", "--limit", "2"]
    argv += ["--no-probe", "--no-plots", "--out", str(out), "--set", "generation={do_sample:true,temperature:0.7}"]
    assert main(argv) == 0
    (result,) = json.loads((out / "report.json").read_text())["checkpoints"]
    assert result["template"] == "plain" and len(result["sets"]["t"]["examples"]) == 2
    kept = json.loads(next((out / "parts").glob("*/set-t.json")).read_text())
    assert kept["key"]["knobs"]["generation"] == {"do_sample": True, "temperature": 0.7}


def test_template_args_that_do_not_fit_the_checkpoints_template_are_refused_before_it_loads(
    system_final, colour_set, tmp_path, monkeypatch
):
    """A checkpoint's config written before training refused such args (here edited): its template could not be
    built, found after the model had loaded."""
    from alignlm.evaluation import report

    final = Path(shutil.copytree(system_final, tmp_path / "t" / "pretrain" / "final"))
    config = final / "config.yaml"
    text = config.read_text()
    assert "system: Be brief." in text
    config.write_text(text.replace("system: Be brief.", "system: Be brief.\n        image_frist: true"))
    monkeypatch.setattr(report.C, "load", lambda *a, **k: pytest.fail("a checkpoint was loaded before the check"))
    message = r"t/pretrain/final: its stage's data.template_args=.*image_frist.* do not fit template 'vicuna_v1'"
    with pytest.raises(ConfigError, match=message):
        main(["eval", str(final), "--sets", f"t={colour_set['test']}", "--no-probe", "--out", str(tmp_path / "r")])


# ------------------------------------------------------------------------------ DPO


def test_ipo_refuses_label_smoothing_it_would_ignore():
    """``loss=ipo`` computed ``(h - 1 / (2 beta))^2`` whatever ``label_smoothing`` said."""
    from alignlm.objectives.preference import PreferenceObjective

    with pytest.raises(ValueError, match=r"dpo label_smoothing=0.1 .*loss=ipo .*set label_smoothing=0"):
        PreferenceObjective(loss="ipo", label_smoothing=0.1)
    assert PreferenceObjective(loss="ipo").label_smoothing == 0.0
    assert PreferenceObjective(loss="sigmoid", label_smoothing=0.1).label_smoothing == 0.1
