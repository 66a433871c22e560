"""Checkpoints: full training state for exact resume, and ``final/`` weights that reload without training code.

Layout (per stage): ``checkpoints/step_000500/`` holds what the stage changes of the model (safetensors: the weights
that train and the buffers of the parts not frozen, BatchNorm's running statistics), optimizer and
scheduler state (under DeepSpeed ZeRO, one optimizer file per rank: its partition), per-rank RNG, fp16's loss scaler,
``trainer_state.json`` (step, data position) and, written last, ``manifest.json``
(every file's size and SHA-256), so a file damaged after the fact is caught before it is loaded; ``final/`` holds
``config.yaml``, ``model.safetensors`` with every part trained so far, ``trained_from.json`` (what the stage was
trained from: :func:`trained_from`, compared when a rerun would skip it) and the same ``manifest.json``
(:func:`final_intact`). Everything is written under a temporary name, synced to the disk and renamed
(:func:`publish`), so neither a killed job nor a lost node leaves a half checkpoint that looks whole. Tensors
load with safetensors or ``torch.load(weights_only=True)``: no arbitrary pickle.

A stage's starting weights (``init_from``) are read here too: another stage's ``final/`` or a transformers Llava folder.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Collection, Container, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from alignlm.export.hf_llava import is_llava_dir, load_llava_weights
from alignlm.files import as_umask_allows, file_sha256, sync, writing
from alignlm.models.io import (
    MODEL_FILES,
    config_strings,
    file_digest,
    load_final_weights,
    model_file_stamps,
    model_stamps,
    part_state,
    read_config_yaml,
    stamps_change,
    trained_buffers,
    trained_tensors,
    wide_parts,
    wide_tensors,
)
from alignlm.models.precision import hold_in_fp32
from alignlm.training import sharding, zero
from alignlm.training.logging import json_values
from alignlm.training.stages import merged_name

STEP_PREFIX = "step_"
SET_ASIDE_PREFIX = "before-"  # resume=never: an earlier run's outputs of a stage, in ``<stage>/before-<time>/``
MANIFEST = "manifest.json"
OBJECTIVES_FILE = "objectives.safetensors"  # persistent objective state (a learned temperature), by config key
SCALER_FILE = "scaler.pt"  # fp16's loss scaler: its scale and growth count (:func:`apply_training_state`)
TRAINED_FROM = "trained_from.json"  # in final/: the stage's recipe as it finished (:func:`trained_from`)
CONTENTS = " contents"  # suffix of a recipe key holding the bytes' digest of the file its config key names
START = " weights"  # suffix of the trained_from key identifying the weights a stage started from (init_from)
# in a step checkpoint's recipe: the model settings it was written with (a final/ holds them in its config.yaml),
# compared apart from the recipe as a final/'s are (model_setting_changes)
MODEL_SETTINGS = "model"
# what a resume allowed to change names when the checkpoint recorded no settings (written before they were recorded)
UNRECORDED = "the stage's settings"
LOADED = " files"  # suffix of a changed key naming the files a model config's key loads (model_file_diff)
IDENTIFIED = (CONTENTS, START)  # keys compared by what identifies the bytes, never by the path that named them
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # weights files of a final/ or a transformers Llava folder
# files of a checkpoint that something reads (weights, states, records, configs): one its manifest does not list makes
# it untrusted (an empty manifest vouched for any files); any other (a README.md, .DS_Store) is the user's, kept
READ_SUFFIXES = (*WEIGHT_SUFFIXES, ".pt", ".pth", ".json", ".yaml", ".yml")


def resolve_init(
    init_from: str | None, run_dir: Path, stages: Mapping[str, Any], aside: str | None = None
) -> Path | None:
    """``init_from`` as a folder: a stage name of this run (its ``final/`` under ``run_dir``), else a path as given.
    ``aside``: the checkpoint asking was set aside by ``resume=never`` in that folder (:func:`stage_place`), so the
    stage it started from is the ``final/`` set aside with it, not the new run's."""
    if not init_from:
        return None
    if init_from in stages:
        return Path(run_dir) / init_from / (aside or "") / "final"
    return Path(init_from)


def stage_place(stage_dir: Path) -> tuple[Path, str | None]:
    """The run folder a stage folder belongs to, and the ``before-*`` folder it was set aside in (None when it was
    not): ``<run>/<stage>/before-<time>`` is stage ``<stage>`` of run ``<run>``, not a run named ``<stage>``."""
    stage_dir = Path(os.path.abspath(stage_dir))
    if stage_dir.name.startswith(SET_ASIDE_PREFIX):
        return stage_dir.parent.parent, stage_dir.name
    return stage_dir.parent, None


def load_init(model: nn.Module, init: Path) -> list[str]:
    """Load a stage's starting weights; returns the parts they covered (saved again in the stage's ``final/``). A part
    a ``final/`` holds in float32 (one an earlier stage trained) is held in float32 here, whatever this stage does
    with it, so that its ``final/`` passes it on unrounded: an LLM trained fully from a bf16-loaded preset, frozen in
    the next stage, had been loaded into the bf16 model built from the preset and saved again in bf16 (67 % of a
    short finetune's change to its weights lost)."""
    if is_llava_dir(init):
        load_llava_weights(model, init)
        return list(model.PARTS)
    hold_wide_parts(model, init)
    return load_final_weights(model, init)


def hold_wide_parts(model: nn.Module, init: Path) -> None:
    """Hold in float32 each part the ``final/`` folder ``init`` holds weights of in float32, whatever dtype the model
    was built in: before its weights (or a stage's gathered state of them) load into it."""
    if not is_llava_dir(init):
        for part in wide_parts(init) & set(model.PARTS):
            hold_in_fp32(getattr(model, part))


def rounded_at_start(model: nn.Module, init: Path | None) -> dict[str, torch.dtype]:
    """The parameters the stage stores in half precision whose starting weights ``init`` holds in float32, with the
    dtype each is stored in, by the model's names for them: the frozen linear layers of a part an earlier stage trained
    fully and this one adapts with LoRA (the trainer stores them in the autocast dtype, which casts them so at every
    use anyway). :func:`restore_unrounded` gives them their values back before LoRA merges into them."""
    if init is None or is_llava_dir(init):
        return {}
    wide = wide_tensors(init)
    return {
        n: p.dtype
        for n, p in model.named_parameters()
        if p.is_floating_point() and p.element_size() < 4 and merged_name(n) in wide
    }


def restore_unrounded(model: nn.Module, init: Path | None, rounded: Mapping[str, torch.dtype]) -> None:
    """Give the parameters :func:`rounded_at_start` named their float32 values from ``init``, in place, so that LoRA
    merges into the weights the stage started from rather than their half-precision rounding: a DPO stage under bf16
    after a full finetune had saved the finetuned LLM's linear layers rounded to bf16 (on the tiny model, 8 % of the
    finetune's change to the LLM undone). Autocast computed every matmul of the stage from the same rounding either
    way. A value whose rounding is not what the stage held, or that ``init`` no longer holds (written again or removed
    since the stage started), is left as the stage held it, with a warning naming it: the stage's training is saved."""
    if not rounded:
        return
    params = dict(model.named_parameters())
    restored: set[str] = set()
    try:
        with safe_open(str(Path(init) / "model.safetensors"), "pt") as f, torch.no_grad():
            held = set(f.keys())
            for name, dtype in rounded.items():
                key, p = merged_name(name), params[name]
                if key not in held:
                    continue
                value = f.get_tensor(key).to(p.device)
                if torch.equal(value.to(dtype), p.to(dtype)):
                    p.data = value
                    restored.add(name)
    except (OSError, SafetensorError):  # gone or cut short since the stage started: the stage's weights are saved
        pass
    moved = [merged_name(n) for n in rounded if n not in restored]
    if moved:
        logging.getLogger("alignlm").warning(
            "%s changed since this stage started: %d weights (%s) are saved as the stage held them, rounded to half "
            "precision, not from the float32 values they started from",
            init,
            len(moved),
            ", ".join(moved[:3]),
        )


