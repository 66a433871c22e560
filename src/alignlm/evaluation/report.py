"""Checkpoints -> ``report.json``, ``report.md`` (one comparison table) and PNG plots.

For each checkpoint: generation sets (question accuracy, caption BLEU-4 / CIDEr-D), alignment probes on a held-out
caption set (docs/methods.md, metrics), and Mind the Gap's shift curve. The report is deterministic: fixed seeds,
first-``n`` subsets, rounded floats, sorted keys; timings go to the console, never into the report.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from alignlm.config import ConfigError
from alignlm.data.build import aspect_ratio_of
from alignlm.evaluation import checkpoints as C
from alignlm.evaluation import paired, plots
from alignlm.evaluation.evaluate import answer_accuracy, caption_scores, set_kind
from alignlm.geometry.metrics import retrieval_recall
from alignlm.geometry.suite import PAIR_METRICS, flat
from alignlm.models.artifacts import artifact_report
from alignlm.models.probes import (
    check_probe_size,
    extract,
    gap_shift,
    load_probe_set,
    needs_tokens,
    probe_metrics,
    resolve_layers,
)
from alignlm.training.logging import json_values

log = logging.getLogger("alignlm")

# Columns of the comparison table after the per-set scores (flattened probe keys).
HEADLINE = (
    "pooled/modality_gap",
    "pooled/mutual_knn",
    "pooled/cka",
    "pooled/cknna",
    "pooled/i2t_recall@1",
    "pooled/t2i_recall@1",
    "per_token/a_score_visual_to_text",
)
DIGITS = 6
PLOTS = ("pca", "metrics", "gap_shift", "layers", "artifacts")  # what write_plots draws, each to out/<name>.png
Column = tuple[str, Callable[[dict[str, Any]], float | None], int]  # header, the value, its decimals in the table


def rounded(x: Any) -> Any:
    """Floats to 6 significant digits, recursively: the last bits of a float sum never reach the report."""
    if isinstance(x, float):
        return float(f"{x:.{DIGITS}g}")
    if isinstance(x, Mapping):
        return {str(k): rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v) for v in x]
    return x


def check_set_names(sets: Sequence[Mapping[str, Any]]) -> None:
    """Each set has a name of its own: the report keeps a set's scores under its name, so the last of two sets of one
    name replaced the first, after both were generated."""
    names = [str(s["name"]) for s in sets]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"eval.sets name {twice} more than once; give each set a name of its own")


def eval_sets(ecfg: Mapping[str, Any], train_cfg: Any) -> list[dict[str, Any]]:
    """The configured sets, else the ones the checkpoint's run evaluated (``eval.sets`` of its config)."""
    sets = list(ecfg.get("sets") or [])
    if not sets:
        sets = [dict(s) for s in (train_cfg.get("eval") or {}).get("sets") or []]
    check_set_names(sets)
    return [
        {"name": str(s["name"]), "path": str(s["path"]), "kind": set_kind(str(s["path"]), str(s.get("kind", "auto")))}
        for s in sets
    ]


def shift_metrics() -> list[str]:
    """What ``gap_shift.metric`` may name: each pooled metric that is one number, and each recall the retrieval
    metric reports at the ``ks`` it measures by default (those gap_shift measures)."""
    ks = inspect.signature(retrieval_recall).parameters["ks"].default
    recalls = [f"{way}_recall@{k}" for way in ("i2t", "t2i") for k in ks]
    return [m for m in PAIR_METRICS if m != "retrieval"] + recalls


def probe_path(ecfg: Mapping[str, Any], sets: list[dict[str, Any]]) -> str | None:
    """``probe.path``, else the ``test_captions.json`` beside the first question set (the offline sets ship one)."""
    probe = ecfg.get("probe") or {}
    if probe.get("path"):
        return str(probe["path"])
    for s in sets:
        candidate = Path(s["path"]).parent / "test_captions.json"
        if candidate.exists():
            return str(candidate)
    return None


def probe_metrics_asked(pcfg: Mapping[str, Any], ecfg: Mapping[str, Any]) -> set[str]:
    """Every metric the probe will measure: its table, its layers' (where layers are asked), the gap-shift curve's."""
    asked = set(pcfg.get("metrics") or []) | (set(pcfg.get("layer_metrics") or []) if pcfg.get("layers") else set())
    shift = dict(ecfg.get("gap_shift") or {})
    return asked | ({shift.get("metric")} if shift.get("deltas") else set())


