"""The whole recipe in one command: offline data and every stage's prepare steps if needed, each stage in ``cfg.run``,
then evaluation.

``alignlm train +exp=demo`` and ``accelerate launch train.py +exp=demo`` both land in ``run``. A stage's ``prepare``
node names the steps that make its inputs (name -> node with ``_target_``: fit an encoder, write a labels file,
embed captions); each step is a function that does nothing when its output exists, so a rerun goes straight to
training. They run on the main process, stage by stage in run order, before any training.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from omegaconf import DictConfig, OmegaConf

from alignlm.config import ConfigError, instantiate, stage_keys
from alignlm.data import GENERATORS, generator_knobs
from alignlm.data.llava import ON_ERROR
from alignlm.data.templates import TEMPLATES
from alignlm.evaluation.evaluate import answer_accuracy
from alignlm.evaluation.report import json_values
from alignlm.geometry.suite import ALL_METRICS
from alignlm.models.build import build_model
from alignlm.models.device import cpu_only
from alignlm.models.io import load_final_weights
from alignlm.models.mllm import AlignLM
from alignlm.training.determinism import deterministic, warn_only
from alignlm.training.logging import get_logger, summary_table
from alignlm.training.optim import SCHEDULES
from alignlm.training.sharding import STRATEGIES
from alignlm.training.stages import MODES
from alignlm.training.trainer import StageResult, Trainer, stage_done, summarize
from alignlm.training.zero import STAGES as ZERO_STAGES
from alignlm.training.zero import check_settings as check_zero_settings
from alignlm.training.zero import launcher_env as zero_launcher_env

PRECISIONS = ("auto", "no", "bf16", "fp16")


def _on(var: str) -> bool:
    return os.environ.get(var, "").lower() in ("1", "true", "yes")


def launch_strategy() -> tuple[str | None, dict[str, Any]]:
    """The strategy an ``accelerate launch`` config asks for through its environment (DeepSpeed ZeRO stage and
    offloading, or FSDP version 2) and its settings; ``(None, {})`` for a plain launch."""
    env = os.environ
    if _on("ACCELERATE_USE_DEEPSPEED"):
        knobs: dict[str, Any] = {}
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if config_file.lower() != "none":
            knobs["deepspeed_config"] = config_file
            stage = str((json.loads(Path(config_file).read_text()).get("zero_optimization") or {}).get("stage"))
        if stage not in ("2", "3"):
            raise ConfigError(
                f"the accelerate launch config asks for DeepSpeed ZeRO stage {stage}; alignlm runs stages 2 and 3 "
                "(configs/accelerate/zero2.yaml, zero3.yaml, zero3_offload.yaml)"
            )
        for key in ("optimizer", "param"):
            device = env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{key.upper()}_DEVICE", "none").lower()
            if device not in ("none", ""):
                knobs[f"offload_{key}"] = True
        return f"zero{stage}", knobs
    if _on("ACCELERATE_USE_FSDP"):
        if env.get("FSDP_VERSION", "1") != "2":
            raise ConfigError(
                "the accelerate launch config asks for FSDP version 1; alignlm shards with FSDP2: set fsdp_version: 2 "
                "(configs/accelerate/fsdp2.yaml)"
            )
        return "fsdp2", {"reshard_after_forward": env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"}
    return None, {}


# what accelerate would read to wrap the model itself; alignlm does the wrapping (training/sharding.py, zero.py)
_LAUNCH_SHARDING_VARS = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")


def resolve_strategy(cfg: DictConfig) -> None:
    """``distributed.strategy: auto`` becomes the launch config's strategy (else ddp); an explicit strategy must agree
    with the launch config. alignlm then wraps the model itself, so accelerate is kept from doing it too."""
    launched, knobs = launch_strategy()
    dist = cfg.distributed
    if dist.strategy == "auto":
        dist.strategy = launched or "ddp"
        for key, value in knobs.items():
            dist[key] = value
    elif launched is not None and launched != dist.strategy:
        raise ConfigError(
            f"the accelerate launch config asks for {launched}, distributed.strategy={dist.strategy}: leave "
            "distributed.strategy at auto (or launcher=auto) to follow the launch config, or launch with a plain one"
        )
    for var in _LAUNCH_SHARDING_VARS:
        os.environ.pop(var, None)
    if dist.strategy in ZERO_STAGES:
        check_zero_settings(dist.strategy, dist, str(cfg.mixed_precision))


def make_accelerator(cfg: DictConfig) -> Accelerator:
    """Accelerator with the configured precision; ``auto`` picks bf16 on a GPU that supports it."""
    mp = str(cfg.mixed_precision)
    if mp not in PRECISIONS:
        raise ConfigError(f"mixed_precision={mp!r} is not known; choose one of {list(PRECISIONS)}")
    # `accelerate launch --cpu` sets ACCELERATE_USE_CPU: then every rank runs on the CPU, even on a GPU machine.
    # cpu=True (also with no GPU at all) lets accelerate see torchrun's ranks as a gloo (MULTI_CPU) group.
    cpu = cpu_only()
    if mp == "auto":
        mp = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    # a collective that outwaits this (a dead or hung rank) raises on every rank still running, instead of hanging
    timeout = timedelta(seconds=float((cfg.get("distributed") or {}).get("timeout_s", 600)))
    return Accelerator(mixed_precision=mp, cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])


def ensure_offline_datasets(cfg: DictConfig) -> None:
    """Generate the offline sets the config names (digits, shapes) when their folder has no info.json, or was written
    with other generator knobs than ``offline_dataset_args`` asks for (e.g. ``{shapes: {som: true}}``)."""
    given = dict(cfg.get("offline_dataset_args") or {})
    for name in cfg.offline_datasets:
        if name not in GENERATORS:
            raise ConfigError(f"offline_datasets has {name!r}; available: {sorted(GENERATORS)}")
        out = Path(cfg.data_root) / name
        args = dict(given.get(name) or {})
        info = out / "info.json"
        knobs = json.loads(info.read_text()).get("knobs", {}) if info.exists() else None
        if knobs is None or any(knobs.get(k) != v for k, v in args.items()):
            if knobs is not None:
                get_logger("alignlm", 0).info(
                    "regenerating %s: it was written with knobs %s, the config asks for %s", out, knobs, args
                )
            GENERATORS[name](out, seed=int(cfg.seed), **args)


def run_prepare_steps(cfg: DictConfig) -> None:
    """Every ``stages.<name>.prepare`` step of the stages to run, in run order (null steps are off)."""
    for stage in cfg.run:
        for key, node in (cfg.stages[stage].get("prepare") or {}).items():
            if node is not None:
                instantiate(node, f"stages.{stage}.prepare.{key}", _convert_="all")


def check_config(cfg: DictConfig) -> None:
    """Config mistakes that would otherwise surface mid-run, each named with its key and the values allowed: unknown
    stage names, a bad resume mode, a run name that is not a plain folder name, numbers out of range."""
    for key in ("run", "offline_datasets"):
        if not OmegaConf.is_list(cfg.get(key, [])):
            raise ConfigError(f"{key}={cfg.get(key)!r} must be a list, e.g. {key}=[{cfg.get(key)}]")
    if not cfg.run:
        raise ConfigError(f"run=[] names no stage to run; stages: {list(cfg.stages)}")
    unknown = [s for s in cfg.run if s not in cfg.stages]
    if unknown:
        raise ConfigError(f"run lists stages {unknown} that are not configured; stages: {list(cfg.stages)}")
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
        _positive_int("stop_after_steps", cfg.stop_after_steps)
    dist = cfg.get("distributed") or {}
    if dist.get("strategy", "auto") not in ("auto", *STRATEGIES):
        raise ConfigError(
            f"distributed.strategy={dist.get('strategy')!r} is not known; choose one of {['auto', *STRATEGIES]}"
        )
    _number("distributed.timeout_s", dist.get("timeout_s", 600), 0.0, low_open=True)
    stop = dist.get("stop_signal")
    if stop is not None and not (isinstance(stop, str) and isinstance(getattr(signal, stop, None), signal.Signals)):
        raise ConfigError(f"distributed.stop_signal={stop!r} must be a signal name such as SIGUSR1, or null")
    for flag in ("resume_allow_changes", "distributed.offload_optimizer", "distributed.offload_param",
                 "distributed.reshard_after_forward"):  # fmt: skip
        _flag(flag, OmegaConf.select(cfg, flag, default=False))
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be a whole number >= 0")
    _positive_int("logging.every", (cfg.get("logging") or {}).get("every", 10))
    nonfinite = cfg.get("nonfinite") or {}
    _positive_int("nonfinite.window", nonfinite.get("window", 100))
    stop_after = nonfinite.get("stop_after", 5)
    if isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 0:
        raise ConfigError(f"nonfinite.stop_after={stop_after!r} must be a whole number >= 0 (0: never stop)")
    ecfg = cfg.get("eval") or {}
    for name in ("batch_size", "max_new_tokens"):
        if ecfg.get(name) is not None:
            _positive_int(f"eval.{name}", ecfg[name])
    if ecfg.get("limit") is not None:
        _positive_int("eval.limit", ecfg.limit)
    for i, s in enumerate(ecfg.get("sets") or []):
        if not (isinstance(s, DictConfig) and isinstance(s.get("name"), str) and isinstance(s.get("path"), str)):
            raise ConfigError(f"eval.sets[{i}]={s!r} must be {{name: ..., path: ...}}")
    for name in cfg.get("offline_datasets") or []:
        if name not in GENERATORS:
            raise ConfigError(f"offline_datasets has {name!r}; available: {sorted(GENERATORS)}")
    for name, args in (cfg.get("offline_dataset_args") or {}).items():
        if name not in GENERATORS:
            raise ConfigError(f"offline_dataset_args has {name!r}; the generators are {sorted(GENERATORS)}")
        unknown = [k for k in (args or {}) if k not in generator_knobs(name)]
        if unknown:
            raise ConfigError(f"offline_dataset_args.{name} has {unknown}; its knobs are {generator_knobs(name)}")
    _check_monitor(cfg.get("monitor") or {})
    if dist.get("strategy") in ZERO_STAGES and dist.get("deepspeed_config"):
        path = Path(str(dist.deepspeed_config))
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"distributed.deepspeed_config={str(path)!r} is not a readable JSON file: {e}") from None
    known, known_data = stage_keys()
    for stage in cfg.run:
        for where, keys, allowed in (
            (f"stages.{stage}", cfg.stages[stage], known),
            (f"stages.{stage}.data", cfg.stages[stage].get("data") or {}, known_data),
        ):
            for key in keys:
                if key not in allowed:
                    near = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                    hint = f"did you mean {near[0]!r}? " if near else ""
                    raise ConfigError(f"{where}.{key} is not a setting of a stage; {hint}known: {sorted(allowed)}")
    parts = (*AlignLM.PARTS, *((cfg.get("model") or {}).get("extras") or {}))
    for i, stage in enumerate(cfg.run):
        _check_stage(f"stages.{stage}", cfg.stages[stage])
        _check_stage_choices(f"stages.{stage}", cfg.stages[stage], parts)
        _check_init_from(cfg, stage, cfg.run[:i])


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and all(c.isalnum() or c in "._-" for c in name)


def _number(key: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if math.isfinite(high) else "")
        raise ConfigError(f"{key}={value!r} must be a finite number {bound}")


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a whole number >= 1")


def _check_stage(key: str, stage: DictConfig) -> None:
    """A stage's numbers, checked before anything is built (an ``inf`` learning rate never reaches step 1)."""
    for part, lr in (stage.get("lr") or {}).items():
        _number(f"{key}.lr.{part}", lr, 0.0, low_open=True)
    _number(f"{key}.weight_decay", stage.get("weight_decay", 0.0), 0.0)
    _number(f"{key}.max_grad_norm", stage.get("max_grad_norm", 1.0), 0.0)
    _number(f"{key}.warmup_ratio", stage.get("warmup_ratio", 0.0), 0.0, 1.0)
    for i, beta in enumerate(stage.get("betas") or (0.9, 0.999)):
        _number(f"{key}.betas[{i}]", beta, 0.0, 0.999999)
    if stage.get("fused_optimizer", "auto") not in ("auto", True, False):
        raise ConfigError(f"{key}.fused_optimizer={stage.fused_optimizer!r}: choose auto, true or false")
    _positive_int(f"{key}.per_device_batch_size", stage.per_device_batch_size)
    _positive_int(f"{key}.grad_accum", stage.grad_accum)
    if stage.get("max_steps") is not None:
        _positive_int(f"{key}.max_steps", stage.max_steps)
    else:
        _number(f"{key}.epochs", stage.get("epochs", 1), 0.0, low_open=True)
    for name in ("save_every", "keep_last"):
        value = stage.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key}.{name}={value!r} must be a whole number >= 0")


