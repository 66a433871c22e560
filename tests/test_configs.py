"""Every config composes: each recipe in configs/exp, each option of each config group, with every ``_target_`` naming
something importable; the cheap ones (tiny or offline parts) are built too. A config that only fails when someone
finally picks it shows up here instead.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from hydra._internal.utils import _locate
from omegaconf import OmegaConf

from alignlm.checks import check_config
from alignlm.config import ConfigError, config_dir, instantiate
from alignlm.data.records import DataError
from alignlm.models.build import build_model
from alignlm.models.io import config_yaml
from alignlm.objectives.base import Objective
from alignlm.pipeline import resolve_precision, run, warn_other_model
from alignlm.training.stages import apply_stage
from tests.conftest import compose, tiny_overrides

CONFIGS = config_dir()
EXPS = sorted(p.stem for p in (CONFIGS / "exp").glob("*.yaml"))
GROUPS = {  # config group -> its options, read from the tree
    group: sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
    for group in ("model", "model/vision", "model/llm", "model/connector", "model/align_levels", "stage", "objective")
}
OPTIONS = [(group, option) for group, options in GROUPS.items() for option in options]
# parts that need weights from a hub or a fitted encoder: composed and located, not built
NOT_BUILT = {("model", "demo"), ("model", "llava_hf"), ("model/vision", "dual_encoder")}
NOT_BUILT |= {("model/vision", o) for o in GROUPS["model/vision"] if o not in ("tiny", "efficientnet_lite0")}
NOT_BUILT |= {("model/llm", o) for o in GROUPS["model/llm"] if o != "tiny"}


def targets(node, key: str = "") -> list[tuple[str, str]]:
    """``(config key, _target_)`` of every node of a config (plain containers, interpolations left as written)."""
    if isinstance(node, dict):
        found = [(key, node["_target_"])] if "_target_" in node else []
        return found + [t for k, v in node.items() for t in targets(v, f"{key}.{k}" if key else str(k))]
    if isinstance(node, list):
        return [t for i, item in enumerate(node) for t in targets(item, f"{key}[{i}]")]
    return []


def assert_targets_resolve(cfg) -> None:
    for key, target in targets(OmegaConf.to_container(cfg, resolve=False)):
        assert callable(_locate(target)), f"{key}._target_={target} is not importable"


def test_the_groups_are_read_from_the_tree():
    assert {"tiny", "demo"} <= set(GROUPS["model"]) and "moe" in GROUPS["model/connector"] and "demo" in EXPS


@pytest.mark.parametrize("exp", EXPS)
def test_every_recipe_composes_and_its_targets_resolve(exp):
    cfg = compose(f"+exp={exp}")
    OmegaConf.resolve(cfg)  # every interpolation has a value
    assert set(cfg.run) <= set(cfg.stages)
    assert_targets_resolve(cfg)


@pytest.mark.parametrize("exp", EXPS)
def test_every_recipe_builds_with_tiny_parts_and_its_stages_apply(exp, tiny_clip):
    overrides = [f"+exp={exp}", "model=tiny"]
    if exp == "revision":  # its tower reads a dual encoder: the tiny CLIP of the fixture stands in
        overrides = [f"+exp={exp}", "model/llm=tiny", f"revision.encoder={tiny_clip}", "model.vision.num_tokens=4"]
    cfg = compose(*overrides)
    model = build_model(cfg.model)
    for name in cfg.run:
        stage = cfg.stages[name]
        apply_stage(model, stage.parts, None)  # every part mode the recipe names exists on the model
        for key, node in stage.objectives.items():
            if node is None:  # switched off (the dpo stage's inherited LM loss)
                continue
            node = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "weight"}
            assert isinstance(instantiate(node, f"stages.{name}.objectives.{key}"), Objective)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_the_cheap_ones_build(group, option):
    override = f"+{group}={option}" if group in ("model/align_levels", "objective", "stage") else f"{group}={option}"
    if group in ("objective", "stage"):
        override = f"+{group}@probe={option}"  # packaged under a scratch key, as the recipes place them
    cfg = compose(override)
    assert_targets_resolve(cfg)
    if (group, option) in NOT_BUILT or group == "stage":
        return
    if group == "objective":
        node = {k: v for k, v in OmegaConf.to_container(cfg.probe, resolve=True).items() if k != "weight"}
        assert isinstance(instantiate(node, f"objective {option}"), Objective)
        return
    model = build_model(cfg.model)
    assert model.num_image_tokens > 0 and len(model.tokenizer) <= model.llm.get_input_embeddings().num_embeddings


def test_eval_defaults_and_accelerate_configs_load():
    eval_cfg = OmegaConf.load(CONFIGS / "eval" / "default.yaml")
    assert eval_cfg.probe.metrics and eval_cfg.device == "auto"
    for path in sorted((CONFIGS / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        assert config.num_processes >= 1, path


def test_configs_live_where_the_tree_says():
    assert (CONFIGS / "train.yaml").exists() and Path(CONFIGS).name == "configs"


# ---- config mistakes, refused before the first stage trains ------------------------------------------------------------

LAUNCHERS = sorted(p.stem for p in (CONFIGS / "launcher").glob("*.yaml"))


@pytest.mark.parametrize(
    "bad, message",
    [
        # evaluation sizes crashed after training (int(None))
        ("eval.batch_size=null", "eval.batch_size=None must be a whole number >= 1"),
        ("eval.max_new_tokens=null", "eval.max_new_tokens=None must be a whole number >= 1"),
        # the second stage's mistakes surfaced after the first had trained
        (
            "stages.finetune.parts.connector=frozen stages.finetune.parts.llm=frozen",
            "stages.finetune.parts={'vision': 'frozen', 'connector': 'frozen', 'llm': 'frozen'} trains nothing: set at "
            "least one of ['vision', 'connector', 'llm'] to full or lora",
        ),
        ("~stages.finetune.lr.llm", "stages.finetune.lr.llm is missing, but stages.finetune.parts.llm=full trains it"),
        ("stages.finetune.objectives.lm=null", "stages.finetune.objectives={'lm': None} has no objective switched on"),
        (
            "stages.finetune.data.num_workers=-2",
            "stages.finetune.data.num_workers=-2 must be a whole number >= 0, or auto",
        ),
        (
            "stages.finetune.parts.llm=lora stages.finetune.lora.target_modules=5",
            "stages.finetune.lora.target_modules=5 must be a module name (all-linear: every linear layer) or a list",
        ),
        # types and values that crashed with a traceback, or were silently read otherwise
        ("stages.finetune.lr=5", "stages.finetune.lr=5 must be a mapping"),
        ("stages.finetune.betas=[0.9]", "stages.finetune.betas=[0.9] must be a list of 2 numbers"),
        ("stages.finetune.betas=0.9", "stages.finetune.betas=0.9 must be a list of 2 numbers"),
        ("stages.finetune.betas=[0.9,1.0]", "stages.finetune.betas[1]=1.0 must be a finite number >= 0.0 and < 1.0"),
        ("stages.finetune.data.template_args=5", "stages.finetune.data.template_args=5 must be a mapping"),
        # a template's arguments are its constructor's: a mistyped one failed with a bare TypeError as its stage began
        (
            "+stages.finetune.data.template_args.image_frist=false",
            "stages.finetune.data.template_args.image_frist is not a known setting; did you mean 'image_first'? "
            "known: ['image_first', 'system']",
        ),
        (
            "+stages.finetune.data.template_args.image_first=no",
            "stages.finetune.data.template_args.image_first='no' must be a bool",
        ),
        (
            "+stages.pretrain.data.template_args.system=x",
            "stages.pretrain.data.template_args={'system': 'x'}: template 'plain' takes no arguments",
        ),
        ("stages.finetune.data.hooks=5", "stages.finetune.data.hooks=5 must be a mapping"),
        (
            "stages.finetune.data.max_image_pixels=0",
            "max_image_pixels=0 must be a whole number >= 1, or null (no limit)",
        ),
        ("stages.finetune.data.max_image_pixels=-1", "max_image_pixels=-1 must be a whole number >= 1, or null"),
        ("stages.finetune.data.pack_length=0", "pack_length=0 must be a whole number >= 1, or null (max_length)"),
        ("stages.finetune.data.num_workers=1.5", "stages.finetune.data.num_workers=1.5 must be a whole number >= 0"),
        ("logging.peak_tflops=abc", "logging.peak_tflops='abc' must be a finite number > 0.0, or auto"),
        ("logging.peak_tflops=0", "logging.peak_tflops=0 must be a finite number > 0.0, or auto"),
        (
            "distributed.stop_signal=SIGKILL",
            "distributed.stop_signal='SIGKILL' must be a signal name a process can catch",
        ),
        ("distributed.stop_file=5", "distributed.stop_file=5 must be a file path, or null"),
        ("stages.finetune.parts=null", "stages.finetune.parts=None must be a mapping"),
        ("output_dir=null", "output_dir=None must be a folder path"),
        ("distributed=null", "distributed=None must be a mapping"),
        (
            "logging.wandb.mode=foo",
            "logging.wandb.mode='foo' is not known; choose one of ['disabled', 'offline', 'online']",
        ),
        # a mistyped key, added by Hydra's `+key=` and never read
        ("+stages.finetune.lora.alpah=8", "stages.finetune.lora.alpah is not a known setting; did you mean 'alpha'?"),
        ("+monitor.evry=5", "monitor.evry is not a known setting; did you mean 'every'?"),
        ("+eval.batchsize=5", "eval.batchsize is not a known setting; did you mean 'batch_size'?"),
        ("+logging.evry=5", "logging.evry is not a known setting; did you mean 'every'?"),
        ("+logging.wandb.projekt=x", "logging.wandb.projekt is not a known setting; did you mean 'project'?"),
        ("+distributed.timeout=5", "distributed.timeout is not a known setting; did you mean 'timeout_s'?"),
        ("distributed.prepare_timeout_s=0", "distributed.prepare_timeout_s=0 must be a finite number > 0.0"),
        ("+nonfinite.windows=5", "nonfinite.windows is not a known setting; did you mean 'window'?"),
        # a negative weight trained by gradient ascent
        (
            "stages.finetune.objectives.lm.weight=-1",
            "stages.finetune.objectives.lm.weight=-1 must be a finite number > 0",
        ),
        (
            "stages.finetune.objectives.lm.weight=abc",
            "stages.finetune.objectives.lm.weight='abc' must be a finite number",
        ),
        # a stage named twice; a string where a list belongs was read character by character
        ("run=[pretrain,pretrain]", "run=['pretrain', 'pretrain'] names ['pretrain'] more than once"),
        ("monitor.every=2 monitor.probe=x.json monitor.metrics=foo", "monitor.metrics='foo' must be a list or null"),
        ("eval.sets=foo", "eval.sets='foo' must be a list or null"),
        # an objective's knobs are its constructor's arguments; a source's keys are Source's fields
        ("+stages.finetune.objectives.lm.weigth=2", "stages.finetune.objectives.lm.weigth is not a known setting"),
        # an objective's knob of another type than its constructor's annotation: refused before the first stage trains
        (
            "+exp=contrastive stages.pretrain.objectives.contrastive.gather=sometimes",
            "stages.pretrain.objectives.contrastive.gather='sometimes' must be a bool",
        ),
        (
            "+exp=contrastive stages.pretrain.objectives.contrastive.temperature=cold",
            "stages.pretrain.objectives.contrastive.temperature='cold' must be a float",
        ),
        (
            "stages.finetune.data.sources=[{path:x.json,weigth:0.1}]",
            "a source is a mapping with a path and any of ['image_root', 'weight', 'allow_outside_root']; ['weigth'] is",
        ),
        # a mistyped top-level or model key, added unread (`+stop_after_step=2` trained to the end)
        ("+stop_after_step=2", "stop_after_step is not a known setting; did you mean 'stop_after_steps'?"),
        ("+resum=never", "resum is not a known setting; did you mean 'resume'?"),
        (
            "+model.visual_token_nrom=1.0",
            "model.visual_token_nrom is not a known setting; did you mean 'visual_token_norm'",
        ),
        ("+model.init_sed=3", "model.init_sed is not a known setting; did you mean 'init_seed'?"),
        # offloading is DeepSpeed's: under ddp and fsdp2 it was read by nothing, and logged as on
        (
            "distributed.offload_optimizer=true",
            "distributed.offload_optimizer=true offloads under DeepSpeed only, which distributed.strategy=auto (here "
            "ddp",
        ),
        (
            "launcher=fsdp2 distributed.offload_param=true",
            "distributed.offload_param=true offloads under DeepSpeed only, which distributed.strategy=fsdp2 does not",
        ),
        # the second stage's mistakes that surfaced after the first had trained: decidable from the config ...
        (
            "stages.finetune.data.feature_cache=true stages.finetune.parts.vision=full",
            "stages.finetune.data.feature_cache=True caches a frozen tower's features, but "
            "stages.finetune.parts.vision=full trains the tower",
        ),
        ("stages.finetune.data.feature_cache=5", "stages.finetune.data.feature_cache=5 must be true"),
        # a later stage's objective or data hook that does not import: found when that stage built it, after the
        # stages before it had trained and written final/, named without the stage ("stage.objectives.cos")
        (
            "+stages.finetune.objectives.cos={_target_:alignlm.objectives.lm.LMObjectiv,weight:0.5}",
            "stages.finetune.objectives.cos._target_='alignlm.objectives.lm.LMObjectiv' cannot be imported: "
            "alignlm.objectives.lm has no 'LMObjectiv'; did you mean alignlm.objectives.lm.LMObjective?",
        ),
        (
            "+stages.finetune.objectives.cos={_target_:no_such_package.Cosine}",
            "stages.finetune.objectives.cos._target_='no_such_package.Cosine' cannot be imported: Error loading",
        ),
        ("+stages.finetune.objectives.cos={weight:0.5}", "stages.finetune.objectives.cos._target_=None must name"),
        (
            "+stages.finetune.data.hooks.q={_target_:alignlm.data.hooks.SampleHok}",
            "stages.finetune.data.hooks.q._target_='alignlm.data.hooks.SampleHok' cannot be imported: "
            "alignlm.data.hooks has no 'SampleHok'; did you mean alignlm.data.hooks.SampleHook?",
        ),
        (
            "+model/align_levels=aligngpt +stages.finetune.parts.align_levels=levelz "
            "+stages.finetune.lr.align_levels=1",
            "stages.finetune.parts.align_levels='levelz' is not known; choose one of ['frozen', 'levels', 'gate']",
        ),
        # ... or from the model, built once before the first stage trains
        (
            "stages.finetune.parts.llm=lora stages.finetune.lora.target_modules=[q_projj]",
            "stages.finetune.lora.target_modules=['q_projj']: 'q_projj' names no module of model.llm; did you mean "
            "'q_proj'?",
        ),
        (  # peft adapted q_proj alone, without a word
            "stages.finetune.parts.llm=lora stages.finetune.lora.target_modules=[q_proj,v_projj]",
            "'v_projj' names no module of model.llm; did you mean 'v_proj'?",
        ),
        (
            "stages.finetune.data.max_length=8",
            "stages.finetune.data.max_length=8 cannot hold one image's 16 visual tokens and a token of text",
        ),
        # a stop that can never fire; nulls the monitor crashed on (the checker itself, on topk)
        ("nonfinite.stop_after=5 nonfinite.window=2", "nonfinite.stop_after=5 can never stop the run"),
        ("monitor.every=2 monitor.probe=x.json monitor.topk=null", "monitor.topk=None must be a whole number >= 1"),
        ("monitor.every=2 monitor.probe=x.json monitor.batch_size=null", "monitor.batch_size=None must be a whole"),
        ("monitor.every=2 monitor.probe=x.json monitor.n=null", "monitor.n=None must be a whole number >= 1"),
    ],
)
def test_a_config_mistake_is_refused_naming_the_key_before_the_first_stage_trains(colour_set, tmp_path, bad, message):
    """Each once surfaced late (after the first stage had trained, or at the evaluation after the last), as a raw
    traceback, or never (a negative weight trained by gradient ascent, pack_length=0 meant max_length)."""
    cfg = compose(*tiny_overrides(colour_set, tmp_path, "run=[pretrain,finetune]"), *bad.split())
    with pytest.raises(ConfigError, match=re.escape(message)):
        run(cfg)
    assert not (tmp_path / "t").exists()  # nothing trained, nothing written


def test_fp16_is_refused_on_the_cpu_before_anything_trains(colour_set, tmp_path, monkeypatch):
    """accelerate's autocast does nothing for fp16 on a CPU: the LoRA stage crashed on its fp16 frozen weights after
    the first stage had trained. Asked for by the run or by an accelerate launch config, it is refused at start-up;
    on a GPU it stands."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # a CPU run also on a GPU machine
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    overrides = tiny_overrides(colour_set, tmp_path, "stages.finetune.parts.llm=lora")
    allowed = re.escape("choose one of ['auto', 'no', 'bf16']")
    with pytest.raises(ConfigError, match=rf"mixed_precision=fp16 does not train on the CPU .*{allowed}"):
        run(compose(*overrides, "mixed_precision=fp16"))
    assert not (tmp_path / "t").exists()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # `accelerate launch --mixed_precision fp16 --cpu`
    with pytest.raises(ConfigError, match=re.escape("mixed_precision=fp16 (from the accelerate launch config) does")):
        resolve_precision(compose(*overrides, "mixed_precision=auto"))
    monkeypatch.setattr("alignlm.pipeline.cpu_only", lambda: False)
    cfg = compose(*overrides, "mixed_precision=auto")
    resolve_precision(cfg)
    assert cfg.mixed_precision == "fp16"


