"""Paired comparison of checkpoints on the same questions: is B really better than A, or is it noise?

Two checkpoints evaluated on the same question set answer the *same* questions, so the right uncertainty is that of
the per-question differences ``d_i = score_B(i) - score_A(i)``, not two independent binomial errors: questions both
get right (or both get wrong) cancel. For each question set the two share, and for all their shared questions pooled,
this reports the accuracy difference, its paired standard error ``std(d, ddof=1) / sqrt(n)``, ``z = diff / se`` (a
normal approximation, poor when few questions differ), the discordant counts (questions B scores higher on, and A
higher on) and ``p``, the exact two-sided sign test on them: under "neither is better" each discordant question is a
fair coin. With right/wrong scores that is McNemar's exact test.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

POOLED = "all"
TIE = 1e-5  # scores are multiples of 1/30 at the finest (VQA over 10 annotators); report.json keeps 6 digits


def paired_difference(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, Any] | None:
    """Difference ``B - A`` over the question ids both score; ``None`` when they share fewer than two."""
    ids = sorted(a.keys() & b.keys())
    n = len(ids)
    if n < 2:
        return None
    # a difference under TIE is rounding (scores of one value reached by other sums, or 6 digits in report.json)
    d = [0.0 if abs(x) <= TIE else x for x in (float(b[i]) - float(a[i]) for i in ids)]
    mean, se = mean_se(d)  # every difference alike: no spread, not 1e-17
    return {
        "n": n,
        "a_acc": math.fsum(float(a[i]) for i in ids) / n,
        "b_acc": math.fsum(float(b[i]) for i in ids) / n,
        "diff": mean,
        "se": se,
        "z": mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean)),
        "only_b": sum(x > 0 for x in d),
        "only_a": sum(x < 0 for x in d),
        "p": sign_test(sum(x > 0 for x in d), sum(x < 0 for x in d)),
    }


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: the chance, if each of the ``wins + losses`` discordant questions were a fair
    coin, of a split at least this uneven (1 when there are none). Exact integer arithmetic, so large counts too.

    The tail sum_{i <= m} C(n, i), m = min(wins, losses), runs down from C(n, m) by
    C(n, i - 1) = C(n, i) i / (n - i + 1): one multiplication by a small number per term (a ``math.comb`` per term
    took 36 s for 20,000 questions). Below n / 2 the terms shrink, so the ``i`` left add at most ``i`` times the
    current one; once that is under 2**-64 of the sum, far below a float's precision, the sum stops (a split near
    n / 2 of 200,000 questions: 2,200 terms, 0.4 s, most of it C(n, m)).
    """
    n = wins + losses
    if not n:
        return 1.0
    i = min(wins, losses)
    term = tail = math.comb(n, i)
    while i and (term * i) << 64 >= tail:
        term = term * i // (n - i + 1)
        i -= 1
        tail += term
    return min(1.0, 2 * tail / 2**n)


def final_scores(report: str | Path, key: str = "scores") -> dict[str, dict[str, float]]:
    """Per question set of an ``alignlm eval`` report, each question's score at its final checkpoint (the last one),
    plus all sets pooled (:data:`POOLED`, ids prefixed by the set); ``key="choice_scores"`` for the names-the-choice
    scores. To pair two reports, :func:`pooled_pair`."""
    return _pooled(_final(report), key)


def pooled_pair(a: str | Path, b: str | Path, key: str = "scores") -> tuple[dict[str, float], dict[str, float]]:
    """Two reports' pooled final scores (:func:`final_scores`) over the sets they read from the same files, as
    ``alignlm compare`` pairs them (:func:`other_questions`: a set whose file either report does not record counts as
    the same): a seed sweep that regenerated the test set under the same ids had paired other questions."""
    first, second = _final(a), _final(b)
    other = set(other_questions(first, second))
    return (_pooled(first, key, other)[POOLED], _pooled(second, key, other)[POOLED])


def paired_reports(a: str | Path, b: str | Path, key: str = "scores") -> dict[str, Any]:
    """:func:`paired_difference` of report ``b``'s final scores against report ``a``'s (:func:`pooled_pair`), or a
    ValueError naming both where they share fewer than two questions of the same files."""
    found = paired_difference(*pooled_pair(a, b, key))
    if found is None:
        raise ValueError(f"{b} and {a} share fewer than 2 questions read from the same files: nothing to pair")
    return found