def _check_monitor(monitor: Any) -> None:
    """The in-training monitor's knobs, which it would otherwise read at its first measurement."""
    every = monitor.get("every", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"monitor.every={every!r} must be a whole number >= 0 (0: off)")
    if not every:
        return
    if not monitor.get("probe"):
        raise ConfigError("monitor.every > 0 needs monitor.probe: a caption file (image + caption records)")
    for name in ("n", "batch_size", "topk"):
        if monitor.get(name) is not None:
            _positive_int(f"monitor.{name}", monitor[name])
    for name in ("metrics", "layer_metrics"):
        unknown = [m for m in monitor.get(name) or [] if m not in ALL_METRICS]
        if unknown:
            raise ConfigError(f"monitor.{name} has unknown metrics {unknown}; choose from {list(ALL_METRICS)}")


def _flag(key: str, value: Any, also: tuple[Any, ...] = ()) -> None:
    """A switch is true or false (a string such as ``maybe`` would otherwise count as true)."""
    if not isinstance(value, bool) and value not in also:
        raise ConfigError(f"{key}={value!r}: choose one of {[*also, True, False]}")


def _check_stage_choices(key: str, stage: DictConfig, parts: tuple[str, ...]) -> None:
    """Names and switches of a stage, checked before the first stage trains (a typo in the second stage would
    otherwise surface after the first had trained)."""
    modes = stage.get("parts") or {}
    unknown = [p for p in modes if p not in parts]
    if unknown:
        raise ConfigError(f"{key}.parts has unknown parts {unknown}; this model's parts are {list(parts)}")
    for part in AlignLM.PARTS:
        if part in modes and modes[part] not in MODES:
            raise ConfigError(f"{key}.parts.{part}={modes[part]!r} is not known; choose one of {list(MODES)}")
    if modes.get("connector") == "lora":
        raise ConfigError(f"{key}.parts.connector=lora is not supported; train the connector fully")
    stray = [p for p in stage.get("lr") or {} if p not in (*parts, "objectives")]
    if stray:
        raise ConfigError(f"{key}.lr has learning rates for {stray}, which are not parts ({list(parts)}) or objectives")
    if stage.get("scheduler", "cosine") not in SCHEDULES:
        raise ConfigError(f"{key}.scheduler={stage.scheduler!r} is not known; choose one of {list(SCHEDULES)}")
    _flag(f"{key}.compile", stage.get("compile", False))
    checkpointing = stage.get("gradient_checkpointing", False)
    if not isinstance(checkpointing, bool):
        unknown = [p for p in checkpointing if p not in ("llm", "vision")] if OmegaConf.is_list(checkpointing) else None
        if unknown is None or unknown:
            raise ConfigError(
                f"{key}.gradient_checkpointing={checkpointing!r}: true, false, or a list of parts; checkpointing "
                f"applies to llm and vision, not {unknown if unknown else checkpointing!r}"
            )
    if "lora" in modes.values():
        lora = stage.get("lora") or {}
        _positive_int(f"{key}.lora.r", lora.get("r", 16))
        _number(f"{key}.lora.alpha", lora.get("alpha", 32), 0.0, low_open=True)
        _number(f"{key}.lora.dropout", lora.get("dropout", 0.05), 0.0, 0.999)
    data = stage.get("data") or {}
    if data.get("template", "vicuna_v1") not in TEMPLATES:
        raise ConfigError(f"{key}.data.template={data.template!r} is not known; choose one of {sorted(TEMPLATES)}")
    if data.get("on_error", "skip") not in ON_ERROR:
        raise ConfigError(f"{key}.data.on_error={data.on_error!r} is not known; choose one of {list(ON_ERROR)}")
    _number(f"{key}.data.min_usable_fraction", data.get("min_usable_fraction", 0.5), 0.0, 1.0)
    _positive_int(f"{key}.data.max_length", data.get("max_length", 2048))
    _flag(f"{key}.data.packing", data.get("packing", "auto"), ("auto",))
    for name in ("group_by_length", "preference"):
        _flag(f"{key}.data.{name}", data.get(name, False))


