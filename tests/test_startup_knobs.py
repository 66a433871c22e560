"""Knobs whose mistakes surfaced late: the final evaluation's sets and generate() settings (after every stage trained),
the monitor under a sharded strategy and the model's own knobs (after the offline sets and prepare steps, exit status
1), an override that adds keys to a mapping (told as a key the config lacks), and a stage whose prompt is not its
starting stage's (the documented DPO command trained on another system prompt)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from alignlm import checks
from alignlm.checks import check_config
from alignlm.commands import console
from alignlm.config import ConfigError, config_dir
from alignlm.data.hooks import SampleHook
from alignlm.data.records import DataError
from alignlm.pipeline import resolve_strategy, run
from tests.conftest import compose, pretrain_on

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["eval.sets=[{name:t,path:t.json,limt:3}]"],
            "eval.sets[0].limt is not a setting of a set (['name', 'path', "
            "'kind']); did you mean eval.limit, which applies to every set?",
        ),
        (["eval.sets=[{name:t,path:t.json,knd:qa}]"], "eval.sets[0].knd is not a known setting; did you mean 'kind'?"),
        (
            ["eval.sets=[{name:t,path:t.json,kind:captions}]"],
            "eval.sets[0].kind='captions' is not known; choose one of",
        ),
        (
            ["eval.sets=[{name:t,path:t.json,kind:caption}]"],
            "eval.sets[0].kind=caption: the run's final evaluation "
            "scores question sets only (answer accuracy): leave the set out of eval.sets and score its captions (BLEU-4, "
            "CIDEr-D) with alignlm eval",
        ),
        (
            ["+eval.generation.temprature=0.7"],
            "eval.generation.temprature is not a setting of transformers' generate(); did you mean 'temperature'?",
        ),
        (["+eval.generation.max_new_tokens=4"], "eval.generation sets ['max_new_tokens'], which alignlm sets itself"),
        # values: transformers takes any, so "maybe" sampled and num_beams 0 failed the final evaluation
        (["eval.generation.do_sample=maybe"], "eval.generation.do_sample='maybe': choose one of [True, False]"),
        (["+eval.generation.num_beams=0"], "eval.generation.num_beams=0 must be a whole number >= 1"),
        (["+eval.generation.temperature=-1"], "eval.generation.temperature=-1 must be"),
        (["+eval.generation.top_p=1.5"], "eval.generation.top_p=1.5 must be"),
        (["+eval.generation.top_k=2.5"], "eval.generation.top_k=2.5 must be a whole number >= 0"),
        (["offline_dataset_seed=-1"], "offline_dataset_seed=-1 must be a whole number >= 0 (or null: the run's seed)"),
    ],
)
def test_an_eval_set_or_generation_mistake_is_refused_by_the_start_up_checks(tmp_path, overrides, message):
    """A mistyped key of a set was dropped unread, a caption set and a mistyped generate() setting stopped the run at
    its final evaluation, after every stage had trained."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(compose(f"output_dir={tmp_path}", *overrides))


def test_eval_sets_and_generate_settings_that_work_pass(tmp_path):
    cfg = compose(
        f"output_dir={tmp_path}",
        "eval.sets=[{name:a,path:a.json},{name:b,path:b.json,kind:qa},{name:c,path:c.json,kind:auto}]",
        "+eval.generation.top_p=0.9",
        "+eval.generation.repetition_penalty=1.1",
        "+eval.generation.num_beams=2",
        "+eval.generation.temperature=0.7",
        "eval.generation.do_sample=true",
    )
    check_config(cfg)