def test_the_defaults_settings_are_accepted_with_their_documented_nulls(tmp_path):
    """``monitor.image_root`` (read by the monitor) is a setting of train.yaml, settable without ``+``; null means no
    image limit, pack_length = max_length, no MFU and no stop signal or file; 0 workers read in the main process."""
    cfg = compose(
        f"output_dir={tmp_path}",
        "monitor.image_root=images",
        "stages.finetune.data.max_image_pixels=null",
        "stages.finetune.data.pack_length=null",
        "stages.finetune.data.num_workers=0",
        "logging.peak_tflops=null",
        "distributed.stop_signal=null",
        "distributed.stop_file=null",
        "logging.wandb=null",
    )
    check_config(cfg)
    assert OmegaConf.select(compose(), "monitor.image_root", default="absent") is None


@pytest.mark.parametrize("overrides", [[f"+exp={exp}"] for exp in EXPS] + [[f"launcher={name}"] for name in LAUNCHERS])
def test_every_recipe_and_launcher_preset_passes_the_checks(overrides, tmp_path):
    """The known keys are read from the defaults (train.yaml, configs/launcher, configs/stage): none of the recipes'
    or the launcher presets' settings is refused as unknown."""
    cfg = compose(*overrides, f"output_dir={tmp_path}")
    for name in cfg.run:  # a recipe that starts from another recipe's final/ (sima: demo's)
        if cfg.stages[name].init_from not in (None, *cfg.run):
            cfg.stages[name].init_from = None
    check_config(cfg)