def evaluate_checkpoint(
    ck: C.Checkpoint, ecfg: Mapping[str, Any], device: torch.device
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One checkpoint's results, and the pooled features the plots draw."""
    t0 = time.perf_counter()
    train_cfg = C.stage_config(ck)
    sets = eval_sets(ecfg, train_cfg)
    pcfg = dict(ecfg.get("probe") or {})
    path = probe_path(ecfg, sets)
    if not sets and not (path and pcfg.get("enabled", True)):
        raise ValueError(
            f"nothing to evaluate for {ck.label}: its run had eval.sets=[] and no --sets NAME=PATH was "
            f"given, and the probe is {'off (--no-probe)' if path else 'without a caption set (probe.path)'}"
        )
    probe = None
    if path and pcfg.get("enabled", True):  # read first: a file too small for topk failed after the generation
        probe = load_probe_set(path, pcfg.get("n"), pcfg.get("image_root"))
        topk, asked = int(pcfg.get("topk", 10)), probe_metrics_asked(pcfg, ecfg)
        check_probe_size(len(probe.ids), topk, asked, "probe", "eval probe.path", path, pcfg.get("n"))
    model = C.load(ck, bool(ecfg.get("allow_code")), bool(ecfg.get("trust_remote_code"))).to(device)
    data_cfg = C.data_config(ck, train_cfg)
    if ecfg.get("template"):
        data_cfg["template"] = ecfg["template"]
    result: dict[str, Any] = {
        "label": ck.label,
        "above": ck.above,
        "path": str(ck.path),
        "kind": ck.kind,
        "run": ck.run,
        "stage": ck.stage,
        "step": ck.step,
        "template": data_cfg.get("template"),
        "sets": {},
    }
    gen = dict(ecfg.get("generation") or {})
    common = {
        "batch_size": int(ecfg["batch_size"]),
        "limit": ecfg.get("limit"),
        "generation": gen,
        "seed": int(ecfg.get("seed", 0)),
    }
    for s in sets:
        if s["kind"] == "qa":
            r = answer_accuracy(
                model, s["name"], s["path"], data_cfg, max_new_tokens=int(ecfg["max_new_tokens"]), **common
            )
        else:
            r = caption_scores(
                model, s["name"], s["path"], data_cfg, max_new_tokens=int(ecfg["caption_max_new_tokens"]), **common
            )
        result["sets"][s["name"]] = r
    t_gen = time.perf_counter()
    features: dict[str, Any] = {}
    if probe is not None:
        layers = resolve_layers(model, pcfg.get("layers"), "probe.layers")
        aspect_ratio = aspect_ratio_of(data_cfg)  # the probe images made square as the checkpoint's stage did
        feats = extract(
            model,
            probe,
            int(pcfg.get("batch_size", 32)),
            layers,
            aspect_ratio=aspect_ratio,
            tokens=needs_tokens(pcfg["metrics"]),
        )
        topk = int(pcfg.get("topk", 10))
        result["probe"] = {"path": path, **probe_metrics(feats, list(pcfg["metrics"]), topk, pcfg.get("layer_metrics"))}
        shift = dict(ecfg.get("gap_shift") or {})
        if shift.get("deltas"):  # the probe's k: the curve at delta 0 is the table's value
            curve = gap_shift(feats, [float(d) for d in shift["deltas"]], shift["metric"], topk)
            result["gap_shift"] = {"metric": shift["metric"], "curve": curve}
        features = {"image": feats.visual_mean, "text": feats.text_mean}
        artifacts = dict(pcfg.get("artifacts") or {})
        if artifacts.get("enabled", True):
            factor = float(artifacts.get("factor", 4.0))
            try:
                pixels = probe.pixels(model.image_spec, aspect_ratio)  # decoded once, by extract above
                layers = artifact_report(model.vision, pixels, factor, int(pcfg.get("batch_size", 32)))
                result["artifacts"] = {"factor": factor, "layers": layers}
            except NotImplementedError as e:
                result["artifacts"] = {"unavailable": str(e)}
    log.info("%s: generation %.1f s, probes %.1f s", ck.label, t_gen - t0, time.perf_counter() - t_gen)
    del model
    return result, features


def write_report(
    results: list[dict[str, Any]], features: list[dict[str, Any]], ecfg: Mapping[str, Any], out: Path
) -> dict[str, Path]:
    """``report.json``, ``report.md`` and the plots for evaluated checkpoints, in the order given. A plot of
    :data:`PLOTS` this report does not draw is removed from ``out``: an earlier report's ``pca.png`` beside this one
    would show checkpoints it never measured."""
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in ecfg.items() if k != "plots"}  # what was measured, not which files were drawn
    plot = bool(ecfg.get("plots", True))
    report = rounded({"config": config, "checkpoints": results, "paired": paired.against_first(results)})
    files = {"json": out / "report.json", "md": out / "report.md"}
    files["json"].write_text(json.dumps(json_values(report), indent=2, sort_keys=True, allow_nan=False) + "\n")
    files["md"].write_text(markdown(report["checkpoints"], report["paired"]))
    if plot:
        files.update(write_plots(report["checkpoints"], features, out))
    for name in PLOTS:
        if name not in files:
            (out / f"{name}.png").unlink(missing_ok=True)
    return files