def _records(path: Path, records: list[dict]) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def test_an_eval_set_the_final_evaluation_cannot_score_is_a_data_error_naming_it(colour_set, tmp_path):
    """As evaluation checks a set before generating (check_answers): a caption set (kind auto), a question without
    an answer; within eval.limit only."""
    test = json.loads(colour_set["test"].read_text())
    captions = _records(tmp_path / "captions.json", json.loads(colour_set["pretrain"].read_text()))
    unanswered = _records(tmp_path / "unanswered.json", [test[0], {k: v for k, v in test[1].items() if k != "answer"}])

    def sets(path: str) -> str:
        return f"eval.sets=[{{name:ok,path:{colour_set['test']}}},{{name:x,path:{path}}}]"

    cases = [
        (captions, r"eval.sets\[1\]: .*captions.json is a caption set .* alignlm eval .*final --sets x="),
        (unanswered, r"eval.sets\[1\]: eval set 'x' \(.*unanswered.json\) record id=t1 has no 'answer'"),
        (str(tmp_path / "nowhere.json"), r"eval.sets\[1\]: data file .*nowhere.json does not exist"),
    ]
    for path, message in cases:
        with pytest.raises(DataError, match=message):
            checks.check_eval_sets(compose(f"output_dir={tmp_path}", sets(path)))
    checks.check_eval_sets(compose(f"output_dir={tmp_path}", sets(unanswered), "eval.limit=1"))


def test_an_eval_set_is_checked_once_the_prepare_steps_wrote_theirs_and_before_any_stage_trains(colour_set, tmp_path):
    """A set a prepare step writes is there when the sets are checked; a missing one is refused before the first
    stage trains (it had stopped the run after every stage trained, its weights unevaluated)."""
    written = tmp_path / "written.json"
    copy = f"+stages.pretrain.prepare.copy={{_target_:shutil.copyfile,_args_:[{colour_set['test']},{written}]}}"
    sets = f"eval.sets=[{{name:a,path:{written}}},{{name:b,path:{tmp_path / 'missing.json'}}}]"
    cfg = compose(*pretrain_on(colour_set, tmp_path, "mixed_precision=no", "stages.pretrain.max_steps=1", copy, sets))
    with pytest.raises(DataError, match=r"eval.sets\[1\]: data file .*missing.json does not exist"):
        run(cfg)
    assert written.exists()  # the prepare step ran, and its set passed
    assert not (tmp_path / "t" / "pretrain" / "final").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["launcher=fsdp2", "monitor.every=1"], "monitor.every > 0 is not available with distributed.strategy=fsdp2"),
        (["model.vision_artifacts={mode:drop,factor:4.0}"], "model.vision_artifacts.mode='drop' is not known"),
        (["model.visual_token_norm=-1"], "model.visual_token_norm=-1 must be a number > 0"),
        (["model/connector=v2l", "model.visual_token_norm=1.0"], "model.visual_token_norm must be null with the v2l"),
        (["model.vision_artifacts=3"], "model.vision_artifacts=3 must be a mapping"),
    ],
)
def test_a_monitor_or_model_knob_mistake_is_exit_2_before_the_prepare_steps(
    colour_set, tmp_path, capsys, overrides, message
):
    """Refused when the first stage set up its optimizer or built its model, exit status 1, after the offline sets
    and every prepare step had run (hours for a method's encoder)."""
    marker = tmp_path / "prepared"
    touch = f"+stages.pretrain.prepare.marker={{_target_:pathlib.Path.touch,_args_:[{marker}]}}"
    probe = f"monitor.probe={colour_set['pretrain']}"
    args = pretrain_on(colour_set, tmp_path, "mixed_precision=no", "eval.sets=[]", probe, touch, *overrides)
    assert console(["train", *args]) == 2
    assert message in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("launcher", ["fsdp2", "zero3"])
def test_the_monitor_under_a_sharded_strategy_is_refused_where_the_strategy_is_resolved(launcher, tmp_path):
    cfg = compose(f"output_dir={tmp_path}", f"launcher={launcher}", "monitor.every=2", "monitor.probe=p.json")
    check_config(cfg)
    with pytest.raises(ConfigError, match=f"monitor.every > 0 is not available with distributed.strategy={launcher}"):
        resolve_strategy(cfg)


