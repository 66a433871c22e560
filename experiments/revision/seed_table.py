"""The ReVision comparison over several seeds: one row per seed, then what holds across seeds.

Each SEED_DIR holds the three arms' evaluations as ``eval_<arm>/report.json`` (experiments/revision/compare.sh,
experiments/revision/finetune_seeds.sh). For every seed, the arms' final checkpoints (the same number of image finetuning
steps): accuracy per question set and over all questions, and each arm minus the reference arm on the same questions
(the paired difference of `alignlm.evaluation.paired`). Across seeds: the mean of each column, and for each
difference its standard error over seeds, ``t = mean / SE`` and how many seeds it is positive at. The per-question
standard error answers "is it better at this seed"; the one over seeds answers "is it better", since the seed
(finetuning order, connector init) moves accuracy by far more than the questions do.

    python experiments/revision/seed_table.py outputs/ft/seed_*
    python experiments/revision/seed_table.py outputs/s1 --arms untrained raw cov     # other arm folder names
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from alignlm.evaluation.paired import POOLED, final_scores, mean_se, paired_reports, t_test_p


def table(seed_dirs: list[Path], arms: list[str]) -> list[str]:
    """The markdown table: per seed, accuracy per set per arm and each arm minus the reference arm over all questions."""
    ref, others = arms[0], arms[1:]
    rows: list[dict[str, Any]] = []
    for d in seed_dirs:
        scores = {a: final_scores(d / f"eval_{a}" / "report.json") for a in arms}
        sets = [s for s in scores[ref] if s != POOLED] + [POOLED]
        acc = {a: {s: math.fsum(scores[a][s].values()) / len(scores[a][s]) for s in sets} for a in arms}
        report = {a: d / f"eval_{a}" / "report.json" for a in arms}
        diffs: dict[str, dict[str, Any]] = {a: paired_reports(report[ref], report[a]) for a in others}
        diffs[f"{arms[-1]}-{others[0]}"] = paired_reports(report[others[0]], report[arms[-1]])
        rows.append({"seed": d.name, "sets": sets, "acc": acc, "diffs": diffs})
    sets = rows[0]["sets"]
    dkeys = list(rows[0]["diffs"])
    dnames = [f"{k} vs {ref}" if "-" not in k else k.replace("-", " vs ") for k in dkeys]
    lines = [
        f"Accuracy % ({' / '.join(sets)}) of each arm's final checkpoint; differences in points over all "
        f"questions, paired per question (SE in brackets).",
        "",
        "| seed | " + " | ".join(arms) + " | " + " | ".join(dnames) + " |",
        "|---|" + "---:|" * (len(arms) + len(dkeys)),
    ]
    for r in rows:
        cells = [" / ".join(f"{100 * r['acc'][a][s]:.1f}" for s in sets) for a in arms]
        cells += [f"{100 * r['diffs'][k]['diff']:+.1f} ({100 * r['diffs'][k]['se']:.1f})" for k in dkeys]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    means = [" / ".join(f"{100 * mean_se([r['acc'][a][s] for r in rows])[0]:.1f}" for s in sets) for a in arms]
    lines.append(
        f"| mean of {len(rows)} | "
        + " | ".join(means)
        + " | "
        + " | ".join(
            "{:+.1f} (SE {:.1f}, t {:+.2f}, p {:.2f}, positive at {}/{})".format(
                100 * m,
                100 * se,
                m / se if se > 0 else math.nan,
                t_test_p(m / se if se > 0 else math.nan, len(rows) - 1),
                sum(r["diffs"][k]["diff"] > 0 for r in rows),
                len(rows),
            )
            for k in dkeys
            for m, se in [mean_se([r["diffs"][k]["diff"] for r in rows])]
        )
        + " |"
    )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seed_dirs", nargs="+", type=Path)
    ap.add_argument(
        "--arms",
        nargs=3,
        default=["revision_untrained", "revision_raw", "revision"],
        metavar=("REFERENCE", "NO_REALIGN", "REVISION"),
        help="the arms' eval_<arm> folder names",
    )
    args = ap.parse_args()
    print("\n".join(table(args.seed_dirs, args.arms)))


if __name__ == "__main__":
    main()
