"""Find and rebuild the checkpoints an evaluation names: ``final/`` folders, step checkpoints, stages, runs.

A path may be
- a ``final/`` folder (``config.yaml`` + ``model.safetensors``);
- a step checkpoint ``<stage>/checkpoints/step_000500`` (trainable weights only): the model is rebuilt from the
  stage's config, its ``init_from`` weights are loaded, the stage's LoRA is applied, then the step's weights;
- a stage folder: each of its step checkpoints, oldest first, then its ``final/``;
- a run folder: the ``final/`` of each stage, in the order the run trained them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from alignlm.models.build import build_model
from alignlm.models.io import (
    checkpoint_stage,
    final_stage,
    load_checkpoint_config,
    load_model,
    load_part_state,
    safe_model_config,
)
from alignlm.models.precision import store_as_built
from alignlm.training.checkpoint import load_init, resolve_init, stage_place, step_dirs, verify
from alignlm.training.logging import read_rows
from alignlm.training.stages import InertTensors, apply_stage, merge_lora

log = logging.getLogger("alignlm")


@dataclass(frozen=True)
class Checkpoint:
    """One evaluable checkpoint and where it came from."""

    path: Path  # absolute
    kind: str  # final | step
    run: str
    stage: str
    step: int | None  # the training step; for final/, the stage's last logged step (None when it logged none)
    above: str = ""  # folders above the run that tell it from another evaluated run of the same name

    @property
    def label(self) -> str:
        name = f"{self.run}/{self.stage}/{'final' if self.kind == 'final' else self.path.name}"
        return f"{self.above}/{name}" if self.above else name

    @property
    def stage_dir(self) -> Path:
        return self.path.parent if self.kind == "final" else self.path.parent.parent


def _is_final(p: Path) -> bool:
    return (p / "model.safetensors").exists() and (p / "config.yaml").exists()


def _is_step(p: Path) -> bool:
    return (p / "trainable.safetensors").exists() and (p / "trainer_state.json").exists()


def _steps(stage_dir: Path) -> list[Path]:
    return [p for p in step_dirs(stage_dir) if _is_step(p)]


def _last_logged_step(stage_dir: Path) -> int | None:
    """The step of the last row of a stage's ``metrics.jsonl``: where its ``final/`` was written."""
    rows = read_rows(stage_dir / "metrics.jsonl")
    return int(rows[-1]["step"]) if rows else None


def _one(given: Path) -> Checkpoint:
    """The checkpoint at ``given``, its path made absolute: its run and stage are the names of the folders above it,
    which a relative path (`alignlm eval final` inside the stage folder, `alignlm eval step_000500` inside
    ``checkpoints/``) does not name; the stage's config and ``init_from`` are looked up there too."""
    p = Path(os.path.abspath(given))
    if _is_final(p):
        return Checkpoint(p, "final", stage_place(p.parent)[0].name, final_stage(p), _last_logged_step(p.parent))
    state = json.loads((p / "trainer_state.json").read_text())
    run_dir, aside = stage_place(p.parent.parent)
    stage = str(state.get("stage", (p.parent.parent.parent if aside else p.parent.parent).name))
    return Checkpoint(p, "step", run_dir.name, stage, int(state["step"]))


def unique_labels(labels: Sequence[str], folders: Sequence[Path]) -> list[str]:
    """Each label, where another one is the same, prefixed with the fewest names of the folders above it (``folders``:
    the folder each label sits in) that tell them apart: ``s1/raw/finetune/final`` and ``s2/raw/finetune/final`` are
    two rows and two lines of a report, where ``raw/finetune/final`` twice was one."""
    parents = [Path(os.path.abspath(f)).parts for f in folders]

    def at(i: int, depth: int) -> str:
        return "/".join([*parents[i][len(parents[i]) - depth :], labels[i]])

    out = []
    for i, label in enumerate(labels):
        same = [j for j, other in enumerate(labels) if other == label and j != i]
        depth = 0
        while depth < len(parents[i]) and any(at(j, depth) == at(i, depth) for j in same):
            depth += 1
        out.append(at(i, depth))
    return out


def _not_there(path: Path) -> str:
    """Why a checkpoint path that does not exist names nothing, with the nearest folder above it that does: it was
    said to be "neither a final/ folder, a step checkpoint, a stage folder nor a run folder", as if it held the wrong
    files, when the run was never trained or its name was mistyped."""
    above = next(a for a in Path(os.path.abspath(path)).parents if a.is_dir())  # the file system's root at least
    try:
        runs = sorted(d.name for d in above.iterdir() if d.is_dir())
    except OSError:  # a folder it may not list: the message goes without its contents
        runs = []
    held = f"; {above} holds {runs[:10]}{' ...' if len(runs) > 10 else ''}" if runs else ""
    return (
        f"{path} does not exist{held}: train it first (`alignlm train` writes <output_dir>/<run_name>/<stage>/final/), "
        "or name a checkpoint that exists"
    )