def model_changes(init: Path, model_cfg: Any) -> list[str]:
    """How the ``model`` settings a ``final/`` folder was trained with (its ``config.yaml``) differ from ``model_cfg``,
    one ``model.<key>: theirs -> ours`` each; [] for the same settings or a folder without alignlm's config (a
    transformers Llava folder). Its weights load onto a model of another tower layer, seed or tower of the same width
    without a word otherwise; the caller warns rather than refuses, since some changes are deliberate (a MoE connector
    upcycled from a dense one differs in ``model.connector``, a swapped part)."""
    path = Path(init) / "config.yaml"
    if is_llava_dir(init) or not path.is_file():
        return []
    model = read_config_yaml(path).get("model")  # interpolations left as text, as it was written
    theirs = OmegaConf.to_container(model, resolve=False) if isinstance(model, DictConfig) else {}
    return [change_text(k, a, b) for k, (a, b) in model_setting_changes(theirs, model_cfg).items()]


def model_settings(model_cfg: Any) -> dict[str, Any]:
    """A ``model`` config as plain containers, resolved (what a ``final/``'s ``config.yaml`` holds of it)."""
    if isinstance(model_cfg, DictConfig):
        return OmegaConf.to_container(model_cfg, resolve=True)
    return dict(model_cfg or {})


# model settings that choose how a part computes, not what: a resume on a machine with other kernels may change them
HOW_MODEL_KEYS = ("attn_implementation",)


def model_setting_changes(theirs: Any, ours: Any) -> dict[str, tuple[Any, Any]]:
    """``{model.<key>: (theirs, ours)}`` for every setting in which two ``model`` configs differ, ``(not set)`` for
    one a side lacks; a path is compared as what it names, not as spelled (:func:`_compared`); a key of
    :data:`HOW_MODEL_KEYS` is not compared (flash-attention on one machine, SDPA on the next). A key one side lacks
    is compared as what was built without it (:func:`built_without`), so a setting added later at its default is no
    change: a checkpoint written before ``model.visual_token_norm`` existed was refused by every run after it. The one
    comparison of model settings: a ``final/``'s (:func:`model_changes`) and a step checkpoint's
    (:func:`resume_changes`)."""
    theirs, ours = flat(model_settings(theirs), "model"), flat(model_settings(ours), "model")
    absent = "(not set)"

    def compared(side: Mapping[str, Any], key: str) -> Any:
        return _compared(key, side[key] if key in side else built_without(key, side, theirs | ours))

    return {
        key: (theirs.get(key, absent), ours.get(key, absent))
        for key in sorted(theirs.keys() | ours.keys())
        if key.rsplit(".", 1)[-1] not in HOW_MODEL_KEYS and compared(theirs, key) != compared(ours, key)
    }


def temporary(final: Path) -> Path:
    """Where ``final`` is written before ``publish`` (every rank can name it)."""
    return final.with_name(final.name + ".tmp")


def zero_optimizer_file(rank: int) -> str:
    """The file of one rank's partition of a ZeRO optimizer state in a step checkpoint."""
    return f"optimizer_rank{rank}.pt"


# the files of a step checkpoint one rank alone reads: its random state, its ZeRO optimizer partition
_RANK_FILE = re.compile(r"(?:rng_|optimizer_rank)(\d+)\.pt")