def _final(report: str | Path) -> dict[str, Any]:
    """The last checkpoint of an ``alignlm eval`` report, refused unless it is a ``final/``."""
    last = json.loads(Path(report).read_text())["checkpoints"][-1]
    if last["kind"] != "final":
        raise ValueError(f"{report}: the last checkpoint is {last['label']}, not a final/")
    return last


def _pooled(checkpoint: Mapping[str, Any], key: str, leave_out: Collection[str] = ()) -> dict[str, dict[str, float]]:
    """A checkpoint's scores per set but those of ``leave_out``, and those sets pooled (:data:`POOLED`)."""
    sets = {name: s[key] for name, s in checkpoint["sets"].items() if key in s and name not in leave_out}
    sets[POOLED] = {f"{name}/{k}": v for name, scores in sets.items() for k, v in scores.items()}
    return sets


def print_seed_table(table: Callable[[Path], list[str]], usage: str, argv: Sequence[str] | None = None) -> None:
    """The entry point of the experiments' seed-table scripts: ``table(OUT)`` for the one folder argument, printed."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        raise SystemExit(usage)
    print("\n".join(table(Path(args[0]))))


def seed_line(name: str, xs: Sequence[float], scale: float = 100.0, unit: str = " points") -> str:
    """``- name: +m unit over n seeds (SE se, t t, df n-1, p p)``: a difference's mean over seeds (times ``scale``),
    its standard error, ``t = mean / SE`` and the two-sided p of Student's t with ``n - 1`` degrees of freedom (nan
    when the seeds agree exactly or there is one). Read p: over 3 seeds |t| must pass 4.30 for p < 0.05, where the
    normal's 1.96 reads a t of 2.7 as an effect (p 0.11)."""
    m, se = mean_se(xs)
    t = m / se if se and se > 0 else math.nan
    return (
        f"- {name}: {scale * m:+.2f}{unit} over {len(xs)} seeds (SE {scale * se:.2f}, t {t:+.2f}, df {len(xs) - 1}, "
        f"p {t_test_p(t, len(xs) - 1):.3f})"
    )


def t_test_p(t: float, df: int) -> float:
    """Two-sided p of Student's t with ``df`` degrees of freedom (nan for a nan t or no degree of freedom)."""
    if math.isnan(t) or df < 1:
        return math.nan
    from scipy.stats import t as student  # noqa: PLC0415 - seconds of import, for the seed tables only

    return float(2 * student.sf(abs(t), df))