def resolve(paths: list[str]) -> list[Checkpoint]:
    """Expand the paths given on the command line into checkpoints, in the order given; each named once, with a label
    of its own (:func:`unique_labels` over the folders that hold the runs)."""
    out: list[Checkpoint] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(_not_there(p))
        if _is_final(p) or _is_step(p):
            out.append(_one(p))
        elif _steps(p) or _is_final(p / "final"):
            out += [_one(s) for s in _steps(p)] + ([_one(p / "final")] if _is_final(p / "final") else [])
        else:
            finals = [d / "final" for d in sorted(p.iterdir()) if _is_final(d / "final")] if p.is_dir() else []
            if not finals:
                raise FileNotFoundError(
                    f"{p} is neither a final/ folder, a step checkpoint, a stage folder nor a run folder "
                    "(no model.safetensors + config.yaml, no trainable.safetensors + trainer_state.json)"
                )
            order = list(load_checkpoint_config(finals[-1] / "config.yaml").get("run") or [])
            finals.sort(
                key=lambda f: (order.index(f.parent.name) if f.parent.name in order else len(order), f.parent.name)
            )
            out += [_one(f) for f in finals]
    where = [c.path for c in out]
    twice = sorted({str(w) for w in where if where.count(w) > 1})
    if twice:
        raise ValueError(f"{paths} name the checkpoint {twice[0]} more than once; evaluate each checkpoint once")
    labels = unique_labels([c.label for c in out], [c.stage_dir.parent.parent for c in out])
    return [replace(c, above=label.removesuffix(c.label).rstrip("/")) for c, label in zip(out, labels)]


def stage_config(ck: Checkpoint) -> DictConfig:
    """The resolved training config the checkpoint was trained with."""
    for candidate in (ck.path / "config.yaml", ck.stage_dir / "config.yaml", ck.stage_dir / "final" / "config.yaml"):
        if candidate.exists():
            return load_checkpoint_config(candidate)
    raise FileNotFoundError(f"no config.yaml for {ck.path}: looked in the checkpoint, {ck.stage_dir} and its final/")


def data_config(ck: Checkpoint, cfg: DictConfig) -> dict[str, Any]:
    """The data node of the checkpoint's stage (its template), or of the run's last stage."""
    return OmegaConf.to_container(cfg.stages[checkpoint_stage(cfg, ck.stage)].data, resolve=True)


def load(ck: Checkpoint, allow_code: bool = False, trust_remote_code: bool = False) -> Any:
    """Rebuild the model of a checkpoint, in eval mode on the CPU; its config is data (``models/io.py``)."""
    if ck.kind == "final":
        return load_model(ck.path, allow_code, trust_remote_code)
    problem = verify(ck.path)
    if problem:
        raise ValueError(f"step checkpoint {ck.path} cannot be evaluated: {problem}")
    cfg = stage_config(ck)
    stage = cfg.stages[ck.stage]
    model = build_model(safe_model_config(cfg.model, allow_code, trust_remote_code))
    built = {name: p.dtype for name, p in model.named_parameters(remove_duplicate=False)}
    run_dir, aside = stage_place(ck.stage_dir)
    init = resolve_init(stage.get("init_from"), run_dir, cfg.stages, aside)
    if init and not init.exists():
        raise FileNotFoundError(
            f"step checkpoint {ck.path} starts from {init} (its stage's init_from={stage.get('init_from')!r}), which "
            "is not there" + (": resume=never set it aside with this stage under another name" if aside else "")
        )
    if init:
        load_init(model, init)
    inert = apply_stage(model, stage.parts, stage.get("lora"))
    state = _without_inert(ck, load_file(str(ck.path / "trainable.safetensors")), inert)
    held = {p.data_ptr() for k, p in model.state_dict().items() if k in state}  # a tied weight arrives with its twin
    untrained = [k for k, p in model.named_parameters() if p.requires_grad and p.data_ptr() not in held]
    if untrained:
        raise ValueError(
            f"step checkpoint {ck.path} lacks the weights of {len(untrained)} parameters its stage "
            f"{ck.stage!r} trains ({untrained[:5]}); evaluating it would use their initial values"
        )
    load_part_state(model, state, [])
    merge_lora(model)
    store_as_built(model, built)  # as its stage's final/ loads: training held what it trained in fp32
    model.requires_grad_(False)
    model.eval()
    return model


def _without_inert(ck: Checkpoint, state: dict[str, torch.Tensor], inert: InertTensors) -> dict[str, torch.Tensor]:
    """``state`` without the tensors its model's output never depends on: an alignlm from before a tower's inert
    weights were kept frozen and out of LoRA trained them (or adapters on them), and this model has no place for
    such an adapter. Leaving them out changes no number the model computes; an info line says so."""
    dropped = sorted(k for k in state if k in inert)
    if dropped:
        log.info(
            "step checkpoint %s: left out %d tensors its model's output never depends on (%s%s), which an earlier "
            "alignlm trained in a tower; the model computes the same without them",
            ck.path,
            len(dropped),
            ", ".join(dropped[:3]),
            ", ..." if len(dropped) > 3 else "",
        )
    return {k: v for k, v in state.items() if k not in inert}