def table_columns(results: list[dict[str, Any]]) -> list[Column]:
    """``(header, value, decimals)`` for every set score and headline probe metric any checkpoint has: the table
    writes each value with its decimals, the plots draw the value itself (percentages as percent)."""
    cols: list[Column] = []
    names = sorted({(n, r["kind"]) for res in results for n, r in res["sets"].items()})
    for name, kind in names:
        if kind == "qa":
            cols.append((f"{name} acc %", lambda res, n=name: _percent(res["sets"].get(n, {}).get("accuracy")), 1))
            if any("choice_accuracy" in res["sets"].get(name, {}) for res in results):
                cols.append(
                    (
                        f"{name} names-choice %",
                        lambda res, n=name: _percent(res["sets"].get(n, {}).get("choice_accuracy")),
                        1,
                    )
                )
        else:
            cols.append((f"{name} BLEU-4", lambda res, n=name: res["sets"].get(n, {}).get("bleu4"), 4))
            cols.append((f"{name} CIDEr", lambda res, n=name: res["sets"].get(n, {}).get("cider"), 4))
    flats = [flat(res.get("probe", {})) for res in results]
    for key in HEADLINE:
        if any(key in f for f in flats):
            cols.append((key.split("/", 1)[1], lambda res, k=key: flat(res.get("probe", {})).get(k), 4))
    return cols