def mean_se(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error over independent runs (seeds); ``nan`` error with a single value, 0 where the
    values agree within :data:`TIE` (float noise had given an SE of 1e-17 and a t of 1e16): the standard error of
    :func:`paired_difference` and of the seed tables alike. The tie is absolute, for every metric: the figures come
    from report.json and metrics files at 6 significant digits, so a spread under 1e-5 (a modality gap near 1, a loss
    near 3) cannot be told from their rounding, and its t is left nan rather than computed from it."""
    m = math.fsum(xs) / len(xs)
    if len(xs) < 2:
        return m, math.nan
    if not all(map(math.isfinite, xs)):
        return m, math.nan
    if max(xs) - min(xs) <= TIE:  # a tie as paired_difference reads one
        return m, 0.0
    return m, math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def other_questions(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The question sets two checkpoints' results share by name but scored from files of other content: other
    questions under the same ids (each run's own ``eval.sets``, two data roots), which are never paired. Results
    written before a set's file was recorded are taken as the same."""
    return [
        name
        for name in sorted(a["sets"].keys() & b["sets"].keys())
        if (fa := a["sets"][name].get("file")) and (fb := b["sets"][name].get("file")) and fa["sha256"] != fb["sha256"]
    ]


def pairing_notes(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """What a reader of ``b``'s paired differences against ``a`` must know: the shared set names scored from other
    files (left out), and the scoring settings that differ on the sets that are paired (decoding, limit, seed, answer
    length, template: a difference then measures them too)."""
    other = other_questions(a, b)
    notes = [
        f"{name}: {b['label']} read {b['sets'][name]['file']['path']}, {a['label']} read "
        f"{a['sets'][name]['file']['path']}, other questions under the same ids: not paired"
        for name in other
    ]
    for name in sorted(a["sets"].keys() & b["sets"].keys() - set(other)):
        ka, kb = a["sets"][name].get("scored_with"), b["sets"][name].get("scored_with")
        if not ka or not kb:
            continue
        changed = [
            f"{k} {kb.get(k)!r} against {ka.get(k)!r}" for k in sorted(ka.keys() | kb.keys()) if ka.get(k) != kb.get(k)
        ]
        if changed:
            notes.append(f"{name}: {b['label']} was scored with other settings than {a['label']}: {'; '.join(changed)}")
    return notes


def against_first(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every checkpoint after the first against the first, per shared question set (scored from the same file) and
    pooled over them."""
    if len(results) < 2:
        return []
    base = results[0]
    rows = []
    for res in results[1:]:
        pooled_a: dict[str, float] = {}
        pooled_b: dict[str, float] = {}
        for name in sorted(base["sets"].keys() & res["sets"].keys() - set(other_questions(base, res))):
            sa, sb = base["sets"][name].get("scores"), res["sets"][name].get("scores")
            if sa is None or sb is None:
                continue
            row = paired_difference(sa, sb)
            if row is not None:
                rows.append({"a": base["label"], "b": res["label"], "set": name, **row})
                pooled_a.update({f"{name}/{k}": v for k, v in sa.items()})
                pooled_b.update({f"{name}/{k}": v for k, v in sb.items()})
        sets = {r["set"] for r in rows if r["b"] == res["label"]}
        if len(sets) > 1:
            row = paired_difference(pooled_a, pooled_b)
            assert row is not None
            rows.append({"a": base["label"], "b": res["label"], "set": POOLED, **row})
    return rows


def run_key(result: Mapping[str, Any]) -> str:
    """A checkpoint's run as the report names it apart from another run of the same name: the folders ``above`` it
    (``s1/raw``, ``s2/raw``: two seeds of one recipe) and its name."""
    above = result.get("above") or ""
    return f"{above}/{result['run']}" if above else str(result["run"])


def same_step_pairs(
    results: Sequence[Mapping[str, Any]], reference_run: str
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """``(reference, other)``: every other run's checkpoint with the reference run's checkpoint (runs by
    :func:`run_key`) of the same stage at the same step: the comparison of arms that had the same number of steps
    (e.g. of image finetuning). Steps restart in each stage, so a step alone would pair one run's pretrain with
    another's finetune."""
    ref = {(r.get("stage"), r["step"]): r for r in results if run_key(r) == reference_run and r.get("step") is not None}
    return [
        (ref[(res.get("stage"), res.get("step"))], res)
        for res in results
        if run_key(res) != reference_run and (res.get("stage"), res.get("step")) in ref
    ]


def same_step(results: Sequence[Mapping[str, Any]], reference_run: str) -> list[dict[str, Any]]:
    """:func:`against_first` rows of each of :func:`same_step_pairs`."""
    return [row for a, b in same_step_pairs(results, reference_run) for row in against_first([a, b])]


def too_few_shared(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The question sets both checkpoints score question by question but that share fewer than two question ids, so
    :func:`against_first` has no row for them (e.g. the same set in a report written before alignlm keyed a record
    without an id by its place in the set, when the key was the file's path as typed)."""
    return [
        name
        for name in sorted(a["sets"].keys() & b["sets"].keys())
        if "scores" in a["sets"][name]
        and "scores" in b["sets"][name]
        and len(a["sets"][name]["scores"].keys() & b["sets"][name]["scores"].keys()) < 2
    ]


def markdown_lines(rows: Sequence[Mapping[str, Any]], notes: Sequence[str] = ()) -> list[str]:
    """The report's section for :func:`against_first` / :func:`same_step` rows and their :func:`pairing_notes`
    (empty when there are neither)."""
    if not rows:
        return ["", "## Paired differences", "", *(f"- {n}" for n in notes)] if notes else []
    lines = [
        "",
        "## Paired differences (same questions)",
        "",
        "| checkpoint | reference | set | n | accuracy % | reference % | difference (points) | paired SE | z | p | it higher | reference higher |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['b']} | {r['a']} | {r['set']} | {r['n']} | {100 * r['b_acc']:.1f} | {100 * r['a_acc']:.1f} | "
            f"{100 * r['diff']:+.1f} | {100 * r['se']:.1f} | {r['z']:+.2f} | {r['p']:.3g} | {r['only_b']} | "
            f"{r['only_a']} |"
        )
    lines += [
        "",
        f"`{POOLED}`: every shared question of the sets above, pooled. p: exact two-sided sign test on the questions "
        "the two score differently (McNemar's exact test for right/wrong scores); z is its normal approximation, "
        "which overstates confidence when few questions differ.",
    ]
    return lines + (["", *(f"- {n}" for n in notes)] if notes else [])