def atomic_dir(final: Path) -> Path:
    """A fresh temporary sibling of ``final``; publish it with ``publish``."""
    tmp = temporary(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path) -> None:
    """Replace ``final`` with ``tmp`` in one rename (the old copy is removed first if present), its
    :func:`write_manifest` written last. The files and the folder's entries are synced to the disk before the rename
    and the rename after it: a rename is atomic for readers at once, but after a power loss or a lost node only what
    was synced is sure to be there, and an unsynced ``final/`` came back with a 0-byte or half-length
    ``model.safetensors`` under a name that said it was whole."""
    write_manifest(tmp)
    for path in tmp.iterdir():
        if path.is_file():
            as_umask_allows(path)  # safetensors' weights are written owner-only
            sync(path)
    sync(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    sync(final.parent)


def save_training_state(
    ckpt_dir: Path,
    model: nn.Module,
    optimizer_state: dict[str, Any] | None,
    scheduler: Any,
    state: dict[str, Any],
    rng: dict[int, Any],
    objective_state: Mapping[str, torch.Tensor] | None = None,
    model_state: Mapping[str, torch.Tensor] | None = None,
    started: bool = False,
    scaler_state: Mapping[str, Any] | None = None,
) -> None:
    """Everything exact resume needs, written atomically (called on the main process, with the model's whole weights
    in place and ``optimizer_state`` from :func:`sharding.optimizer_state`, or None when every rank wrote its own
    :func:`zero_optimizer_file` into the folder's :func:`temporary` copy, which ``started=True`` says was made for
    them); ``objective_state``: the objectives' state by config key (a learned temperature resumes with them);
    ``model_state``: the model's whole state dict when its own tensors are shards (:func:`sharding.full_state`);
    ``scaler_state``: fp16's loss scaler's ``state_dict()`` (None without one)."""
    with writing(ckpt_dir):  # a full disk named by the checkpoint, as one line
        tmp = temporary(ckpt_dir) if started else atomic_dir(ckpt_dir)
        save_file(
            part_state(model, model.PARTS, only_trainable=True, state=model_state), str(tmp / "trainable.safetensors")
        )  # extra parts too; the buffers of the parts this stage trains with their weights
        if objective_state:
            objectives = {k: v.detach().cpu().contiguous() for k, v in objective_state.items()}
            save_file(objectives, str(tmp / OBJECTIVES_FILE))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler_state:
            torch.save(dict(scaler_state), tmp / SCALER_FILE)
        for rank, r in rng.items():
            torch.save(r, tmp / f"rng_{rank}.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(json_values(state), indent=2, allow_nan=False))
        publish(tmp, ckpt_dir)


def write_manifest(folder: Path) -> None:
    """Every file's size and SHA-256, written last: a checkpoint is whole only when its manifest says so."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(folder.iterdir()) if p.is_file()
    }
    (folder / MANIFEST).write_text(json.dumps(files, indent=2))


# Looks = a folder's manifest and each file's (name, bytes, modification time, inode): what it is without reading it.
Looks = tuple[bytes, tuple[tuple[str, int, int, int], ...]]
# folders this process found damaged by their digests (a resume passing over them), while they look the same: what
# the sizes alone cannot tell (damage of the same length) is still known to pruning
_damaged: dict[str, tuple[Looks, str]] = {}


def _looks(folder: Path) -> Looks:
    """What a folder holding a manifest is like without reading its other files: a file rewritten, replaced or cut
    since, or another manifest, changes it."""
    stats = ((p.name, p.stat()) for p in sorted(folder.iterdir()) if p.is_file())
    files = tuple((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in stats)
    return (folder / MANIFEST).read_bytes(), files


def verify(folder: Path, digests: bool = True, rank: int | None = None) -> str | None:
    """Why a step checkpoint or ``final/`` cannot be trusted (naming the file), or None when every file matches its
    manifest. ``digests`` False: names and sizes only (what a full disk, a kill or a lost node leaves: a file missing,
    empty or short), without reading the files. ``rank``: the rank that will load the folder hashes only the files it
    reads, not another rank's own (its random state, its ZeRO optimizer partition), whose sizes it still checks: every
    rank of a resume had hashed every rank's partition, the world size times the optimizer's bytes read per resume. A
    folder found damaged by its digests is remembered while it looks the same (:func:`_looks`), so pruning, which reads
    sizes only, still knows it."""
    if not (folder / MANIFEST).exists():  # written before manifests existed: its atomic publication is all the proof
        return None
    key, looks = str(folder.resolve()), _looks(folder)
    known = _damaged.get(key)
    if known is not None and known[0] == looks:
        return known[1]
    problem = _manifest_problem(folder, looks[0], digests, rank)
    if digests and problem is not None:
        _damaged[key] = (looks, problem)
    return problem


def remember_damage(folder: Path, problem: str) -> None:
    """Record that another rank found ``folder`` damaged (a file only it hashes): pruning, which reads sizes only,
    knows it here too while the folder looks the same, and never counts it as the checkpoint to keep."""
    _damaged[str(folder.resolve())] = (_looks(folder), problem)


def _another_ranks(name: str, rank: int | None) -> bool:
    """Whether the checkpoint file ``name`` is read by one rank alone, not ``rank`` (None: every file is ours)."""
    match = _RANK_FILE.fullmatch(name)
    return rank is not None and match is not None and int(match.group(1)) != rank


def _manifest_problem(folder: Path, text: bytes, digests: bool, rank: int | None = None) -> str | None:
    """:func:`verify`'s reading of a folder holding a manifest, ``text``."""
    manifest = folder / MANIFEST
    try:
        files = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{manifest} is not valid JSON"
    if not isinstance(files, dict) or not all(
        isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")
        and isinstance(want, dict) and isinstance(want.get("bytes"), int) and isinstance(want.get("sha256"), str)
        for name, want in files.items()
    ):  # fmt: skip
        return f"{manifest} is not a manifest (file names in this folder, each with its bytes and sha256)"
    unlisted = sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and p.name != MANIFEST and p.name not in files and p.suffix in READ_SUFFIXES
    )
    if unlisted:
        return f"{folder / unlisted[0]} is not in the manifest"
    for name, want in files.items():
        path = folder / name
        if not path.exists():
            return f"{path} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {want['bytes']} (truncated?)"
    for name, want in files.items() if digests else ():
        if not _another_ranks(name, rank) and file_sha256(folder / name) != want["sha256"]:
            return f"{folder / name} does not match its SHA-256 in the manifest (damaged)"
    return None


def final_intact(final: Path) -> str | None:
    """Why a stage's ``final/`` cannot count as finished (naming the file), or None: every file its manifest lists is
    there at its size. Sizes, not digests: every rank asks at every rerun, where hashing a 7B model's weights would
    take minutes, and what a full disk, a kill or a lost node leaves (a file missing, empty or short) shows in its
    size; ``verify`` checks the digests too. A ``final/`` written before it held a manifest is trusted, as it was."""
    return verify(final, digests=False)


@dataclass
class TrainingState:
    """A step checkpoint as one rank read it (:func:`read_training_state`), none of it applied yet. Reading is where a
    rank alone can fail (its own files, its node's disk), and applying takes collectives under FSDP2 and ZeRO-3 (each
    sharded parameter gathered or scattered), which a rank that failed would never enter: so the ranks agree on their
    readings before any applies them (the trainer's verdict)."""

    folder: Path
    weights: dict[str, torch.Tensor]
    objectives: dict[str, torch.Tensor] | None  # None: this stage's objectives hold no state
    optimizer: dict[str, Any]
    partition: bool  # ``optimizer`` is this rank's ZeRO partition, not the whole state
    scheduler: dict[str, Any]
    rng: dict[str, Any] | None  # None: the checkpoint holds no random state of this rank
    scaler: dict[str, Any] | None  # None: no fp16 loss scaler saved


def read_training_state(ckpt_dir: Path, rank: int, objectives: nn.Module | None = None) -> TrainingState:
    """Read what rank ``rank`` restores from a step checkpoint (the trainer state, which says whether it may be resumed
    at all, is read and checked before: :func:`resume_changes`); raises if a file is missing or cannot be read."""
    objective_state = None
    if objectives is not None and objectives.state_dict():
        if not (ckpt_dir / OBJECTIVES_FILE).exists():
            raise FileNotFoundError(
                f"{ckpt_dir} has no {OBJECTIVES_FILE}, but this stage's objectives have state to resume "
                "(was the checkpoint written with other objectives?)"
            )
        objective_state = load_file(str(ckpt_dir / OBJECTIVES_FILE))
    partition = ckpt_dir / zero_optimizer_file(rank)
    rng_file, scaler_file = ckpt_dir / f"rng_{rank}.pt", ckpt_dir / SCALER_FILE
    return TrainingState(
        ckpt_dir,
        load_file(str(ckpt_dir / "trainable.safetensors")),
        objective_state,
        _load_state(partition if partition.exists() else ckpt_dir / "optimizer.pt"),
        partition.exists(),  # written under DeepSpeed ZeRO: one partition per rank
        torch.load(ckpt_dir / "scheduler.pt", weights_only=True),
        torch.load(rng_file, weights_only=True) if rng_file.exists() else None,
        torch.load(scaler_file, weights_only=True) if scaler_file.exists() else None,
    )


def apply_training_state(
    state: TrainingState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int,
    objectives: nn.Module | None = None,
    scaler: Any = None,
) -> tuple[list[str], bool]:
    """Restore weights, objective state, optimizer, scheduler, this rank's RNG and fp16's loss ``scaler`` from what
    :func:`read_training_state` read (collectives under FSDP2 and ZeRO-3: every rank applies). Returns the buffers of
    the trained parts (:func:`trained_buffers`) the checkpoint does not hold (written before step checkpoints held
    them, they keep their values at the stage's start), and whether the scaler was restored (False when the
    checkpoint holds none: written before the scaler was saved, or without fp16; a fresh one starts high, 2**16, and
    backs off by skipping the steps whose gradients overflow). The caller warns of both."""
    sharding.load_weights(model, state.weights)
    if state.objectives is not None and objectives is not None:
        sharding.load_weights(objectives, state.objectives)
    if state.partition:
        zero.load_optimizer(optimizer, state.optimizer)
    else:
        sharding.load_optimizer_state(sharding.optimizer_owner(model, objectives), optimizer, state.optimizer)
    keep_kernels(optimizer)
    scheduler.load_state_dict(state.scheduler)
    if state.rng is not None:
        set_rng_state(state.rng)
    else:  # a rank the checkpoint's run did not have (resume_allow_changes), or a file gone from one without a manifest
        logging.getLogger("alignlm").warning(
            "rank %d: %s holds no random state of this rank (rng_%d.pt): its dropout and other random draws go on from "
            "this run's seed, not as an uninterrupted run's would",
            rank,
            state.folder,
            rank,
        )
    scaled = scaler is None or state.scaler is not None
    if scaler is not None and state.scaler is not None:  # its scale and growth count; this run's growth settings
        saved = {k: state.scaler[k] for k in ("scale", "_growth_tracker")}
        scaler.load_state_dict({**scaler.state_dict(), **saved})
    return [n for n in trained_buffers(model) if n not in state.weights], scaled


def _load_state(path: Path) -> Any:
    """An optimizer state file, mapped from the disk onto the CPU: read whole by every rank, AdamW's state of a 7B model
    trained fully (56 GB) took that much private memory in each of a node's 8 ranks at a resume (mapped, the ranks
    share one copy in the page cache); and a file saved from cuda:0 was put back on cuda:0 by every rank before the
    optimizer moved it to its own device (a CUDA context and the whole state on GPU 0 per rank). The optimizer casts
    each tensor to its parameter's device when it loads the state."""
    return torch.load(path, weights_only=True, mmap=True, map_location="cpu")


KERNELS = ("fused", "foreach")  # an optimizer's choice of kernel: how its step is computed, not what


def keep_kernels(optimizer: Any) -> None:
    """After an optimizer's state was loaded: this run's choice of kernel (:data:`KERNELS`, as the optimizer was
    built: its ``defaults``) in every parameter group, where loading put the checkpoint's (``fused_optimizer`` is free
    on resume). The trainer hands a fused optimizer its skip flag by its defaults, and a group that had come back
    unfused crashed on it; one that came back fused stayed fused whatever this run said. Each step counter is placed
    where this run's kernel keeps it, as torch's own loading places it (a fused or capturable AdamW: on its
    parameter's device, in float32)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's and DeepSpeed's wrappers hold torch's AdamW
    ours = {k: inner.defaults[k] for k in KERNELS if k in inner.defaults}
    for group in inner.param_groups:
        group.update(ours)
        if not (group.get("fused") or group.get("capturable")):
            continue
        for param in group["params"]:
            state = inner.state.get(param, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(dtype=torch.float32, device=param.device)


# Stage keys a resumed run may change without changing what it computes: when and how checkpoints are kept, how the
# same numbers are computed (recomputation, which restores the RNG for its dropout; one fused optimizer kernel, whose
# rounding differs by 1e-9; cached tower features), data loading. Not compilation (:data:`NUMERICS`).
# Every other key of the stage (learning rates, schedule, data, objectives, ...), the seed and the precision make the
# trajectory and are compared (``recipe``); the step count is compared as the stage's total, not as epochs/max_steps.
# The batch is compared as the global batch (with the world size) and as its split into micro-batches
# (``per_device_batch_size``, ``grad_accum``: :data:`SPLIT`): the token-normalised LM loss is the same over any split,
# but an objective relating a micro-batch's samples (contrastive negatives), the MoE balance loss and LoRA's dropout
# masks are computed per micro-batch.
FREE_ON_RESUME = (
    "save_every",
    "keep_last",
    "gradient_checkpointing",
    "fused_optimizer",
    "init_from",
    "prepare",
    "epochs",
    "max_steps",
    "data.num_workers",
    "data.feature_cache",
    "data.on_error",
    "data.min_usable_fraction",
)


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{dotted.key: leaf}`` (lists are leaves: a list of data sources changes as a whole)."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def recipe(
    stage: Mapping[str, Any],
    name: str,
    total_steps: int | None,
    seed: int,
    precision: str,
    files: Mapping[str, dict[str, str]],
) -> dict[str, Any]:
    """What makes a stage's trajectory besides the world size and global batch, by config key: written into each
    step checkpoint and compared on resume (the optimizer's and schedule's loaded state would otherwise keep the
    checkpoint's learning rates and decay whatever this run's config says, without a word). ``files``: the stage's
    :func:`input_files`, since a file regenerated at the same path changes what trains though no key changed.
    ``total_steps`` None: the step count as written (``epochs``, ``max_steps``), for a finished stage, whose total
    cannot be counted again without building its data."""
    keys = {f"stages.{name}.{k}": v for k, v in flat(stage).items() if not any(_under(k, f) for f in FREE_ON_RESUME)}
    if total_steps is None:
        keys |= {f"stages.{name}.{k}": stage.get(k) for k in ("epochs", "max_steps")}
    else:
        keys[f"stages.{name} total steps"] = total_steps
    return keys | {"seed": seed, "mixed_precision": precision} | dict(files)


def step_recipe(recipe: Mapping[str, Any], model_cfg: Any, stamped: bool = True) -> dict[str, Any]:
    """A step checkpoint's recipe: the stage's :func:`recipe` with the model settings (:data:`MODEL_SETTINGS`) and
    the files they load as they are now (:data:`MODEL_FILES`), as ``trainer_state.json`` holds it. A step checkpoint
    holds only what the stage trains: a frozen LLM or tower comes from its folder as it is at the resume, and a model
    setting (a visual token norm, a loss weight, a rate scale its optimizer group holds) makes the trajectory as a
    stage setting does; both had resumed without a word. A ``final/`` holds the same in its ``config.yaml`` and
    ``trained_from.json`` (:func:`finished_changes`). ``stamped`` False (a rank that writes no checkpoint): without
    the files, which only a written checkpoint holds (a resume compares the record with the files as they are,
    :func:`model_file_diff`): every rank had read a 7B LLM's folder whole at every stage start."""
    model = model_settings(model_cfg)
    files = {MODEL_FILES: model_stamps(model)} if stamped else {}
    return json.loads(json.dumps({**recipe, MODEL_SETTINGS: model, **files}))


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".") or key.startswith(prefix + "[")


