"""PNG figures of an evaluation report and of training-time monitor logs (matplotlib, Agg backend, no display).

- ``pca``: pooled visual tokens and caption embeddings on the unit sphere, projected on their joint top-2 principal
  components and coloured by modality, one panel per checkpoint: the Mind-the-Gap picture;
- ``metrics``: each headline figure (accuracies, caption scores, probe metrics) per checkpoint or step;
- ``gap_shift``: a metric as both modalities slide along the gap direction, one line per checkpoint;
- ``layers``: probe metrics per LLM layer, one line per checkpoint;
- ``runs``: ``monitor/*`` curves of several training runs side by side (``alignlm plot-runs``);
- ``curves``: question accuracy against training step, one line per run (``alignlm compare --plot``; runs of one
  name by the folders above them).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from torch import Tensor  # noqa: E402

from alignlm.evaluation.checkpoints import unique_labels  # noqa: E402
from alignlm.evaluation.paired import run_key  # noqa: E402
from alignlm.models.io import load_checkpoint_config  # noqa: E402

COLOURS = {"image": "tab:blue", "text": "tab:red"}
_SAVE = {"dpi": 90, "metadata": {"Software": None}}  # no version string: same inputs, same bytes


def _grid(n: int, width: float = 3.6, height: float = 3.0) -> tuple[Any, list[Any]]:
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.axis("off")
    return fig, flat[:n]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, **_SAVE)
    plt.close(fig)
    return path


def pca_2d(image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets normalised to the sphere, projected on the top-2 principal axes of their union (signs fixed)."""
    x = torch.cat(
        [torch.nn.functional.normalize(image.double(), dim=1), torch.nn.functional.normalize(text.double(), dim=1)]
    )
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    axes = v[:2].T
    axes = axes * torch.sign(axes[axes.abs().argmax(0), torch.arange(2)])  # deterministic orientation
    y = x @ axes
    return y[: len(image)], y[len(image) :]


