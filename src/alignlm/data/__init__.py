"""Data layer: LLaVA-format loading, templates and label masks, collation, and the offline generators."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def generator_knobs(name: str) -> list[str]:
    """The knobs generator ``name`` takes: its keyword arguments besides the seed."""
    return list(generator_defaults(name))
