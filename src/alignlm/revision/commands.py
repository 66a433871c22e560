"""The ReVision subcommands of ``alignlm``: ``embed``, ``realign fit|apply``, ``dual-encoder fit``.

Each module registers its own parser next to the code it runs; this file only lists the modules.
"""

from __future__ import annotations

import argparse
import importlib

MODULES = ("alignlm.revision.embed", "alignlm.revision.realign", "alignlm.revision.dual_encoder")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add every ReVision subcommand to the ``alignlm`` parser."""
    for name in MODULES:
        importlib.import_module(name).register(subparsers)