@pytest.mark.parametrize(
    "overrides, line",
    [
        (
            ["offline_dataset_args={shapes:{n_train:500}}"],
            "alignlm: offline_dataset_args={shapes:{n_train:500}} adds "
            "offline_dataset_args.shapes to offline_dataset_args, a mapping this config has ({}): an override with = "
            "merges into a mapping and sets only the keys it has; new keys are added with a +: "
            "+offline_dataset_args={shapes:{n_train:500}} (or one key at a time: +offline_dataset_args.shapes=...)",
        ),
        (
            ["eval.generation={temperature:0.7}"],
            "alignlm: eval.generation={temperature:0.7} adds "
            "eval.generation.temperature to eval.generation, a mapping this config has ({'do_sample': False}): an "
            "override with = merges into a mapping and sets only the keys it has; new keys are added with a +: "
            "+eval.generation={temperature:0.7}",
        ),
        (
            ["stages.finetune.data.template_args={system:hi}"],
            "alignlm: stages.finetune.data.template_args={system:hi} "
            "adds stages.finetune.data.template_args.system to stages.finetune.data.template_args, a mapping",
        ),
        # a new key of such a mapping that is no setting: the nearest one
        (
            ["eval.generation={temprature:0.7}"],
            "alignlm: eval.generation.temprature is not a setting of "
            "transformers' generate(); did you mean 'temperature'?",
        ),
        (
            ["offline_dataset_args={shapez:{n_train:5}}"],
            "alignlm: offline_dataset_args.shapez is not a known setting; did you mean 'shapes'?",
        ),
        (
            ["stages.pretrain.data.template_args={system:hi}"],
            "alignlm: stages.pretrain.data.template_args: template "
            "'plain' (stages.pretrain.data.template) takes no arguments",
        ),
    ],
)
def test_an_override_adding_keys_to_a_mapping_says_the_mapping_exists_and_gives_the_plus_form(
    tmp_path, capsys, overrides, line
):
    """It was told "offline_dataset_args is not in the composed config", of a key the config has."""
    assert console(["train", f"output_dir={tmp_path}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err
    advised = re.search(r"new keys are added with a \+: (\S+)", err)
    if advised:  # the form it gives composes, with the keys added
        cfg = compose(f"output_dir={tmp_path}", advised.group(1))
        check_config(cfg)


def test_train_yamls_comment_shows_overrides_that_compose(tmp_path):
    """train.yaml's comment showed {shapes: {n_train: 500}}, whose override form Hydra refuses without a +."""
    text = (config_dir() / "train.yaml").read_text()
    shown = re.findall(r"\+(?:offline_dataset_args|eval\.generation)\.[\w.]+=[\w.]+", text)
    assert len(shown) == 2, shown
    for override in shown:
        check_config(compose(f"output_dir={tmp_path}", override))


def test_a_stage_with_another_prompt_than_the_stage_it_starts_from_is_warned_with_the_override(tmp_path):
    """+stage@stages.dpo=dpo on the demo builds the dpo stage from stage/dpo.yaml: the demo's system prompt was lost,
    and DPO trained and the run evaluated on a prompt the model was never finetuned with."""
    (line,) = checks.prompt_changes(compose("+exp=demo", "+stage@stages.dpo=dpo", "run=[dpo]"))
    assert line.startswith(
        "stage dpo starts from stage finetune (stages.dpo.init_from) but renders its prompts otherwise: "
        "stages.dpo.data.template_args={}, stages.finetune.data.template_args={'system': 'Answer briefly.'}; it trains "
        "and the run evaluates on prompts its starting model was not trained with"
    ), line
    fix = shlex.split(line.rpartition(": ")[2])
    assert fix == ["stages.dpo.data.template_args=${stages.finetune.data.template_args}"]
    assert checks.prompt_changes(compose("+exp=demo", "+stage@stages.dpo=dpo", "run=[dpo]", *fix)) == []
    # the template too; none after the plain template's captioning stage (LLaVA's pretrain -> finetune), none in sima
    (line,) = checks.prompt_changes(
        compose("+exp=demo", "+stage@stages.dpo=dpo", "stages.finetune.data.template=vicuna_v1", "run=[finetune,dpo]")
    )
    assert "stages.dpo.data.template='chat', stages.finetune.data.template='vicuna_v1'" in line
    assert "'stages.dpo.data.template=${stages.finetune.data.template}'" in line
    assert checks.prompt_changes(compose("+exp=demo")) == []
    assert checks.prompt_changes(compose("+exp=sima")) == []


def test_the_run_warns_of_another_prompt_at_start_up(colour_set, tmp_path, alignlm_log):
    cfg = compose(
        *pretrain_on(colour_set, tmp_path, "mixed_precision=no", "run=[pretrain,finetune]"),
        "stages.pretrain.data.template=chat",
        "stages.finetune.data.template=vicuna_v1",
        f"stages.finetune.data.sources=[{{path:{colour_set['instruct']}}}]",
        f"eval.sets=[{{name:a,path:{tmp_path / 'missing.json'}}}]",  # refused before anything trains
    )
    with pytest.raises(DataError, match="missing.json does not exist"):
        run(cfg)
    warned = [
        r.getMessage() for r in alignlm_log.records if "stage finetune starts from stage pretrain" in r.getMessage()
    ]
    assert (
        len(warned) == 1
        and "stages.finetune.data.template='vicuna_v1', stages.pretrain.data.template='chat'" in (warned[0])
    )


def _documented_dpo_commands() -> list[list[str]]:
    """Every `alignlm train ... +stage@stages.dpo=dpo` command of README.md and docs/methods.md, as its words."""
    command = r"alignlm train \+exp=demo \+stage@stages\.dpo=dpo"
    found = []
    for doc in ("README.md", "docs/methods.md"):
        text = (ROOT / doc).read_text().replace("\\\n", " ")  # a code block's continued line
        spans = re.findall(rf"`({command}[^`]*)`", text) + re.findall(rf"^({command}.*)$", text, re.MULTILINE)
        found += [shlex.split(span.replace("\n", " "), comments=True)[2:] for span in spans]
    return found


def test_the_documented_dpo_commands_train_on_the_finetune_stages_prompt():
    commands = _documented_dpo_commands()
    assert len(commands) >= 3, commands
    for words in commands:
        assert checks.prompt_changes(compose(*words)) == [], words


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["+model.vision.config.num_hiden_layers=4"],
            "model.vision.config.num_hiden_layers is not a setting of 'clip_vision_model' configs; did you mean "
            "'num_hidden_layers'?",
        ),
        (
            ["model.vision.config.model_type=dinov2"],
            "model.vision.config.intermediate_size is not a setting of 'dinov2'",
        ),
        (["model.init_seed=1.9"], "model.init_seed=1.9 must be a whole number >= 0"),
        (["model.init_seed=abc"], "model.init_seed='abc' must be a whole number >= 0"),
    ],
)
def test_a_model_setting_a_build_would_drop_or_cut_is_refused_at_start_up(tmp_path, overrides, message):
    """transformers keeps an unknown config keyword as an attribute, so a mistyped tower setting built the default
    tower without a word; an init_seed of 1.9 seeded 1, and "abc" failed when the first stage built its model."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(compose(f"output_dir={tmp_path}", "model=tiny", *overrides))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "+stages.pretrain.prepare.revision_realign.realing=x",
            "stages.pretrain.prepare.revision_realign.realing is not a known setting; did you mean 'realign'?",
        ),
        (
            "revision.covariance=abc",
            "stages.pretrain.prepare.revision_realign.covariance='abc' must be a float or null",
        ),
        (
            "+stages.pretrain.data.hooks.text_embeds.embed_nose=1",
            "stages.pretrain.data.hooks.text_embeds.embed_nose is not a known setting; did you mean 'embed_noise'?",
        ),
        ("revision.embed_noise=x", "stages.pretrain.data.hooks.text_embeds.embed_noise='x' must be a float"),
    ],
)
def test_a_prepare_steps_or_data_hooks_knob_is_checked_before_any_step_runs(tmp_path, override, message):
    """A prepare step's knobs were checked when it was called, after the steps before it (an encoder fitted, every
    image and caption embedded), and a hook's when its stage built its data."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(compose(f"output_dir={tmp_path}", "+exp=revision", override))


