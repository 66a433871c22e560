"""Where work outside a stage's trainer runs (prepare steps, evaluation, commands): the one rule, so that
``accelerate launch --cpu`` keeps every part of a run on the CPU, not only the training ranks."""

from __future__ import annotations

import os

import torch


def cpu_only() -> bool:
    """No GPU, or ``accelerate launch --cpu`` (``ACCELERATE_USE_CPU``): then every rank runs on the CPU."""
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def default_device() -> str:
    """``cuda`` (the current GPU), or ``cpu`` where ``cpu_only``."""
    return "cpu" if cpu_only() else "cuda"