def _names(text: str, file: bool = False) -> bool:
    """Whether a config string names an existing file (``file``) or file or folder."""
    try:
        return Path(text).is_file() if file else Path(text).exists()
    except (OSError, ValueError):  # a prompt too long to be a file name, or holding a NUL byte: text, not a path
        return False


def _names_what_is_not_there(value: Any) -> bool:
    """Whether a setting holds a string that reads as a path (it has a folder in it) to nothing there now."""
    if isinstance(value, Mapping):
        return any(map(_names_what_is_not_there, value.values()))
    if isinstance(value, list):
        return any(map(_names_what_is_not_there, value))
    return isinstance(value, str) and os.sep in value and not _names(value)


def input_files(stage: Mapping[str, Any], name: str) -> dict[str, dict[str, str]]:
    """Every existing file that a string of the stage's config names (data sources, the labels, levels or preference
    pairs a prepare step writes), as ``{"stages.<name>.<key> contents": {"path", "sha256"}}``: a prepare step or a
    generator that rewrites a file in place changes what the stage trains on under the same keys. Folders (image
    roots, the feature cache) are not read, nor the keys free on resume (``prepare``, ``init_from``: where the inputs
    came from, not what they are). Each file is read once, however many keys name it."""
    digests: dict[str, str] = {}
    out = {}
    for key, text in config_strings(stage):
        if any(_under(key, free) for free in FREE_ON_RESUME) or not _names(text, file=True):
            continue
        if text not in digests:
            digests[text] = file_sha256(Path(text))
        out[f"stages.{name}.{key}{CONTENTS}"] = {"path": text, "sha256": digests[text]}
    return out


