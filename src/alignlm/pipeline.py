"""The whole recipe in one command: offline data and every stage's prepare steps if needed, each stage in ``cfg.run``,
then evaluation.

``alignlm train +exp=demo`` and ``accelerate launch train.py +exp=demo`` both land in ``run``. A stage's ``prepare``
node names the steps that make its inputs (name -> node with ``_target_``: fit an encoder, write a labels file,
embed captions); each step is a function that does nothing when its output exists, so a rerun goes straight to
training. They run on the main process, stage by stage in run order, before any training, while the other ranks
wait for them (``distributed.prepare_timeout_s``); after the last stage the other ranks end and the main process
evaluates alone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list
from omegaconf import DictConfig, OmegaConf

from alignlm.checks import (
    check_config,
    check_eval_sets,
    check_source_files,
    check_sources,
    check_stage_batches,
    check_stages_fit_model,
    idle_overrides,
    override_warnings,
    prompt_changes,
)
from alignlm.config import ConfigError, instantiate, overridden_keys
from alignlm.data import (
    GENERATORS,
    differences_said,
    offline_set_differences,
    offline_sets,
    offline_settings,
    read_info,
    split_neutral_knobs,
)
from alignlm.data.synthetic import readers_lock
from alignlm.evaluation.evaluate import answer_accuracy
from alignlm.files import LockHeld, release_lock, replace_text, sole_writer, take_lock, take_shared_lock
from alignlm.models.build import build_model
from alignlm.models.device import cpu_only
from alignlm.models.io import load_final_weights
from alignlm.training import checkpoint as ckpt
from alignlm.training.agreement import KINDS, agreed
from alignlm.training.determinism import deterministic, warn_only
from alignlm.training.logging import get_logger, json_values, summary_table
from alignlm.training.trainer import (
    STOP_WHY,
    StageResult,
    StopRequest,
    StopTraining,
    Trainer,
    check_monitor_strategy,
    damaged_final,
    stage_done,
    summarize,
)
from alignlm.training.zero import STAGES as ZERO_STAGES
from alignlm.training.zero import check_settings as check_zero_settings
from alignlm.training.zero import launcher_env as zero_launcher_env
from alignlm.training.zero import owned_by_alignlm

PRECISIONS = ("auto", "no", "bf16", "fp16")
STAGE_SUMMARY = "summary.json"  # a stage's figures in its own folder; the run's summary.json gathers them


# an accelerate launch config's DeepSpeed settings that alignlm sets itself (zero.OWNED), as accelerate passes them on
_LAUNCH_OWNED = {
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "gradient_accumulation_steps",
    "ACCELERATE_GRADIENT_CLIPPING": "gradient_clipping",
}
_OFFLOADS = ("offload_optimizer", "offload_param")
# an accelerate launch config's FSDP switches that would change memory or compute, with what alignlm offers instead:
# they had been dropped without a word (the run used the memory the user had configured away)
_FSDP_REFUSED = {
    "FSDP_OFFLOAD_PARAMS": (
        "fsdp_offload_params",
        "offload with DeepSpeed instead (configs/accelerate/zero3_offload.yaml)",
    ),
    "FSDP_ACTIVATION_CHECKPOINTING": (
        "fsdp_activation_checkpointing",
        "checkpoint by part instead (stages.<stage>.gradient_checkpointing=true, or a list such as [llm])",
    ),
    "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": (
        "fsdp_activation_checkpointing_offload",
        "checkpoint by part instead (stages.<stage>.gradient_checkpointing=true)",
    ),
}


def _on(var: str) -> bool:
    return os.environ.get(var, "").lower() in ("1", "true", "yes")


def launch_strategy() -> tuple[str | None, dict[str, Any]]:
    """The strategy an ``accelerate launch`` config asks for through its environment (DeepSpeed ZeRO stage and
    offloading, or FSDP version 2) and its settings; ``(None, {})`` for a plain launch. What alignlm cannot take from
    it (accumulation, clipping, an offload device other than the CPU) is refused, not dropped."""
    env = os.environ
    if _on("ACCELERATE_USE_DEEPSPEED"):
        given = {key: env[var] for var, key in _LAUNCH_OWNED.items() if var in env}
        if given:
            raise ConfigError(
                f"the accelerate launch config's deepspeed_config sets {owned_by_alignlm(given)}: remove "
                f"{', '.join(f'{k}: {v}' for k, v in given.items())} there"
            )
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
        if _on("ACCELERATE_DEEPSPEED_ZERO3_INIT"):
            raise ConfigError(
                "the accelerate launch config's deepspeed_config sets zero3_init_flag: true; alignlm builds the model "
                "whole on each rank and partitions it when the stage starts (training/zero.py), so nothing would build "
                "it partitioned: set zero3_init_flag: false"
            )
        for key in _OFFLOADS:
            device = env.get(f"ACCELERATE_DEEPSPEED_{key.upper()}_DEVICE")
            if device is None:  # not in the launch config (a DeepSpeed JSON of its own may offload)
                continue
            if device.lower() not in ("none", "", "cpu"):
                raise ConfigError(
                    f"the accelerate launch config's deepspeed_config has {key}_device: {device}; alignlm offloads "
                    "to the CPU only: use cpu or none"
                )
            knobs[key] = device.lower() == "cpu"
        return f"zero{stage}", knobs
    if _on("ACCELERATE_USE_FSDP"):
        if env.get("FSDP_VERSION", "1") != "2":
            raise ConfigError(
                "the accelerate launch config asks for FSDP version 1; alignlm shards with FSDP2: set fsdp_version: 2 "
                "(configs/accelerate/fsdp2.yaml)"
            )
        for var, (field, instead) in _FSDP_REFUSED.items():
            if _on(var):
                raise ConfigError(
                    f"the accelerate launch config's fsdp_config sets {field}: true, which alignlm's FSDP2 does not do "
                    f"(it shards the model itself: training/sharding.py): set it to false, and {instead}"
                )
        return "fsdp2", {"reshard_after_forward": env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"}
    return None, {}


# what accelerate would read to wrap the model itself; alignlm does the wrapping (training/sharding.py, zero.py)
_LAUNCH_SHARDING_VARS = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")


def resolve_strategy(cfg: DictConfig) -> None:
    """``distributed.strategy: auto`` becomes the launch config's strategy (else ddp), with its settings; an explicit
    strategy and its settings must agree with the launch config. alignlm then wraps the model itself, so accelerate is
    kept from doing it too. What the strategy rules out is refused here, before anything runs: the in-training
    monitor under a sharded one (:func:`check_monitor_strategy`), DeepSpeed's settings under another."""
    launched, knobs = launch_strategy()
    dist = cfg.distributed
    asked = dist.strategy
    if dist.strategy == "auto":
        dist.strategy = launched or "ddp"
        named = overridden_keys(cfg)
        for key, value in knobs.items():  # an offload the alignlm config turns on stays on
            if key not in _OFFLOADS and f"distributed.{key}" in named and dist[key] != value:
                raise ConfigError(  # the launch config's had replaced the command line's without a word
                    f"the accelerate launch config asks for {launched} with {key}={value}; this run's command line "
                    f"has distributed.{key}={dist[key]}: make them agree"
                )
            dist[key] = value or (key in _OFFLOADS and dist[key])
    elif launched is not None:
        ours = {key: dist.get(key) for key, value in knobs.items() if dist.get(key) != value}
        if launched != dist.strategy or ours:
            theirs = "".join(f", {key}={knobs[key]}" for key in ours)
            raise ConfigError(
                f"the accelerate launch config asks for {launched}{theirs}; this run has distributed.strategy="
                f"{dist.strategy}{''.join(f', distributed.{key}={value}' for key, value in ours.items())}: leave "
                "distributed.strategy at auto (or launcher=auto) to follow the launch config, make them agree, or launch "
                "with a plain one"
            )
    for var in _LAUNCH_SHARDING_VARS:
        os.environ.pop(var, None)
    check_monitor_strategy(str(dist.strategy), int((cfg.get("monitor") or {}).get("every", 0)))
    if dist.strategy in ZERO_STAGES:
        check_zero_settings(dist.strategy, dist, str(cfg.mixed_precision))
    else:
        check_no_offload(dist, asked)


