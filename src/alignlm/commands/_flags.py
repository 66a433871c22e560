"""Flags several commands share, and the ``type=`` checks of their values."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from alignlm.models.device import device_problem


def whole_number(low: int) -> Callable[[str], int]:
    """argparse ``type=`` of a count: a whole number >= ``low``. Zero and negative counts once ran on and did nothing
    (``--limit 0`` measured nothing and exited 0) or failed late with a traceback, after the long pass."""

    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {low}")
        return value

    return check


def number(low: float, high: float = math.inf, *, low_open: bool = True) -> Callable[[str], float]:
    """argparse ``type=`` of a rate, a temperature or a shrinkage: a finite number in ``(low, high]`` (``[low, high]``
    where not ``low_open``), refused before the pass that would read it (a dual encoder's features, ReAlign's
    shards) rather than after."""

    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            where = (
                f"{'(' if low_open else '['}{low:g}, {high:g}]"
                if high < math.inf
                else f"{'>' if low_open else '>='} {low:g}"
            )
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a finite number {'in ' if high < math.inf else ''}{where}"
            )
        return value

    return check


positive_int = whole_number(1)  # a limit, a batch size, samples, epochs
positive_float = number(0.0)  # a rate, a temperature


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
