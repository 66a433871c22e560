"""Flags several commands share."""

from __future__ import annotations

import argparse


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