def check_no_offload(dist: DictConfig, asked: str) -> None:
    """Offloading to the CPU and a DeepSpeed JSON are DeepSpeed's (``zero.deepspeed_config``): under ddp or fsdp2 they
    were read by nothing, while the stage's start-up line said the offloads were on. ``asked``: the strategy before
    ``auto`` was resolved."""
    how = f"distributed.strategy={asked}" + (
        f" (here {dist.strategy}: no DeepSpeed launch config)" if asked == "auto" else ""
    )
    if dist.get("deepspeed_config"):
        raise ConfigError(
            f"distributed.deepspeed_config={dist.deepspeed_config} is read under DeepSpeed only, which {how} does not "
            "run: set it to null, or distributed.strategy=zero2 or zero3"
        )
    on = [key for key in _OFFLOADS if dist.get(key)]
    if on:
        needs = "zero3" if on[0] == "offload_param" else "zero2 or zero3"
        raise ConfigError(
            f"distributed.{on[0]}=true offloads under DeepSpeed only, which {how} does not run: set it to false, or "
            f"distributed.strategy={needs} (launcher=zero3_offload offloads both)"
        )


def resolve_precision(cfg: DictConfig) -> None:
    """``mixed_precision: auto`` becomes the precision an accelerate launch config asks for (its ``mixed_precision``
    or ``--mixed_precision``, passed on as ACCELERATE_MIXED_PRECISION) when it asks for bf16 or fp16, and an explicit
    precision that differs from such a request is refused, as a contradicting strategy is. A launch saying ``no`` asks
    for nothing: plain ``accelerate launch`` says it whenever neither a config file nor a flag set one, and a user's
    ``accelerate launch train.py`` must still get bf16 on a GPU that has it (set ``mixed_precision=no`` for fp32).
    fp16 is refused on the CPU, where accelerate's autocast does nothing for it (a LoRA stage crashed on its fp16
    frozen weights, after the stages before it had trained)."""
    mp = str(cfg.mixed_precision)
    if mp not in PRECISIONS:
        raise ConfigError(f"mixed_precision={mp!r} is not known; choose one of {list(PRECISIONS)}")
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if launched not in ("", "no", mp):
        if launched not in PRECISIONS:
            raise ConfigError(
                f"the accelerate launch config asks for mixed_precision {launched}; alignlm trains with one of "
                f"{list(PRECISIONS[1:])}: set one of them there"
            )
        if mp != "auto":
            raise ConfigError(
                f"the accelerate launch config asks for mixed_precision {launched}, this run has mixed_precision="
                f"{mp}: leave mixed_precision at auto to follow the launch config, or launch with the same one"
            )
        cfg.mixed_precision = launched
    if cfg.mixed_precision == "fp16" and cpu_only():
        source = " (from the accelerate launch config)" if mp == "auto" else ""
        raise ConfigError(
            f"mixed_precision=fp16{source} does not train on the CPU (autocast does nothing for fp16 there): choose "
            f"one of {[p for p in PRECISIONS if p != 'fp16']}"
        )


