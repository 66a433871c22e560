"""Data layer: LLaVA-format loading, templates and label masks, collation, and the offline generators."""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# name -> module with ``generate(out_dir, *, seed, **knobs) -> dict``, every knob with a default and recorded in the
# info.json it writes; add a generator by adding a line.
_GENERATOR_MODULES = {"digits": "alignlm.data.digits", "shapes": "alignlm.data.shapes"}


def _lazy(module: str) -> Callable[..., dict[str, Any]]:
    def generate(out_dir: str | Path, **knobs: Any) -> dict[str, Any]:
        return importlib.import_module(module).generate(out_dir, **knobs)

    return generate


GENERATORS: dict[str, Callable[..., dict[str, Any]]] = {k: _lazy(m) for k, m in _GENERATOR_MODULES.items()}


def generator_defaults(name: str) -> dict[str, Any]:
    """The knobs generator ``name`` takes (its keyword arguments besides the seed) with their defaults: what a set
    written without ``offline_dataset_args`` was made with, to tell a set on disk from the one a config asks for."""
    params = inspect.signature(importlib.import_module(_GENERATOR_MODULES[name]).generate).parameters
    return {k: p.default for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k != "seed"}


def split_neutral_knobs(name: str) -> set[str]:
    """The knobs of generator ``name`` that add files but change none of the set's split (its module's
    ``SPLIT_NEUTRAL``): shapes' ``som`` writes som.json and tagged images, every other file byte-identical."""
    return set(getattr(importlib.import_module(_GENERATOR_MODULES[name]), "SPLIT_NEUTRAL", ()))


def generator_knobs(name: str) -> list[str]:
    """The knobs generator ``name`` takes: its keyword arguments besides the seed."""
    return list(generator_defaults(name))


def offline_settings(cfg: Any) -> dict[str, Any]:
    """What of a run's config (a ``DictConfig`` or a checkpoint's ``config.yaml`` as read) says which offline sets it
    generates and how, resolved: the rest of it is not read."""
    args = cfg.get("offline_dataset_args")
    return {
        "data_root": str(cfg.get("data_root", "data")),
        "seed": _drawn_with(cfg),
        "offline_datasets": list(cfg.get("offline_datasets") or []),
        "offline_dataset_args": OmegaConf.to_container(args, resolve=True) if isinstance(args, DictConfig) else args,
    }


def _drawn_with(cfg: Any) -> Any:
    """The seed a run's offline sets are drawn with: ``offline_dataset_seed``, or where that is null (or a config
    written before it existed does not have it) the run's ``seed``."""
    held = cfg.get("offline_dataset_seed")
    return cfg.get("seed", 0) if held is None else held


def offline_sets(cfg: Mapping[str, Any]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Each offline set a run's config generates (``offline_datasets``), with its folder (``data_root/<name>``) and
    what that folder's info.json records when it holds the set this config asks for: the generator's defaults with
    ``offline_dataset_args`` over them, and the run's ``seed``. ``cfg``: resolved, as a container or config."""
    given = cfg.get("offline_dataset_args") or {}
    return {
        str(name): (
            Path(str(cfg["data_root"])) / str(name),
            {**generator_defaults(str(name)), **dict(given.get(name) or {}), "seed": int(cfg["seed"])},
        )
        for name in cfg.get("offline_datasets") or []
        if name in GENERATORS
    }


def read_info(info: Path) -> dict[str, Any] | str:
    """An offline set's ``info.json``, or why it cannot be read (a full disk had left one empty, when it was written
    in place: every rerun stopped on a ``JSONDecodeError`` naming no file)."""
    try:
        written = json.loads(info.read_text())
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return written if isinstance(written, dict) else f"a JSON {type(written).__name__}, not an object"


def offline_set_differences(written: Mapping[str, Any], wanted: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{knob: (as written, as asked)}`` for every knob (and the ``seed``) in which the set whose ``info.json`` holds
    ``written`` (:func:`read_info`) differs from ``wanted`` (:func:`offline_sets`), so a config back at the defaults
    gets a set of the defaults, not the one an earlier config asked for. A knob the file does not record (a set written before the generator had it,
    or before info.json recorded it) counts as differing: what an older generator drew for it cannot be told, and
    regenerating costs one run of the generator (the prepare steps' files made from the set follow their inputs'
    digests), where keeping it would serve a set nobody asked for."""
    missing = "not recorded"
    stored = {"seed": written.get("seed", missing), **(written.get("knobs") or {})}
    asked = json.loads(json.dumps(wanted))  # as it reads back from info.json (tuples become lists)
    return {
        k: (stored.get(k, missing), asked.get(k, missing))
        for k in [*asked, *(k for k in stored if k not in asked)]
        if stored.get(k, missing) != asked.get(k, missing)
    }


def differences_said(differs: Mapping[str, tuple[Any, Any]]) -> tuple[str, str]:
    """:func:`offline_set_differences` as two phrases, ``("k=as written, ...", "k=as asked, ...")``, so every
    message about a set on disk that is not the one asked for says it in the same words."""
    written = ", ".join(f"{k}={was!r}" for k, (was, _) in differs.items())
    asked = ", ".join(f"{k}={now!r}" for k, (_, now) in differs.items())
    return written, asked
