"""What the data policy left out, by cause, and what it kept but changed: one report per stage.

Every record dropped at start-up (malformed, invalid JSON line, image path outside its root) and every sample skipped
while training (missing, unreadable or oversized image, too long to cut, ...) is counted under exactly one cause, with
the first few record ids of each and the first reason given for it: a cause's count alone ("malformed record: 80")
does not say what to fix, and the reason is the same for every record when one mistake made them all. Samples cut
to ``data.max_length`` are counted too, as kept. The stage table, the log and ``summary.json`` show it; step
checkpoints carry it, so a resumed stage reports the whole stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignlm.data.records import TRUNCATED

EXAMPLES = 3  # record ids kept per cause
REASON_CHARS = 300  # of the first reason kept per cause (a reason may quote a long value of the record)


@dataclass
class DataReport:
    """Counts per cause, the first ``EXAMPLES`` record ids of each, and per cause the first reason given, as
    ``[record id, reason]``."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    reasons: dict[str, list[str]] = field(default_factory=dict)

    def add(self, cause: str, record_id: str, n: int = 1, reason: str | None = None) -> None:
        """Count ``n`` of ``cause``; ``reason``: why this record was left out (kept if it is the cause's first)."""
        self.counts[cause] = self.counts.get(cause, 0) + n
        ids = self.examples.setdefault(cause, [])
        if len(ids) < EXAMPLES and str(record_id) not in ids:
            ids.append(str(record_id))
        if reason and cause not in self.reasons:
            self.reasons[cause] = [str(record_id), reason[:REASON_CHARS]]

    def merge(self, other: DataReport) -> DataReport:
        """This report plus ``other`` (ranks, or a resumed segment)."""
        out = DataReport.from_dict(self.to_dict())
        for cause, n in other.counts.items():
            out.counts[cause] = out.counts.get(cause, 0) + n
            ids = out.examples.setdefault(cause, [])
            ids.extend(i for i in other.examples.get(cause, []) if len(ids) < EXAMPLES and i not in ids)
        for cause, first in other.reasons.items():
            out.reasons.setdefault(cause, list(first))
        return out

    @property
    def left_out(self) -> int:
        """Records and samples not trained on (truncated ones were)."""
        return sum(n for cause, n in self.counts.items() if cause != TRUNCATED)

    def to_dict(self) -> dict[str, Any]:
        """The report as ``summary.json`` and a checkpoint keep it (``reasons`` only where one was given)."""
        out = {
            "left_out": self.left_out,
            "counts": dict(sorted(self.counts.items())),
            "examples": dict(sorted(self.examples.items())),
        }
        return out | ({"reasons": dict(sorted(self.reasons.items()))} if self.reasons else {})

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DataReport:
        data = data or {}
        return cls(
            dict(data.get("counts", {})),
            {k: list(v) for k, v in data.get("examples", {}).items()},
            {k: list(v) for k, v in data.get("reasons", {}).items()},
        )

    def lines(self) -> list[str]:
        """One line per cause, largest first: ``cause: n (e.g. id: reason; also id, id)``, or without a reason
        ``cause: n (e.g. id, id)``."""
        return [self.line(cause, n) for cause, n in sorted(self.counts.items(), key=lambda kv: -kv[1])]

    def line(self, cause: str, n: int) -> str:
        """A cause's line of :meth:`lines`."""
        ids = self.examples.get(cause, [])
        if cause not in self.reasons:
            return f"{cause}: {n} (e.g. {', '.join(ids)})"
        first, reason = self.reasons[cause]
        others = [i for i in ids if i != first]
        return f"{cause}: {n} (e.g. {first}: {reason}{'; also ' + ', '.join(others) if others else ''})"