def make_accelerator(cfg: DictConfig) -> Accelerator:
    """Accelerator with the configured precision (see :func:`resolve_precision`); ``auto`` picks bf16 on a GPU that
    supports it."""
    resolve_precision(cfg)
    mp = str(cfg.mixed_precision)
    # `accelerate launch --cpu` sets ACCELERATE_USE_CPU: then every rank runs on the CPU, even on a GPU machine.
    # cpu=True (also with no GPU at all) lets accelerate see torchrun's ranks as a gloo (MULTI_CPU) group.
    cpu = cpu_only()
    if mp == "auto":
        mp = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    # a collective that outwaits this (a dead or hung rank) raises on every rank still running, instead of hanging
    timeout = timedelta(seconds=float((cfg.get("distributed") or {}).get("timeout_s", 600)))
    rejoin_process_group(timeout, prepare_timeout(cfg))
    return Accelerator(mixed_precision=mp, cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])


def ensure_offline_datasets(cfg: DictConfig, readers: contextlib.ExitStack | None = None) -> None:
    """Generate the offline sets the config names (digits, shapes) when their folder has no info.json, or was written
    with another seed or other generator knobs than the defaults with ``offline_dataset_args`` over them (e.g.
    ``{shapes: {som: true}}``, or back to the defaults after it).

    With ``readers`` (the run's), each set is held as read until that stack closes: a run of another seed started
    meanwhile on the same ``data_root`` is refused where it would write the set again (``DatasetWriter``). It had
    rewritten the images and test questions under the first run, which trained and was scored on a mix, exit 0."""
    for name in cfg.offline_datasets:
        if name not in GENERATORS:
            raise ConfigError(f"offline_datasets has {name!r}; available: {sorted(GENERATORS)}")
    for name, (out, wanted) in offline_sets(offline_settings(cfg)).items():
        info = out / "info.json"
        # runs started together (a job array) find the set the first one writes: they had written it all at once
        with sole_writer(info, f"generating {out}"):
            held = read_info(info) if info.exists() else None
            if isinstance(held, str):  # what it was written with cannot be told
                if stages := trained_on(cfg, out):
                    raise ConfigError(
                        f"{info} cannot be read ({held}), so what {out} was written with cannot be told, and stages "
                        f"{stages} of this run trained on it: delete {info} to have the set written again with this "
                        "config's settings, or start afresh: resume=never sets the run aside, or give another run_name"
                    )
                get_logger("alignlm", 0).warning("regenerating %s: its info.json cannot be read (%s)", out, held)
                info.unlink()
                held = None
            differs = offline_set_differences(held, wanted) if held is not None else None
            # a knob that only adds files (shapes' som) rewrites nothing a stage read: +exp=demo after +exp=som
            if differs and set(differs) - split_neutral_knobs(name) and (stages := trained_on(cfg, out)):
                written, asked = differences_said(differs)
                seed = " (offline_dataset_seed=null draws with the run's seed, as runs did before that knob)"
                raise ConfigError(
                    f"{out} holds the set that stages {stages} of this run trained on, written with {written}; this "
                    f"config asks for {asked}, and writing it again would change what they trained on. Keep their "
                    f"settings{seed if 'seed' in differs else ''}, or start afresh: resume=never sets the run aside, "
                    "or give another run_name"
                )
            if differs:
                get_logger("alignlm", 0).warning(
                    "regenerating %s: it was written with %s, the config asks for %s", out, *differences_said(differs)
                )
            if differs or not info.exists():  # the generator's defaults with the config's knobs over them, and the seed
                GENERATORS[name](out, **wanted)
            # held before the writer's lock is let go: a run waiting on it would otherwise find no reader, and write
            # the set again under this one
            fd = take_shared_lock(readers_lock(out), f"a run writing {out} again") if readers is not None else None
            if fd is not None:
                readers.callback(release_lock, fd)


