"""Make ``accelerate launch --cpu --num_processes N train.py ...`` really run N data-parallel CPU processes.

Without MPI, accelerate's simple launcher starts a *single* process for ``--cpu --num_processes N`` (it sets
``MASTER_ADDR`` and ``ACCELERATE_USE_CPU`` but no ``RANK``/``WORLD_SIZE``), so a user who asked for two ranks would
silently train on one. When ``alignlm train`` sees exactly that situation it reads N from the launching accelerate
command (its flags or its config file) and starts N gloo ranks itself through ``torch.distributed.run``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from accelerate.commands.config.config_args import default_config_file, load_config_from_file
from accelerate.commands.launch import launch_command_parser

_RANK_VARS = ("WORLD_SIZE", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _launcher_argv(pid: int) -> list[str] | None:
    """The arguments of the ``accelerate launch`` process ``pid`` (also started as ``accelerate-launch`` or ``python -m
    accelerate.commands.launch``) after the command itself, or None if it is not one."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:  # not Linux, or the parent is gone
        return None
    for i, arg in enumerate(argv):
        if (
            arg == "accelerate.commands.launch"
            or Path(arg).name == "accelerate-launch"
            or (arg == "launch" and i > 0 and Path(argv[i - 1]).name == "accelerate")
        ):
            return [a for a in argv[i + 1 :] if a]
    return None


def requested_processes(launcher_argv: Sequence[str]) -> int:
    """``num_processes`` as accelerate resolves it: the flag, else the config file, else 1."""
    args = launch_command_parser().parse_args(list(launcher_argv))
    if args.num_processes is not None:
        return int(args.num_processes)
    config_file = args.config_file or default_config_file
    if config_file and Path(config_file).exists():
        return int(getattr(load_config_from_file(config_file), "num_processes", 1) or 1)
    return 1


def cpu_processes_to_spawn() -> int:
    """N > 1 when accelerate asked for N CPU processes but started this one alone; else 0 (nothing to do)."""
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1") or "MASTER_ADDR" not in env:
        return 0
    if any(v in env for v in _RANK_VARS):
        return 0  # already one rank of a real launch (torchrun, MPI)
    launcher = _launcher_argv(os.getppid())
    if launcher is None:
        return 0
    n = requested_processes(launcher)
    return n if n > 1 else 0


def spawn_cpu_ranks(n: int, train_args: Sequence[str]) -> int:
    """Run ``alignlm train <train_args>`` as ``n`` gloo ranks on this machine; return their exit status."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(n),
        "--master_addr",
        os.environ["MASTER_ADDR"],
        "--master_port",
        os.environ.get("MASTER_PORT", "29500"),
        "-m",
        "alignlm.commands",
        "train",
        *train_args,
    ]
    print(
        f"alignlm: accelerate started one process for --cpu --num_processes {n}; starting {n} gloo ranks",
        file=sys.stderr,
        flush=True,
    )
    return subprocess.run(cmd, check=False).returncode
