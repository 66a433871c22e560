"""SIMA over several seeds: per seed, the critic's agreement with the reference answers, how many preference pairs it
kept, and accuracy after the DPO stage against the finetuned model it started from, paired per question; across
seeds, the mean difference, its standard error over seeds and ``t = mean / SE``.

OUT (experiments/sima/seeds.sh) holds ``eval_before/report.json``, and per seed ``seed_<S>/sima/critic_check.json``,
``seed_<S>/sima/<set>.json`` and ``eval_seed_<S>/report.json``.

    python experiments/sima/seed_table.py outputs/sima
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from alignlm.evaluation.paired import POOLED, final_scores, paired_reports, seed_line


def table(out: Path) -> list[str]:
    before = final_scores(out / "eval_before" / "report.json")
    sets = [s for s in before if s != POOLED] + [POOLED]
    acc = {s: math.fsum(before[s].values()) / len(before[s]) for s in sets}
    lines = [
        f"Before (the finetuned model, greedy): {' / '.join(f'{s} {100 * acc[s]:.1f} %' for s in sets)}.",
        "",
        "| seed | critic agreement on informative pairs (always-greedy baseline) | pairs kept / judged | "
        + " | ".join(f"{s} after" for s in sets)
        + " | after - before, all (paired SE) |",
        "|---|---|---|" + "---:|" * (len(sets) + 1),
    ]
    diffs = []
    for run in sorted(out.glob("seed_*")):
        after = final_scores(out / f"eval_{run.name}" / "report.json")
        critic = json.loads((run / "sima" / "critic_check.json").read_text())
        judged = sum(c["pairs"] for c in critic.values())
        kept = sum(len(json.loads((run / "sima" / f"{name}.json").read_text())) for name in critic)
        agreement = "; ".join(
            f"{name} {_pct(c['agreement'])} of {c['informative']} (greedy right {_pct(c['a_right'])}); consistent "
            f"{c['informative_consistent']}"
            for name, c in critic.items()
        )
        d = paired_reports(out / "eval_before" / "report.json", out / f"eval_{run.name}" / "report.json")
        diffs.append(d["diff"])
        cells = [f"{100 * math.fsum(after[s].values()) / len(after[s]):.1f}" for s in sets]
        lines.append(
            f"| {run.name} | {agreement} | {kept} / {judged} | "
            + " | ".join(cells)
            + f" | {100 * d['diff']:+.1f} ({100 * d['se']:.1f}) |"
        )
    lines += ["", "Across the seeds: " + seed_line("after - before", diffs)[2:] + "."]
    return lines


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    print("\n".join(table(ap.parse_args().out)))


if __name__ == "__main__":
    main()