def trained_on(cfg: DictConfig, folder: Path) -> list[str]:
    """The stages of this run to resume or skip that have trained (a ``final/`` or a step checkpoint) on data inside
    ``folder``: an offline set written again under them had been lost before the rerun was refused for its changed
    files, and the other checkpoints that read it with it."""
    run_dir, root = Path(str(cfg.get("output_dir", "outputs"))) / str(cfg.get("run_name", "")), folder.resolve()
    names = []
    for name in cfg.get("run") or []:
        stage_dir = run_dir / str(name)
        if not ((stage_dir / "final").is_dir() or any((stage_dir / "checkpoints").glob("step_*"))):
            continue
        sources = ((cfg.stages[name].get("data") or {}).get("sources")) or []
        paths = [p for s in sources for p in (s.get("path"), s.get("image_root")) if p]
        if any(Path(str(p)).resolve().is_relative_to(root) for p in paths):
            names.append(str(name))
    return names


def run_prepare_steps(cfg: DictConfig) -> None:
    """Every ``stages.<name>.prepare`` step of the stages to run, in run order (null steps are off)."""
    for stage in cfg.run:
        for key, node in (cfg.stages[stage].get("prepare") or {}).items():
            if node is not None:
                instantiate(node, f"stages.{stage}.prepare.{key}", _convert_="all")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage of ``cfg.run`` in order, then evaluate the last stage's ``final/``. Another ``run`` may follow
    in the same process (a sweep script, a notebook), with other settings: :func:`accelerate_state_of_this_run`. The
    stop signal asks for a clean stop from here to the end (``StopRequest``), and the run's folder is locked against
    a second run of the same name (:func:`run_lock`)."""
    check_config(cfg)
    check_sources(cfg)
    resolve_precision(cfg)  # before the strategy's checks, which depend on it
    resolve_strategy(cfg)
    with accelerate_state_of_this_run(), StopRequest(cfg.get("distributed") or {}).handling() as stop:
        try:
            with deterministic(cfg.get("deterministic", False)):  # before anything touches the GPU
                # the accelerator first: with DeepSpeed's LOCAL_RANK already set, a process started without a launcher
                # would wait for a launcher's rendezvous (MASTER_ADDR) instead of training as one rank
                acc = make_accelerator(cfg)
                with (
                    run_lock(Path(cfg.output_dir), str(cfg.run_name), acc),
                    zero_launcher_env(cfg.distributed.strategy in ZERO_STAGES, cpu_only()),
                    contextlib.ExitStack() as readers,
                ):
                    return _run(cfg, acc, stop, readers)
        finally:
            # DeepSpeed's communication threads can abort a process that exits with its group alive; a one-rank group
            # (no launcher) is kept: DeepSpeed caches it, and a later run in this process reuses it
            dist = torch.distributed
            if cfg.distributed.strategy in ZERO_STAGES and dist.is_initialized() and dist.get_world_size() > 1:
                end_process_group()


# the backend of every process group of several ranks that a run in this process ended, in order
_ENDED_GROUPS: list[str] = []


def end_process_group() -> None:
    """Destroy the default process group, remembering its backend for a later run's :func:`rejoin_process_group`."""
    _ENDED_GROUPS.append(str(torch.distributed.get_backend()))
    torch.distributed.destroy_process_group()