def start_weights(init: Path | None) -> dict[str, Any] | None:
    """What identifies the weights a stage starts from (its ``init_from`` as :func:`resolve_init` finds it), as
    :func:`trained_from` records it and :func:`start_change` compares it; None for a stage without ``init_from``. A
    ``final/`` holding a :data:`TRAINED_FROM` record: that record's SHA-256, which names the earlier stage's recipe,
    files and, recursively, its own start, so a stage retrained from anything else since gives another. A ``final/``
    without one or a transformers Llava folder: each weights file's ``[bytes, modification time (ns), sha256]``, so
    that a byte-identical copy (``cp -r`` to node-local disk at every requeue, new times) is the same start; it had
    been refused on resume as changed weights. Cost: the weights files read whole once per process (memoised:
    :func:`~alignlm.models.io.file_digest`), about 25 s for a 7B Llava folder's 14 GB on the 2-core builder. A folder
    not there (a stage this run trains anew, or removed) has no weights files."""
    if init is None:
        return None
    record = Path(init) / TRAINED_FROM
    if record.is_file():
        return {"path": str(init), "trained_from sha256": file_sha256(record)}
    files = sorted(p for p in Path(init).glob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    weights = {p.name: [st.st_size, st.st_mtime_ns, file_digest(p)] for p in files for st in (p.stat(),)}
    return {"path": str(init), "weights": weights}


def start_change(theirs: Any, ours: Any) -> str | None:
    """How two :func:`start_weights` differ: None for the same start (wherever it lies: a move or a copy is no
    change), else ``"changed"``, or ``"rewritten"`` for weights files of the same names and sizes whose modification
    times alone differ where a side holds no digests (a record written before starts held them: a copy cannot be
    told from new weights of the same size). Files are compared as model files are
    (:func:`~alignlm.models.io.stamps_change`)."""
    if not (isinstance(theirs, Mapping) and isinstance(ours, Mapping)):
        return None if theirs == ours else "changed"
    if "trained_from sha256" in theirs or "trained_from sha256" in ours:
        return None if theirs.get("trained_from sha256") == ours.get("trained_from sha256") else "changed"
    a, b = theirs.get("weights"), ours.get("weights")
    if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
        return "changed"
    return stamps_change(*([[name, *v] if isinstance(v, list) else v for name, v in w.items()] for w in (a, b)))


def trained_from(
    stage: Mapping[str, Any],
    name: str,
    seed: int,
    precision: str,
    world: int,
    files: Mapping[str, dict[str, str]],
    init: Path | None,
) -> dict[str, Any]:
    """What a finished stage was trained from, as its ``final/`` records it (:data:`TRAINED_FROM`) and a rerun
    compares (:func:`finished_changes`): its :func:`recipe` with the step count as written, its global batch (a step
    checkpoint holds that beside its recipe) and its starting weights (:func:`start_weights` of ``init``, its
    ``init_from`` as :func:`resolve_init` finds it: null without one, so that a record written before starts were
    recorded, which lacks the key, is told apart). A later
    stage trained from an earlier one's old weights had been kept after the earlier one was retrained: ``init_from``
    is free on resume, since a step checkpoint holds its weights, but a finished stage holds what they became.
    ``stage``: resolved, as a container."""
    batch = int(stage["per_device_batch_size"]) * int(stage["grad_accum"]) * world
    settings = recipe(stage, name, None, seed, precision, files) | {
        f"stages.{name} global batch": batch,
        f"stages.{name}.init_from{START}": start_weights(init),
    }
    return json.loads(json.dumps(settings))  # as the record reads back (tuples as lists)


def _resolved(tree: Any) -> Any:
    """``tree`` with every non-empty string that names an existing file or folder replaced by its absolute path, into
    mappings and lists: ``data/x.json``, ``./data/x.json`` and ``/runs/data/x.json`` from ``/runs`` are one input, and
    a rerun that spells it otherwise changes nothing. Applied to both sides of a comparison in one working folder, so
    equal strings stay equal whatever they say, and only spellings of one existing path become equal (``""`` stays
    itself: an empty ``image_root`` means the data file's folder, not this one)."""
    if isinstance(tree, Mapping):
        return {k: _resolved(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_resolved(v) for v in tree]
    if isinstance(tree, str) and tree and _names(tree):
        return str(Path(tree).resolve())
    return tree


# settings an older config wrote otherwise, by key suffix: compared by what they mean
SAME_MEANING = {".data.group_by_length": {True: "band"}}


def _compared(key: str, value: Any) -> Any:
    """What a recorded value is compared by: a file's digest without the path that named it (the same bytes under
    another spelling or place are no change; a move is named by the config key holding the path, if any), any other
    value with its paths resolved (:func:`_resolved`). A start's weights are compared by :func:`start_change`."""
    if key.endswith(CONTENTS) and isinstance(value, Mapping):
        return {k: v for k, v in value.items() if k != "path"}
    for suffix, meaning in SAME_MEANING.items():
        if key.endswith(suffix) and isinstance(value, bool | str) and value in meaning:
            return meaning[value]
    return _resolved(value)


# stage and model settings added after a checkpoint may have been written, by key suffix: what the code that wrote it
# did without them where that was not null (a recipe lacking the key is compared as that value, not as a change)
BEFORE_SETTINGS = {".data.image_aspect_ratio": "pad"}


def built_without(key: str, side: Mapping[str, Any], both: Mapping[str, Any]) -> Any:
    """What a flat model config ``side`` that lacks ``key`` built: the default of the parameter of that name of the
    ``_target_`` of the node holding it (``side``'s, else the other side's, in ``both``), where it has one; else
    :func:`setting_before`. Reading every absent key as null took a tower whose ``weights`` key was deleted (built
    with its pretrained weights) for one with ``weights: null`` (random): a resume went on with another tower under
    the connector."""
    parent, _, name = key.rpartition(".")
    target = side.get(f"{parent}._target_", both.get(f"{parent}._target_"))
    if isinstance(target, str):
        try:
            default = inspect.signature(get_object(target)).parameters[name].default
        except (ImportError, AttributeError, KeyError, TypeError, ValueError):  # no such parameter, or not importable
            default = inspect.Parameter.empty
        if default is not inspect.Parameter.empty:
            return default
    return setting_before(key)


def setting_before(key: str) -> Any:
    """What a recorded recipe that lacks ``key`` did: :data:`BEFORE_SETTINGS`'s value for it, else null."""
    return next((v for suffix, v in BEFORE_SETTINGS.items() if key.endswith(suffix)), None)


# the global batch's split into micro-batches, by key suffix: compared since it was found to change what some objectives
# compute; a record written while it was free on resume lacks it and says nothing of it (compared where both hold it)
SPLIT = (".per_device_batch_size", ".grad_accum")
# compiled layers draw their dropout masks from another random stream than eager ones: a resume that turned
# ``compile`` on trained on with other masks (LoRA dropout 0.1: losses apart from the next step). Compared where both
# records hold it, as :data:`SPLIT` (a record written while it was free on resume lacks it)
NUMERICS = (".compile",)


def recipe_changes(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (theirs, ours)}`` for every key in which two recipes differ (:func:`_compared`: not by the spelling of
    a path). A file's contents, a start's weights and the batch's split (:data:`SPLIT`) count where both recorded
    them: a record written before they were has none, and a path that appears or goes is named by its own config
    key."""

    def differ(key: str, a: Any, b: Any) -> bool:
        if key.endswith(START):
            return start_change(a, b) is not None
        return a != b and _compared(key, a) != _compared(key, b)

    def recorded(key: str) -> Any:
        """Their value of ``key``; a setting added since they were written, what their code did without it."""
        return theirs[key] if key in theirs else setting_before(key)

    changed = {
        k: (recorded(k), v)
        for k, v in ours.items()
        if (k in theirs or not k.endswith(IDENTIFIED + SPLIT + NUMERICS)) and differ(k, recorded(k), v)
    }
    return changed | {k: (v, None) for k, v in theirs.items() if k not in ours and not k.endswith(IDENTIFIED)}


def _start_text(key: str, theirs: Any, ours: Any) -> str:
    """A stage's starting weights (:func:`start_weights`) that are not the ones it trained from, for a message."""
    if not isinstance(ours, Mapping):
        where = theirs.get("path") if isinstance(theirs, Mapping) else theirs
        return f"{key}: trained from the weights in {where}, this run starts from none"
    if not isinstance(theirs, Mapping):
        return f"{key}: trained from no starting weights, this run starts from {ours.get('path')}"
    if "trained_from sha256" not in ours and not ours.get("weights"):
        return (
            f"{key} ({ours.get('path')}): no weights there now, this stage trained from the ones there were "
            "(this run trains them anew, or they were removed)"
        )
    if start_change(theirs, ours) == "rewritten":
        return (
            f"{key} ({ours.get('path')}): its weights files were rewritten (same sizes, other modification times; "
            "this record holds no digests to compare)"
        )
    return f"{key} ({ours.get('path')}): its weights changed since this stage trained from them"


def change_text(key: str, theirs: Any, ours: Any) -> str:
    """One changed setting for a message, ``key: theirs -> ours``; a file whose bytes changed at the same path
    (however spelled), ``key (path): contents changed`` (two digests would tell a reader nothing); starting weights
    that changed, ``stages.<name>.init_from (path): its weights changed since this stage trained from them``."""
    if key.endswith(START):
        return _start_text(key.removesuffix(START), theirs, ours)
    if key.endswith(LOADED) and isinstance(ours, Mapping):
        return _loaded_text(key.removesuffix(LOADED), theirs, ours)
    if key.endswith(CONTENTS) and isinstance(theirs, dict) and isinstance(ours, dict):
        if _resolved(theirs.get("path")) == _resolved(ours.get("path")):
            return f"{key.removesuffix(CONTENTS)} ({ours.get('path')}): contents changed"
        return f"{key.removesuffix(CONTENTS)}: file {theirs.get('path')} -> {ours.get('path')}"
    if key.endswith(".data.group_by_length") and _compared(key, theirs) == "band":
        return f"{key}: {theirs} -> {ours} ({key}=band goes on in the order it started with)"
    return f"{key}: {theirs} -> {ours}"


def finished_changes(
    final: Path, ours: Mapping[str, Any], model_cfg: Any, settings_only: bool = False
) -> list[str] | None:
    """How what ``final/`` was trained from (its :data:`TRAINED_FROM` record, its ``config.yaml``'s model settings:
    :func:`model_changes`, and the files they loaded: :func:`model_file_changes`) differs from this run's ``ours``
    (:func:`trained_from`) and ``model_cfg``, one line each; None for
    a ``final/`` written before the record existed, whose inputs cannot be compared. ``settings_only``: the settings
    and model settings alone, not the files nor the starting weights. A rerun that skips a finished
    stage otherwise passed its old weights on to the next stages and the evaluation whatever had changed."""
    path = Path(final) / TRAINED_FROM
    if not path.is_file():
        return None
    try:
        theirs = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}): what the stage was trained from cannot be compared with this run; "
            "retrain with resume=never (earlier outputs are set aside, not deleted)"
        ) from e
    if not isinstance(theirs, dict):
        raise ValueError(f"{path} is not a mapping of settings: retrain with resume=never")
    files = theirs.pop(MODEL_FILES, None)  # written by save_final, not by trained_from: compared on their own
    if settings_only:  # before the prepare steps write the files and the earlier stages their weights
        theirs, ours = ({k: v for k, v in d.items() if not k.endswith((CONTENTS, START))} for d in (theirs, ours))
        files = None
    changed = recipe_changes(theirs, ours)
    if settings_only:  # a path not there yet cannot be told the same as another spelling of it: the full check will
        changed = {k: ab for k, ab in changed.items() if not any(map(_names_what_is_not_there, ab))}
    lines = [change_text(k, a, b) for k, (a, b) in changed.items()]
    return lines + model_changes(final, model_cfg) + model_file_changes(files, model_cfg)


