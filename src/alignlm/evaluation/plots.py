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

import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignlm.config import ConfigError
from alignlm.evaluation.checkpoints import unique_labels
from alignlm.evaluation.paired import run_key
from alignlm.files import replace_file
from alignlm.models.io import load_checkpoint_config
from alignlm.training.logging import read_rows

log = logging.getLogger("alignlm")

COLOURS = {"image": "tab:blue", "text": "tab:red"}
CYCLE = "tab10"  # up to ten lines: the usual distinct colours
MANY = "viridis"  # more lines: sampled in their order (checkpoints by step), no colour twice
MANY_SPAN = 0.92  # of the colormap used: its last, pale yellow is hard to see on white
TICKS_UPRIGHT = 8  # more checkpoints than this on one axis: their names stand upright
TICKS_MAX = 24  # more than this: every k-th name, the last always
MONITOR_COST = ("monitor/seconds", "monitor/time_share")  # the monitor's cost, not a measurement of the model
# no version string: same inputs, same bytes; the canvas grows to hold a legend beside the panels
_SAVE = {"dpi": 90, "metadata": {"Software": None}, "bbox_inches": "tight"}


@functools.cache
def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display), imported at the first figure: imported with this module,
    it took 0.6 s of every command's start, the ranks ``alignlm train`` launches included (the command line imports
    every command's module)."""
    import matplotlib  # noqa: PLC0415 - 0.6 s to import, for drawing only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _grid(n: int, width: float = 3.6, height: float = 3.0) -> tuple[Any, list[Any]]:
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.axis("off")
    return fig, flat[:n]


def _save(fig: Any, path: Path) -> Path:
    """``fig`` as a PNG at ``path``, whole or not at all (a full disk had left a 0-byte plot)."""
    try:
        fig.tight_layout()
        replace_file(path, lambda tmp: fig.savefig(tmp, format="png", **_SAVE))
    finally:
        pyplot().close(fig)
    return path


def _top_axes(x: Tensor, k: int) -> Tensor:
    """The top ``k`` right singular vectors of ``x [m, d]`` as columns ``[d, k]``, from the eigenvectors of the smaller
    Gram matrix (``x^T x``, or ``x x^T`` mapped back through ``x``): a whole SVD of ``[2n, d]`` (20k x 4096 for 10k
    probe pairs of a 7B model) computed every direction to keep two. Exact as the SVD: in float64 the top
    eigenvectors are as accurate as its singular vectors wherever they are defined (the top eigenvalues apart)."""
    if x.shape[1] <= x.shape[0]:
        return torch.linalg.eigh(x.T @ x).eigenvectors[:, -k:].flip(1)
    values, vectors = torch.linalg.eigh(x @ x.T)
    return (x.T @ vectors[:, -k:].flip(1)) / values[-k:].flip(0).clamp_min(torch.finfo(x.dtype).tiny).sqrt()