@pytest.mark.parametrize(
    ("exp", "override", "message"),
    [
        ("revision", "revision.covariance=-1", "prepare.revision_realign.covariance=-1 must be a finite number >= 0"),
        ("revision", "revision.embed_noise=-1", "hooks.text_embeds.embed_noise=-1 must be a finite number >= 0"),
        ("revision", "revision.batch_size=0", "prepare.revision_embeddings.batch_size=0 must be a whole number >= 1"),
        # a knob of the dual-encoder fit a step makes: by its name, type and bounds, one level down
        (
            "revision",
            "revision.fit.temperature=0",
            "revision_encoder.fit.temperature=0 must be a finite number in (0, 1]",
        ),
        ("revision", "revision.fit.batch_size=1", "revision_encoder.fit.batch_size=1 must be a whole number >= 2"),
        (
            "revision",
            "+revision.fit.epoch=3",
            "revision_encoder.fit.epoch is not a known setting; did you mean 'epochs'?",
        ),
        ("revision", "revision.fit.lr=fast", "revision_encoder.fit.lr='fast' must be a float"),
        ("revision", "+revision.fit.out=x", "revision_encoder.fit.out is passed by what builds or calls it"),
        ("sea", "stages.pretrain.prepare.sea_labels.k=0", "prepare.sea_labels.k=0 must be a whole number >= 1"),
        (
            "aligngpt",
            "stages.pretrain.prepare.aligngpt_levels.num_levels=1",
            "num_levels=1 must be a whole number >= 2",
        ),
        ("aligngpt", "+stages.pretrain.prepare.aligngpt_levels.fit.dim=0", "aligngpt_levels.fit.dim=0 must be a whole"),
        ("sima", "stages.dpo.prepare.sima.temperature=0", "prepare.sima.temperature=0 must be a finite number > 0"),
        ("sima", "stages.dpo.prepare.sima.samples=0", "prepare.sima.samples=0 must be a whole number >= 1"),
        ("sima", f"stages.dpo.prepare.sima.samples={10**400}", "samples=1000"),  # an OverflowError naming no key
    ],
)
def test_a_prepare_steps_or_hooks_value_out_of_its_bounds_is_refused_before_any_step_runs(
    tmp_path, exp, override, message
):
    """Each was refused when its step ran or its stage built its data, after the steps before it had run (a dual
    encoder fitted, every image embedded): the bounds are declared once beside the argument (``config.Bounds``) and
    read by the start-up check, the command-line flag and the code that uses the value."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(compose(f"output_dir={tmp_path}", f"+exp={exp}", override))


@pytest.mark.parametrize(
    "override",
    [f"distributed.timeout_s={10**400}", f"stages.pretrain.lr={10**400}"],
)
def test_a_number_past_any_floats_range_is_refused_naming_its_key(tmp_path, override):
    """math.isfinite raised an OverflowError naming no key: a traceback from the start-up check itself."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key) + "=1000"):
        check_config(compose(f"output_dir={tmp_path}", override))


