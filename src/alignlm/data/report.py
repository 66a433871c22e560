"""What the data policy left out, by cause, and what it kept but changed: one report per stage.

Every record dropped at start-up (malformed, invalid JSON line, image path outside its root) and every sample skipped
while training (missing, unreadable or oversized image, too long to cut, ...) is counted under exactly one cause, with
the first few record ids of each; samples cut to ``data.max_length`` are counted too, as kept. The stage table, the
log and ``summary.json`` show it; step checkpoints carry it, so a resumed stage reports the whole stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignlm.data.records import TRUNCATED

EXAMPLES = 3  # record ids kept per cause


@dataclass
class DataReport:
    """Counts per cause and the first ``EXAMPLES`` record ids of each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, cause: str, record_id: str, n: int = 1) -> None:
        self.counts[cause] = self.counts.get(cause, 0) + n
        ids = self.examples.setdefault(cause, [])
        if len(ids) < EXAMPLES:
            ids.append(str(record_id))

    def merge(self, other: DataReport) -> DataReport:
        """This report plus ``other`` (ranks, or a resumed segment)."""
        out = DataReport(dict(self.counts), {k: list(v) for k, v in self.examples.items()})
        for cause, n in other.counts.items():
            out.counts[cause] = out.counts.get(cause, 0) + n
            ids = out.examples.setdefault(cause, [])
            ids.extend(i for i in other.examples.get(cause, []) if len(ids) < EXAMPLES and i not in ids)
        return out

    @property
    def left_out(self) -> int:
        """Records and samples not trained on (truncated ones were)."""
        return sum(n for cause, n in self.counts.items() if cause != TRUNCATED)

    def to_dict(self) -> dict[str, Any]:
        return {
            "left_out": self.left_out,
            "counts": dict(sorted(self.counts.items())),
            "examples": dict(sorted(self.examples.items())),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DataReport:
        data = data or {}
        return cls(dict(data.get("counts", {})), {k: list(v) for k, v in data.get("examples", {}).items()})

    def lines(self) -> list[str]:
        """One line per cause, largest first: ``cause: n (e.g. id, id)``."""
        return [
            f"{cause}: {n} (e.g. {', '.join(self.examples.get(cause, []))})"
            for cause, n in sorted(self.counts.items(), key=lambda kv: -kv[1])
        ]