def rejoin_process_group(timeout: timedelta, wait: timedelta) -> None:
    """A run after one that ended its process group in this process (:func:`end_process_group`: a sweep script under
    torchrun) joins a new one of the same ranks and backend, its keys under a prefix of their own in the launcher's
    store: torch names the new group as the ended one, whose keys torchrun's store still held, and the ranks hung in
    their first collective. ``timeout``: the group's (``distributed.timeout_s``); ``wait``: how long a rank waits for
    the others to join (``distributed.prepare_timeout_s``), as the main process may still be evaluating the last
    run."""
    if not _ENDED_GROUPS or torch.distributed.is_initialized():
        return
    store, rank, world = next(torch.distributed.rendezvous("env://", timeout=wait))
    store = torch.distributed.PrefixStore(f"alignlm-run{len(_ENDED_GROUPS)}", store)
    torch.distributed.init_process_group(_ENDED_GROUPS[-1], store=store, rank=rank, world_size=world, timeout=timeout)


@contextlib.contextmanager
def accelerate_state_of_this_run() -> Iterator[None]:
    """accelerate's process-wide state (precision, device, process group, accumulation) made during the run is reset
    at its end, whether it finished or raised, and so is any that names a process group the run destroyed (the other
    ranks leave it before the evaluation, DeepSpeed's is ended): a second ``run`` in the process failed, with
    "AcceleratorState has already been initialized and cannot be changed" for another ``mixed_precision``, or under
    torchrun with "Default process group has not been initialized" (reset, accelerate takes the new group that
    :func:`rejoin_process_group` makes). State made before the run (a caller's own ``Accelerator`` or
    ``PartialState``) is the caller's, and stays while its process group does."""
    made = {state: not state._shared_state for state in (PartialState, AcceleratorState, GradientState)}
    try:
        yield
    finally:
        shared = PartialState._shared_state
        group_gone = shared.get("num_processes", 1) > 1 and not torch.distributed.is_initialized()
        if made[AcceleratorState] or group_gone:
            AcceleratorState._reset_state(reset_partial_state=made[PartialState] or group_gone)
        if made[GradientState] or group_gone:
            GradientState._reset_state()


def prepare_timeout(cfg: DictConfig) -> timedelta:
    """``distributed.prepare_timeout_s`` (checked by ``check_config``): how long the other ranks wait for the main
    process's set-up work."""
    return timedelta(seconds=float((cfg.get("distributed") or {}).get("prepare_timeout_s", 86400)))


@contextlib.contextmanager
def others_wait_for_main(acc: Accelerator, timeout: timedelta) -> Iterator[None]:
    """The main process's set-up work (offline sets, prepare steps: minutes to hours) runs inside; the other ranks wait
    at its end in a gloo group of their own whose collectives time out after ``timeout``. The run's process group
    times out after ``distributed.timeout_s`` (600 s), which a long prepare step outlasted: every rerun failed there
    again. A rank that dies still ends the job: its peers lose the connection, and the launcher ends the rest."""
    if acc.num_processes == 1:
        yield
        return
    group = torch.distributed.new_group(backend="gloo", timeout=timeout)  # every rank, before the main one starts
    try:
        yield
        torch.distributed.barrier(group=group)
    finally:
        torch.distributed.destroy_process_group(group)


def leave_process_group(acc: Accelerator) -> None:
    """After the last stage only the main process has work left (the evaluation): the other ranks end instead of
    waiting for it in a barrier that times out after ``distributed.timeout_s``. Every rank leaves the process group
    first, once all have arrived, so no communicator outlives its peers. The launcher waits for every rank, and a
    failure of the main process still fails the job."""
    if acc.num_processes > 1 and torch.distributed.is_initialized():
        acc.wait_for_everyone()
        end_process_group()


def run_lock_file(output_dir: Path, run_name: str) -> Path:
    """The lock of the run ``output_dir/run_name``: beside its folder, not in it, so that a run refused before its
    first stage trains still leaves no folder behind."""
    return output_dir / f".{run_name}.lock"


