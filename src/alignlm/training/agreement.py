"""One answer on every rank to a check each rank makes itself.

A check that reads this rank's files (a node's copy of the data, of the starting weights) may refuse on one rank
only: that rank raised while the others went on into the next collective and waited there until the timeout, the
refusal surfacing as a timeout. :func:`agreed` makes every rank take the same path, a bug on one rank included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from accelerate import Accelerator
from accelerate.utils import gather_object

from alignlm.config import ConfigError

T = TypeVar("T")

# the refusals agreed on, by kind: a config's mistake, another value, a file (one node lacking it, or unreadable
# there), and any other error (a bug: on the ranks it did not happen on, told by its type and message)
KINDS: dict[str, type[Exception]] = {"config": ConfigError, "value": ValueError, "file": OSError, "error": RuntimeError}


def kind_of(e: Exception) -> str:
    """The kind of ``e`` in :data:`KINDS`."""
    if isinstance(e, ConfigError):
        return "config"
    return "value" if isinstance(e, ValueError) else "file" if isinstance(e, OSError) else "error"


def agreed(acc: Accelerator, check: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``check(*args, **kwargs)`` on every rank (a collective: every rank calls it at the same point); where it raises
    on any rank, every rank raises the first such rank's error, naming that rank: a refusal (a ``ConfigError``,
    another ``ValueError``, an ``OSError``) of the same kind, any other error as a ``RuntimeError`` giving its type.
    A rank whose own check raised another error (a bug) raises that one, its traceback whole."""
    if acc.num_processes == 1:
        return check(*args, **kwargs)
    failure: tuple[str, str] | None = None
    own: Exception | None = None
    result = None
    try:
        result = check(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - every rank must leave the same way, whatever the error: see the docstring
        own, kind = e, kind_of(e)
        failure = (kind, str(e) if kind != "error" else f"{type(e).__name__}: {e}")
    failures = gather_object([failure])
    first = next(((rank, f) for rank, f in enumerate(failures) if f is not None), None)
    if own is not None and kind_of(own) == "error":
        raise own
    if first is not None:
        rank, (kind, message) = first
        raise KINDS[kind](f"rank {rank}: {message}")
    return result  # type: ignore[return-value]