def plot_pca(panels: Sequence[tuple[str, Tensor, Tensor, float]], path: Path) -> Path:
    """One panel per ``(label, image [n, d], text [n, d], gap)``: matched pairs joined by faint lines, all of a panel
    one collection (a line each took 1.6 ms: 80 s for 50k pairs)."""
    fig, axes = _grid(len(panels), 3.8, 3.6)
    for ax, (label, image, text, gap) in zip(axes, panels):
        a, b = pca_2d(image, text)
        ax.add_collection(LineCollection(torch.stack([a, b], dim=1).numpy(), colors="0.85", linewidths=0.4, zorder=1))
        ax.scatter(a[:, 0], a[:, 1], s=9, c=COLOURS["image"], label="image (visual tokens)", zorder=2)
        ax.scatter(b[:, 0], b[:, 1], s=9, c=COLOURS["text"], label="text (caption embedding)", zorder=2)
        ax.set_title(f"{label}\ngap {gap:.3f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_series(series: Mapping[str, Sequence[float]], xlabels: Sequence[str], path: Path, xlabel: str = "") -> Path:
    """One small panel per metric, its value at each checkpoint (or step)."""
    fig, axes = _grid(len(series))
    xs = list(range(len(xlabels)))
    for ax, (name, ys) in zip(axes, series.items()):
        ax.plot(xs, ys, marker="o")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(xs)
        ax.set_xticklabels(xlabels, rotation=30, ha="right", fontsize=7)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_panels(panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], path: Path, xlabel: str) -> Path:
    """One panel per title, one ``(x, y)`` line per label in it (gap-shift, per-layer and monitor curves)."""
    fig, axes = _grid(len(panels), 4.2 if len(panels) > 1 else 5.5, 3.2 if len(panels) > 1 else 3.8)
    for ax, (title, lines) in zip(axes, panels.items()):
        for label, pts in lines.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=2.5, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_accuracy_curves(results: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Accuracy per question set against the step of each checkpoint, one line per run and stage (steps restart in
    each stage); with several sets, also all their questions pooled. Checkpoints of unknown step are left out."""
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    pooled: dict[str, dict[int, list[float]]] = {}
    stages: dict[str, set[Any]] = {}
    for res in results:
        stages.setdefault(run_key(res), set()).add(res.get("stage"))
    for res in results:
        if res.get("step") is None:
            continue
        run = run_key(res)  # two runs of one name (s1/raw, s2/raw) are two lines
        line = f"{run}/{res.get('stage')}" if len(stages[run]) > 1 else run
        for name, r in sorted(res["sets"].items()):
            if r.get("kind") != "qa":
                continue
            panels.setdefault(f"{name} accuracy %", {}).setdefault(line, []).append((res["step"], 100 * r["accuracy"]))
            tot = pooled.setdefault(line, {}).setdefault(int(res["step"]), [0.0, 0.0])
            tot[0] += r["accuracy"] * r["n"]
            tot[1] += r["n"]
    if not panels:
        raise ValueError("no question-set accuracy at a known step to plot")
    if len(panels) > 1:
        panels["all questions accuracy %"] = {
            run: [(st, 100 * c / n) for st, (c, n) in steps.items()] for run, steps in pooled.items()
        }
    return plot_panels(
        {t: {run: sorted(pts) for run, pts in lines.items()} for t, lines in panels.items()}, path, "training step"
    )


def read_monitor(run: Path) -> dict[str, list[tuple[int, float]]]:
    """``monitor/*`` values of a run folder (its stages chained, steps continuing across stages) or one stage."""
    stages = [run] if (run / "metrics.jsonl").exists() else _stage_dirs(run)
    if not stages:
        raise FileNotFoundError(f"{run} has no metrics.jsonl, nor stage folders holding one")
    out: dict[str, list[tuple[int, float]]] = {}
    offset = 0
    for stage in stages:
        last = 0
        for line in (stage / "metrics.jsonl").read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            last = max(last, int(row["step"]))
            for k, v in row.items():
                if (
                    k.startswith("monitor/")
                    and isinstance(v, (int, float))
                    and k not in ("monitor/seconds", "monitor/time_share")
                ):
                    out.setdefault(k[len("monitor/") :], []).append((offset + int(row["step"]), float(v)))
        offset += last
    return out


def _stage_dirs(run: Path) -> list[Path]:
    """Stage folders of a run in training order (the order of ``run`` in its summary/config, else by time)."""
    dirs = [d for d in sorted(run.iterdir()) if (d / "metrics.jsonl").exists()] if run.is_dir() else []
    cfg = next((d / f for d in dirs for f in ("config.yaml", "final/config.yaml") if (d / f).exists()), None)
    if cfg is not None:
        order = list(load_checkpoint_config(cfg).get("run") or [])
        return sorted(dirs, key=lambda d: (order.index(d.name) if d.name in order else len(order), d.name))
    return dirs


def plot_runs(runs: Sequence[Path], path: Path, metrics: Sequence[str] | None = None) -> Path:
    """The monitor's curves of several runs side by side: one panel per metric, one line per run, named by its folder
    (with as many folders above it as tell apart two runs of the same name)."""
    folders = [Path(os.path.abspath(r)) for r in runs]
    labels = unique_labels([f.name for f in folders], [f.parent for f in folders])
    data = {label: read_monitor(f) for label, f in zip(labels, folders)}
    names = sorted(set().union(*(d.keys() for d in data.values())))
    if metrics:
        names = [n for n in names if n in metrics or n.split("/")[-1] in metrics]
    if not names:
        found = sorted(set().union(*(d.keys() for d in data.values())))
        raise ValueError(
            f"none of the metrics {list(metrics or [])} is among the runs' monitor metrics {found}"
            if found
            else f"no monitor/* metrics in {list(map(str, runs))}: train with monitor.every > 0 and monitor.probe set"
        )
    panels = {name: {run: series[name] for run, series in data.items() if name in series} for name in names}
    return plot_panels(panels, path, "step (stages chained)")
