"""A data hook that injects a fault on one rank, for the cluster tests (configured as ``stage.data.hooks.fault``)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from alignlm.data.hooks import SampleHook


class Fault(SampleHook):
    """After ``after`` samples on rank ``rank``: ``hang`` (sleep), ``die`` (SIGKILL itself), ``term`` (SIGTERM itself, as
    torchrun ends the surviving ranks) or ``signal`` (SIGUSR1, once)."""

    def __init__(self, model: Any, rank: int, after: int, action: str) -> None:
        self.rank, self.after, self.action, self.calls = rank, after, action, 0

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
