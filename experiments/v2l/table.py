"""V2L against mlp2x_gelu (``baseline``) and VLAP over seeds (experiments/v2l/run.sh): per seed, token-word accuracy
after caption pretraining and answer accuracy after connector-only finetuning with the LLM frozen; V2L minus each
other arm paired per question within a seed, then the mean over seeds, its standard error and ``t = mean / SE``.

    python experiments/v2l/table.py outputs/v2l
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from alignlm.evaluation.paired import POOLED, final_scores, mean_se, paired_difference

ARMS = ("baseline", "vlap", "v2l")
WORDS = "without background"


def table(out: Path) -> list[str]:
    seeds = sorted({p.name.rsplit("_", 1)[1] for p in out.glob("v2l_seed_*")}, key=int)
    lines = [
        "| seed | "
        + " | ".join(f"{a} token-word" for a in ARMS)
        + " | "
        + " | ".join(f"{a} answers" for a in ARMS)
        + " | v2l - baseline answers (paired SE) | v2l - vlap answers (paired SE) |",
        "|---|" + "---:|" * (2 * len(ARMS) + 2),
    ]
    diffs: dict[str, list[float]] = {
        "token-word v2l - baseline": [],
        "token-word v2l - vlap": [],
        "answers v2l - baseline": [],
        "answers v2l - vlap": [],
    }
    for seed in seeds:
        words = {a: json.loads((out / f"tokens_{a}_seed_{seed}.json").read_text()) for a in ARMS}
        words = {a: next(iter(w.values()))[WORDS]["token_word_acc"] for a, w in words.items()}
        scores = {a: final_scores(out / f"eval_{a}_seed_{seed}" / "report.json")[POOLED] for a in ARMS}
        paired = {a: paired_difference(scores[a], scores["v2l"]) for a in ("baseline", "vlap")}
        for a in ("baseline", "vlap"):
            diffs[f"token-word v2l - {a}"].append(words["v2l"] - words[a])
            diffs[f"answers v2l - {a}"].append(paired[a]["diff"])
        acc = {a: math.fsum(scores[a].values()) / len(scores[a]) for a in ARMS}
        lines.append(
            f"| {seed} | "
            + " | ".join(f"{100 * words[a]:.1f}" for a in ARMS)
            + " | "
            + " | ".join(f"{100 * acc[a]:.1f}" for a in ARMS)
            + " | "
            + " | ".join(f"{100 * paired[a]['diff']:+.1f} ({100 * paired[a]['se']:.1f})" for a in ("baseline", "vlap"))
            + " |"
        )
    lines.append("")
    for name, xs in diffs.items():
        m, se = mean_se(xs)
        t = m / se if se and se > 0 else math.nan
        lines.append(f"- {name}: {100 * m:+.2f} points over {len(xs)} seeds (SE {100 * se:.2f}, t {t:+.2f})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    print("\n".join(table(ap.parse_args().out)))


if __name__ == "__main__":
    main()