def _check_init_from(cfg: DictConfig, stage: str, before: list[str]) -> None:
    """``init_from`` names a stage run before this one (or whose ``final/`` this run already has), or a folder."""
    init = cfg.stages[stage].get("init_from")
    if not init:
        return
    if init in cfg.stages:
        if init not in before and not (Path(cfg.output_dir) / str(cfg.run_name) / init / "final").exists():
            raise ConfigError(
                f"stages.{stage}.init_from={init!r}: that stage is not run before {stage!r} in run={list(cfg.run)}, "
                f"and {Path(cfg.output_dir) / str(cfg.run_name) / init / 'final'} does not exist yet"
            )
    elif not Path(str(init)).exists():
        raise ConfigError(f"stages.{stage}.init_from={init!r} is neither a stage of this config nor a folder")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage of ``cfg.run`` in order, then evaluate the last stage's ``final/``."""
    check_config(cfg)
    resolve_strategy(cfg)
    try:
        with deterministic(cfg.get("deterministic", False)):  # before anything touches the GPU
            # the accelerator first: with DeepSpeed's LOCAL_RANK already set, a process started without a launcher
            # would wait for a launcher's rendezvous (MASTER_ADDR) instead of training as one rank
            acc = make_accelerator(cfg)
            with zero_launcher_env(cfg.distributed.strategy in ZERO_STAGES, cpu_only()):
                return _run(cfg, acc)
    finally:
        # DeepSpeed's communication threads can abort a process that exits with its group alive; a one-rank group
        # (no launcher) is kept: DeepSpeed caches it, and a later run in this process reuses it
        dist = torch.distributed
        if cfg.distributed.strategy in ZERO_STAGES and dist.is_initialized() and dist.get_world_size() > 1:
            dist.destroy_process_group()