class NoModelHook(SampleHook):
    """A hook whose constructor lacks the ``model`` its builder passes."""

    def __init__(self, path: str) -> None:
        self.path = path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model/connector=linear", "model.connector.bias=no"], "model.connector.bias='no' must be a bool"),
        (["+model.connector.dept=3"], "model.connector.dept is not a known setting; did you mean 'depth'?"),
        (
            ["+model.connector.in_dim=3"],
            "model.connector.in_dim is passed by what builds or calls it, not by the config",
        ),
        (["+model.llm.hiden_size=8"], "model.llm.hiden_size is not a known setting; did you mean 'hidden_size'?"),
        (["model.llm.num_hidden_layers=two"], "model.llm.num_hidden_layers='two' must be an int"),
        (
            ["+exp=aligngpt", "+model.extras.align_levels.num_level=3"],
            "model.extras.align_levels.num_level is not a known setting; did you mean 'num_levels'?",
        ),
        (
            [f"+stages.pretrain.data.hooks.q._target_={__name__}.NoModelHook", "+stages.pretrain.data.hooks.q.path=x"],
            f"stages.pretrain.data.hooks.q._target_='{__name__}.NoModelHook' takes no argument 'model', which its",
        ),
    ],
)
def test_a_model_parts_or_hooks_knob_is_checked_before_the_prepare_steps(tmp_path, overrides, message):
    """The model is first built when the first stage starts, after every prepare step (hours for a method's encoder):
    a misspelt connector knob failed there with exit status 1, ``bias: no`` built the bias (a non-empty string is
    true), and a hook whose constructor takes no ``model`` failed when its stage built its data."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(compose(f"output_dir={tmp_path}", *overrides))


def test_the_feature_cache_beside_a_hook_that_replaces_the_images_is_refused_at_start_up(tmp_path):
    """ReVision's caption embeddings stand in for the images: with the cache on too, the stage refused it when it built
    its data, after the prepare steps had fitted an encoder and embedded every image and caption."""
    with pytest.raises(ConfigError, match=r"hooks.text_embeds \(TextEmbeddingHook\) already replaces the images"):
        check_config(compose(f"output_dir={tmp_path}", "+exp=revision", "stages.pretrain.data.feature_cache=true"))


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["stages.finetune.parts.llm=full", "stages.finetune.lora.r=128"],
            "stages.finetune.lora.r is unused: no part of stages.finetune.parts is lora ({'vision': 'frozen', "
            "'connector': 'full', 'llm': 'full'}): set e.g. stages.finetune.parts.llm=lora",
        ),
        (
            ["stages.pretrain.epochs=2"],
            "stages.pretrain.epochs is unused: stages.pretrain.max_steps=250 sets the stage's length "
            "(stages.pretrain.max_steps=null trains by epochs)",
        ),
        (["stages.finetune.lr.vision=0.5"], "stages.finetune.lr.vision is unused: stages.finetune.parts.vision=frozen"),
        (
            ["stages.pretrain.gradient_checkpointing=[llm,vision]"],
            "stages.pretrain.gradient_checkpointing names vision, which checkpoints nothing: the tower is frozen",
        ),
        (
            ["offline_datasets=[digits]", "+offline_dataset_args.shapes.n_train=40"],
            "offline_dataset_args.shapes.n_train is unused: shapes is not in offline_datasets=['digits']",
        ),
        (["offline_datasets=[]", "offline_dataset_seed=0"], "offline_dataset_seed is unused: offline_datasets=[]"),
        (["monitor.probe=p.json"], "monitor.probe is unused: monitor.every=0 runs no probe"),
        (["eval.sets=[]", "eval.max_new_tokens=32"], "eval.max_new_tokens is unused: eval.sets=[] runs no final"),
        (
            ["stages.finetune.data.template=vicuna_v1"],
            "stages.finetune.data.template keeps stages.finetune.data.template_args={'system': 'Answer briefly.'}, "
            "which the config set for another template: vicuna_v1 renders them too",
        ),
        (["resume=never", "resume_allow_changes=true"], "resume_allow_changes is unused: resume=never sets earlier"),
        (["nonfinite.stop_after=0", "nonfinite.window=10"], "nonfinite.window is unused: nonfinite.stop_after=0"),
        (["logging.wandb.project=mine"], "logging.wandb.project is unused: logging.wandb.mode=disabled"),
        (
            ["launcher=ddp", "distributed.reshard_after_forward=false"],
            "distributed.reshard_after_forward is unused: only FSDP2 reshards, and this run's strategy is ddp",
        ),
    ],
)
def test_an_override_that_nothing_reads_is_named_with_why(overrides, line):
    """Each had been accepted and dropped: a LoRA rank without a LoRA part (the LLM trained whole, the same losses),
    epochs under a recipe's max_steps (2 epochs asked, 0.74 of one trained), a probe with the monitor off."""
    cfg = compose("+exp=demo", "model=tiny", *overrides)
    resolve_strategy(cfg)
    (said,) = checks.override_warnings(cfg)
    assert said.startswith(line), said


