"""Flags several commands share, and the ``type=`` checks of their values."""

from __future__ import annotations

import argparse
import math

from alignlm.models.device import device_problem


def positive_int(text: str) -> int:
    """argparse ``type=`` of a count (a limit, a batch size, samples, epochs): a whole number >= 1. Zero and negative
    counts once ran on and did nothing (``--limit 0`` measured nothing and exited 0) or failed late with a traceback."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def positive_float(text: str) -> float:
    """argparse ``type=`` of a rate or a temperature: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0")
    return value


def add_trust_flags(p: argparse.ArgumentParser) -> None:
    """``--allow-code`` and ``--trust-remote-code``: what a checkpoint may run, decided by the user, never by the file."""
    p.add_argument(
        "--allow-code",
        action="store_true",
        help="build parts the checkpoint's config names outside alignlm "
        "(your own connector, ...): only for checkpoints you trust",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let transformers run code shipped with the weights "
        "(a checkpoint's own trust_remote_code is always ignored)",
    )


def device_flag(value: str) -> str:
    """``--device``: a name torch knows and a GPU this machine has, refused before anything is read or loaded."""
    problem = device_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(f"{value!r}: {problem}; use cpu, cuda or cuda:N, or leave it unset")
    return value
