"""The ``alignlm`` command line, and all of it: every subcommand lives in a module of this package.

Each module here with a ``register(subparsers)`` function adds its subcommands; the root parser finds them itself,
so a method's commands are one new file in this package. Library modules contain no argument parsing.

    alignlm train +exp=demo stages.pretrain.max_steps=20     # Hydra overrides (commands/train.py)
    alignlm --help                                           # every command
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The root parser with every command module's subcommands, modules in name order."""
    parser = argparse.ArgumentParser(
        prog="alignlm",
        description="Train LLaVA-style multimodal LLMs with alignment objectives, and measure modality alignment.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):  # __main__ runs the command line when imported
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``alignlm`` console script.

    A subcommand whose parser has a ``pass_through`` function (a wrapped tool's own command line, such as
    ``lmms-eval``) receives its arguments unparsed.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    pass_through = getattr(commands.get(argv[0]), "pass_through", None) if argv else None
    if pass_through is not None:
        return pass_through(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
