"""A data hook that injects a fault on one rank, for the cluster tests (configured as ``stage.data.hooks.fault``)."""

from __future__ import annotations

import errno
import os
import signal
import time
from typing import Any

from alignlm.data.hooks import SampleHook
from alignlm.training import checkpoint


class Fault(SampleHook):
    """After ``after`` samples on rank ``rank``: ``hang`` (sleep), ``die`` (SIGKILL itself), ``term`` (SIGTERM itself, as
    torchrun ends the surviving ranks) or ``signal`` (SIGUSR1, once). ``unreadable``: from the start, that rank's
    checkpoint reads of safetensors files whose path ends with ``file`` fail with an I/O error (a node's disk), which a
    manifest cannot foresee: its hash was read before. ``other_data``: from the start, that rank reads other contents
    in every file the stage names (a node's own copy of the data, regenerated there): their digests differ."""

    def __init__(self, model: Any, rank: int, after: int, action: str, file: str = "") -> None:
        self.rank, self.after, self.action, self.calls = rank, after, action, 0
        if action == "unreadable" and int(os.environ.get("RANK", "0")) == rank:
            read = checkpoint.load_file

            def failing(path: str, *args: Any, **kwargs: Any) -> Any:
                if path.endswith(file):
                    raise OSError(errno.EIO, os.strerror(errno.EIO), path)
                return read(path, *args, **kwargs)

            checkpoint.load_file = failing
        if action == "other_data" and int(os.environ.get("RANK", "0")) == rank:
            digests = checkpoint.input_files

            def other(*args: Any, **kwargs: Any) -> Any:
                return {k: {**v, "sha256": "0" * 64} for k, v in digests(*args, **kwargs).items()}

            checkpoint.input_files = other

    def fields(self, record_id: str, record: dict[str, Any], visual_inputs: list[Any]) -> dict[str, Any]:
        if int(os.environ.get("RANK", "0")) != self.rank:
            return {}
        self.calls += 1
        if self.calls == self.after + 1:
            if self.action == "hang":
                time.sleep(3600)
            elif self.action == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.action == "term":
                os.kill(os.getpid(), signal.SIGTERM)
            elif self.action == "signal":
                os.kill(os.getpid(), signal.SIGUSR1)
        return {}
