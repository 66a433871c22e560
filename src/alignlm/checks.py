"""Config checks before anything is built: every mistake a user can make in the composed tree (a key that does not
exist, a choice that is not one, a number out of range, a switch that is not true or false, a mapping or a list that
is something else, a stage that starts from one not yet trained) is a ``ConfigError`` naming the key and what it may
be, raised before the first stage trains. A mistake in the second stage used to surface after the first had trained.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import math
import re
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra._internal.utils import _locate
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import GrammarParseError, InterpolationResolutionError, InterpolationToMissingValueError
from torch import nn
from transformers import GenerationConfig, GenerationMixin

from alignlm.config import (
    ConfigError,
    KnobsOf,
    check_bounds,
    compose,
    composed,
    composed_without,
    config_roots,
    default_keys,
    deleted_keys,
    group_lists,
    is_finite,
    is_group,
    knob_annotations,
    optional_keys,
    overridden_keys,
    plain,
    union_args,
)
from alignlm.data import GENERATORS, generator_knobs
from alignlm.data.images import MAX_PIXELS, check_aspect_ratio
from alignlm.data.llava import check_error_policy
from alignlm.data.records import DataError, Source, epoch_share, image_names, iter_records
from alignlm.data.templates import TEMPLATES, PlainTemplate
from alignlm.evaluation.evaluate import KINDS, check_answers, check_set_names, set_kind
from alignlm.export.hf_llava import is_llava_dir
from alignlm.geometry.suite import metric_problems, unknown_metrics_said
from alignlm.models.build import check_model_settings
from alignlm.models.generation import check_generation
from alignlm.models.mllm import AlignLM
from alignlm.models.probes import check_probe_metrics
from alignlm.objectives.base import check_min_batch
from alignlm.training.logging import WANDB_MODES
from alignlm.training.optim import check_schedule
from alignlm.training.sharding import STRATEGIES
from alignlm.training.stages import (
    ALL_LINEAR,
    LORA_LAYERS,
    MODES,
    check_parts,
    lora_adapted,
    lora_exclusions,
    lora_matches,
)
from alignlm.training.trainer import build_objectives, checkpointable, checkpointing_parts
from alignlm.training.zero import STAGES as ZERO_STAGES

_LLAVA_BUILDERS = ("alignlm.export.hf_llava.vision_from_llava", "alignlm.export.hf_llava.llm_from_llava")
# the mappings of train.yaml whose keys are all its own (true: null allowed); eval.generation is free-form (generate's
# settings, check_generation), logging.wandb has keys of its own
_SECTIONS = {
    "distributed": False,
    "nonfinite": True,
    "eval": False,
    "monitor": True,
    "logging": False,
    "logging.wandb": True,
}
# Hydra's words for a=1,2 (the value might be a list or a text) and for a=range(0,3) or a=choice(1,2) (a sweep)
_SWEEP = re.compile(r"Ambiguous value for argument '(([^=']+)=([^']*))'.*--multirun")
_SWEEP_FUNCTION = re.compile(r"Sweep parameters '([^']+)' requires --multirun")
_UNCATCHABLE = ("SIGKILL", "SIGSTOP")  # no handler can be installed for these (POSIX)
EVAL_SET_KEYS = ("name", "path", "kind")  # an entry of eval.sets, a run's or alignlm eval's (--sets, --config, --set)
# generate()'s arguments that no eval.generation setting gives: the prompts, a whole config, the catch-all
_NOT_GENERATION_KNOBS = ("self", "inputs", "generation_config", "kwargs")


def check_config(cfg: DictConfig) -> None:
    """Config mistakes that would otherwise surface mid-run, each named with its key and the values allowed: unknown
    stage names, a bad resume mode, a run name that is not a plain folder name, numbers out of range."""
    known = default_keys(cfg)
    check_deletions(cfg, known)  # first: a deleted run_name leaves the interpolations of it unresolved
    try:  # every interpolation resolved once, named by its key: a check's get() raised naming none
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationToMissingValueError:  # to a mandatory value (???) left unset: the checks below name it
        pass
    except (InterpolationResolutionError, GrammarParseError) as e:
        raise ConfigError(f"{e.full_key}: {str(e.msg).splitlines()[0]}") from None
    try:
        check_keys("", cfg, known[""])  # `+stop_after_step=2` (meant: stop_after_steps) had trained to the end
        check_keys("model", _mapping("model", cfg.get("model")), known["model"])
    except ConfigError as e:
        if composed(cfg):
            raise
        raise ConfigError(
            f"{e} (this config is a copy or merge of the one alignlm.config.compose returned, so the "
            "hydra.searchpath folders a plug-in's recipe came from are unknown here: pass the composed config itself)"
        ) from None
    for key in ("run", "offline_datasets"):
        _list(key, cfg.get(key, []))
    if not cfg.run:
        raise ConfigError(f"run=[] names no stage to run; stages: {list(cfg.stages)}")
    for stage in cfg.stages:  # a stage trains into output_dir/run_name/<stage>, and resume=never moves what is there
        if not isinstance(stage, str) or "." in stage or not _plain_name(stage):
            raise ConfigError(
                f"stage name {stage!r} must be a plain folder name (letters, digits, '_', '-'; no '.', which config "
                "keys read as a level): a stage's outputs go to output_dir/run_name/<stage>"
            )
    unknown = [s for s in cfg.run if s not in cfg.stages]
    if unknown:
        raise ConfigError(f"run lists stages {unknown} that are not configured; stages: {list(cfg.stages)}")
    twice = sorted({s for s in cfg.run if list(cfg.run).count(s) > 1})
    if twice:
        raise ConfigError(
            f"run={list(cfg.run)} names {twice} more than once; each stage runs once, into its own folder "
            "output_dir/run_name/<stage>"
        )
    if not isinstance(cfg.get("output_dir"), str):
        raise ConfigError(
            f"output_dir={cfg.get('output_dir')!r} must be a folder path (outputs go to output_dir/run_name)"
        )
    if not isinstance(cfg.get("deterministic", False), bool):
        raise ConfigError(f"deterministic={cfg.deterministic!r} must be true or false")
    if cfg.resume not in ("auto", "never"):
        raise ConfigError(f"resume={cfg.resume!r} is not known; choose one of ['auto', 'never']")
    name = cfg.run_name
    if isinstance(name, bool) or not isinstance(name, (str, int, float)) or not _plain_name(str(name)):
        raise ConfigError(
            f"run_name={name!r} must be a plain folder name (letters, digits, '.', '_', '-'; not '.' or "
            "'..'): outputs go to output_dir/run_name"
        )
    cfg.run_name = str(name)  # `run_name=nan` or `run_name=7` arrive as numbers
    if cfg.get("stop_after_steps") is not None:
        _whole("stop_after_steps", cfg.stop_after_steps)
    _check_sections(cfg, known)
    dist = cfg.distributed
    if dist.get("strategy", "auto") not in ("auto", *STRATEGIES):
        raise ConfigError(
            f"distributed.strategy={dist.get('strategy')!r} is not known; choose one of {['auto', *STRATEGIES]}"
        )
    _number("distributed.timeout_s", dist.get("timeout_s", 600), 0.0, low_open=True)
    _number("distributed.prepare_timeout_s", dist.get("prepare_timeout_s", 86400), 0.0, low_open=True)
    stop = dist.get("stop_signal")
    if stop is not None and not (
        isinstance(stop, str) and isinstance(getattr(signal, stop, None), signal.Signals) and stop not in _UNCATCHABLE
    ):
        raise ConfigError(
            f"distributed.stop_signal={stop!r} must be a signal name a process can catch, such as SIGUSR1 (not "
            f"{' or '.join(_UNCATCHABLE)}), or null (off)"
        )
    if not isinstance(dist.get("stop_file"), (str, type(None))):
        raise ConfigError(f"distributed.stop_file={dist.stop_file!r} must be a file path, or null (off)")
    _check_switches_and_counts(cfg)
    _check_eval(cfg, known.get("eval", set()))
    _check_llava_start(cfg)  # model.path first: the parts' knobs below read it
    _check_model_settings(cfg.model)
    _check_datasets(cfg)
    _check_monitor(cfg.get("monitor") or {})
    if dist.get("strategy") in ZERO_STAGES and dist.get("deepspeed_config"):
        path = Path(str(dist.deepspeed_config))
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"distributed.deepspeed_config={str(path)!r} is not a readable JSON file: {e}") from None
    _check_stage_keys(cfg, known)
    parts = _part_modes(cfg.model)
    for i, stage in enumerate(cfg.run):
        _check_stage(f"stages.{stage}", cfg.stages[stage])
        _check_objectives(f"stages.{stage}", cfg.stages[stage])
        for name, node in (
            _mapping(f"stages.{stage}.prepare", cfg.stages[stage].get("prepare"), null=True) or {}
        ).items():
            _check_call_knobs(f"stages.{stage}.prepare.{name}", node)
        _check_stage_choices(f"stages.{stage}", cfg.stages[stage], parts)
        _check_init_from(cfg, stage, cfg.run[:i])


def check_sources(cfg: DictConfig) -> None:
    """Every stage of ``cfg.run`` reads at least one data source (after :func:`check_config`, which checks that each
    ``sources`` is a list of sources). Bare ``alignlm train`` (no recipe: the stage files set none), or a stage added
    with ``+stage@stages.dpo=dpo`` and no records, failed with a ValueError (exit status 1) when that stage built its
    data, after the stages before it had trained."""
    for stage in cfg.run:
        key = f"stages.{stage}.data.sources"
        if not OmegaConf.select(cfg, key):
            pairs = cfg.stages[stage].data.get("preference")
            raise ConfigError(
                f"{key} is empty: stage {stage} has no data to train on; start from a recipe that sets it (alignlm "
                f"train +exp=demo, configs/exp/) or give {key}=[{{path: records.json}}] (a file of "
                f"{'preference pairs' if pairs else 'LLaVA records'}; image_root and weight optional)"
            )


def prompt_changes(cfg: DictConfig) -> list[str]:
    """For each stage of ``cfg.run`` whose ``init_from`` names a stage of this config, one line where its
    ``data.template`` or ``data.template_args`` differ from that stage's, naming both values and the override that
    makes them alike: the stage trains (and, the last, the run evaluates) on prompts its starting model was not trained
    with. ``+stage@stages.dpo=dpo`` builds the dpo stage from ``stage/dpo.yaml``, not from the recipe's finetune stage,
    so on the demo it lost the system prompt the model was finetuned with. A warning, not a refusal (a new prompt may
    be meant); none after a stage of the plain template, a captioning stage that teaches no prompt (LLaVA's pretrain,
    before the finetune stage's conversation template)."""
    lines = []
    for name in cfg.run:
        init = cfg.stages[name].get("init_from")
        if not isinstance(init, str) or init not in cfg.stages or init == name:
            continue
        ours, theirs = prompt_of(cfg.stages[name].data), prompt_of(cfg.stages[init].data)
        if theirs["template"] == PlainTemplate.name:
            continue
        differ = [(knob, ours[knob], theirs[knob]) for knob in ours if ours[knob] != theirs[knob]]
        if not differ:
            continue
        said = "; ".join(f"stages.{name}.data.{k}={a!r}, stages.{init}.data.{k}={b!r}" for k, a, b in differ)
        fix = prompt_overrides(name, init, [k for k, _, _ in differ])
        lines.append(
            f"stage {name} starts from stage {init} (stages.{name}.init_from) but renders its prompts otherwise: "
            f"{said}; it trains{' and the run evaluates' if name == cfg.run[-1] else ''} on prompts its starting "
            f"model was not trained with. To render them as stage {init} does: {fix}"
        )
    return lines


def override_warnings(cfg: DictConfig) -> list[str]:
    """One line for each override of the command line (``alignlm.config.overridden_keys``) that nothing reads in this
    config, saying why and what would make it count, and for each that leaves in place a setting made for another
    choice. Each had been accepted without a word: ``stages.finetune.lora.r=128`` without a LoRA part trained the LLM
    whole with the same losses; ``stages.pretrain.epochs=2`` under a recipe's ``max_steps`` trained 0.74 of an epoch;
    ``monitor.probe=...`` without ``monitor.every`` probed nothing; ``stages.finetune.data.template=vicuna_v1`` under
    a recipe kept the recipe's system prompt for its chat template ("Answer briefly.") in place of LLaVA's. Warnings,
    not refusals: a sweep over ``parts.llm=full,lora`` sets the LoRA knobs for both. Only what the user named is
    looked at, since every stage file sets a rate and a LoRA block for every part."""
    lines = []
    named = list(dict.fromkeys(overridden_keys(cfg)))
    referenced = _interpolated_keys(OmegaConf.to_container(cfg, resolve=False))
    for key in named:
        # another knob that reads it through an interpolation (stages.finetune.lora=${stages.pretrain.lora}) uses it
        read = any(_within(key, ref) or _within(ref, key) for ref in referenced)
        said = (None if read else _unused_because(cfg, key)) or _kept_for_another_template(cfg, key, named)
        if said:
            lines.append(f"{key} {said}")
    for key, options in group_lists(cfg):  # a sweep's list form, merging what the user may have meant as runs apart
        lines.append(
            f"{key}=[{','.join(options)}] merges the options {options} into one config, each later one over the "
            f"earlier (run_name={cfg.get('run_name')}, the last one's where each sets one); for one run of each: "
            f"for v in {' '.join(options)}; do alignlm train {key}=$v run_name=$v; done"
        )
    return lines


# what only a stage that trains reads: the in-training probes and the training log's settings
_READ_WHILE_TRAINING = ("monitor", "logging")


def idle_overrides(cfg: DictConfig, to_train: Sequence[str]) -> list[str]:
    """Where every stage of ``cfg.run`` has finished (skipped on a rerun), one line naming the command line's
    overrides that only training reads (``monitor.*``, ``logging.*``): the README's run followed by the same command
    with the monitor added skipped both stages, monitored nothing, and said nothing until ``plot-runs`` found no
    curve."""
    named = [k for k in dict.fromkeys(overridden_keys(cfg)) if k.split(".")[0] in _READ_WHILE_TRAINING]
    if to_train or not named:
        return []
    return [
        f"{', '.join(named)}: unused, every stage of run={plain(cfg.run)} has finished in "
        f"{Path(str(cfg.output_dir)) / str(cfg.run_name)} and is skipped, so nothing trains to read them (give a new "
        "run_name, or resume=never to set the finished run aside and train again)"
    ]


def _kept_for_another_template(cfg: DictConfig, key: str, named: Sequence[str]) -> str | None:
    """Where ``key`` picks another template for a stage than the config would (its recipe's, its stage file's) and
    the stage's ``template_args``, written for that one, are kept, not given with it: what the new template does with
    them."""
    parts = key.split(".")
    stage = (
        cfg.stages.get(parts[1])
        if len(parts) == 4 and parts[0] == "stages" and parts[2:] == ["data", "template"]
        else None
    )
    if not isinstance(stage, DictConfig):
        return None
    args_key = f"stages.{parts[1]}.data.template_args"
    given = plain(stage.data.get("template_args") or {})
    if not given or any(_within(args_key, k) or _within(k, args_key) for k in named):
        return None
    before = (composed_without(cfg, key).stages.get(parts[1]) or {}).get("data") or {}
    if before.get("template") == stage.data.template:  # the template they were written for
        return None
    return (
        f"keeps {args_key}={given}, which the config set for another template: {stage.data.template} renders them too "
        f"(a system prompt there replaces the template's own); set {args_key}={{}} for the template's own"
    )


def _interpolated_keys(node: Any) -> set[str]:
    """The config keys the interpolations in ``node`` (unresolved) read: ``stages.pretrain.lora`` of
    ``${stages.pretrain.lora}``; a resolver's (``${oc.env:HOME}``) is none."""
    if isinstance(node, Mapping):
        return set().union(*(_interpolated_keys(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_interpolated_keys(v) for v in node))
    if isinstance(node, str):
        return {ref.strip() for ref in re.findall(r"\$\{([^${}:]+)\}", node)}
    return set()


def _within(key: str, outer: str) -> bool:
    """Whether ``key`` is ``outer`` or lies below it (``stages.a.lora.r`` within ``stages.a.lora``)."""
    return key == outer or key.startswith(outer + ".")


def _unused_because(cfg: DictConfig, key: str) -> str | None:
    """What of the knob ``key`` (an override's key) nothing in ``cfg`` reads, and why (``is unused: ...``), or None
    where something may read it all."""
    parts = key.split(".")
    stage = cfg.stages.get(parts[1]) if parts[0] == "stages" and len(parts) >= 3 else None
    if isinstance(stage, DictConfig):  # a stage set to null (stages.finetune=null) is no stage
        name, knob = parts[1], parts[2:]
        modes = dict(stage.get("parts") or {})
        if knob[0] == "lora" and "lora" not in modes.values() and stage.get("lora") is not None:
            return (
                f"is unused: no part of stages.{name}.parts is lora ({plain(modes)}): set e.g. "
                f"stages.{name}.parts.llm=lora"
            )
        if knob == ["epochs"] and stage.get("max_steps") is not None:
            return (
                f"is unused: stages.{name}.max_steps={stage.max_steps} sets the stage's length "
                f"(stages.{name}.max_steps=null trains by epochs)"
            )
        if knob[0] == "lr" and len(knob) == 2 and modes.get(knob[1]) == "frozen":
            return f"is unused: stages.{name}.parts.{knob[1]}=frozen trains nothing to use it"
        if knob == ["gradient_checkpointing"] and modes.get("vision") == "frozen" and "vision" in _parts_named(stage):
            return (
                f"names vision, which checkpoints nothing: the tower is frozen (stages.{name}.parts.vision), so its "
                "forward keeps no activations; the LLM's are what checkpointing saves (true, or [llm])"
            )
    if parts == ["offline_dataset_seed"] and not cfg.get("offline_datasets"):
        return "is unused: offline_datasets=[] generates no set to draw with it"
    if parts[0] == "offline_dataset_args" and len(parts) >= 2 and parts[1] not in (cfg.get("offline_datasets") or []):
        listed = plain(cfg.get("offline_datasets"))
        return f"is unused: {parts[1]} is not in offline_datasets={listed}, so nothing generates it"
    if (
        parts[0] == "monitor"
        and len(parts) >= 2
        and parts[1:] != ["every"]
        and not int((cfg.get("monitor") or {}).get("every") or 0)
    ):
        return "is unused: monitor.every=0 runs no probe (monitor.every=N probes every N steps)"
    wandb = (cfg.get("logging") or {}).get("wandb") or {}
    if parts[:2] == ["logging", "wandb"] and parts[2:] != ["mode"] and wandb.get("mode") == "disabled":
        return "is unused: logging.wandb.mode=disabled logs nothing to wandb (offline or online does)"
    if parts[0] == "eval" and len(parts) >= 2 and parts[1] != "sets" and not (cfg.get("eval") or {}).get("sets"):
        return "is unused: eval.sets=[] runs no final evaluation (alignlm eval takes settings of its own)"
    if key == "resume_allow_changes" and cfg.get("resume") == "never":
        return "is unused: resume=never sets earlier outputs aside, so nothing is resumed or kept"
    if key == "nonfinite.window" and not (cfg.get("nonfinite") or {}).get("stop_after"):
        return "is unused: nonfinite.stop_after=0 never stops the run (a count within the window does)"
    strategy = (cfg.get("distributed") or {}).get("strategy")
    if key == "distributed.reshard_after_forward" and strategy != "fsdp2":
        return f"is unused: only FSDP2 reshards, and this run's strategy is {strategy}"
    return None


def _parts_named(stage: DictConfig) -> list[str]:
    """The parts a stage's ``gradient_checkpointing`` names; none where the value is not one (refused by
    ``check_config`` where the stage runs: a stage that does not run is not this warning's to refuse)."""
    try:
        return checkpointing_parts(stage.get("gradient_checkpointing") or False)
    except ConfigError:
        return []


def prompt_of(data: Mapping[str, Any]) -> dict[str, Any]:
    """What of a stage's ``data`` renders its prompts: its template and the template's arguments, as it reads them."""
    return {
        "template": data.get("template", PlainTemplate.name),
        "template_args": plain(data.get("template_args") or {}),
    }


def prompt_overrides(stage: str, init: str, knobs: Sequence[str]) -> str:
    """The overrides that make stage ``stage`` render its prompts as stage ``init`` does, one per knob of ``knobs``
    (:func:`prompt_of`'s), as README's DPO command writes them: ``init``'s value by interpolation, which replaces a
    mapping whole (``template_args`` given as a mapping with ``=`` merges into the stage's, and Hydra refuses the keys
    it lacks)."""
    return " ".join(f"'stages.{stage}.data.{k}=${{stages.{init}.data.{k}}}'" for k in knobs)


def check_source_files(cfg: DictConfig, stages: Sequence[str]) -> None:
    """Each data source of ``stages`` (those about to train) is a file of records: a ``DataError`` (exit status 65)
    naming the source otherwise. Called once the offline sets and every stage's prepare steps have written their
    files (a stage's records may be one's output, as SIMA's preference pairs are) and before the first stage trains:
    a later stage's missing file was found when that stage built its data, after the stages before it had trained.
    No stage writes another's records: what a stage leaves is its checkpoints."""
    for stage in stages:
        for i, node in enumerate(cfg.stages[stage].data.sources):
            key = f"stages.{stage}.data.sources[{i}]"
            try:
                iter_records(Source.from_config(node, key).path)  # refuses a missing file or a folder; reads nothing
            except DataError as e:
                raise DataError(f"{key}: {e}", e.cause) from None


SMALL_SOURCE = 64 << 20  # bytes: a source this small is counted at start-up (a second's read at most)


def check_stage_batches(cfg: DictConfig, stages: Sequence[str], world: int) -> None:
    """Each stage about to train whose sources are small (:data:`SMALL_SOURCE` each) holds at least one global batch
    of records an epoch (``per_device_batch_size x processes x grad_accum``, the sources' weights applied): a later
    stage's batch larger than its records was refused when that stage began, after the stages before it had trained.
    Records its start-up checks drop still count here (an upper bound: the fractional weights rounded as the mixture
    rounds them); a stage with a larger source is not counted (a 64 MB file holds tens of thousands of records, more
    than any global batch)."""
    for stage in stages:
        node = cfg.stages[stage]
        batch = int(node.per_device_batch_size) * world * int(node.grad_accum)
        records = 0
        for i, entry in enumerate(node.data.sources):
            source = Source.from_config(entry, key := f"stages.{stage}.data.sources[{i}]")
            if Path(source.path).stat().st_size > SMALL_SOURCE:
                break
            try:  # a line of bad JSON Lines is the stage's to skip and count; a broken JSON file stops it anyway
                n = sum(1 for _ in iter_records(source.path, bad_lines=[]))
            except DataError as e:
                raise DataError(f"{key}: {e}", e.cause) from None
            whole, take = epoch_share(n, source.weight)  # as the stage's mixture counts them
            records += whole * n + take
        else:
            if records < batch:
                raise ConfigError(
                    f"stages.{stage}: its sources hold {records} records an epoch (their weights applied), fewer than "
                    f"one global batch of {batch} (per_device_batch_size {node.per_device_batch_size} x {world} "
                    f"processes x grad_accum {node.grad_accum}): lower stages.{stage}.per_device_batch_size or "
                    "grad_accum, or give the stage more data"
                )


# Hydra's refusal of an override of a key or a group the composed config lacks, and its advice (the override with +)
_NOT_THERE = re.compile(
    r"(?:In '[^']*': )?Could not override '([^']+)'\.(.*?)To append to your \w+(?: list)? use \+(.+)$"
)


def _searched(overrides: Sequence[str]) -> DictConfig | None:
    """The config of ``overrides``' ``hydra.searchpath`` alone, whose folders (``config.config_roots``) hold a
    plug-in's config groups; None without one, or where it does not compose (the tree's folders alone then)."""
    search = [o for o in overrides if o.lstrip("+").startswith("hydra.searchpath=")]
    if not search:
        return None
    try:
        return compose(search)
    except (HydraException, ConfigError):
        return None


def override_mistake(overrides: Sequence[str], error: HydraException) -> str:
    """One line for Hydra's refusal of ``overrides``, naming what to type instead. Hydra's advice for a key the config
    lacks, "To append to your config use +stages.pretrain.max_step=50" (on a line of its own), only moved the refusal of
    a mistyped key to the start-up checks; for ``stage=dpo`` it was "+stage=dpo", a top-level ``stage`` nothing reads.
    A key is now told with the nearest known one (as the start-up checks tell one added with ``+``), a group or an
    option that does not exist with the nearest there is, and a group the defaults list picks under packages
    (``stage@stages.pretrain``) with the form that adds one more; Hydra's other errors (a malformed override) lose
    only their line breaks (its list of options and search path took a dozen lines)."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options is not None:
        group, _, option = str(error.missing_cfg_file).rpartition("/")
        near = difflib.get_close_matches(option, error.options, n=1)
        hint = f"did you mean {group}={near[0]}? " if near else ""
        return f"{group}={option}: no such option of {group}; {hint}its options: {sorted(error.options)}"
    text = " ".join(str(error).split())
    function = _SWEEP_FUNCTION.match(text)
    if function is not None:
        return sweep_advice(f"{function.group(1)}: a sweep", per_seed_draws(overrides))
    swept = _SWEEP.match(text)
    if swept is not None:
        said, key, values = f"{swept.group(1)}: a comma makes a Hydra sweep", swept.group(2), swept.group(3)
        if is_group(key, _searched(overrides)):  # a list of options would merge them into one run
            loop = f"for v in {' '.join(values.split(','))}; do alignlm train {key}=$v run_name=$v; done"
            return sweep_advice(said, example=loop)
        return sweep_advice(said, per_seed_draws(overrides)) + (
            f"; a list is written {key}=[{values}], a text with a comma quoted: {key}='{values}'"
        )
    found = _NOT_THERE.match(text)
    if found is None:
        return text
    key, said, given = found.group(1), found.group(2), found.group(3)
    value = given.partition("=")[2]
    if "defaults list" in text or "Did you mean to override" in said:
        return _group_not_in_defaults(key, value, re.findall(r"[\w/]+@[\w.]+", said))
    rest = list(overrides)
    if given in rest:
        rest.remove(given)
    try:
        cfg = compose(rest)
    except HydraException:  # another override fails too: Hydra names the first
        return text
    try:
        _check_override_key(cfg, key)
    except ConfigError as e:
        return str(e)
    node = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    if isinstance(node, DictConfig):
        return _mapping_override(cfg, key, node, given, value)
    return f"{key} is not in the composed config: a new key is added with a +, +{given}"


def per_seed_draws(overrides: Sequence[str]) -> bool:
    """Whether the command line draws the offline sets with each run's seed (``offline_dataset_seed=null``)."""
    return any(o.replace(" ", "") in ("offline_dataset_seed=null", "offline_dataset_seed=~") for o in overrides)


def sweep_advice(said: str, per_seed: bool = False, example: str = "") -> str:
    """The one line for a sweep asked of ``alignlm train`` (``-m``, ``--multirun``, ``seed=0,1``): Hydra's advice for
    ``seed=0,1``, "add --multirun to your command line", was then refused by the command line as an unknown
    argument. A run is one configuration whose checkpoints, lock and skips are its ``run_name``'s: a sweep is one
    command per value, each with its own ``run_name`` (the same one resumed, or refused, the first value's run).
    ``example``: the loop to show (a seed loop otherwise)."""
    if example:
        note = ""
    elif per_seed:
        example = "for s in 0 1 2; do alignlm train +exp=demo seed=$s run_name=demo_seed$s data_root=data/seed$s; done"
        note = "; with offline_dataset_seed=null each seed draws its own sets, into its own data_root"
    else:
        example = "for s in 0 1 2; do alignlm train +exp=demo seed=$s run_name=demo_seed$s; done"
        note = "; every seed reads one draw of the offline sets, offline_dataset_seed"
    return (
        f"{said}, and alignlm train runs one configuration: run one command per value, each under its own run_name, "
        f"e.g. {example} (a SLURM job array on a cluster{note})"
    )


def _mapping_override(cfg: DictConfig, key: str, node: DictConfig, given: str, value: str) -> str:
    """Hydra's refusal of ``key=value`` where ``key`` is a mapping of the config (``offline_dataset_args``,
    ``eval.generation``, a stage's ``data.template_args``) and the value a mapping with keys it lacks: Hydra merges a
    mapping given with ``=`` into the one there, and only ``+`` adds keys. It had been told as "not in the composed
    config", of a key that is there. A new key that no setting has is named with the nearest known one."""
    new = [f"{key}.{path}" for path in _new_keys(node, _override_value(given))]
    for path in new:
        try:
            _check_override_key(cfg, path)
        except ConfigError as e:
            return str(e)
    one = f" (or one key at a time: +{new[0]}=...)" if new else ""
    return (
        f"{key}={value} adds {', '.join(new) or 'keys'} to {key}, a mapping this config has ({plain(node)}): an "
        f"override with = merges into a mapping and sets only the keys it has; new keys are added with a +: "
        f"+{given}{one}"
    )


def _override_value(override: str) -> Any:
    """The value of one command-line override as Hydra reads it (None where it does not parse)."""
    try:
        return OverridesParser.create().parse_override(override).value()
    except HydraException:
        return None


def _new_keys(node: Any, value: Any, path: str = "") -> list[str]:
    """The dotted paths of ``value`` (a mapping) whose keys ``node`` (a mapping of the config) lacks: each new key,
    not the keys below it."""
    if not (isinstance(node, Mapping) and isinstance(value, Mapping)):
        return []
    found = []
    for name, sub in value.items():
        where = f"{path}{name}"
        found += _new_keys(node[name], sub, f"{where}.") if name in node else [where]
    return found


def _group_not_in_defaults(key: str, value: str, picked: list[str]) -> str:
    """A config group ``key`` (``group`` or ``group@package``) that no entry of the defaults list picks; ``picked``:
    the entries that pick the group under other packages."""
    group, _, package = key.partition("@")
    if not picked:
        return f"{key}={value}: no default picks {key}, so the choice is added with a +: +{key}={value}"
    parents = {p.partition("@")[2].rpartition(".")[0] for p in picked}
    where = package or (f"{parents.pop()}.{value}" if len(parents) == 1 else "<package>")
    then = f" and add {where.rpartition('.')[2]} to run" if re.fullmatch(r"stages\.[^.]+", where) else ""
    return (
        f"{key}={value}: the defaults pick {group} as {', '.join(picked)}; add one more with "
        f"+{group}@{where}={value}{then}, or give one of those another option, e.g. {picked[0]}={value}"
    )


def _check_override_key(cfg: DictConfig, key: str) -> None:
    """``key`` (dotted; with a ``/``, a config group) is a setting ``cfg`` knows, level by level, where the start-up
    checks know every key of the level (``check_config``: the top, a stage, its data, LoRA and template arguments,
    the model, the sections of ``train.yaml``, the offline sets' knobs, ``generate()``'s settings); a ``ConfigError``
    with the nearest known one otherwise. A level of free keys (an objective's knob) passes."""
    if "/" in key:
        groups = sorted(
            {str(p.parent.relative_to(root)) for root in config_roots(cfg) for p in root.glob("*/**/*.yaml")}
        )
        near = difflib.get_close_matches(key, groups, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ConfigError(f"{key} is not a config group; {hint}groups: {groups}")
    known = default_keys(cfg)
    parts = key.split(".")
    for depth, name in enumerate(parts):
        if parts[:depth] == ["stages"]:
            if name not in cfg.stages:
                raise ConfigError(_not_a_stage(cfg, name))
            continue
        if parts[:depth] == ["eval", "generation"]:
            check_generation_keys({name: None})
            return
        allowed = _keys_at(cfg, known, parts[:depth])
        if allowed is None:
            return
        check_keys(".".join(parts[:depth]), {name: None}, allowed)


def _keys_at(cfg: DictConfig, known: dict[str, set[str]], parts: list[str]) -> set[str] | None:
    """Every key the mapping at ``parts`` (below ``stages.<name>`` or outside ``stages``) may hold, where the start-up
    checks know them all (``known``: ``default_keys``; a stage's ``lr`` and ``parts``: the model's parts; its
    ``data.template_args``: its template's arguments; ``offline_dataset_args``: the generators and their knobs); None
    where its keys are free."""
    if parts[:1] == ["stages"]:
        below = parts[2:]
        if not below:
            return known["stage"]
        if below in (["data"], ["lora"]):
            return known.get(f"stage.{below[0]}", set())
        if below in (["lr"], ["parts"]):
            return set(_part_modes(cfg.model)) | ({"objectives"} if below == ["lr"] else set())
        if below == ["data", "template_args"]:
            return _template_arguments(cfg, parts[1])
        return None
    if parts == ["offline_dataset_args"]:
        return set(GENERATORS)
    if parts[:1] == ["offline_dataset_args"] and len(parts) == 2 and parts[1] in GENERATORS:
        return set(generator_knobs(parts[1]))
    where = ".".join(parts)
    return known.get(where, set()) if where in ("", "model", *_SECTIONS) else None


def _template_arguments(cfg: DictConfig, stage: str) -> set[str] | None:
    """The arguments stage ``stage``'s template takes (None where the template is not known: the start-up checks name
    it); a template that takes none is said so."""
    name = str(cfg.stages[stage].data.get("template", PlainTemplate.name))
    if name not in TEMPLATES:
        return None
    allowed = set(inspect.signature(TEMPLATES[name]).parameters)
    if not allowed:
        raise ConfigError(
            f"stages.{stage}.data.template_args: template {name!r} (stages.{stage}.data.template) takes no arguments"
        )
    return allowed


def _not_a_stage(cfg: DictConfig, name: str) -> str:
    """``stages.<name>`` names no stage of ``cfg``: the nearest, and how a stage is added."""
    near = difflib.get_close_matches(name, list(cfg.stages), n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    options = sorted({p.stem for root in config_roots(cfg) for p in (root / "stage").glob("*.yaml")})
    choice = name if name in options else f"<one of {options}>"
    return (
        f"stages.{name} is not a stage of this config; {hint}stages: {sorted(cfg.stages)}; a stage is added with "
        f"+stage@stages.{name}={choice} (and named in run)"
    )


def _check_switches_and_counts(cfg: DictConfig) -> None:
    """True/false switches, the seed, logging and the non-finite rule."""
    for flag in ("resume_allow_changes", "distributed.offload_optimizer", "distributed.offload_param",
                 "distributed.reshard_after_forward"):  # fmt: skip
        _flag(flag, OmegaConf.select(cfg, flag, default=False))
    _whole("seed", cfg.get("seed", 0), 0)
    if cfg.get("offline_dataset_seed") is not None:
        _whole("offline_dataset_seed", cfg.offline_dataset_seed, 0, " (or null: the run's seed)")
    _whole("logging.every", cfg.logging.get("every", 10))
    peak = cfg.logging.get("peak_tflops", "auto")
    if peak not in ("auto", None):
        _number("logging.peak_tflops", peak, 0.0, low_open=True, note=", or auto (from the GPU's name), or null")
    mode = (cfg.logging.get("wandb") or {}).get("mode", "disabled")
    if mode not in WANDB_MODES:
        raise ConfigError(f"logging.wandb.mode={mode!r} is not known; choose one of {list(WANDB_MODES)}")
    nonfinite = cfg.get("nonfinite") or {}
    window, stop_after = nonfinite.get("window", 100), nonfinite.get("stop_after", 5)
    _whole("nonfinite.window", window)
    _whole("nonfinite.stop_after", stop_after, 0, " (0: never stop)")
    if stop_after > window:  # it counts skipped steps among the last `window`: more than that can never happen
        raise ConfigError(
            f"nonfinite.stop_after={stop_after} can never stop the run: it counts the non-finite steps among the last "
            f"nonfinite.window={window} steps; set it to at most {window}, or 0 (never stop)"
        )


def _check_eval(cfg: DictConfig, section: set[str]) -> None:
    """The final evaluation's knobs, read only after the last stage trained: its sizes, ``generate()``'s settings
    (:func:`check_generation_keys`) and each ``eval.sets`` entry: its keys (``limt: 3`` was dropped unread, every
    question evaluated), its ``kind`` and a name no other entry has (the report keeps one result per name: two of one
    name were reduced to one). The sets' files are checked once the offline sets are written
    (:func:`check_eval_sets`). ``section``: the keys of ``eval`` (one of them in a set, ``limt`` for ``eval.limit``,
    is told so)."""
    ecfg = cfg.eval
    for name in ("batch_size", "max_new_tokens"):
        _whole(f"eval.{name}", ecfg.get(name))
    if ecfg.get("limit") is not None:
        _whole("eval.limit", ecfg.limit)
    check_generation_keys(_mapping("eval.generation", ecfg.get("generation")))
    sets = _list("eval.sets", ecfg.get("sets"), null=True, example="[{name:x,path:x.json}]") or []
    for i, entry in enumerate(sets):
        key = f"eval.sets[{i}]"
        if isinstance(entry, DictConfig):
            _check_set_keys(key, entry, section)
        if not (
            isinstance(entry, DictConfig) and isinstance(entry.get("name"), str) and isinstance(entry.get("path"), str)
        ):
            raise ConfigError(f"{key}={entry!r} must be {{name: ..., path: ...}} (kind optional)")
        kind = entry.get("kind", "auto")
        if kind not in KINDS:
            raise ConfigError(f"{key}.kind={kind!r} is not known; choose one of {list(KINDS)}")
        if kind == "caption":
            raise ConfigError(f"{key}.kind=caption: {_captions_elsewhere(cfg, entry)}")
    check_set_names(sets)


def _check_set_keys(key: str, entry: DictConfig, section: set[str]) -> None:
    """Every key of the ``eval.sets`` entry at ``key`` is one of :data:`EVAL_SET_KEYS`, a mistyped one named with the
    nearest; one near a key of ``eval`` itself (``section``) is told to be set there, for every set."""
    for name in entry:
        whole = difflib.get_close_matches(str(name), sorted(section - {"sets"}), n=1)
        if name not in EVAL_SET_KEYS and whole and not difflib.get_close_matches(str(name), EVAL_SET_KEYS):
            raise ConfigError(
                f"{key}.{name} is not a setting of a set ({list(EVAL_SET_KEYS)}); did you mean eval.{whole[0]}, "
                "which applies to every set?"
            )
    check_keys(key, entry, set(EVAL_SET_KEYS))


def _captions_elsewhere(cfg: DictConfig, entry: DictConfig) -> str:
    """Why a caption set is refused in ``eval.sets`` and where it is scored instead."""
    final = Path(str(cfg.output_dir)) / str(cfg.run_name) / str(cfg.run[-1]) / "final"
    return (
        "the run's final evaluation scores question sets only (answer accuracy): leave the set out of eval.sets and "
        f"score its captions (BLEU-4, CIDEr-D) with alignlm eval {final} --sets {entry.name}={entry.path}"
    )


def check_eval_sets(cfg: DictConfig) -> None:
    """Each of ``eval.sets`` is a file of questions the run's final evaluation can score, as evaluation checks a set
    before it generates (``evaluation/evaluate.py: check_answers``, on the first ``eval.limit`` records): a
    ``DataError`` (exit status 65) naming ``eval.sets[i]`` otherwise. Called where :func:`check_source_files` is, once
    the offline sets and prepare steps have written their files (the demo's sets are an offline set's), before the
    first stage trains: a missing file or a caption set had stopped the run after every stage had trained."""
    for i, entry in enumerate(cfg.eval.get("sets") or []):
        key, name, path = f"eval.sets[{i}]", str(entry.name), str(entry.path)
        try:
            if set_kind(path, str(entry.get("kind", "auto"))) == "caption":
                raise DataError(
                    f"{path} is a caption set (its first record has no 'answer', or it has no record): "
                    f"{_captions_elsewhere(cfg, entry)}"
                )
            check_answers(name, path, cfg.eval.get("limit"))
        except DataError as e:
            raise DataError(f"{key}: {e}", e.cause) from None


@functools.cache
def generation_keys() -> frozenset[str]:
    """What ``eval.generation`` may set: the settings of the installed transformers' ``GenerationConfig`` and the
    arguments of ``generate()`` itself."""
    config = {k for k in GenerationConfig().to_dict() if not k.startswith("_") and k != "transformers_version"}
    named = set(inspect.signature(GenerationMixin.generate).parameters) - set(_NOT_GENERATION_KNOBS)
    return frozenset(config | named)


def check_generation_keys(generation: Mapping[str, Any] | None, key: str = "eval.generation") -> None:
    """``generation`` sets none of the settings alignlm sets itself (``check_generation``) and only settings of
    ``generate()`` (:func:`generation_keys`), a mistyped one named with the nearest: ``temprature: 0.7`` passed the
    start-up checks and stopped the run at its final evaluation, after every stage trained (transformers refuses a
    keyword no model input takes)."""
    check_generation(generation, key)
    for name in generation or {}:
        if name not in generation_keys():
            near = difflib.get_close_matches(str(name), sorted(generation_keys()), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(
                f"{key}.{name} is not a setting of transformers' generate(); {hint}the settings are those of "
                "transformers.GenerationConfig"
            )
    for name, value in (generation or {}).items():
        if value is not None and name in GENERATION_VALUES:
            GENERATION_VALUES[name](f"{key}.{name}", value)


def _check_model_settings(model: Any) -> None:
    """What building the model checks of ``model`` (``models/build.py: check_model_settings``), before the offline
    sets and prepare steps run: a filter mode that does not exist, a token norm that is not a number > 0 or one the
    connector does not take had been refused when the first stage built its model, after they ran (exit status 1).
    The parts' knobs by name and annotated type, as an objective's (:func:`_check_call_knobs`): a misspelt connector
    knob had failed there too, and ``bias: no`` had built the bias (a non-empty string is true)."""
    _mapping("model.vision_artifacts", model.get("vision_artifacts"), null=True)
    _check_call_knobs("model.vision", model.get("vision"))
    _check_call_knobs("model.llm", model.get("llm"))
    _check_call_knobs("model.connector", model.get("connector"), ("in_dim", "out_dim"))
    for name, node in (_mapping("model.extras", model.get("extras"), null=True) or {}).items():
        _check_call_knobs(f"model.extras.{name}", node, ("hidden_size", "num_visual_tokens", "embed_std"))
    try:
        check_model_settings(model)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_datasets(cfg: DictConfig) -> None:
    """The offline sets to generate and their generators' knobs."""
    for name in cfg.get("offline_datasets") or []:
        if name not in GENERATORS:
            raise ConfigError(f"offline_datasets has {name!r}; available: {sorted(GENERATORS)}")
    for name, args in (cfg.get("offline_dataset_args") or {}).items():
        if name not in GENERATORS:
            raise ConfigError(f"offline_dataset_args has {name!r}; the generators are {sorted(GENERATORS)}")
        unknown = [k for k in (args or {}) if k not in generator_knobs(name)]
        if unknown:
            raise ConfigError(f"offline_dataset_args.{name} has {unknown}; its knobs are {generator_knobs(name)}")


def _check_sections(cfg: DictConfig, known: dict[str, set[str]]) -> None:
    """Each of :data:`_SECTIONS` is a mapping (null where allowed) of keys ``train.yaml`` sets."""
    for where, null in _SECTIONS.items():
        check_keys(where, _mapping(where, OmegaConf.select(cfg, where), null=null) or {}, known.get(where, set()))


def _check_stage_keys(cfg: DictConfig, known: dict[str, set[str]]) -> None:
    """Every key of a stage to run, of its data and of its LoRA settings is one some ``configs/stage/*.yaml`` sets."""
    for stage in cfg.run:
        key, node = f"stages.{stage}", cfg.stages[stage]
        check_keys(key, node, known["stage"])
        check_keys(f"{key}.data", _mapping(f"{key}.data", node.get("data")), known["stage.data"])
        check_keys(f"{key}.lora", _mapping(f"{key}.lora", node.get("lora"), null=True) or {}, known["stage.lora"])


# the places whose keys are alignlm's settings (``default_keys``), checked by name at start-up: a key deleted there
# (``~seed``) is one alignlm reads; below them (a stage's objectives, hooks, prepare steps) entries are the user's
SETTING_PLACES = ("", "model", "stage", "stage.data", "stage.lora")


def check_deletions(cfg: DictConfig, known: Mapping[str, set[str]]) -> None:
    """Refuse an override that deletes a setting's value (``~seed``, ``~stages.finetune.epochs``, ``~stages``): a
    deleted one had crashed with a traceback where it was first read, after earlier stages had trained. A section or
    a setting null by default (``~stages.<s>.lora``, ``~stages.<s>.init_from``, ``~monitor``) is read as absent, and
    an entry of the user's (a stage, an objective, a hook) is theirs: both are left alone."""
    deleted = deleted_keys(cfg)
    optional = optional_keys(cfg) if deleted else {}
    for key in deleted:
        parts = key.split(".")
        if parts[0] == "stages":
            if len(parts) < 3:  # ~stages.<name> drops a stage; ~stages drops them all, told as a setting
                if len(parts) == 2:
                    continue
                place = ""
            else:
                place = ".".join(["stage", *parts[2:-1]])
        else:
            place = ".".join(parts[:-1])
        if place not in SETTING_PLACES or parts[-1] not in known.get(place, set()):
            continue
        # a section or a setting some default leaves null (lora, init_from, hooks, monitor) is read as absent
        if key != "stages" and parts[-1] in optional.get(place, set()):
            continue
        given = OmegaConf.select(composed_without(cfg, key), key)  # what the defaults and the recipe set there
        if key == "stages" or not (given is None or isinstance(given, DictConfig)):
            shown = json.dumps(plain(given)) if not isinstance(given, DictConfig) else None
            said = f"{key}={shown}" if shown is not None and len(shown) <= 80 else f"its value ({key}=...)"
            raise ConfigError(
                f"~{key} deletes a value alignlm reads (a deleted one had stopped the run where it was first read, "
                f"after earlier stages trained): leave it out to keep {said}, or set it to another value"
            )


def check_keys(where: str, node: Mapping[str, Any], allowed: set[str]) -> None:
    """Every key of ``node`` (at ``where``; ``""``: the top level) is in ``allowed`` (a mistyped one is named with the
    nearest allowed key)."""
    for key in node:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            name = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"{name} is not a known setting; {hint}known: {sorted(allowed)}")


def _mapping(key: str, value: Any, *, null: bool = False) -> Any:
    """``value`` is a mapping (or null where ``null`` allows): a number, a list or a null there crashed mid-run."""
    if not (isinstance(value, Mapping) or (null and value is None)):
        raise ConfigError(f"{key}={value!r} must be a mapping {{key: value, ...}}{' or null' if null else ''}")
    return value


def _list(key: str, value: Any, *, null: bool = False, example: str = "") -> Any:
    """``value`` is a list (or null where ``null`` allows): a string was read character by character."""
    if not (OmegaConf.is_list(value) or (null and value is None)):
        example = example or f"[{value}]"
        raise ConfigError(f"{key}={value!r} must be a list{' or null' if null else ''}, e.g. {key}={example}")
    return value


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and all(c.isalnum() or c in "._-" for c in name)


def _number(
    key: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    note: str = "",
) -> None:
    """``value`` is a finite number (not a bool or string) between ``low`` and ``high``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and is_finite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}"
        bound += f" and {'<' if high_open else '<='} {high}" if math.isfinite(high) else ""
        raise ConfigError(f"{key}={value!r} must be a finite number {bound}{note}")


def _whole(key: str, value: Any, low: int = 1, note: str = "") -> None:
    """``value`` is a whole number (not a bool, float or string) of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}={value!r} must be a whole number >= {low}{note}")


def _check_stage(key: str, stage: DictConfig) -> None:
    """A stage's numbers, checked before anything is built (an ``inf`` learning rate never reaches step 1)."""
    for part, lr in _mapping(f"{key}.lr", stage.get("lr")).items():
        _number(f"{key}.lr.{part}", lr, 0.0, low_open=True)
    _number(f"{key}.weight_decay", stage.get("weight_decay", 0.0), 0.0)
    _number(f"{key}.max_grad_norm", stage.get("max_grad_norm", 1.0), 0.0)
    _number(f"{key}.warmup_ratio", stage.get("warmup_ratio", 0.0), 0.0, 1.0)
    betas = stage.get("betas", [0.9, 0.999])
    if not (OmegaConf.is_list(betas) and len(betas) == 2):
        raise ConfigError(f"{key}.betas={plain(betas)!r} must be a list of 2 numbers (Adam's), e.g. [0.9, 0.999]")
    for i, beta in enumerate(betas):
        _number(f"{key}.betas[{i}]", beta, 0.0, 1.0, high_open=True)
    _flag(f"{key}.fused_optimizer", stage.get("fused_optimizer", "auto"), ("auto",))
    _whole(f"{key}.per_device_batch_size", stage.per_device_batch_size)
    _whole(f"{key}.grad_accum", stage.grad_accum)
    if stage.get("max_steps") is not None:
        _whole(f"{key}.max_steps", stage.max_steps)
    else:
        _number(f"{key}.epochs", stage.get("epochs", 1), 0.0, low_open=True)
    for name in ("save_every", "keep_last"):
        _whole(f"{key}.{name}", stage.get(name, 0), 0)


def _check_monitor(monitor: Any) -> None:
    """The in-training monitor's knobs, which it would otherwise read at its first measurement."""
    _whole("monitor.every", monitor.get("every", 0), 0, " (0: off)")
    if not monitor.get("every", 0):
        return
    if not monitor.get("probe"):
        raise ConfigError("monitor.every > 0 needs monitor.probe: a caption file (image + caption records)")
    for name, default in (("n", 64), ("batch_size", 32), ("topk", 10)):
        _whole(f"monitor.{name}", monitor.get(name, default))  # null too: the monitor had crashed on it mid-run
    n, topk = monitor.get("n", 64), monitor.get("topk", 10)
    if n < topk + 2:
        raise ConfigError(f"monitor.n={n} must be at least monitor.topk + 2 = {topk + 2} for the kNN metrics")
    asked: dict[str, list[Any]] = {}
    for name in ("metrics", "layer_metrics"):
        asked[name] = _list(f"monitor.{name}", monitor.get(name), null=True) or []
        problems = metric_problems(asked[name])
        if problems:
            raise ConfigError(unknown_metrics_said(f"monitor.{name}", problems))
    # as the monitor reads them: the layers' metrics are its table's unless given; a null table is its own default
    layers = monitor.get("layers")
    per_layer = set(asked["layer_metrics"] or asked["metrics"]) if layers and layers != "none" else set()
    check_probe_metrics(set(asked["metrics"]) | per_layer, topk, n, "monitor")


def _flag(key: str, value: Any, also: tuple[Any, ...] = ()) -> None:
    """A switch is true or false (a string such as ``maybe`` would otherwise count as true)."""
    if not isinstance(value, bool) and value not in also:
        raise ConfigError(f"{key}={value!r}: choose one of {[*also, True, False]}")


# the values of the generate() settings a user sets most, checked before anything runs: transformers takes any value
# of any type there, so `do_sample: maybe` sampled (a string is true) and `num_beams: 0` failed in the final
# evaluation, after every stage trained
GENERATION_VALUES: dict[str, Callable[[str, Any], None]] = {
    "do_sample": _flag,
    "use_cache": _flag,
    "num_beams": _whole,
    "top_k": functools.partial(_whole, low=0),
    "no_repeat_ngram_size": functools.partial(_whole, low=0),
    "min_new_tokens": functools.partial(_whole, low=0),
    "temperature": functools.partial(_number, low=0.0, low_open=True),
    "repetition_penalty": functools.partial(_number, low=0.0, low_open=True),
    "length_penalty": functools.partial(_number, low=-math.inf),
    "top_p": functools.partial(_number, low=0.0, high=1.0, low_open=True),
    "typical_p": functools.partial(_number, low=0.0, high=1.0, low_open=True),
    "min_p": functools.partial(_number, low=0.0, high=1.0),
}


def _part_modes(model: Any) -> dict[str, tuple[str, ...]]:
    """The model's parts, each with the modes ``stages.<s>.parts`` may give it: an extra input part's are its class's
    ``TRAIN_MODES`` (read without building it; () when the class cannot be found, which building it then names)."""
    modes = dict.fromkeys(AlignLM.PARTS, MODES)
    for name, node in (model.get("extras") or {}).items():
        if node is None:  # off
            continue
        try:
            modes[name] = tuple(getattr(_locate(str(node.get("_target_"))), "TRAIN_MODES", MODES))
        except (ImportError, ValueError, AttributeError):
            modes[name] = ()
    return modes


def _check_stage_choices(key: str, stage: DictConfig, part_modes: Mapping[str, tuple[str, ...]]) -> None:
    """Names and switches of a stage, checked before the first stage trains (a typo in the second stage would
    otherwise surface after the first had trained)."""
    modes = _mapping(f"{key}.parts", stage.get("parts"))
    check_parts(modes, part_modes, key)
    parts = tuple(part_modes)
    stray = [p for p in stage.lr if p not in (*parts, "objectives")]
    if stray:
        raise ConfigError(f"{key}.lr has learning rates for {stray}, which are not parts ({list(parts)}) or objectives")
    trained = {p: mode for p, mode in modes.items() if mode != "frozen"}
    if not trained:
        raise ConfigError(
            f"{key}.parts={plain(modes)} trains nothing: set at least one of {list(parts)} to full or lora"
        )
    missing = [p for p in trained if p not in stage.lr]
    if missing:
        raise ConfigError(
            f"{key}.lr.{missing[0]} is missing, but {key}.parts.{missing[0]}={trained[missing[0]]} trains it: every "
            "trained part needs its learning rate"
        )
    check_schedule(stage.get("scheduler", "cosine"), key)
    _flag(f"{key}.compile", stage.get("compile", False))
    checkpointing_parts(stage.get("gradient_checkpointing", False), f"{key}.gradient_checkpointing")
    if "lora" in modes.values():
        lora = stage.get("lora") or {}
        _whole(f"{key}.lora.r", lora.get("r", 16))
        _number(f"{key}.lora.alpha", lora.get("alpha", 32), 0.0, low_open=True)
        _number(f"{key}.lora.dropout", lora.get("dropout", 0.05), 0.0, 0.999)
        targets = lora.get("target_modules", "all-linear")
        if not isinstance(targets, str) and not (
            OmegaConf.is_list(targets) and targets and all(isinstance(t, str) for t in targets)
        ):
            raise ConfigError(
                f"{key}.lora.target_modules={plain(targets)!r} must be a module name (all-linear: every linear "
                "layer) or a list of names, e.g. [q_proj, v_proj]"
            )
    data = stage.data
    if data.get("template", "plain") not in TEMPLATES:
        raise ConfigError(f"{key}.data.template={data.template!r} is not known; choose one of {sorted(TEMPLATES)}")
    _check_template_args(key, data)
    check_error_policy(data.get("on_error", "skip"), data.get("min_usable_fraction", 0.5), f"{key}.data")
    check_aspect_ratio(data.get("image_aspect_ratio", "pad"), f"{key}.data.image_aspect_ratio")
    _whole(f"{key}.data.max_length", data.get("max_length", 2048))
    for name, node in (_mapping(f"{key}.data.hooks", data.get("hooks"), null=True) or {}).items():
        _check_call_knobs(f"{key}.data.hooks.{name}", node, ("model",))
    for i, source in enumerate(_list(f"{key}.data.sources", data.get("sources", []), example="[{path: a.json}]")):
        Source.from_config(source, f"{key}.data.sources[{i}]")
    for name, default, note in (("max_image_pixels", MAX_PIXELS, "no limit"), ("pack_length", None, "max_length")):
        value = data.get(name, default)
        if value is not None:
            _whole(f"{key}.data.{name}", value, 1, f", or null ({note})")
    if data.get("num_workers", "auto") != "auto":
        _whole(f"{key}.data.num_workers", data.num_workers, 0, ", or auto")
    _flag(f"{key}.data.packing", data.get("packing", "auto"), ("auto",))
    _flag(f"{key}.data.group_by_length", data.get("group_by_length", "step"), ("step", "band"))
    _flag(f"{key}.data.preference", data.get("preference", False))
    _check_feature_cache(key, data.get("feature_cache", False), modes.get("vision", "frozen"), _hook_targets(key, data))


def _check_template_args(key: str, data: DictConfig) -> None:
    """``data.template_args`` are arguments of the chosen template's constructor, of their types: a mistyped
    ``image_frist`` failed with a bare TypeError when its stage built the template, after the stages before it had
    trained."""
    args = _mapping(f"{key}.data.template_args", data.get("template_args"), null=True)
    if not args:
        return
    name = data.get("template", "plain")
    cls = TEMPLATES[name]
    allowed = set(inspect.signature(cls).parameters)
    if not allowed:
        raise ConfigError(f"{key}.data.template_args={plain(args)}: template {name!r} takes no arguments")
    check_keys(f"{key}.data.template_args", args, allowed)
    check_knob_types(f"{key}.data.template_args", cls, args)


def _check_feature_cache(key: str, cache: Any, vision: str, hooks: Mapping[str, Any] | None = None) -> None:
    """``data.feature_cache`` (``training/feature_cache.py``): true, a folder, or false / null (off); only for a
    frozen tower, whose features do not change (the stage had refused a trained one after the stages before it), and
    not beside a data hook that replaces the images itself (refused when the stage built its data, after the prepare
    steps had run). ``hooks``: the stage's, as :func:`_hook_targets` gives them."""
    if not (cache is None or isinstance(cache, bool) or (isinstance(cache, str) and cache)):
        raise ConfigError(
            f"{key}.data.feature_cache={cache!r} must be true (the folder output_dir/feature_cache), a folder, or "
            "false or null (off)"
        )
    if cache and vision != "frozen":
        raise ConfigError(
            f"{key}.data.feature_cache={cache!r} caches a frozen tower's features, but {key}.parts.vision={vision} "
            "trains the tower: turn one of them off"
        )
    for name, hook in (hooks or {}).items() if cache else ():
        if getattr(hook, "replaces_visuals", False):
            raise ConfigError(
                f"{key}.data.feature_cache={cache!r}: the data hook {key}.data.hooks.{name} ({hook.__name__}) already "
                "replaces the images of this stage; turn one of them off"
            )


def _check_objectives(key: str, stage: DictConfig) -> None:
    """A stage trains on at least one objective (null ones are off), each with a weight > 0 (a negative one trained by
    gradient ascent); one that relates a micro-batch's samples gets its ``min_batch_size`` per device, known from its
    class before anything is built; its knobs are its constructor's, of their types, and the constructor takes them
    (:func:`_check_objective_builds`)."""
    objectives = _mapping(f"{key}.objectives", stage.get("objectives"), null=True) or {}
    if all(node is None for node in objectives.values()):
        raise ConfigError(
            f"{key}.objectives={plain(objectives)} has no objective switched on (null is off): a stage needs one to "
            "train on (configs/objective/*.yaml)"
        )
    for name, node in objectives.items():
        if node is None:
            continue
        _mapping(f"{key}.objectives.{name}", node)
        off = " (set the objective to null to switch it off)"
        _number(f"{key}.objectives.{name}.weight", node.get("weight", 1.0), 0.0, low_open=True, note=off)
        cls = import_target(f"{key}.objectives.{name}", node)
        if not isinstance(cls, type):  # a function that builds the objective: its own arguments, checked when called
            continue
        check_min_batch(cls, stage.get("per_device_batch_size", 1), f"{key}.objectives.{name}")
        # its knobs are its constructor's arguments (none where it keeps torch.nn.Module's, which takes no knob)
        knobs = [] if cls.__init__ is torch.nn.Module.__init__ else inspect.signature(cls).parameters.values()
        if not any(p.kind is p.VAR_KEYWORD for p in knobs):
            allowed = {p.name for p in knobs} | {"weight"} | {k for k in node if str(k).startswith("_")}
            check_keys(f"{key}.objectives.{name}", node, allowed)
        if knobs:
            check_knob_types(f"{key}.objectives.{name}", cls, node)
        _check_needed_hooks(key, name, cls, stage)
        _check_objective_builds(key, name, stage)


def _check_needed_hooks(key: str, name: str, cls: type, stage: DictConfig) -> None:
    """The objective's ``needs_hooks`` are among the stage's data hooks (null ones are off): an objective of per-image
    labels without the hook that reads them was refused when its stage began, after the stages before it trained."""
    hooks = _hook_targets(key, stage.get("data"))
    for need in getattr(cls, "needs_hooks", ()):
        if not any(isinstance(hook, type) and issubclass(hook, need) for hook in hooks.values()):
            raise ConfigError(
                f"{key}.objectives.{name} needs the data hook {need.__module__}.{need.__qualname__} among "
                f"{key}.data.hooks, which has {sorted(hooks)}: its loss reads what that hook puts in the batch (a "
                "recipe that uses it shows how: configs/exp/)"
            )


def _hook_targets(key: str, data: Any) -> dict[str, Any]:
    """The data hooks of the stage at ``key`` that are on (null: off), each the class or function its ``_target_``
    names, imported: what the checks of the objectives that need a hook and of the feature cache look at."""
    hooks = _mapping(f"{key}.data.hooks", (data or {}).get("hooks"), null=True) or {}
    return {
        name: import_target(f"{key}.data.hooks.{name}", _mapping(f"{key}.data.hooks.{name}", node))
        for name, node in hooks.items()
        if node is not None
    }


def _check_objective_builds(key: str, name: str, stage: DictConfig) -> None:
    """The objective ``name`` of the stage at ``key``, built as the stage's trainer builds it
    (``training/trainer.py: build_objectives``) and let go: a refusal of its constructor (DPO's unknown ``loss``,
    ``beta <= 0``, ``loss=ipo`` with ``label_smoothing > 0``) came when its stage started, after the stages before it
    had trained. Cheap: the Objective contract keeps what needs the model, the data or a file for ``setup()``, and the
    built-in constructors hold numbers and a one-element tensor at most. One that a function builds is not built here
    (nothing holds a function to that contract: it may read a file a prepare step has not written yet)."""
    where = f"{key}.objectives"
    one = {"objectives": {name: stage.objectives[name]}, "per_device_batch_size": stage.get("per_device_batch_size", 1)}
    try:
        build_objectives(one, where)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        said = str(e)
        raise ConfigError(said if f"{where}.{name}" in said else f"{where}.{name}: {said}") from None


def import_target(key: str, node: Mapping[str, Any]) -> Any:
    """The class or function ``node``'s ``_target_`` names, imported now: a typo in a later stage's objective or data
    hook was found only when that stage built it, after the stages before it had trained and written their
    ``final/``. A name its module lacks is told with the nearest one it holds."""
    target = node.get("_target_")
    if not isinstance(target, str) or not target:
        raise ConfigError(f"{key}._target_={target!r} must name the class or function to build (package.module.Name)")
    try:
        return _locate(target)
    except (ImportError, AttributeError, ValueError) as e:
        why = " ".join(str(e).split())
    module, _, name = target.rpartition(".")
    try:
        names = dir(_locate(module)) if module else []
    except (ImportError, AttributeError, ValueError):
        names = []  # the module itself does not import: the first error says why
    if names and name not in names:
        near = difflib.get_close_matches(name, names, n=1)
        why = f"{module} has no {name!r}" + (f"; did you mean {module}.{near[0]}?" if near else "")
    raise ConfigError(f"{key}._target_={target!r} cannot be imported: {why}")


def _check_call_knobs(key: str, node: Any, supplied: Sequence[str] = ()) -> None:
    """A prepare step, data hook or model part (null: off) names a function or class that imports, and its knobs are
    arguments of it (:func:`_check_knobs_of`): these are called or built only when their stage comes (a prepare step
    after the steps before it, a hook when its stage builds its data, the model after every prepare step), so a
    misspelt knob or a string for a number had failed after the work before them had run (an encoder fitted, every
    image embedded). ``supplied``: the arguments its builder passes (a hook's ``model``, a connector's widths)."""
    if node is not None:
        _check_knobs_of(key, import_target(key, _mapping(key, node)), node, supplied)


def _check_knobs_of(key: str, target: Any, node: Mapping[str, Any], supplied: Sequence[str] = ()) -> None:
    """The keys of ``node`` (``_``-prefixed ones aside) are arguments of ``target``, a function or class, unless it
    takes any (``**kwargs``), and hold values of their annotated types and bounds (:func:`check_knob_types`). It takes
    the arguments its builder ``supplied`` (a hook without ``model`` had failed when its stage built its data), and
    the config sets none of them (the builder's value had silently won)."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # a built-in (time.sleep) tells no signature: its call checks its arguments
        return
    names = {p.name for p in params}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    lacks = [s for s in supplied if s not in names and not takes_any]
    if lacks:
        raise ConfigError(
            f"{key}._target_={node.get('_target_')!r} takes no argument {lacks[0]!r}, which its builder passes: add "
            f"it to the signature (docs/architecture.md, extension points)"
        )
    for given in (s for s in supplied if s in node):
        raise ConfigError(f"{key}.{given} is passed by what builds or calls it, not by the config: leave it out")
    if not takes_any:
        check_keys(key, node, names - set(supplied) | {k for k in node if str(k).startswith("_")})
    check_knob_types(key, target, node)


# a constructor annotation -> the config values it takes (a whole number where a float is asked is fine; a bool is no
# number, though Python's bool is an int)
_KNOB_TYPES: dict[Any, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def check_knob_types(key: str, cls: Any, node: Mapping[str, Any]) -> None:
    """Each knob of ``node`` whose constructor argument (or function argument, ``cls`` being a function) is annotated
    ``bool``, ``int``, ``float`` or ``str`` (or one of them or None) holds such a value: ``gather: "no"`` or
    ``temperature: "0.07"`` failed only when the stage built its objectives, after the stages before it had trained.
    An annotation ``Annotated[..., Bounds(...)]`` bounds a number (``k: 0`` had been refused when its prepare step
    ran, after the steps before it); ``Annotated[..., KnobsOf(fn)]`` makes a mapping's keys ``fn``'s arguments,
    checked the same way. Other annotations are the constructor's own business."""
    for knob, (hint, extras) in knob_annotations(cls).items():
        if knob not in node:
            continue
        args = union_args(hint)
        value = node[knob]
        if all(a in _KNOB_TYPES or a is type(None) for a in args) and not any(
            value is None
            if a is type(None)
            else isinstance(value, _KNOB_TYPES[a]) and (a is bool or not isinstance(value, bool))
            for a in args
        ):
            wanted = " or ".join("null" if a is type(None) else a.__name__ for a in args)
            raise ConfigError(f"{key}.{knob}={value!r} must be {'an' if wanted[0] in 'aeiou' else 'a'} {wanted}")
        for of in (e for e in extras if isinstance(e, KnobsOf) and value is not None):
            _check_knobs_of(f"{key}.{knob}", of.target, _mapping(f"{key}.{knob}", value), of.supplied)
    try:
        check_bounds(cls, node, f"{key}.")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_init_from(cfg: DictConfig, stage: str, before: list[str]) -> None:
    """``init_from`` names a stage run before this one (or whose ``final/`` this run already has), a ``final/`` folder
    or a transformers Llava folder: anything else (a step checkpoint, a file) failed only when the stage started,
    after the stages before it had trained."""
    init = cfg.stages[stage].get("init_from")
    if not init:
        return
    if init in cfg.stages:
        final = Path(cfg.output_dir) / str(cfg.run_name) / init / "final"
        if init not in before and not final.exists():
            raise ConfigError(
                f"stages.{stage}.init_from={init!r}: that stage is not run before {stage!r} in run={list(cfg.run)}, "
                f"and {final} does not exist yet"
            )
        return
    problem = _not_starting_weights(Path(str(init)))
    if problem:
        raise ConfigError(
            f"stages.{stage}.init_from={init!r} {problem}; it takes a stage of this config, a final/ folder "
            "(model.safetensors + config.yaml) or a transformers Llava folder"
        )


def _not_starting_weights(path: Path) -> str | None:
    """What ``path`` is instead of starting weights that ``training/checkpoint.py: load_init`` reads (a Llava folder,
    else a ``final/`` folder), or None."""
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is a file, not a folder"
    if is_llava_dir(path) or all((path / name).is_file() for name in ("model.safetensors", "config.yaml")):
        return None
    if (path / "trainable.safetensors").exists():
        return "is a step checkpoint (it resumes its own stage; a stage starts from a final/ folder)"
    finals = [str(p) for p in (path / "final", *sorted(path.glob("*/final"))) if p.is_dir()]
    if finals:
        return f"is a stage or run folder; name one of its final/ folders: {finals}"
    if (path / "config.json").exists():
        return "is a transformers folder whose config.json is not a Llava model's (model_type llava)"
    return "holds neither model.safetensors + config.yaml nor a config.json"


def _check_llava_start(cfg: DictConfig) -> None:
    """A model built from a Llava folder (``model=llava_hf``) has random weights: only ``init_from`` loads the
    folder's, so a first stage without one trained a random model and said nothing."""
    model = cfg.get("model") or {}
    parts = [p for p in ("vision", "llm") if OmegaConf.select(model, f"{p}._target_") in _LLAVA_BUILDERS]
    if not parts:
        return
    path = OmegaConf.select(model, f"{parts[0]}.path", default=None, throw_on_resolution_failure=False)
    if path is None:
        raise ConfigError("model=llava_hf needs model.path=DIR: the transformers Llava folder to build the model from")
    first = cfg.run[0]
    if not cfg.stages[first].get("init_from"):
        raise ConfigError(
            f"model=llava_hf builds the model from model.path={path} with random weights, and stages.{first}."
            f"init_from is not set: add stages.{first}.init_from={path} to start from the folder's weights"
        )


def check_stages_fit_model(cfg: DictConfig, stages: Sequence[str], model: AlignLM) -> None:
    """What only the built model tells, for every stage of ``stages`` (those about to train), before the first trains:
    each LoRA stage's ``target_modules`` name modules of the part it adapts (peft refused them when that stage began,
    after the stages before it had trained), and ``data.max_length`` holds one image's visual tokens and a token of
    text (the stage's dataset refused it then). Those targets must also leave a module the part's output depends on
    once its inert ones are excluded (peft found no module to adapt when the stage began), and every module they adapt
    must be a layer LoRA can adapt (peft refused it when the stage began) whose weights no other module shares (a
    tied LM head: ``final/`` was not the model trained). Each part a stage checkpoints can checkpoint. No stage trains
    the LLM's input embedding table while a copy of it is in use (:func:`_check_input_embedding_copies`). ``model``: built from ``cfg.model``, nothing loaded."""
    exclusions: dict[str, list[str]] = {}  # each part's, probed once for all stages
    for name in stages:
        key, stage = f"stages.{name}", cfg.stages[name]
        targets = (stage.get("lora") or {}).get("target_modules", ALL_LINEAR)
        adapted_by_part: dict[str, list[str]] = {}
        for part, mode in stage.parts.items():
            if mode == "lora":
                module = getattr(model, part)
                _check_lora_targets(f"{key}.lora.target_modules", plain(targets), module, part)
                if part not in exclusions:
                    exclusions[part] = lora_exclusions(module)
                adapted = adapted_by_part[part] = lora_adapted(module, plain(targets), exclusions[part])
                _check_lora_reaches(key, plain(targets), module, part, adapted)
                _check_lora_layers(f"{key}.lora.target_modules", plain(targets), module, part, adapted)
                _check_lora_untied(key, plain(targets), module, part, adapted)
        _check_input_embedding_copies(key, stage, model, adapted_by_part.get("llm", []))
        for part in checkpointing_parts(stage.get("gradient_checkpointing") or False):
            try:  # a tower that cannot checkpoint had been refused when its stage began, after the ones before trained
                checkpointable(model, part, f"{key}.gradient_checkpointing")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        max_length, tokens = stage.data.get("max_length", 2048), model.num_image_tokens
        if max_length <= tokens and _has_images(stage.data):
            raise ConfigError(
                f"{key}.data.max_length={max_length} cannot hold one image's {tokens} visual tokens and a token of "
                f"text: every record with an image would be cut away; set it above {tokens}"
            )


def _check_input_embedding_copies(key: str, stage: DictConfig, model: AlignLM, adapted: list[str]) -> None:
    """A stage that trains the LLM's input embedding table (``parts.llm=full``, or LoRA adapting it: ``adapted``, the
    LLM's modules the stage's LoRA adapts) while a part of the model or one of the stage's objectives holds a copy of
    that table taken once (it says what in its ``input_embedding_copy``) is refused: the copy stays the table as it
    was, and what it stood for (visual tokens that are the LLM's words, targets among its embeddings) silently no
    longer holds. Each method declares its copy; nothing here knows which method holds one."""
    mode = stage.parts.get("llm", "frozen")
    table = model.llm.get_input_embeddings()
    name = next((n for n, m in model.llm.named_modules() if m is table), "the input embeddings")
    if mode == "full":
        trains = f"{key}.parts.llm=full trains the LLM's input embedding table"
    elif mode == "lora" and name in adapted:
        trains = f"{key}.lora.target_modules adapts the LLM's input embedding table ({name})"
    else:
        return
    holders = [(f"model.{part}", getattr(model, part)) for part in model.PARTS]
    for obj, node in (stage.get("objectives") or {}).items():
        if node is not None:
            holders.append((f"{key}.objectives.{obj}", import_target(f"{key}.objectives.{obj}", node)))
    for where, holder in holders:
        copy = getattr(holder, "input_embedding_copy", None)
        if copy:
            raise ConfigError(
                f"{trains}, but {where} holds {copy}: training the table leaves that copy behind. Set "
                f"{key}.parts.llm=frozen, or lora with target_modules that leave {name} alone (all-linear does)"
            )


def _check_lora_targets(key: str, targets: str | list[str], module: nn.Module, part: str) -> None:
    """Every name of ``targets`` (a list, each matched as peft does: the module's name or its last components) or the
    pattern ``targets`` (a string, matched whole against a module's name) matches a module of ``module``: peft fails
    only when none of a list does, and a mistyped entry beside a right one adapted fewer layers without a word.
    ``all-linear`` is every linear layer (peft's own shorthand)."""
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return
    names = [n for n, _ in module.named_modules() if n]
    for target in [targets] if isinstance(targets, str) else targets:
        if lora_matches(target if isinstance(targets, str) else [target], names):
            continue
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if n and not next(m.children(), None)})
        if isinstance(targets, str):
            _check_pattern_names_no_layers(key, targets, part, leaves)
        near = difflib.get_close_matches(target, leaves, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ConfigError(
            f"{key}={targets!r}: {target!r} names no module of model.{part}; {hint}its layers are named {leaves}, or "
            f"use {ALL_LINEAR} (every linear layer)"
        )


def _check_pattern_names_no_layers(key: str, pattern: str, part: str, leaves: list[str]) -> None:
    """A string ``target_modules`` that matched nothing but names layers (``q_proj``, or LLaMA-Factory's
    ``q_proj,v_proj``) is refused saying why: peft reads a string as a pattern matched against a module's whole dotted
    name, and a layer's name only in a list. The refusal had suggested the very name it refused."""
    named = [name.strip() for name in pattern.split(",") if name.strip()]
    if not any(name in leaves for name in named):
        return
    raise ConfigError(
        f"{key}={pattern!r} matches no module of model.{part}: a string is a pattern matched against a module's whole "
        f"name (model.layers.0.self_attn.q_proj), and a layer is named by its last components only in a list; write "
        f"{key}=[{', '.join(named)}]"
    )


def _check_lora_reaches(key: str, targets: str | list[str], module: nn.Module, part: str, adapted: list[str]) -> None:
    """``targets`` adapt some module of ``module``: ``adapted`` (``lora_adapted``: matched as peft matches them,
    ``all-linear`` every linear layer but an LM head, less the part's inert modules, ``lora_exclusions``) is not empty.
    A tower whose only linear layer is inert (a CNN's classifier) otherwise failed with peft's "No modules were
    targeted" when its stage began, after the stages before it had trained."""
    if adapted:
        return
    every_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    named = lora_adapted(module, targets)
    beyond = f" ({named[:3]}{' ...' if len(named) > 3 else ''}: an adapter there would never train)" if named else ""
    what = (
        f"no linear layer of model.{part} reaches its features{beyond}"
        if every_linear
        else f"{key}.lora.target_modules={targets!r} names no module of model.{part} its features pass{beyond}"
    )
    raise ConfigError(
        f"{key}.parts.{part}=lora adapts nothing: {what}; use {key}.parts.{part}=full or frozen"
        + ("" if every_linear else ", or target layers its features pass through")
    )


def _check_lora_layers(key: str, targets: str | list[str], module: nn.Module, part: str, adapted: list[str]) -> None:
    """Every module ``targets`` adapt in ``module`` (``adapted``) is a layer LoRA can adapt (``LORA_LAYERS``): a norm
    or a whole attention block named there passed the name check, and peft refused it ("Target module ... is not
    supported") when its stage began, after the stages before it had trained."""
    for name in adapted:
        sub = module.get_submodule(name)
        if isinstance(sub, LORA_LAYERS):
            continue
        inside = sorted({n.rsplit(".", 1)[-1] for n, m in sub.named_modules() if n and isinstance(m, LORA_LAYERS)})
        instead = f"name the layers inside it instead ([{', '.join(inside)}])" if inside else "leave it out"
        raise ConfigError(
            f"{key}={targets!r} adapts model.{part}.{name}, a {type(sub).__name__}, which LoRA cannot adapt (peft adapts "
            f"only {sorted({t.__name__ for t in LORA_LAYERS})} layers): {instead}, or use {ALL_LINEAR}"
        )


def _check_lora_untied(key: str, targets: str | list[str], module: nn.Module, part: str, adapted: list[str]) -> None:
    """No module ``targets`` adapt in ``module`` shares a weight with another module (an LLM's LM head tied to its
    input embeddings, ``tie_word_embeddings``: SmolLM2, Qwen2.5-0.5B), found by parameter identity. The adapter acts on
    one use of the shared weight while training, and merging it into the weight for ``final/`` changes both uses: the
    saved model was not the model trained. ``all-linear`` leaves an LM head out (as peft does)."""
    owners: dict[int, list[str]] = {}
    for name, sub in module.named_modules(remove_duplicate=False):
        for param in sub.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    for name in adapted:
        shared = [o for p in module.get_submodule(name).parameters(recurse=False) for o in owners[id(p)] if o != name]
        if shared:
            raise ConfigError(
                f"{key}.lora.target_modules={targets!r} adapts model.{part}.{name}, whose weight is tied to "
                f"model.{part}.{shared[0]}'s: the adapter trains one use of the shared weight and merging it into "
                f"final/ changes both, so final/ would not be the model trained. Leave {name.rsplit('.', 1)[-1]} out "
                f"of {key}.lora.target_modules ({ALL_LINEAR} leaves the LM head out), untie the weights in a copy of "
                f"the model (an LLM's config.json: tie_word_embeddings: false, its head saved as a weight of its own), "
                f"or train the part fully ({key}.parts.{part}=full)"
            )


def _has_images(data: DictConfig) -> bool:
    """Whether a record of the stage's sources names an image (read only where ``max_length`` is too short for one,
    rarely: a text-only stage may be that short). A file that cannot be read counts as none: the stage's dataset
    names it when it starts."""
    for i, node in enumerate(data.get("sources") or []):
        try:  # read up to the first record with an image
            records = iter_records(Source.from_config(node, f"data.sources[{i}]").path, [])
            if any(isinstance(r, dict) and image_names(r) for r in records):
                return True
        except DataError:
            continue
    return False