def test_a_stage_starting_from_a_final_of_other_model_settings_is_warned_naming_them(tmp_path, caplog):
    """A final/ trained with another tower layer and init seed loaded onto this run's model without a word; now a
    warning names each setting that differs (not a refusal: an upcycled MoE connector differs on purpose)."""
    final = tmp_path / "other" / "final"
    final.mkdir(parents=True)
    (final / "config.yaml").write_text(config_yaml(compose("model.vision.select_layer=-1", "model.init_seed=7")))
    cfg = compose(f"output_dir={tmp_path}", f"stages.finetune.init_from={final}")
    log = logging.getLogger("test_configs.init_from")
    with caplog.at_level("WARNING", logger=log.name):
        warn_other_model(cfg, ["pretrain", "finetune"], log)
    assert f"stages.finetune.init_from={final} was trained with other model settings" in caplog.text
    assert "model.init_seed: 7 -> 0; model.vision.select_layer: -1 -> -2;" in caplog.text
    caplog.clear()
    (final / "config.yaml").write_text(config_yaml(compose()))
    with caplog.at_level("WARNING", logger=log.name):
        warn_other_model(cfg, ["finetune"], log)
    assert not caplog.text  # the same settings


# ---- every stage's data, checked before the first stage trains -----------------------------------------------------