def model_file_changes(theirs: Any, model_cfg: Any) -> list[str]:
    """:func:`model_file_diff` one line each: ``model.llm.name_or_path (<path>): its files changed since this stage
    trained with them``."""
    return [change_text(k, a, b) for k, (a, b) in model_file_diff(theirs, model_cfg).items()]


def model_file_diff(theirs: Any, model_cfg: Any) -> dict[str, tuple[Any, Any]]:
    """The local files or folders a stage's model config named (a record's :data:`MODEL_FILES`: a finished stage's
    or a step checkpoint's) that this run's ``model_cfg`` names under the same key and that changed since
    (``models.io.stamps_change``: files added or gone, sizes, digests; modification times where the record holds no
    digests), as ``{model.<key> files: (theirs, ours)}`` (:data:`LOADED`; each side ``{"path", "files"}``). A
    ``final/`` or a step checkpoint holds only the parts its stage trained, so the next stage or the resumed one
    rebuilds a frozen LLM or tower from that folder: new weights there went unnoticed, under a connector fitted to the
    old ones. A byte-identical copy (``cp -r`` to node-local disk at a requeue) is no change. A key naming another
    path now is :func:`model_setting_changes`' to name; a record written before the files were recorded (None) is
    compared without them."""
    if not isinstance(theirs, Mapping):
        return {}
    named = dict(config_strings(model_settings(model_cfg), "model"))
    changed = {}
    for key, was in sorted(theirs.items()):
        was = was if isinstance(was, Mapping) else {}
        path = was.get("path")
        if key not in named or os.path.abspath(named[key]) != path:
            continue
        now = model_file_stamps(path, was.get("files"))
        if stamps_change(was.get("files"), now):
            changed[f"{key}{LOADED}"] = (dict(was), {"path": path, "files": now})
    return changed


def _loaded_text(key: str, theirs: Any, ours: Mapping[str, Any]) -> str:
    """One :func:`model_file_diff` change for a message. Files of the same names and sizes whose modification times
    alone differ, in a record without digests, are said to be rewritten: "changed" sent a user looking for new
    weights where a requeue had only copied the folder again."""
    where = f"{key} ({ours.get('path')})"
    if not ours.get("files"):
        return f"{where}: nothing there now, though this stage trained with them"
    was = theirs.get("files") if isinstance(theirs, Mapping) else None
    if stamps_change(was, ours["files"]) == "rewritten":
        return (
            f"{where}: its files were rewritten (same sizes, other modification times; this record holds no digests "
            "to compare)"
        )
    return f"{where}: its files changed since this stage trained with them"


def layout(model: nn.Module, objectives: nn.Module | None) -> dict[str, list[int]]:
    """Every trained tensor's name and shape (``trained_tensors``: the parameters that train and the buffers of the
    parts not frozen) and the objectives' state: what a checkpoint must hold to load here (under ZeRO-3 a parameter's
    own shape is its partition's; ``ds_shape`` is the whole one)."""
    out = {n: list(getattr(t, "ds_shape", t.shape)) for n, t in trained_tensors(model).items()}
    if objectives is not None:
        out |= {f"objectives.{k}": list(getattr(v, "ds_shape", v.shape)) for k, v in objectives.state_dict().items()}
    return out


