"""Arms of caption pretraining side by side by the alignment monitor (experiments/artifacts/run.sh,
experiments/objectives/run.sh): per seed and arm (runs named ``<arm>_seed_<seed>``), the last monitor measurement and
the mean captioning loss of the last 10 steps; each arm minus the ``none`` arm paired by seed, with the mean over seeds,
its standard error and ``t = mean / SE``.

    python experiments/monitor_table.py outputs/artifacts
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from alignlm.evaluation.paired import print_seed_table, seed_line

METRICS = ("pooled/modality_gap", "pooled/mutual_knn", "pooled/cka", "pooled/cknna", "pooled/i2t_recall@10")


def last_row(run: Path) -> dict[str, float]:
    """The monitor's last measurement, with the mean captioning loss (``loss/lm``, without any other objective's
    term) of the last 10 steps as ``caption_loss``."""
    rows = [json.loads(r) for r in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    monitor = [r for r in rows if any(k.startswith("monitor/") for k in r)][-1]
    out = {m: monitor[f"monitor/{m}"] for m in METRICS if f"monitor/{m}" in monitor}
    losses = [r["loss/lm"] for r in rows if r.get("loss/lm") is not None][-10:]
    return out | {"caption_loss": math.fsum(losses) / len(losses)}


def table(out: Path) -> list[str]:
    runs = {p.name for p in out.iterdir() if (p / "pretrain" / "final" / "config.yaml").exists()}  # finished runs
    arms = sorted({r.rsplit("_seed_", 1)[0] for r in runs}, key=lambda a: (a != "none", a))
    seeds = sorted({r.rsplit("_seed_", 1)[1] for r in runs}, key=int)
    values = {(a, s): last_row(out / f"{a}_seed_{s}") for a in arms for s in seeds if f"{a}_seed_{s}" in runs}
    keys = list(next(iter(values.values())))
    lines = ["| arm | seed | " + " | ".join(keys) + " |", "|---|---|" + "---:|" * len(keys)]
    for (a, s), v in values.items():
        lines.append(f"| {a} | {s} | " + " | ".join(f"{v[k]:.4f}" for k in keys) + " |")
    lines.append("")
    for a in arms[1:]:
        for k in keys:
            d = [
                values[(a, s)][k] - values[("none", s)][k] for s in seeds if (a, s) in values and ("none", s) in values
            ]
            lines.append(seed_line(f"{a} - none, {k}", d, scale=1.0, unit=""))
    return lines


if __name__ == "__main__":
    print_seed_table(table, __doc__)
