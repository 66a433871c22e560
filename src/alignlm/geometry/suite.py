"""The metric suite: every alignment metric of ``geometry.metrics`` by name, between two pooled feature sets, and a
researcher's own by the dotted path of its function.

Used by the probes of ``alignlm eval`` and by the in-training monitor, so both report the same figures under the
same names; ``flat`` turns the nested results into ``group/metric`` keys for tables and logs.

A metric of one's own is a function ``fn(A, B) -> float`` (or a mapping of named floats) of two float64 feature sets
``[n, d_a]`` and ``[n, d_b]`` on the probe's device, row ``i`` of each the same item; it also gets ``topk`` and
``preprocess`` (whether to clamp outliers: false where the caller prepared the features) where its signature names
them, and ``fn.same_space = True`` marks one that needs both sets in one space (it is then skipped for the vision
tower's features, as the modality gap is). Named in ``monitor.metrics`` or the eval's ``probe.metrics`` as
``pkg.module.fn``, it is reported under that name (a mapping's entries as ``pkg.module.fn/key``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from torch import Tensor

from alignlm.geometry import metrics as M

# Metrics between two pooled feature sets ([n, d] each); ``same_dim`` ones need both in the LLM space.
PAIR_METRICS: dict[str, tuple[Callable[..., Any], bool]] = {
    "modality_gap": (M.modality_gap, True),
    "mutual_knn": (M.mutual_knn, False),
    "cycle_knn": (M.cycle_knn, False),
    "lcs_knn": (M.lcs_knn, False),
    "edit_distance_knn": (M.edit_distance_knn, False),
    "cka": (M.cka, False),
    "unbiased_cka": (M.unbiased_cka, False),
    "cknna": (M.cknna, False),
    "svcca": (M.svcca, False),
    "retrieval": (M.retrieval_recall, True),
}
TOKEN_METRICS = ("a_score",)
ALL_METRICS = (*PAIR_METRICS, *TOKEN_METRICS)
KNN_METRICS = {"mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn", "cknna"}


# pooled metrics that only normalise their features' rows; every other one clamps outliers first (``preprocess``)
NORMALISING_METRICS = ("modality_gap", "retrieval")


def metric_problems(names: Collection[str]) -> list[str]:
    """Each of ``names`` that is neither a metric of the suite nor the dotted path of a function, with why: what a
    config check reports before a model is built."""
    problems = []
    for name in names:
        if name in ALL_METRICS:
            continue
        try:
            _own_metric(str(name))
        except ValueError as e:
            problems.append(f"{name} ({e})")
    return problems


def unknown_metrics_said(key: str, problems: Sequence[str]) -> str:
    """The one message for metric names ``metric_problems`` refused, under the config key ``key``."""
    return (
        f"{key} has unknown metrics: {'; '.join(problems)}. Choose from {list(ALL_METRICS)}, or name a function of "
        "your own by its dotted path (pkg.module.fn: docs/evaluation.md)"
    )


@functools.cache
def _own_metric(path: str) -> Callable[..., Any]:
    """The function at the dotted ``path`` (``pkg.module.fn``); a ValueError saying why there is none."""
    module, _, attribute = path.rpartition(".")
    if not module:
        raise ValueError("no metric of that name, nor a dotted path pkg.module.fn")
    try:
        fn = getattr(importlib.import_module(module), attribute, None)
    except ImportError as e:
        raise ValueError(f"its module does not import: {e}") from None
    if not callable(fn):
        raise ValueError(f"{module} has no function {attribute}")
    return fn


def _measure_own(name: str, A: Tensor, B: Tensor, topk: int, preprocess: bool) -> dict[str, float]:
    """A researcher's metric ``name`` (a dotted path) between ``A`` and ``B``, as the suite's entries."""
    fn = _own_metric(name)
    if getattr(fn, "same_space", False) and A.shape[1] != B.shape[1]:
        return {}
    try:
        takes = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin (torch.dist) may have none: it gets the two sets alone
        takes = {}
    knobs = {k: v for k, v in (("topk", topk), ("preprocess", preprocess)) if k in takes}
    value = fn(A.double(), B.double(), **knobs)  # as the contract says, whatever the caller's dtype
    values = value.items() if isinstance(value, Mapping) else [("", value)]
    out = {}
    for key, v in values:
        if isinstance(v, Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(
                f"metric {name} returned {type(v).__name__} for {key or 'its value'}: a metric returns a float or a "
                "mapping of named floats"
            )
        out[f"{name}/{key}" if key else name] = float(v)
    return out


def pair_metrics(
    A: Tensor, B: Tensor, names: Sequence[str], topk: int = 10, preprocess: bool = True
) -> dict[str, float]:
    """The named pooled-feature metrics between ``A`` and ``B`` (those needing one space are skipped otherwise).
    ``preprocess`` False: features the caller prepared (``metrics.prepare_features``) are not clamped again."""
    problems = metric_problems(names)
    if problems:
        raise ValueError(unknown_metrics_said("the probe metrics", problems))
    n = A.shape[0]
    if any(m in KNN_METRICS for m in names) and not 1 <= topk <= n - 2:
        raise ValueError(
            f"the kNN metrics need 1 <= topk <= n - 2 = {n - 2} for {n} items, got topk={topk} (with k = n - 1 every "
            "item's neighbours are all the others, and they score 1 for any features): probe more items or lower topk"
        )
    out: dict[str, float] = {}
    prepared: tuple[Tensor, Tensor] | None = None  # both sets clamped once for every metric that clamps
    lists: tuple[Tensor, Tensor] | None = None  # both sets' ranked neighbour lists, once for the list metrics
    for name in names:
        if name not in ALL_METRICS:
            out.update(_measure_own(name, A, B, topk, preprocess))
            continue
        if name not in PAIR_METRICS:
            continue
        fn, same_dim = PAIR_METRICS[name]
        if same_dim and A.shape[1] != B.shape[1]:
            continue
        if name == "retrieval":  # recall@k of k or fewer items is 1 whatever the features: not reported
            out.update(fn(A, B, ks=[k for k in M.RECALL_AT if k < n]))
            continue
        if name == "modality_gap":
            out[name] = fn(A, B)
            continue
        # each metric had clamped both sets itself: a sort of every entry, 8 times per pair of sets
        if prepared is None:
            prepared = (M.prepare_features(A, name="A"), M.prepare_features(B, name="B")) if preprocess else (A, B)
        a, b = prepared
        if name in M.LIST_SCORES:  # each had ranked both sets' neighbours itself: an n x n similarity per set
            lists = lists or M.knn_lists(a, b, topk, preprocess=False)
            out[name] = M.LIST_SCORES[name](*lists)
        elif name in KNN_METRICS:
            out[name] = fn(a, b, topk=topk, preprocess=False)
        elif name == "svcca":
            out[name] = fn(a, b, cca_dim=min(10, n - 2, A.shape[1], B.shape[1]), preprocess=False)
        else:
            out[name] = fn(a, b, preprocess=False)
    return out


def flat(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"pooled": {"cka": x}}`` -> ``{"pooled/cka": x}`` (scalars only), for tables and logs."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat(v, key + "/"))
        elif isinstance(v, (int, float)):
            out[key] = float(v)
    return out