@pytest.mark.parametrize(
    "overrides",
    [
        ["+exp=demo", "model=tiny", "stages.finetune.parts.llm=lora", "stages.finetune.lora.r=8"],
        ["+exp=demo", "stages.pretrain.epochs=2", "stages.pretrain.max_steps=null"],
        ["+exp=demo", "stages.finetune.lr.llm=1e-5", "monitor.every=5", "monitor.probe=p.json"],
        [
            "+exp=demo",
            "stages.finetune.gradient_checkpointing=[llm]",
            "logging.wandb.mode=offline",
            "logging.wandb.project=x",
        ],
        [
            "+exp=demo",
            "+offline_dataset_args.shapes.som=true",
            "launcher=fsdp2",
            "distributed.reshard_after_forward=false",
        ],
        ["+exp=demo", "resume_allow_changes=true", "nonfinite.window=10", "stages.pretrain.keep_last=0"],
        ["+exp=demo", "eval.max_new_tokens=32", "eval.limit=10", "offline_dataset_seed=0"],
        ["+exp=demo", "stages.finetune.data.template=vicuna_v1", "stages.finetune.data.template_args={}"],
        ["stages.finetune.data.template=vicuna_v1"],  # no recipe: the stage file's template_args are empty
        ["+exp=demo", "stages.finetune.data.template=chat"],  # the template the recipe's template_args are for
        ["+exp=sea"],  # what a recipe sets is not the user's to be told of
        ["+exp=demo", "stages.finetune.max_steps=4", "run=[pretrain]", "stages.finetune=null"],  # no stage
        # read by another stage through an interpolation
        ["+exp=demo", "stages.pretrain.lora.r=32", "stages.finetune.lora=${stages.pretrain.lora}"],
        ["+exp=demo", "stages.pretrain.lr.llm=1e-4", "stages.finetune.lr.llm=${stages.pretrain.lr.llm}"],
        # a stage that does not run is not checked (nor refused) here
        ["+exp=demo", "run=[pretrain]", "stages.finetune.gradient_checkpointing=[llm,connector]"],
    ],
)
def test_an_override_that_is_read_is_not_warned_of(overrides):
    cfg = compose(*overrides)
    resolve_strategy(cfg)
    assert checks.override_warnings(cfg) == []


