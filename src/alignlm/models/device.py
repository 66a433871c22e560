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
