"""One answer on every rank to a check each rank makes itself.

A check that reads this rank's files (a node's copy of the data, of the starting weights) may refuse on one rank
only: that rank raised while the others went on into the next collective and waited there until the timeout, the
refusal surfacing as a timeout. :func:`agreed` makes every rank take the same path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from accelerate import Accelerator
from accelerate.utils import gather_object

from alignlm.config import ConfigError

T = TypeVar("T")

# the refusals agreed on, by kind: a config's mistake, another value, a file (one node lacking it, or unreadable there)
KINDS: dict[str, type[Exception]] = {"config": ConfigError, "value": ValueError, "file": OSError}


def agreed(acc: Accelerator, check: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``check(*args, **kwargs)`` on every rank (a collective: every rank calls it at the same point); where it refuses
    on any rank (a ``ConfigError``, another ``ValueError`` or an ``OSError``), every rank raises the first rank's
    refusal, naming that rank, of the same kind. Other exceptions (bugs) propagate on their own rank as they would."""
    if acc.num_processes == 1:
        return check(*args, **kwargs)
    refusal: tuple[str, str] | None = None
    result = None
    try:
        result = check(*args, **kwargs)
    except (ValueError, OSError) as e:
        kind = "config" if isinstance(e, ConfigError) else "value" if isinstance(e, ValueError) else "file"
        refusal = (kind, str(e))
    refusals = gather_object([refusal])
    first = next(((rank, r) for rank, r in enumerate(refusals) if r is not None), None)
    if first is not None:
        rank, (kind, message) = first
        raise KINDS[kind](f"rank {rank}: {message}")
    return result  # type: ignore[return-value]