def pca_2d(image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets normalised to the sphere, projected on the top-2 principal axes of their union (signs fixed)."""
    x = torch.cat(
        [torch.nn.functional.normalize(image.double(), dim=1), torch.nn.functional.normalize(text.double(), dim=1)]
    )
    x = x - x.mean(0)
    axes = _top_axes(x, 2)
    axes = axes * torch.sign(axes[axes.abs().argmax(0), torch.arange(2)])  # deterministic orientation
    y = x @ axes
    return y[: len(image)], y[len(image) :]


def plot_pca(panels: Sequence[tuple[str, Tensor, Tensor, float]], path: Path) -> Path:
    """One panel per ``(label, image [n, d], text [n, d], gap)``: matched pairs joined by faint lines, all of a panel
    one collection (a line each took 1.6 ms: 80 s for 50k pairs)."""
    fig, axes = _grid(len(panels), 3.8, 3.6)
    from matplotlib.collections import LineCollection  # noqa: PLC0415 - matplotlib is imported when drawing

    for ax, (label, image, text, gap) in zip(axes, panels):
        a, b = pca_2d(image, text)
        ax.add_collection(LineCollection(torch.stack([a, b], dim=1).numpy(), colors="0.85", linewidths=0.4, zorder=1))
        ax.scatter(a[:, 0], a[:, 1], s=9, c=COLOURS["image"], label="image (visual tokens)", zorder=2)
        ax.scatter(b[:, 0], b[:, 1], s=9, c=COLOURS["text"], label="text (caption embedding)", zorder=2)
        ax.set_title(f"{label}\ngap {gap:.3f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("PC1", fontsize=8)
        ax.set_ylabel("PC2", fontsize=8)
    handles, names = axes[0].get_legend_handles_labels()
    _legend(fig, handles, names)
    return _save(fig, path)


def plot_series(
    series: Mapping[str, Sequence[float]],
    xlabels: Sequence[str],
    path: Path,
    xlabel: str = "",
    groups: Sequence[str] | None = None,
) -> Path:
    """One small panel per metric, its value at each checkpoint (or step). The checkpoints' common leading folders
    move to the axis label, so twenty ``raw/finetune/step_...`` names are twenty short ones that do not overlap.
    ``groups``: each checkpoint's run; a line joins only the consecutive checkpoints of one run, a colour each (one
    line through two runs' checkpoints drew a trajectory that no training took)."""
    fig, axes = _grid(len(series))
    xs = list(range(len(xlabels)))
    groups = list(groups) if groups is not None else [""] * len(xs)
    colours = line_colours(list(dict.fromkeys(groups)))
    common, names = _common_prefix(xlabels)
    upright = len(xs) > TICKS_UPRIGHT
    every = math.ceil(len(xs) / TICKS_MAX)
    shown = [x for x in xs if x % every == 0 or x == xs[-1]]
    for ax, (name, ys) in zip(axes, series.items()):
        start = 0
        for end in [*(x for x in xs[1:] if groups[x] != groups[x - 1]), len(xs)]:
            run = groups[start]
            ax.plot(xs[start:end], ys[start:end], marker="o", color=colours[run], label=run or None)
            start = end
        ax.set_title(name, fontsize=9)
        ax.set_xticks(shown)
        ax.set_xticklabels(
            [names[x] for x in shown], rotation=90 if upright else 30, ha="center" if upright else "right", fontsize=7
        )
        ax.set_xlabel(f"{xlabel} ({common}...)" if common else xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    if len(colours) > 1:
        handles, labels = axes[0].get_legend_handles_labels()
        runs = dict(zip(labels, handles))  # a run whose checkpoints lie apart has several segments, one entry
        _legend(fig, list(runs.values()), list(runs))
    return _save(fig, path)


def plot_panels(panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], path: Path, xlabel: str) -> Path:
    """One panel per title, one ``(x, y)`` line per label in it (gap-shift, per-layer and monitor curves). A label
    keeps one colour in every panel (:func:`line_colours`) and the one legend, beside the panels, names every label:
    coloured panel by panel, a label missing from one panel shifted the colours of the others there, and the legend
    of the first panel alone never named a label it lacked. A NaN ``y`` leaves a gap in its line."""
    labels = list(dict.fromkeys(label for lines in panels.values() for label in lines))
    colours = line_colours(labels)
    fig, axes = _grid(len(panels), 4.2 if len(panels) > 1 else 5.5, 3.2 if len(panels) > 1 else 3.8)
    for ax, (title, lines) in zip(axes, panels.items()):
        for label, pts in lines.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=2.5, color=colours[label], label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D  # noqa: PLC0415 - matplotlib is imported when drawing

    _legend(fig, [Line2D([], [], color=colours[label], marker="o", ms=2.5) for label in labels], labels)
    return _save(fig, path)


def line_colours(labels: Sequence[str]) -> dict[str, Any]:
    """A colour per label: the ten-colour cycle for up to ten, past that a colormap sampled in the labels' order,
    where the cycle came round again and two of twenty checkpoints' lines were drawn alike."""
    import matplotlib  # noqa: PLC0415 - imported when drawing

    colormaps = matplotlib.colormaps
    cycle = colormaps[CYCLE].colors
    if len(labels) <= len(cycle):
        return dict(zip(labels, cycle))
    many = colormaps[MANY]
    return {label: many(MANY_SPAN * i / (len(labels) - 1)) for i, label in enumerate(labels)}


def _legend(fig: Any, handles: Sequence[Any], labels: Sequence[str]) -> None:
    """One legend for the whole figure, right of its panels (``_save`` widens the canvas to hold it): inside the first
    panel, twenty names covered its lines and ran off its bottom edge."""
    if labels:
        ncols = math.ceil(len(labels) / 30)
        fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, ncols=ncols)