class StageStarted(Exception):
    """Raised in place of a stage's training: the run got past its start-up checks."""


def _no_training(monkeypatch) -> list[str]:
    """The stages the run would have trained (none does: the first raises ``StageStarted``)."""
    started: list[str] = []

    def trainer(cfg, name, *args):
        started.append(name)
        raise StageStarted(name)

    monkeypatch.setattr("alignlm.pipeline.Trainer", trainer)
    return started


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], "stages.pretrain.data.sources is empty: stage pretrain has no data to train on; start from a recipe"),
        (["stages.finetune.data.sources=[]"], "stages.finetune.data.sources is empty: stage finetune has no data"),
        (
            ["+stage@stages.dpo=dpo", "run=[pretrain,finetune,dpo]", "stages.dpo.data.sources=[]"],
            "or give stages.dpo.data.sources=[{path: records.json}] (a file of preference pairs;",
        ),
    ],
)
def test_a_stage_without_data_is_a_config_error_before_anything_runs(
    colour_set, tmp_path, monkeypatch, overrides, message
):
    """Bare ``alignlm train`` (the README's Extending command had no recipe) failed with a ValueError, exit status 1,
    when the stage built its data; an empty later stage (a dpo stage added without records) after the stages before it
    had trained."""
    started = _no_training(monkeypatch)
    base = [f"output_dir={tmp_path}"] if not overrides else tiny_overrides(colour_set, tmp_path)
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        run(compose(*base, *overrides))
    assert "+exp=demo" in str(refused.value) and not started and not list(tmp_path.iterdir())


