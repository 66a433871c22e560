"""Set-of-Mark against plain finetuning over seeds (experiments/som/run.sh): per seed, held-out accuracy of each arm
overall and per question type, and som - plain paired per question; then the mean over seeds, its standard error
and ``t = mean / SE``.

    python experiments/som/table.py outputs/som
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from alignlm.evaluation.paired import POOLED, final_scores, paired_difference, print_seed_table, seed_line


def qtypes(test_set: Path) -> dict[str, str]:
    """Question id -> question type (count, color, shape, position) of the held-out set."""
    return {r["id"]: r["meta"]["qtype"] for r in json.loads(test_set.read_text())}


def table(out: Path) -> list[str]:
    kinds = qtypes(out / "data" / "shapes" / "test.json")
    types = sorted(set(kinds.values()))
    seeds = sorted({p.name.rsplit("_", 1)[1] for p in out.glob("som_seed_*")}, key=int)
    lines = [
        "| seed | plain | som | som - plain (paired SE) | " + " | ".join(f"{t}: plain / som" for t in types) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(types),
    ]
    diffs: list[float] = []
    per_type: dict[str, list[float]] = {t: [] for t in types}
    for seed in seeds:
        plain, som = (final_scores(out / f"eval_{arm}_seed_{seed}" / "report.json")[POOLED] for arm in ("plain", "som"))
        d = paired_difference(plain, som)
        diffs.append(d["diff"])
        cells = []
        for t in types:
            ids = [i for i in plain if kinds[i.split("/", 1)[1]] == t]
            a, b = (math.fsum(s[i] for i in ids) / len(ids) for s in (plain, som))
            per_type[t].append(b - a)
            cells.append(f"{100 * a:.1f} / {100 * b:.1f}")
        lines.append(
            f"| {seed} | {100 * d['a_acc']:.1f} | {100 * d['b_acc']:.1f} | {100 * d['diff']:+.1f} ({100 * d['se']:.1f}) | "
            + " | ".join(cells)
            + " |"
        )
    lines.append("")
    lines += [seed_line(f"som - plain, {name}", xs) for name, xs in {"all questions": diffs, **per_type}.items()]
    return lines


if __name__ == "__main__":
    print_seed_table(table, __doc__)