def test_the_run_warns_of_an_unused_override_at_start_up(colour_set, tmp_path, alignlm_log):
    cfg = compose(
        *pretrain_on(colour_set, tmp_path, "mixed_precision=no"),
        "stages.pretrain.lora.r=4",
        f"eval.sets=[{{name:a,path:{tmp_path / 'missing.json'}}}]",  # refused before anything trains
    )
    with pytest.raises(DataError, match="missing.json does not exist"):
        run(cfg)
    assert [r.getMessage() for r in alignlm_log.records if "is unused" in r.getMessage()] == [
        "stages.pretrain.lora.r is unused: no part of stages.pretrain.parts is lora ({'vision': 'frozen', "
        "'connector': 'full', 'llm': 'frozen'}): set e.g. stages.pretrain.parts.llm=lora"
    ]


@pytest.mark.parametrize("override", ["hydra.run.dir=/tmp/elsewhere", "hydra.job.chdir=true", "hydra/job_logging=none"])
def test_an_override_of_hydras_own_settings_is_refused(override):
    """alignlm composes with Hydra's compose API: hydra.run.dir had been accepted, the outputs going to output_dir."""
    with pytest.raises(ConfigError, match=re.escape(f"{override}: alignlm composes its config with Hydra's compose")):
        compose("+exp=demo", override)


def test_a_template_read_through_an_interpolation_is_still_warned_of_keeping_its_recipes_arguments():
    """SIMA's prepare step reads ${stages.dpo.data}: the template it reads renders the recipe's system prompt too."""
    cfg = compose("+exp=sima", "model=tiny", "stages.dpo.data.template=vicuna_v1")
    resolve_strategy(cfg)
    (said,) = checks.override_warnings(cfg)
    assert said.startswith("stages.dpo.data.template keeps stages.dpo.data.template_args={'system': 'Answer briefly.'}")


def test_overrides_only_training_reads_are_named_when_every_stage_has_finished():
    """The README's run followed by the same command with the monitor added skipped both finished stages, monitored
    nothing, and said nothing until plot-runs found no curve."""
    cfg = compose("+exp=demo", "model=tiny", "monitor.every=10", "monitor.probe=p.json", "logging.every=5", "seed=3")
    (line,) = checks.idle_overrides(cfg, [])
    assert line.startswith("monitor.every, monitor.probe, logging.every: unused, every stage of run=['pretrain', ")
    assert "give a new run_name, or resume=never" in line
    assert checks.idle_overrides(cfg, ["finetune"]) == []
    assert checks.idle_overrides(compose("+exp=demo", "seed=3"), []) == []