def lock_run(output_dir: Path, run_name: str) -> int | None:
    """Lock the run ``output_dir/run_name`` for this process (:func:`~alignlm.files.take_lock` on
    :func:`run_lock_file`) and return the lock file's descriptor, to close at the run's end (:func:`unlock_run`).
    Refused with a ``ConfigError`` naming the holder while another process holds it; None, with a warning, on a
    filesystem that cannot lock."""
    output_dir.mkdir(parents=True, exist_ok=True)
    # where the run writes (its folder, or the one it is made in): every checkpoint and log would fail there, after
    # the set-up's minutes or hours (offline sets, prepare steps, the model)
    writes = output_dir / run_name if (output_dir / run_name).is_dir() else output_dir
    if not os.access(writes, os.W_OK):
        raise OSError(
            errno.EACCES,
            "cannot be written (a read-only file system, or no write permission): no checkpoint or log could be saved",
            str(writes),
        )
    try:
        return take_lock(run_lock_file(output_dir, run_name), "a second run of this run_name")
    except LockHeld as e:
        raise ConfigError(
            f"run_name={run_name} in output_dir={output_dir} is in use by another alignlm run ({e.holder}), which holds "
            f"{e.path}: two runs of one name write into each other's checkpoints and logs. Wait for it to end (a "
            "requeued job: end the old one first), or choose another run_name"
        ) from None


def unlock_run(fd: int) -> None:
    """Let go of a run's lock (:func:`lock_run`'s descriptor)."""
    release_lock(fd)


@contextlib.contextmanager
def run_lock(output_dir: Path, run_name: str, acc: Accelerator) -> Iterator[None]:
    """The run is locked for its lifetime by its main process (global rank 0: one lock per run, also when the ranks
    of several nodes share the folder), so a second run of the same ``output_dir``/``run_name`` (a requeued job
    overlapping the old one, a second launch by hand) is refused before it writes anything: both had trained into the
    same folder, steps logged twice, each deleting the other's checkpoint being written. Every rank learns the
    refusal and raises it, instead of waiting for a main process that has gone."""
    fd, refused = None, None  # (its kind in agreement.KINDS, the message)
    if acc.is_main_process:
        try:
            fd = lock_run(output_dir, run_name)
        except ConfigError as e:
            refused = ("config", str(e))
        except OSError as e:  # every rank learns it, not only this one (the others would wait for a lost main process)
            said = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
            refused = ("file", f"the lock of run_name={run_name} cannot be taken in output_dir={output_dir}: {said}")
    if acc.num_processes > 1:
        refused = broadcast_object_list([refused])[0]
    if refused is not None:  # a full disk or a read-only folder is no config mistake: exit status 1, not 2
        raise KINDS[refused[0]](refused[1])
    try:
        yield
    finally:
        if fd is not None:
            unlock_run(fd)


def set_aside_earlier_runs(cfg: DictConfig, run_dir: Path) -> None:
    """``resume=never``: every stage of ``cfg.run`` starts over, so each one's earlier outputs move aside before any
    trains (:func:`checkpoint.set_aside`). Stage by stage as each began, an interrupted new run left a later stage's
    old ``final/`` in place, which a rerun with ``resume=auto`` took for that stage finished."""
    folder = ckpt.set_aside_name(run_dir / name for name in cfg.run)
    for name in cfg.run:
        aside = ckpt.set_aside(run_dir / name, folder)
        if aside is not None:
            get_logger("alignlm", 0).warning(
                "resume=never: the earlier run's outputs of stage %s moved to %s", name, aside
            )


def warn_other_model(cfg: DictConfig, stages: list[str], log: Any) -> None:
    """A stage whose ``init_from`` is a ``final/`` of another model config (another tower layer, seed or tower of the
    same width) loads its weights all the same: a warning names the settings that differ
    (:func:`checkpoint.model_changes`). One this run trains first has this run's config, and is not there yet."""
    run_dir = Path(cfg.output_dir) / cfg.run_name
    for name in stages:
        if cfg.stages[name].get("init_from") in stages:  # trained again first: it will have this run's config
            continue
        init = ckpt.resolve_init(cfg.stages[name].get("init_from"), run_dir, cfg.stages)
        changes = ckpt.model_changes(init, cfg.model) if init is not None and init.is_dir() else []
        if changes:
            log.warning(
                "stages.%s.init_from=%s was trained with other model settings, %s; its weights load onto this run's "
                "model as they are (deliberate for an upcycled connector or a swapped part; otherwise set the same "
                "model settings)",
                name,
                init,
                "; ".join(changes),
            )