def test_a_later_stages_missing_data_file_is_refused_before_the_first_stage_trains(colour_set, tmp_path, monkeypatch):
    """A finetune source that does not exist (or is a folder) was found when finetuning built its data, after
    pretraining had trained; docs/reliability.md said before the first stage trains."""
    started = _no_training(monkeypatch)
    for path, problem in ((tmp_path / "nope.json", "does not exist"), (tmp_path, "is a folder")):
        sources = f"stages.finetune.data.sources=[{{path:{colour_set['instruct']}}},{{path:{path}}}]"
        with pytest.raises(DataError, match=re.escape(f"stages.finetune.data.sources[1]: data file {path} {problem}")):
            run(compose(*tiny_overrides(colour_set, tmp_path / "out"), sources))
        assert not started and not (tmp_path / "out" / "t" / "pretrain").exists()


def test_a_stages_data_that_a_prepare_step_writes_is_not_refused(colour_set, tmp_path, monkeypatch):
    """A stage's records may be a prepare step's output (SIMA's preference pairs): the files are checked after the
    offline sets and every prepare step have written theirs, so a file missing at start-up but made then passes."""
    started = _no_training(monkeypatch)
    made = tmp_path / "made" / "instruct.json"
    made.parent.mkdir()
    prepare = f"+stages.finetune.prepare.copy={{_target_:shutil.copyfile,src:{colour_set['instruct']},dst:{made}}}"
    cfg = compose(
        *tiny_overrides(colour_set, tmp_path / "out"), f"stages.finetune.data.sources=[{{path:{made}}}]", prepare
    )
    with pytest.raises(StageStarted):
        run(cfg)
    assert started == ["pretrain"] and made.exists()


