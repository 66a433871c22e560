"""``alignlm train``: compose the config from Hydra overrides, then run the pipeline (or print the config).

``train`` takes Hydra overrides (``alignlm train +exp=demo stages.pretrain.max_steps=20``) and composes the config
tree in ``configs/`` (or ``$ALIGNLM_CONFIG_DIR``); ``--print-config`` shows the result, checks it as a run would and exits. Config errors
surface before any process is spawned. Exit status: 0 done, 75 stopped by ``stop_after_steps``, the stop signal or the
stop file (rerun to resume), 65 unusable data, 2 a config that cannot work (an unknown key or choice, a value out of
range) or another run of the same output_dir/run_name running, 1 a stage that diverged or trained nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import sys

from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import GrammarParseError, InterpolationResolutionError

from alignlm.checks import check_config, override_mistake, per_seed_draws, sweep_advice
from alignlm.commands import BAD_DATA, FAILED, USAGE
from alignlm.commands.launch import cpu_processes_to_spawn, spawn_cpu_ranks
from alignlm.config import ConfigError, compose
from alignlm.data.llava import error_message
from alignlm.data.records import DataError
from alignlm.pipeline import run
from alignlm.training.trainer import StopTraining, TrainingError

STOPPED = 75  # exit status of a run that stop_after_steps ended early (sysexits' EX_TEMPFAIL: rerun to continue)


def report_crashes() -> None:
    """A process that a signal kills in native code (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL: a driver fault, a C++
    thread left running at exit) prints every thread's Python stack on its stderr as it dies, as
    ``PYTHONFAULTHANDLER=1`` does: a rank died with "terminate called without an active exception" and no word of
    where. Left as it is where a handler is on already (pytest's, the user's) or stderr is no file (a notebook's)."""
    if not faulthandler.is_enabled():
        with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
            faulthandler.enable(all_threads=True)


def cmd_train(args: argparse.Namespace) -> int:
    if args.multirun:
        advice = sweep_advice("-m/--multirun asks for a Hydra sweep", per_seed_draws(args.overrides))
        print(f"alignlm: {advice}", file=sys.stderr)
        return USAGE
    try:
        cfg = compose(args.overrides)
    except HydraException as e:  # a key or a choice that does not exist, a malformed override: one line, no trace
        print(f"alignlm: {override_mistake(args.overrides, e)}", file=sys.stderr)
        return USAGE
    if args.print_config:  # printed, then checked as a run would: a config the run refuses exits as the run would
        try:
            print(OmegaConf.to_yaml(cfg, resolve=True))
        except (InterpolationResolutionError, GrammarParseError):
            print(OmegaConf.to_yaml(cfg))  # as composed: the check names the interpolation that does not resolve
        try:
            check_config(cfg)
        except ConfigError as e:
            print(f"alignlm: {e}", file=sys.stderr)
            return USAGE
        return 0
    n = cpu_processes_to_spawn()
    if n:
        return spawn_cpu_ranks(n, args.overrides)
    report_crashes()
    try:
        run(cfg)
    except ConfigError as e:
        print(f"alignlm: {e}", file=sys.stderr)
        return USAGE
    except StopTraining as e:  # the planned end of a time-limited job: a message, no traceback
        print(f"alignlm: {e}", file=sys.stderr)
        return STOPPED
    except TrainingError as e:
        print(f"alignlm: {e}", file=sys.stderr)
        return FAILED
    except DataError as e:  # one line, also when a loader worker raised it (error_message)
        print(f"alignlm: {error_message(e)}", file=sys.stderr)
        return BAD_DATA
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` to the ``alignlm`` command line."""
    p = sub.add_parser(
        "train",
        help="run the stages of a config (Hydra overrides follow)",
        description="Compose the config from Hydra overrides and run its stages, then evaluate the last one. "
        "Exit status: 0 done; 75 stopped by stop_after_steps, the stop signal or the stop file (rerun to resume); "
        "65 data that cannot be used; 2 a config that cannot work (an unknown key or choice, a value out of range) "
        "or another run of the same output_dir/run_name running; 1 a stage that diverged or trained nothing, or a "
        "file that cannot be read. Each is one line on stderr, not a traceback.",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the composed config, check it as a run would and exit (status 2 where it would refuse it)",
    )
    p.add_argument("-m", "--multirun", action="store_true", help=argparse.SUPPRESS)  # refused with the way to sweep
    p.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. +exp=demo model=tiny stages.pretrain.max_steps=10"
    )
    p.set_defaults(func=cmd_train, trailing="overrides")