def layout_difference(theirs: Mapping[str, list[int]], ours: Mapping[str, list[int]]) -> str | None:
    """What differs between a checkpoint's layout and this run's, the first few of each kind, or None."""
    parts = []
    for what, names in (
        ("missing from the checkpoint", [n for n in ours if n not in theirs]),
        ("not trained by this run", [n for n in theirs if n not in ours]),
        ("of another shape", [f"{n} {theirs[n]} -> {ours[n]}" for n in ours if n in theirs and theirs[n] != ours[n]]),
    ):
        if names:
            parts.append(f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    return "; ".join(parts) or None


def _inert_surplus(theirs: Mapping[str, list[int]], ours: Mapping[str, list[int]], inert: Container[str]) -> list[str]:
    """The tensors a checkpoint's layout holds beyond this run's when they are its whole difference and each is one
    this run's model keeps frozen because its output never depends on it (``inert``: ``stages.InertTensors``), else
    []: the checkpoint was written before alignlm kept a tower's inert weights frozen and out of LoRA."""
    surplus = [n for n in theirs if n not in ours]
    fits = all(n in theirs and theirs[n] == shape for n, shape in ours.items())
    return surplus if fits and all(n in inert for n in surplus) else []


def resume_changes(
    folder: Path,
    written: Mapping[str, Any],
    ours: Mapping[str, Any],
    stage: str,
    allow: bool,
    inert: Container[str] = frozenset(),
    buffers: Collection[str] = frozenset(),
) -> dict[str, tuple[Any, Any]]:
    """Refuse a checkpoint whose tensors do not fit this run (another model, parts, LoRA or objectives) or whose
    optimizer state another strategy wrote; name what would make the resumed stage differ from an uninterrupted one
    (the data order of a step depends on the global batch, each rank's RNG on the world size, the rest on the stage's
    config: ``recipe``, and on the weights it started from: ``start``) and refuse it unless ``allow``
    (``resume_allow_changes``). ``written``: the checkpoint's ``trainer_state.json``; ``ours``: the same fields of
    this run; ``inert``: the tensors this run's model keeps frozen because its output never depends on them (what
    ``apply_stage`` returned), which a checkpoint of an earlier alignlm trained; ``buffers``: this run's trained
    buffers (:func:`trained_buffers`), of which a checkpoint written before step checkpoints held them has none (it
    resumes, :func:`apply_training_state` names them). Returns what changed, ``{key: (theirs, ours)}``.

    The start is compared because a step checkpoint holds only what the stage changes: a frozen part (and DPO's
    reference model) comes from ``init_from`` as it is now, so an earlier stage retrained since would have gone on
    under the checkpoint's weights, and ``final/`` named the old start. A changed global batch names the change of its
    split into micro-batches too (:data:`SPLIT`)."""
    ours_layout = ours["layout"]
    theirs = written.get("layout", ours_layout)
    if not any(n in theirs for n in buffers):  # written before step checkpoints held a trained part's buffers
        ours_layout = {n: shape for n, shape in ours_layout.items() if n not in buffers}
    difference = layout_difference(theirs, ours_layout)
    held = _inert_surplus(theirs, ours_layout, inert) if difference else []
    if held:
        raise ValueError(
            f"{folder} trained {len(held)} tensors that this run leaves alone because its model's output never "
            f"depends on them ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): it was written by an alignlm "
            "from before a tower's inert weights (the layers above select_layer, a pooled-output head, a classifier) "
            "were kept frozen and out of LoRA. Finish the stage with the alignlm version that wrote it, or start it "
            "over with resume=never (its earlier outputs are set aside, not deleted)"
        )
    if difference:
        raise ValueError(
            f"{folder} does not fit this run's model: {difference}. Was the model, stages.{stage}.parts, its lora or "
            "its objectives changed since it was written? Resume with the same config, or start the stage over with "
            "resume=never (its checkpoints are set aside, not deleted)"
        )
    strategy = ours["strategy"]
    if written.get("strategy", "ddp") != strategy:
        raise ValueError(
            f"{folder} was written with distributed.strategy={written.get('strategy', 'ddp')}, this run has "
            f"{strategy}: their optimizer states differ in layout; resume with the same strategy"
        )
    changed = {k: (written[k], ours[k]) for k in ("world", "global_batch") if k in written and written[k] != ours[k]}
    if "recipe" not in written:  # nothing to compare this run's settings with: it had resumed as if they were its own
        if not allow:
            raise ValueError(
                f"{folder} was written by an alignlm from before step checkpoints recorded the settings they were "
                "trained with, so whether this run's settings, data order and files are its own cannot be checked: "
                "a resume would go on along another trajectory, unsaid. Finish the stage with the alignlm version "
                "that wrote it, start it over with resume=never (its checkpoints are set aside, not deleted), or set "
                "resume_allow_changes=true to continue with this run's settings"
            )
        changed[UNRECORDED] = ("not recorded", "this run's")
    theirs_recipe = dict(written.get("recipe", ours["recipe"]))
    ours_recipe = dict(ours["recipe"])
    their_model, their_files = theirs_recipe.pop(MODEL_SETTINGS, None), theirs_recipe.pop(MODEL_FILES, None)
    our_model = ours_recipe.pop(MODEL_SETTINGS, None)
    ours_recipe.pop(MODEL_FILES, None)
    changed |= recipe_changes(theirs_recipe, ours_recipe)
    if their_model is not None and our_model is not None:  # one written before they were recorded has none
        changed |= model_setting_changes(their_model, our_model) | model_file_diff(their_files, our_model)
    if "start" in written:  # one written before starts were recorded has none to compare
        start = f"stages.{stage}.init_from{START}"
        changed |= recipe_changes({start: written["start"]}, {start: ours["start"]})
    if "global_batch" in changed:
        changed = {k: ab for k, ab in changed.items() if not k.endswith(SPLIT)}
    if strategy in zero.STAGES and "world" in changed:
        raise ValueError(
            f"{folder} was written by {written['world']} ranks under distributed.strategy={strategy}, this run has "
            f"{ours['world']}: each rank resumes its own partition of the optimizer state, so resume with the same "
            "number of ranks (its trainable.safetensors holds the whole weights: init_from a final/ made from them "
            "starts a new stage at any size)"
        )
    if changed and not allow:
        raise ValueError(
            f"{folder} {' and '.join(_said(changed))}: the resumed stage would not reproduce an uninterrupted one. "
            "Resume with the same settings, files and starting weights, or set resume_allow_changes=true to continue "
            "with this run's"
        )
    return changed


def _said(changed: Mapping[str, tuple[Any, Any]]) -> list[str]:
    """What :func:`resume_changes` found changed, for its refusal: the settings as ``key=value``, files and starting
    weights as the finished-stage check names them (:func:`change_text`)."""
    settings = {k: ab for k, ab in changed.items() if not k.endswith((*IDENTIFIED, LOADED))}
    said = []
    if settings:
        said.append(
            f"was written with {', '.join(f'{k}={a}' for k, (a, _) in settings.items())}, this run has "
            f"{', '.join(f'{k}={b}' for k, (_, b) in settings.items())}"
        )
    for suffix, what in (
        ((CONTENTS, LOADED), "was written from other files"),
        ((START,), "was trained from other weights"),
    ):
        texts = [change_text(k, a, b) for k, (a, b) in changed.items() if k.endswith(suffix)]
        if texts:
            said.append(f"{what}: {'; '.join(texts)}")
    return said


def optimizer_settings(optimizer: Any, scheduler: Any) -> list[dict[str, Any]]:
    """Each parameter group's learning rate (before the schedule), decay, betas and eps as this run built them."""
    keys = ("weight_decay", "betas", "eps")
    return [{"initial_lr": lr, **{k: g[k] for k in keys}} for g, lr in zip(optimizer.param_groups, scheduler.base_lrs)]


def take_optimizer_settings(optimizer: Any, scheduler: Any, fresh: list[dict[str, Any]]) -> None:
    """After a resume allowed to change them: this run's optimizer settings (:func:`optimizer_settings`, taken before
    loading) over the checkpoint's, which loading the optimizer's and schedule's state restored; the learning rate
    at the resumed step of this run's schedule."""
    scheduler.base_lrs = [f["initial_lr"] for f in fresh]
    lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, settings, lr in zip(optimizer.param_groups, fresh, lrs):
        group.update(settings, lr=lr)
    scheduler._last_lr = lrs


def rng_state() -> dict[str, Any]:
    """Torch's CPU generator state and, with CUDA, the state of the one device this process trains on (the current
    device, which accelerate sets to each process's own): not every visible GPU's, so a resume that sees fewer or
    other GPUs (another CUDA_VISIBLE_DEVICES, one GPU per task) still restores it. Data order is seeded separately,
    by step."""
    out: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s states, the CUDA one onto the device this process trains on now."""
    torch.set_rng_state(state["cpu"])
    if "cuda" not in state or not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    cuda = _own_cuda_state(state["cuda"], device)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _own_cuda_state(saved: torch.Tensor | list[torch.Tensor], device: int) -> torch.Tensor | None:
    """The writer's own CUDA state. Checkpoints written before :func:`rng_state` kept one device's hold a list, one
    state per GPU the writer could see: its own is the only entry, or the entry of this process's device (the same
    launcher gives a rank the same device); where there is none, None and a warning (the CUDA generator starts
    fresh: random draws on the GPU, dropout, differ from an uninterrupted run), rather than an IndexError."""
    if isinstance(saved, torch.Tensor):
        return saved
    if len(saved) == 1:
        return saved[0]
    if device < len(saved):
        return saved[device]
    logging.getLogger("alignlm").warning(
        "the checkpoint's RNG file holds CUDA generator states for %d GPUs, none for this process's cuda:%d: "
        "its CUDA generator starts fresh (random draws on the GPU, dropout, differ from an uninterrupted run)",
        len(saved),
        device,
    )
    return None


def step_of(folder: Path) -> int | None:
    """The step a checkpoint folder's name gives (``step_000120``: 120), None for any other name (a temporary one)."""
    digits = folder.name.removeprefix(STEP_PREFIX)
    return int(digits) if folder.name.startswith(STEP_PREFIX) and digits.isdigit() else None