def test_alignlm_config_dir_naming_no_config_tree_is_refused(tmp_path, monkeypatch):
    """A mistyped ALIGNLM_CONFIG_DIR, or a plug-in's conf/ folder (no train.yaml), fell back to the repository's
    configs/ without a word."""
    (tmp_path / "conf" / "model").mkdir(parents=True)
    for folder, problem in ((tmp_path / "nope", "does not exist"), (tmp_path / "conf", "has no train.yaml")):
        monkeypatch.setenv("ALIGNLM_CONFIG_DIR", str(folder))
        with pytest.raises(
            ConfigError, match=re.escape(f"ALIGNLM_CONFIG_DIR={folder} {problem}: it replaces the whole")
        ):
            config_dir()
    monkeypatch.setenv("ALIGNLM_CONFIG_DIR", str(CONFIGS))
    assert config_dir() == CONFIGS


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            "stages.finetune.warmup_ratio=1.5",
            "stages.finetune.warmup_ratio=1.5 must be a finite number >= 0.0 and <= 1",
        ),
        ("stages.pretrain.lr.connector=0", "stages.pretrain.lr.connector=0 must be a finite number > 0.0"),
        (
            "monitor.every=2 monitor.probe=x.json monitor.topk=10 monitor.n=11",
            "monitor.n=11 must be at least monitor.topk + 2 = 12",
        ),
    ],
)
def test_a_bound_at_its_edge_is_refused_at_start_up(colour_set, tmp_path, bad, message):
    """``check_config``'s bounds at their edges: a warmup over the whole schedule, a learning rate of 0 (a part that
    silently never trains: freeze it instead), a monitor of topk + 1 items (no kNN item has topk others and one
    more)."""
    import re

    from alignlm.checks import check_config
    from alignlm.config import ConfigError
    from tests.conftest import compose, tiny_overrides

    cfg = compose(*tiny_overrides(colour_set, tmp_path, "run=[pretrain,finetune]"), *bad.split())
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(cfg)
    assert check_config(compose(*tiny_overrides(colour_set, tmp_path, "run=[pretrain,finetune]"))) is None