def check_finished_stages(cfg: DictConfig, acc: Accelerator, log: Any, settings_only: bool = False) -> None:
    """``resume=auto`` skips a stage whose ``final/`` exists: refuse, before anything trains, every such stage of
    ``cfg.run`` trained from other settings, model settings, file contents or starting weights than this run's
    (:func:`checkpoint.finished_changes`), naming each change; a changed lr, a regenerated labels file or pairs file,
    an earlier stage retrained since a later one trained from it, had been skipped over without a word, the old
    weights passed on to the next stages and the evaluation. A path spelled otherwise (relative, absolute) is no
    change. With
    ``resume_allow_changes=true`` such a stage is kept as it is, with a warning naming the changes. Every rank compares
    its own view of the files (a node's copy of the data or the starting weights may differ), and the caller makes the
    ranks agree (:func:`~alignlm.training.agreement.agreed`): a rank that alone refused had left the others waiting.
    ``settings_only`` (before the offline sets and prepare steps): the settings alone, so that a changed setting is
    refused before a prepare step spends its hours (scoring 558k caption pairs) for a run that cannot go on. A
    path whose file is not there yet (an offline set or a prepare step's output to be written) is left to the full
    check: two spellings of it cannot be told the same before it exists."""
    if cfg.resume == "never" or (settings_only and cfg.get("resume_allow_changes")):
        return
    run_dir = Path(cfg.output_dir) / cfg.run_name
    refused = []
    for name in (n for n in cfg.run if stage_done(cfg, n)):
        final = run_dir / name / "final"
        stage = OmegaConf.to_container(cfg.stages[name], resolve=True)
        # the start a skipped stage would follow: an earlier stage's final/ as this run leaves it (none there: one
        # this run trains anew, which the finished stage never saw)
        init = ckpt.resolve_init(stage.get("init_from"), run_dir, cfg.stages)
        files = {} if settings_only else ckpt.input_files(stage, name)
        ours = ckpt.trained_from(stage, name, int(cfg.seed), str(acc.mixed_precision), acc.num_processes, files, init)
        changes = ckpt.finished_changes(final, ours, cfg.model, settings_only)
        if changes is None and settings_only:
            continue
        if changes is None:
            log.warning(
                "stage %s: %s was written before finished stages recorded what they were trained from "
                "(%s); its settings and files cannot be compared with this run's, and it is kept as finished "
                "(resume=never retrains every stage)",
                name,
                final,
                ckpt.TRAINED_FROM,
            )
        elif changes and cfg.get("resume_allow_changes"):
            log.warning(
                "stage %s: keeping %s, trained from other settings, files or starting weights than this run's, as "
                "finished (resume_allow_changes=true): %s",
                name,
                final,
                "; ".join(changes),
            )
        elif changes:
            refused.append(f"stage {name} ({final}): {'; '.join(changes)}")
    if refused:
        raise ConfigError(
            "finished stages were trained from other settings, files or starting weights than this run's, and "
            f"resume=auto would keep their weights: {' | '.join(refused)}. Give another run_name to train this config "
            "as a run of its own, set resume=never to retrain every stage (earlier outputs are set aside in "
            "<stage>/before-<time>/, not deleted), or resume_allow_changes=true to keep the finished stages as they are"
        )


def finished_stage_figures(stage_file: Path, name: str, log: Any) -> dict[str, Any] | None:
    """A skipped stage's figures, from the ``summary.json`` it wrote beside its ``final/``; None, with a warning
    naming the file, where it is missing or cannot be read (a 0-byte one left by a full disk or a kill before it was
    written whole ended every rerun with a ``JSONDecodeError`` naming no file): the stage's ``final/`` is whole, the
    rerun goes on, and only the run's ``summary.json`` lacks the stage."""
    try:
        figures = json.loads(stage_file.read_text())
    except FileNotFoundError:
        problem = "is missing"
    except (OSError, ValueError) as e:
        problem = f"could not be read ({type(e).__name__}: {e})"
    else:
        if isinstance(figures, dict):
            return figures
        problem = f"holds a JSON {type(figures).__name__}, not an object"
    log.warning(
        "stage %s is finished, but %s %s: the run's summary.json leaves the stage's figures out",
        name,
        stage_file,
        problem,
    )
    return None


