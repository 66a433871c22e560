"""Set-of-Mark against plain finetuning over seeds (experiments/som/run.sh): per seed, held-out accuracy of each arm
overall and per question type, and arm - plain paired per question; then the mean over seeds, its standard error
and ``t = mean / SE``. Every ``eval_<run>`` of a run ``<arm>_seed_<S>`` other than plain is an arm.

    python experiments/som/table.py outputs/som
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from alignlm.evaluation.paired import paired_reports, pooled_pair, print_seed_table, seed_line


def qtypes(test_set: Path) -> dict[str, str]:
    """Question id -> question type (count, color, shape, position) of the held-out set."""
    return {r["id"]: r["meta"]["qtype"] for r in json.loads(test_set.read_text())}


def table(out: Path) -> list[str]:
    """One block per arm other than ``plain`` (``som``; ``som78``, the equal-plain-samples control), against plain."""
    kinds = qtypes(out / "data" / "shapes" / "test.json")
    runs = [p.name[len("eval_") :] for p in out.glob("eval_*_seed_*") if (out / p.name[len("eval_") :]).is_dir()]
    arms = sorted({r.rsplit("_seed_", 1)[0] for r in runs} - {"plain"})
    lines: list[str] = []
    for arm in arms:
        lines += arm_block(out, arm, kinds) + [""]
    return lines[:-1]


def arm_block(out: Path, arm: str, kinds: dict[str, str]) -> list[str]:
    types = sorted(set(kinds.values()))
    seeds = sorted({p.name.rsplit("_", 1)[1] for p in out.glob(f"eval_{arm}_seed_*")}, key=int)
    lines = [
        f"| seed | plain | {arm} | {arm} - plain (paired SE) | "
        + " | ".join(f"{t}: plain / {arm}" for t in types)
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(types),
    ]
    diffs: list[float] = []
    per_type: dict[str, list[float]] = {t: [] for t in types}
    for seed in seeds:
        plain, other = pooled_pair(*(out / f"eval_{a}_seed_{seed}" / "report.json" for a in ("plain", arm)))
        d = paired_reports(*(out / f"eval_{a}_seed_{seed}" / "report.json" for a in ("plain", arm)))
        diffs.append(d["diff"])
        cells = []
        for t in types:
            ids = [i for i in plain if kinds[i.split("/", 1)[1]] == t]
            a, b = (math.fsum(s[i] for i in ids) / len(ids) for s in (plain, other))
            per_type[t].append(b - a)
            cells.append(f"{100 * a:.1f} / {100 * b:.1f}")
        lines.append(
            f"| {seed} | {100 * d['a_acc']:.1f} | {100 * d['b_acc']:.1f} | {100 * d['diff']:+.1f} ({100 * d['se']:.1f}) | "
            + " | ".join(cells)
            + " |"
        )
    lines.append("")
    lines += [seed_line(f"{arm} - plain, {name}", xs) for name, xs in {"all questions": diffs, **per_type}.items()]
    return lines


if __name__ == "__main__":
    print_seed_table(table, __doc__)