def _common_prefix(labels: Sequence[str]) -> tuple[str, list[str]]:
    """The leading ``/``-separated folders all ``labels`` share (leaving each at least its last part), and the
    labels without them."""
    parts = [label.split("/") for label in labels]
    n = 0
    while parts and all(len(p) > n + 1 and p[n] == parts[0][n] for p in parts):
        n += 1
    return "".join(f"{p}/" for p in parts[0][:n]) if n else "", ["/".join(p[n:]) for p in parts]


def plot_accuracy_curves(results: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Accuracy per question set against the step of each checkpoint, one line per run and stage (steps restart in
    each stage); with several sets, also their questions pooled (:func:`pooled_accuracy`). Checkpoints of unknown step
    are left out."""
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    counts: dict[str, dict[int, dict[str, list[float]]]] = {}  # line -> step -> set -> [correct, questions]
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
            tot = counts.setdefault(line, {}).setdefault(int(res["step"]), {}).setdefault(name, [0.0, 0.0])
            tot[0] += r["accuracy"] * r["n"]
            tot[1] += r["n"]
    if not panels:
        raise ValueError("no question-set accuracy at a known step to plot")
    if len(panels) > 1:
        title, lines = pooled_accuracy(counts)
        if lines:
            panels[title] = lines
    return plot_panels(
        {t: {run: sorted(pts) for run, pts in lines.items()} for t, lines in panels.items()}, path, "training step"
    )


def pooled_accuracy(
    counts: Mapping[str, Mapping[int, Mapping[str, Sequence[float]]]],
) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """The pooled panel's title and lines from ``line -> step -> set -> (correct, questions)``: each line pools only
    the sets every one of its points has, so a checkpoint evaluated on fewer sets does not move the line with no set's
    accuracy changing. A set some of a line's checkpoints lack is logged, and the title then says the line pools
    fewer than all its sets."""
    lines: dict[str, list[tuple[float, float]]] = {}
    partial = False
    for line, steps in counts.items():
        common = sorted(set.intersection(*(set(sets) for sets in steps.values())))
        some = sorted(set.union(*(set(sets) for sets in steps.values())) - set(common))
        if some:
            partial = True
            log.warning(
                "accuracy plot: %s pools only %s, the sets all its checkpoints have; %s (not at every step) left out "
                "of its pooled line",
                line,
                common or "no set",
                some,
            )
        if common:
            lines[line] = [
                (step, 100 * sum(sets[n][0] for n in common) / sum(sets[n][1] for n in common))
                for step, sets in steps.items()
            ]
    return ("pooled accuracy % (sets at every step of a line)" if partial else "all questions accuracy %"), lines


def read_monitor(run: Path) -> dict[str, list[tuple[int, float]]]:
    """``monitor/*`` values of a run folder (its stages chained, steps continuing across stages) or one stage. Rows
    are read by ``read_rows``, which leaves out a row that is not JSON (a last one cut short by a killed run) with a
    warning naming the file and line; a
    value that was not finite (null in metrics.jsonl) is NaN, a gap in its line, and counted in a warning."""
    stages = [run] if (run / "metrics.jsonl").exists() else _stage_dirs(run)
    if not stages:
        raise FileNotFoundError(f"{run} has no metrics.jsonl, nor stage folders holding one")
    out: dict[str, list[tuple[int, float]]] = {}
    offset = 0
    for stage in stages:
        last, nan = 0, 0
        path = stage / "metrics.jsonl"
        for row in read_rows(path):
            step = row.get("step")
            if not isinstance(step, int):
                raise ValueError(f"{path}: a row without an integer 'step' ({str(row)[:80]}); mend or delete it")
            last = max(last, step)
            for k, v in row.items():
                if not k.startswith("monitor/") or k in MONITOR_COST or isinstance(v, bool):
                    continue
                if v is None or (isinstance(v, float) and not math.isfinite(v)):
                    nan += 1
                    v = math.nan
                if isinstance(v, (int, float)):
                    out.setdefault(k[len("monitor/") :], []).append((offset + step, float(v)))
        if nan:
            log.warning("%s: %d monitor values were not finite (null): gaps in their lines", path, nan)
        offset += last
    return out


def _stage_dirs(run: Path) -> list[Path]:
    """Stage folders of a run in training order. Each stage's config.yaml says what ran before it: the stages before
    it in its ``run`` list, and the stage its ``init_from`` names. A stage a later job added (``run=[dpo]`` after
    pretrain and finetune) lists only itself: taking the order of one config (the first by name) put it first. What no
    config orders (stage folders without config.yaml, metrics copied off a cluster) goes by when each stage last wrote
    its metrics.jsonl: stages run one after another, so they ended in the order they started. Never by name: finetune
    sorts before pretrain."""
    dirs = [d for d in run.iterdir() if (d / "metrics.jsonl").exists()] if run.is_dir() else []
    names = {d.name: d for d in dirs}
    before: dict[str, set[str]] = {name: set() for name in names}
    for d in dirs:
        cfg_path = next((d / f for f in ("config.yaml", "final/config.yaml") if (d / f).exists()), None)
        if cfg_path is None:
            continue
        cfg = load_checkpoint_config(cfg_path)
        order = [str(s) for s in cfg.get("run") or [] if str(s) in names]
        for a, b in zip(order, order[1:]):
            before[b].add(a)
        init = ((cfg.get("stages") or {}).get(d.name) or {}).get("init_from")
        if isinstance(init, str) and init in names and init != d.name:
            before[d.name].add(init)
    when = {name: ((d / "metrics.jsonl").stat().st_mtime, name) for name, d in names.items()}
    ordered: list[str] = []
    while len(ordered) < len(names):
        left = sorted((n for n in names if n not in ordered), key=when.__getitem__)
        ready = [n for n in left if before[n] <= set(ordered)]
        if not ready:
            log.warning(
                "%s: the stages' config.yaml files order %s each before another (run lists of separate jobs "
                "disagree); these go by when each last wrote its metrics.jsonl",
                run,
                left,
            )
            ready = left
        ordered.append(ready[0])
    return [names[n] for n in ordered]


def _names_metric(asked: str, name: str) -> bool:
    """Whether ``asked`` names the monitor metric ``name``: as a run of its whole "/"-parts, so that "mutual_knn" is
    every layer's, "retrieval" each of its recalls, and a plug-in metric's dotted path each entry of its mapping
    ("pooled/pkg.fn/key"); those had matched nothing, only the last part counted."""
    return f"/{asked.strip('/')}/" in f"/{name}/"


def plot_runs(runs: Sequence[Path], path: Path, metrics: Sequence[str] | None = None) -> Path:
    """The monitor's curves of several runs side by side: one panel per metric, one line per run, named by its folder
    (with as many folders above it as tell apart two runs of the same name)."""
    folders = [Path(os.path.abspath(r)) for r in runs]
    labels = unique_labels([f.name for f in folders], [f.parent for f in folders])
    data = {label: read_monitor(f) for label, f in zip(labels, folders)}
    names = sorted(set().union(*(d.keys() for d in data.values())))
    if metrics:
        unmatched = [m for m in metrics if not any(_names_metric(m, n) for n in names)]
        names = [n for n in names if any(_names_metric(m, n) for m in metrics)]
        if names and unmatched:
            log.warning("plot-runs: no run has the metrics %s; the plot has the others asked", unmatched)
    for (label, series), folder in zip(data.items(), folders):
        if names and not any(n in series for n in names):
            log.warning(
                "plot-runs: %s (%s) has %s: it is not in the plot",
                label,
                folder,
                "none of the metrics asked" if series else "no monitor/* metrics (trained with monitor.every=0?)",
            )
    if not names:
        found = sorted(set().union(*(d.keys() for d in data.values())))
        raise ConfigError(  # a usage error (exit 2): the runs or the metrics asked for
            f"none of the metrics {list(metrics or [])} is among the runs' monitor metrics {found}"
            if found
            else f"no monitor/* metrics in {list(map(str, runs))}: train with monitor.every > 0 and monitor.probe set"
        )
    panels = {name: {run: series[name] for run, series in data.items() if name in series} for name in names}
    return plot_panels(panels, path, "step (stages chained)")
