"""The ``alignlm`` command line, and all of it: every subcommand lives in a module of this package.

Each module here with a ``register(subparsers)`` function adds its subcommands; the root parser finds them itself,
so a method's commands are one new file in this package. Library modules contain no argument parsing.

    alignlm train +exp=demo stages.pretrain.max_steps=20     # Hydra overrides (commands/train.py)
    alignlm --help                                           # every command
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence
from typing import Any

from omegaconf.errors import GrammarParseError, InterpolationResolutionError, MissingMandatoryValue

from alignlm.config import ConfigError
from alignlm.data.records import DataError

BAD_DATA = 65  # sysexits' EX_DATAERR: the data cannot be used (the message says why)
USAGE = 2  # as argparse: a flag, an override or a config value that cannot work
FAILED = 1  # a stage that diverged or trained nothing, a file that cannot be read or written, another error
INTERRUPTED = 130  # the shell's status of a command stopped by Ctrl-C (128 + SIGINT)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default beside its help, unless it is None: that help says what leaving the flag out means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every command's parser (nested ones inherit the class): ``--help`` shows the defaults, which it hid."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The root parser with every command module's subcommands, modules in name order."""
    parser = Parser(
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


# a Hydra app's own command-line flags (``@hydra.main``), which a user of one types out of habit
HYDRA_APP_FLAGS = frozenset(
    "--cfg -c --package -p --info -i --resolve --config-path -cp --config-name -cn --config-dir -cd --hydra-help "
    "--run -r --shell-completion -sc --experimental-rerun".split()
)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line as a function: errors propagate (tests and callers catch them; ``console`` prints them).

    A subcommand whose parser has a ``pass_through`` function (a wrapped tool's own command line, such as
    ``lmms-eval``) receives its arguments unparsed. A flag may sit between a command's trailing arguments (``alignlm
    train +exp=demo --print-config seed=1``): argparse gives a list argument only the words before the flag and
    refused the rest as unrecognized; they are appended to it, in their order.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    pass_through = getattr(commands.get(argv[0]), "pass_through", None) if argv else None
    if pass_through is not None:
        return pass_through(argv[1:])
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = commands.get(argv[0], parser)  # its usage, not the root's
        hydra = [word for word in extra if word.split("=", 1)[0] in HYDRA_APP_FLAGS]
        if hydra and argv[0] == "train":  # the one command of Hydra overrides
            command.error(
                f"{hydra[0]} is a flag of a Hydra app; alignlm composes its config with Hydra's compose API and runs "
                "no Hydra app: alignlm train <overrides> --print-config prints the composed config and checks it"
            )
        trailing = getattr(args, "trailing", None)
        if trailing is None or any(word.startswith("-") for word in extra):
            command.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, trailing, [*getattr(args, trailing), *extra])
    return args.func(args)


def console(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``alignlm`` console script, ``python -m alignlm.commands`` and ``train.py``: ``main`` with
    a user's mistake as one line ``alignlm <command>: <message>`` on stderr and an exit status, not a traceback.

    65 unusable data, 2 a usage or config mistake (a config value that cannot be read among them), 1 a file that cannot be read or written, or another ``ValueError``
    or ``KeyError`` (its type named: it may be a library's bug), 130 Ctrl-C; any other exception is a bug and keeps
    its traceback. ``ALIGNLM_DEBUG=1`` re-raises everything, with the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "alignlm" + (f" {argv[0]}" if argv and not argv[0].startswith("-") else "")
    if os.environ.get("ALIGNLM_DEBUG") == "1":
        return main(argv)
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own exits (it printed the usage) keep their status; a command's message is 2
        if not isinstance(e.code, str):
            return e.code or 0
        return _say(prog, e.code, USAGE)
    except DataError as e:
        return _say(prog, str(e), BAD_DATA)
    except ConfigError as e:
        return _say(prog, str(e), USAGE)
    except CONFIG_VALUE_ERRORS as e:  # ``${nope}``, ``???`` left unset: omegaconf's text, 3 lines, names the key last
        message = (getattr(e, "msg", None) or str(e)).splitlines()[0]
        key = getattr(e, "full_key", None)
        return _say(prog, f"config {key}: {message}" if key else f"config: {message}", USAGE)
    except OSError as e:  # errno errors read "[Errno 2] No such file or directory: 'x'": the file first
        return _say(prog, f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e), FAILED)
    except (ValueError, KeyError) as e:
        ours = type(e).__module__.startswith("alignlm.")  # another's (a plug-in's, a library's) says where to look
        return _say(prog, str(e) if ours else f"{type(e).__name__}: {e} ({DEBUG_HINT})", FAILED)
    except KeyboardInterrupt:
        return _say(prog, "interrupted", INTERRUPTED)


DEBUG_HINT = "ALIGNLM_DEBUG=1 shows where it was raised"
# a config value that cannot be read: an interpolation to a missing key or of bad syntax, a mandatory value (???) unset
CONFIG_VALUE_ERRORS = (InterpolationResolutionError, GrammarParseError, MissingMandatoryValue)


def _say(prog: str, message: str, status: int) -> int:
    """Print ``message`` as ``prog: message`` (unless it names the command already) to stderr; return ``status``."""
    print(message if message.startswith("alignlm") else f"{prog}: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(console())