def markdown(results: list[dict[str, Any]], paired_rows: Sequence[Mapping[str, Any]] = ()) -> str:
    """The comparison table, chance levels, paired differences, every probe metric, and a few predictions per set."""
    cols = table_columns(results)
    lines = [
        "# alignlm evaluation",
        "",
        "| checkpoint | " + " | ".join(h for h, _, _ in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    lines += [f"| {res['label']} | " + " | ".join(_text(get(res), d) for _, get, d in cols) + " |" for res in results]
    chance = {n: r["chance"] for res in results for n, r in res["sets"].items() if r.get("chance")}
    if chance:
        lines += ["", "Chance level: " + ", ".join(f"{n} {100 * c:.1f} %" for n, c in sorted(chance.items()))]
    lines += paired.markdown_lines(paired_rows)
    probes = [flat(res.get("probe", {})) for res in results]
    keys = sorted({k for p in probes for k in p if k != "n" and not k.startswith("layers/")})
    if keys:
        n = next(res["probe"]["n"] for res in results if "probe" in res)
        lines += [
            "",
            f"## Alignment probes ({n} image-caption pairs, visual tokens vs caption embeddings)",
            "",
            "| metric | " + " | ".join(r["label"] for r in results) + " |",
            "|---|" + "---:|" * len(results),
        ]
        lines += [f"| {k} | " + " | ".join(_num(p.get(k)) for p in probes) + " |" for k in keys]
    layer_keys = sorted({k for p in probes for k in p if k.startswith("layers/")}, key=_layer_key)
    if layer_keys:
        lines += [
            "",
            "## Per LLM layer (mean image-token vs mean caption hidden state)",
            "",
            "| layer / metric | " + " | ".join(r["label"] for r in results) + " |",
            "|---|" + "---:|" * len(results),
        ]
        lines += [f"| {k[len('layers/') :]} | " + " | ".join(_num(p.get(k)) for p in probes) + " |" for k in layer_keys]
    lines += artifact_lines(results)
    lines += ["", "## Examples", ""]
    for res in results:
        for name, r in sorted(res["sets"].items()):
            for ex in r["examples"][:3]:
                ref = ex.get("answer", ex.get("reference"))
                lines.append(f"- `{res['label']}` {name} {ex['id']}: {ex['prediction']!r} (reference {ref!r})")
    return "\n".join(lines) + "\n"


def artifact_lines(results: list[dict[str, Any]]) -> list[str]:
    """Per checkpoint, the tower's outlier tokens layer by layer (the probe of models/artifacts.py)."""
    lines = []
    for res in results:
        art = res.get("artifacts")
        if not art:
            continue
        lines += ["", f"## Vision-tower artifact tokens: {res['label']}", ""]
        if "unavailable" in art:
            lines.append(f"Not measured: {art['unavailable']}.")
            continue
        lines += [
            f"Patch tokens over {art['factor']:g}x their image's median norm, per tower layer (output: what the "
            "connector gets).",
            "",
            "| layer | outlier share % | max / median norm | prefix / median norm |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {name} | {_pct(v['outlier_share'])} | {_num(v['max_ratio'])} | {_num(v['prefix_ratio'])} |"
            for name, v in art["layers"].items()
        ]
    return lines


def write_plots(results: list[dict[str, Any]], features: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    """The PCA picture, the metric-per-checkpoint panels, the gap-shift and per-layer curves."""
    files: dict[str, Path] = {}
    labels = [r["label"] for r in results]
    panels = [
        (r["label"], f["image"], f["text"], r["probe"]["pooled"].get("modality_gap", float("nan")))
        for r, f in zip(results, features)
        if f
    ]
    if panels:
        files["pca"] = plots.plot_pca(panels, out / "pca.png")
    series = {
        header: [math.nan if v is None else float(v) for v in map(get, results)]
        for header, get, _ in table_columns(results)
    }
    if series:
        files["metrics"] = plots.plot_series(series, labels, out / "metrics.png")
    curves = {r["label"]: r["gap_shift"]["curve"] for r in results if "gap_shift" in r}
    if curves:
        metric = next(r["gap_shift"]["metric"] for r in results if "gap_shift" in r)
        files["gap_shift"] = plots.plot_panels(
            {f"Mind the Gap shift: {metric}": curves}, out / "gap_shift.png", "delta (> 0 closes the gap)"
        )
    per_layer: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in results:
        layers = (r.get("probe") or {}).get("layers") or {}
        for i, values in sorted(layers.items(), key=lambda kv: int(kv[0])):
            for name, v in values.items():
                per_layer.setdefault(name, {}).setdefault(r["label"], []).append((int(i), v))
    if per_layer:
        files["layers"] = plots.plot_panels(
            dict(sorted(per_layer.items())), out / "layers.png", "LLM layer (0 = input embeddings)"
        )
    towers: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in results:
        layers = (r.get("artifacts") or {}).get("layers") or {}
        for key, title in (("outlier_share", "outlier token share"), ("max_ratio", "max / median token norm")):
            pts = [(float(i), v[key]) for i, v in enumerate(layers.values())]
            if pts:
                towers.setdefault(title, {})[r["label"]] = pts
    if towers:
        files["artifacts"] = plots.plot_panels(towers, out / "artifacts.png", "vision-tower layer (last: output)")
    return files


def _layer_key(k: str) -> tuple[int, str]:
    layer, _, metric = k[len("layers/") :].partition("/")
    return int(layer), metric


def _percent(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _text(x: float | None, decimals: int) -> str:
    return "-" if x is None else f"{x:.{decimals}f}"


def _pct(x: float | None) -> str:
    return _text(_percent(x), 1)


def _num(x: float | None) -> str:
    return _text(x, 4)
