"""V2L against mlp2x_gelu (``baseline``) and VLAP over seeds (experiments/v2l/run.sh): per seed, token-word accuracy
after caption pretraining, and answer accuracy after connector-only finetuning with the LLM frozen, both exact match
and names-the-choice (the prediction names the right choice and no other: a frozen LLM may answer in sentences);
V2L minus each other arm, answers paired per question within a seed, then the mean over seeds, its standard error
and ``t = mean / SE``.

    python experiments/v2l/table.py outputs/v2l
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from alignlm.evaluation.paired import POOLED, final_scores, paired_reports, print_seed_table, seed_line

ARMS = ("baseline", "vlap", "v2l")
OTHERS = ("baseline", "vlap")
WORDS = "without background"
SCORES = {"exact": "scores", "names-choice": "choice_scores"}


def table(out: Path) -> list[str]:
    seeds = sorted({p.name.rsplit("_", 1)[1] for p in out.glob("eval_v2l_seed_*")}, key=int)
    lines = [
        "| seed | metric | " + " | ".join(ARMS) + " | " + " | ".join(f"v2l - {a} (paired SE)" for a in OTHERS) + " |",
        "|---|---|" + "---:|" * (len(ARMS) + len(OTHERS)),
    ]
    diffs: dict[str, list[float]] = {}
    for seed in seeds:
        words = {a: json.loads((out / f"tokens_{a}_seed_{seed}.json").read_text()) for a in ARMS}
        words = {a: next(iter(w.values()))[WORDS]["token_word_acc"] for a, w in words.items()}
        cells = " | ".join(f"{100 * words[a]:.1f}" for a in ARMS)
        gaps = [words["v2l"] - words[a] for a in OTHERS]
        for a, g in zip(OTHERS, gaps):
            diffs.setdefault(f"token-word accuracy, v2l - {a}", []).append(g)
        lines.append(f"| {seed} | token-word | {cells} | " + " | ".join(f"{100 * g:+.1f}" for g in gaps) + " |")
        for metric, key in SCORES.items():
            report = {a: out / f"eval_{a}_seed_{seed}" / "report.json" for a in ARMS}
            scores = {a: final_scores(report[a], key)[POOLED] for a in ARMS}
            paired = {a: paired_reports(report[a], report["v2l"], key) for a in OTHERS}
            for a in OTHERS:
                diffs.setdefault(f"answers ({metric}), v2l - {a}", []).append(paired[a]["diff"])
            acc = " | ".join(f"{100 * math.fsum(scores[a].values()) / len(scores[a]):.1f}" for a in ARMS)
            pairs = " | ".join(f"{100 * paired[a]['diff']:+.1f} ({100 * paired[a]['se']:.1f})" for a in OTHERS)
            lines.append(f"| {seed} | answers, {metric} | {acc} | {pairs} |")
    lines.append("")
    lines += [seed_line(name, xs) for name, xs in diffs.items()]
    return lines


if __name__ == "__main__":
    print_seed_table(table, __doc__)