def _run(cfg: DictConfig, acc: Accelerator) -> dict[str, Any]:
    log = get_logger("alignlm", acc.process_index)
    if acc.is_main_process:
        ensure_offline_datasets(cfg)
        run_prepare_steps(cfg)
    acc.wait_for_everyone()
    run_dir = Path(cfg.output_dir) / cfg.run_name
    summary: dict[str, Any] = {"run": str(run_dir), "stages": {}, "eval": {}}
    earlier = _earlier_stage_summaries(run_dir)
    final = None
    for name in cfg.run:
        final = run_dir / name / "final"
        if stage_done(cfg, name):
            log.info("stage %s already finished at %s; skipping (resume=never retrains)", name, final)
            if name in earlier:
                summary["stages"][name] = earlier[name]
            continue
        result: StageResult = Trainer(cfg, name, acc).fit()
        log.info("\n%s", summarize(result))
        summary["stages"][name] = {
            "steps": result.steps,
            "first_loss": result.first_loss,
            "last_loss": result.last_loss,
            "seconds": result.seconds,
            "samples_per_s": result.samples_per_s,
            "tokens_per_s": result.tokens_per_s,
            "tflops": result.tflops,
            "mfu": result.mfu,
            "peak_memory_gib": result.peak_memory_gib,
            "skipped": result.skipped,
            "data": result.data,
            "nonfinite_steps": result.nonfinite_steps,
            "world_size": result.world_size,
        }
    if cfg.eval.sets and final is not None and acc.is_main_process:
        with warn_only():  # the weights are saved: an op without a deterministic kernel (top-p) must not stop it now
            summary["eval"] = evaluate_final(cfg, final, acc.device)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps(json_values(summary), indent=2, allow_nan=False))
        log.info("\n%s", pipeline_table(summary))
    acc.wait_for_everyone()
    return summary