def stop_if_asked(stop: StopRequest, acc: Accelerator, done: str, later: list[str], evaluates: bool) -> None:
    """After stage ``done``, before the stages ``later`` or the evaluation: stop there (``StopTraining``, exit 75) if
    any rank was asked to (``StopRequest``), with nothing to write: the stage's ``final/`` is whole. A request at a
    stage's last step, or while its ``final/`` was written, stops here; the rerun begins with the next stage (or
    evaluates). With nothing left to run, the run finishes. Every rank calls it."""
    if not (later or evaluates) or not stop.agreed(acc):
        return
    stop.served(acc)
    before = f"stage {later[0]}" if later else "the evaluation"
    raise StopTraining(f"stopped after stage {done}, before {before} ({STOP_WHY}); rerun to resume")


def _run(cfg: DictConfig, acc: Accelerator, stop: StopRequest, readers: contextlib.ExitStack) -> dict[str, Any]:
    log = get_logger("alignlm", acc.process_index)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    if acc.is_main_process:  # before the offline sets and prepare steps: a stop now costs nothing
        for line in [*override_warnings(cfg), *prompt_changes(cfg)]:
            log.warning("%s", line)
    agreed(acc, check_finished_stages, cfg, acc, log, settings_only=True)  # before the prepare steps' work
    with others_wait_for_main(acc, prepare_timeout(cfg)):
        if acc.is_main_process:
            if cfg.resume == "never":
                set_aside_earlier_runs(cfg, run_dir)
            ensure_offline_datasets(cfg, readers)
            run_prepare_steps(cfg)
    agreed(acc, check_finished_stages, cfg, acc, log)  # from the files the prepare steps left
    to_train = [name for name in cfg.run if not stage_done(cfg, name)]
    if acc.is_main_process:
        for line in idle_overrides(cfg, to_train):
            log.warning("%s", line)
    check_source_files(cfg, to_train)  # on every rank, once the offline sets and prepare steps wrote theirs
    check_stage_batches(cfg, to_train, acc.num_processes)
    check_eval_sets(cfg)  # so are the final evaluation's sets, read after every stage trained
    if acc.is_main_process:
        for name in to_train:
            problem = damaged_final(cfg, name)
            if problem is not None:
                log.warning(
                    "stage %s: its final/ is damaged (%s): training it again from its newest whole step checkpoint",
                    name,
                    problem,
                )
        warn_other_model(cfg, to_train, log)
    # what only a built model tells (LoRA targets, room for the visual tokens), for every stage to train, on the first
    # one's model as built: its mistakes had surfaced when their stage began, after the stages before it had trained
    check_model = partial(check_stages_fit_model, cfg, to_train)
    summary: dict[str, Any] = {"run": str(run_dir), "stages": {}, "eval": {}}
    final = None
    steps_left = cfg.get("stop_after_steps")  # per process, over all its stages
    for name in cfg.run:
        final = run_dir / name / "final"
        stage_file = run_dir / name / STAGE_SUMMARY
        if stage_done(cfg, name):
            log.info("stage %s already finished at %s; skipping (resume=never retrains)", name, final)
            figures = finished_stage_figures(stage_file, name, log)
            if figures is not None:
                summary["stages"][name] = figures
            continue
        if steps_left == 0:  # the earlier stages used up this process's steps: the rerun starts this one
            raise StopTraining(
                f"stopped before stage {name} (stop_after_steps={cfg.stop_after_steps} steps trained in this "
                "process); rerun to resume"
            )
        result: StageResult = Trainer(cfg, name, acc, steps_left, check_model, stop).fit()
        check_model = None
        if steps_left is not None:
            steps_left -= result.process_steps
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
        # beside final/ as soon as the stage ends: a later stage's stop and rerun keeps it; whole or not at all
        if acc.is_main_process:
            replace_text(stage_file, json.dumps(json_values(summary["stages"][name]), indent=2, allow_nan=False))
        stop_if_asked(stop, acc, name, to_train[to_train.index(name) + 1 :], bool(cfg.eval.sets))
    leave_process_group(acc)
    if not acc.is_main_process:
        return summary
    if cfg.eval.sets and final is not None:
        with warn_only():  # the weights are saved: an op without a deterministic kernel (top-p) must not stop it now
            summary["eval"] = evaluate_final(cfg, final, acc.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    replace_text(run_dir / "summary.json", json.dumps(json_values(summary), indent=2, allow_nan=False))
    log.info("\n%s", pipeline_table(summary))
    if stop.asked():  # during the evaluation, or the last stage's end with no evaluation: nothing was left to stop
        stop.served(acc)
        log.warning("a stop was asked for (%s) when the run had nothing left to stop: it finished", STOP_WHY)
    return summary


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
