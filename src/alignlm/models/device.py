"""Where work outside a stage's trainer runs (prepare steps, evaluation, commands): the one rule, so that
``accelerate launch --cpu`` keeps every part of a run on the CPU, not only the training ranks."""

from __future__ import annotations

import torch
from accelerate.utils import parse_flag_from_env


def cpu_only() -> bool:
    """No GPU, or ``accelerate launch --cpu`` (``ACCELERATE_USE_CPU``, read as accelerate reads it): then every rank
    runs on the CPU."""
    return not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")


def default_device() -> str:
    """``cuda`` (the current GPU), or ``cpu`` where ``cpu_only``."""
    return "cpu" if cpu_only() else "cuda"


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot be used here (not a name torch knows; a GPU this machine does not have), or None: each
    command and knob that takes a device says so before it reads or loads anything, in its own words."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        return "not a device torch knows"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return "this machine has no CUDA device"
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA devices"
    return None