def step_dirs(stage_dir: Path) -> list[Path]:
    """Step checkpoints, oldest first, by their step (temporary ones are ignored): by name, ``step_1000000`` (seven
    digits past the six of the padding) came before ``step_999995``, and a resume took the older one for the newest
    while pruning deleted the newer ones."""
    root = stage_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted((p for p in root.iterdir() if step_of(p) is not None), key=lambda p: (step_of(p), p.name))


def set_aside(stage_dir: Path, name: str) -> Path | None:
    """``resume=never``: everything an earlier run left in ``stage_dir`` (step checkpoints, ``final/``, its figures,
    ``metrics.jsonl``, config) moves into a new folder ``name`` there (``before-<time>``, one name for every stage of
    the run, so a set-aside stage finds the ``final/`` it started from: :func:`resolve_init`); nothing is deleted.
    Returns that folder, or None when there was nothing to move.

    All of it, not the step checkpoints alone: an old ``final/`` left beside a new run that is then interrupted is
    what a later ``resume=auto`` takes for the stage finished (the old weights reach the next stages and the
    evaluation), and a new ``metrics.jsonl`` would cut the old one to nothing. Earlier ``before-*`` folders stay."""
    old = [p for p in stage_dir.iterdir() if not p.name.startswith(SET_ASIDE_PREFIX)] if stage_dir.is_dir() else []
    if not old:
        return None
    aside = stage_dir / name
    aside.mkdir()
    for path in old:
        os.replace(path, aside / path.name)
    return aside


def set_aside_name(stage_dirs: Iterable[Path]) -> str:
    """A ``before-<time>`` name free in every one of ``stage_dirs`` (two runs set aside within one second)."""
    stamp, n = time.strftime("%Y%m%dT%H%M%S"), 0
    dirs = list(stage_dirs)
    while True:
        name = f"{SET_ASIDE_PREFIX}{stamp}" + (f"-{n}" if n else "")
        if not any((d / name).exists() for d in dirs):
            return name
        n += 1


def prune(stage_dir: Path, keep_last: int, written: Path) -> None:
    """Keep ``written`` (the checkpoint just saved) and the newest others that are whole (:func:`verify`) up to
    ``keep_last`` in all (0 keeps all); delete the rest, a damaged one with a warning naming what is wrong. Ranked by
    name alone, a damaged newer folder a resume had passed over outlived the older whole one, the last to fall back
    on. Only the folders that would be kept are checked, by their sizes and what a resume found hashing them: rank 0
    prunes while the other ranks wait, and hashing the older checkpoints after each requeue (a 7B run's are ~100 GB
    each) could outlast the collective timeout.

    Temporary step folders are deleted too: no save is under way while rank 0 prunes, so each was left by a job
    killed while it wrote a checkpoint (a stop checkpoint at an irregular step is not written again under its name,
    and each held nearly a whole checkpoint: ~100 GB at 7B)."""
    for tmp in (stage_dir / "checkpoints").glob(f"{STEP_PREFIX}*.tmp"):
        if tmp.resolve() != temporary(written).resolve():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_last <= 0:
        return
    room = keep_last - 1  # beside the one just written
    for folder in reversed([d for d in step_dirs(stage_dir) if d.resolve() != written.resolve()]):
        if room:
            problem = verify(folder, digests=False)
            if problem is None:
                room -= 1
                continue
            logging.getLogger("alignlm").warning("checkpoint %s is damaged (%s): deleted", folder, problem)
        shutil.rmtree(folder)


def save_final(
    final_dir: Path,
    model: nn.Module,
    config_yaml: str,
    parts: Iterable[str],
    stage: str,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Weights of every part trained so far plus the resolved config: enough to rebuild the model. The metadata names
    the parts held whole and the stage that trained them (``io.final_stage``: its template prompts the model).
    ``settings``: what the stage was trained from (:func:`trained_from`), written in the same publish (with the
    manifest a rerun checks: :func:`final_intact`), so a ``final/`` holds it exactly when it is whole; None for a
    folder no stage trained (written by a tool or a test), which a rerun skips with a warning that its inputs cannot
    be compared. With them, the files its model config loads as they are now (:data:`MODEL_FILES`: the frozen parts
    the ``final/`` is rebuilt from, which it does not hold)."""
    with writing(final_dir):  # a full disk named by the folder, as one line
        tmp = atomic_dir(final_dir)
        metadata = {"parts": ",".join(parts), "stage": stage}
        save_file(part_state(model, parts), str(tmp / "model.safetensors"), metadata=metadata)
        (tmp / "config.yaml").write_text(config_yaml)
        if settings is not None:
            record = {**settings, MODEL_FILES: model_stamps(read_config_yaml(tmp / "config.yaml").get("model"))}
            (tmp / TRAINED_FROM).write_text(json.dumps(json_values(record), indent=2, allow_nan=False))
        publish(tmp, final_dir)