@pytest.mark.parametrize(
    "objective, knob, value",
    [
        ("vlap", "tau", "-0.01"),  # trained the loss's opposite, with no word
        ("vlap", "tau", "nan"),  # these made every step non-finite: the run stopped blaming the learning rate
        ("vlap", "epsilon", "0"),
        ("vlap", "iterations", "0"),
        ("vlap", "prior_temperature", "nan"),
        ("contrastive", "temperature", "nan"),
        ("contrastive", "max_scale", "inf"),
        ("dpo", "beta", "inf"),
    ],
)
def test_an_objectives_number_out_of_its_range_is_refused_at_start_up_naming_the_knob(objective, knob, value):
    stage = "dpo" if objective == "dpo" else "pretrain"
    overrides = ["+stage@stages.dpo=dpo", "run=[pretrain,dpo]"] if objective == "dpo" else []
    if objective != "dpo":
        overrides.append(f"+objective@stages.pretrain.objectives.{objective}={objective}")
    key = f"stages.{stage}.objectives.{objective}.{knob}"
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}={value}.* must be a (finite|whole) number"):
        check_config(compose(*overrides, f"{key}={value}"))


def test_a_later_stages_global_batch_larger_than_its_records_is_refused_before_the_first_stage_trains(
    colour_set, tmp_path
):
    """The finetune stage's 48 records at weight 0.5 against a global batch of 32: refused when that stage began,
    after pretraining had trained. Counted at start-up now, the weights applied, naming the knobs."""
    from tests.conftest import tiny_overrides

    weighted = f"stages.finetune.data.sources=[{{path:{colour_set['instruct']},weight:0.5}}]"
    overrides = [*tiny_overrides(colour_set, tmp_path), weighted, "eval.sets=[]"]
    with pytest.raises(ConfigError, match=re.escape(
        "stages.finetune: its sources hold 24 records an epoch (their weights applied), fewer than one global batch of "
        "32 (per_device_batch_size 16 x 1 processes x grad_accum 2): lower stages.finetune.per_device_batch_size"
    )):  # fmt: skip
        run(compose(*overrides, "stages.finetune.per_device_batch_size=16", "stages.finetune.grad_accum=2"))
    assert not (tmp_path / "t" / "pretrain").exists()
    run(compose(*overrides, "stages.finetune.per_device_batch_size=12", "stages.finetune.grad_accum=2"))  # 24: one


def test_the_batch_check_rounds_a_fractional_weight_as_the_mixture_does(tmp_path):
    """3 records at weight 0.5 are 2 an epoch (1.5, a half up): a global batch of 2 trains, and was refused."""
    from omegaconf import OmegaConf

    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    (tmp_path / "three.json").write_text(json.dumps([{"id": str(i), "conversations": turns} for i in range(3)]))
    stage = {"per_device_batch_size": 2, "grad_accum": 1, "data": {"sources": [{"path": str(tmp_path / "three.json")}]}}
    stage["data"]["sources"][0]["weight"] = 0.5
    checks.check_stage_batches(OmegaConf.create({"stages": {"sft": stage}}), ["sft"], 1)
    with pytest.raises(ConfigError, match="hold 2 records an epoch"):
        checks.check_stage_batches(OmegaConf.create({"stages": {"sft": stage}}), ["sft"], 2)


def test_a_config_group_given_a_list_is_warned_as_options_merged_into_one_run():
    """`+exp=[sea,contrastive]` merges both recipes into one run under the last one's run_name (a SEA + contrastive
    hybrid in outputs/contrastive), where a user may have meant a run of each; it went unsaid."""
    (said,) = checks.override_warnings(compose("+exp=[sea,contrastive]", "model=tiny"))
    assert said == (
        "+exp=[sea,contrastive] merges the options ['sea', 'contrastive'] into one config, each later one over the "
        "earlier (run_name=contrastive, the last one's where each sets one); for one run of each: for v in sea "
        "contrastive; do alignlm train +exp=$v run_name=$v; done"
    )
