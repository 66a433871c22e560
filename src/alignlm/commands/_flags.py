"""Flags several commands share, and the ``type=`` checks of their values."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from alignlm.config import POSITIVE, Bounds
from alignlm.models.device import device_problem


def within(bounds: Bounds, whole: bool = False) -> Callable[[str], float]:
    """argparse ``type=`` of a number within ``bounds`` (a whole one where ``whole``: a count), refused before the
    pass that would read it (a dual encoder's features, ReAlign's shards) rather than after. Zero and negative counts
    once ran on and did nothing (``--limit 0`` measured nothing and exited 0). A flag that sets a config knob shares
    the knob's ``Bounds``."""

    def check(text: str) -> float:
        try:
            value: float = int(text) if whole else float(text)
        except ValueError:
            value = math.nan
        if not bounds.holds(value, whole):
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole' if whole else 'finite'} number {bounds}")
        return value

    return check


def whole_number(low: int) -> Callable[[str], float]:
    """argparse ``type=`` of a count: a whole number >= ``low`` (returned as an int)."""
    return within(Bounds(low), whole=True)


positive_int = whole_number(1)  # a limit, a batch size, samples, epochs
positive_float = within(POSITIVE)  # a rate, a temperature


def pixel_limit(text: str) -> int | None:
    """argparse ``type=`` of an image size limit, as ``data.max_image_pixels``: a positive whole number of pixels, or
    ``none`` for no limit."""
    return None if text.strip().lower() in ("none", "null") else int(positive_int(text))


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