def _earlier_stage_summaries(run_dir: Path) -> dict[str, Any]:
    """Stage figures of an earlier run of this pipeline, so that a rerun which skips finished stages keeps them."""
    path = run_dir / "summary.json"
    return json.loads(path.read_text())["stages"] if path.exists() else {}


def evaluate_final(cfg: DictConfig, final: Path, device: torch.device) -> dict[str, Any]:
    """Answer accuracy of this run's ``final/`` checkpoint on every ``eval.sets`` entry (the model built from the run's
    own config, not the copy on disk)."""
    model = build_model(cfg.model)
    load_final_weights(model, final)
    model = model.eval().to(device)
    data_cfg = OmegaConf.to_container(cfg.stages[cfg.run[-1]].data, resolve=True)
    out = {}
    for s in cfg.eval.sets:
        out[s.name] = answer_accuracy(
            model,
            s.name,
            s.path,
            data_cfg,
            int(cfg.eval.batch_size),
            int(cfg.eval.max_new_tokens),
            cfg.eval.limit,
            OmegaConf.to_container(cfg.eval.generation),
        )
    return out


def pipeline_table(summary: dict[str, Any]) -> str:
    """Loss per stage and held-out accuracy next to chance, the figures a user checks first."""
    rows: dict[str, Any] = {}
    for name, s in summary["stages"].items():
        rows[f"{name} loss"] = (
            f"{s['first_loss']:.3f} -> {s['last_loss']:.3f}  ({s['steps']} steps, {s['seconds']:.0f} s)"
        )
    for name, e in summary["eval"].items():
        rows[f"{name} accuracy"] = f"{100 * e['accuracy']:.1f} %  (chance {100 * e['chance']:.1f} %, n={e['n']})"
    return summary_table(f"alignlm run {summary['run']}", rows)
