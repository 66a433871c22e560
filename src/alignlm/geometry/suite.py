"""The metric suite: every alignment metric of ``geometry.metrics`` by name, between two pooled feature sets.

Used by the probes of ``alignlm eval`` and by the in-training monitor, so both report the same figures under the
same names; ``flat`` turns the nested results into ``group/metric`` keys for tables and logs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


def pair_metrics(
    A: Tensor, B: Tensor, names: Sequence[str], topk: int = 10, preprocess: bool = True
) -> dict[str, float]:
    """The named pooled-feature metrics between ``A`` and ``B`` (those needing one space are skipped otherwise).
    ``preprocess`` False: features the caller prepared (``metrics.prepare_features``) are not clamped again."""
    unknown = [m for m in names if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown probe metrics {unknown}; choose from {list(ALL_METRICS)}")
    n = A.shape[0]
    if any(m in KNN_METRICS for m in names) and not 1 <= topk <= n - 2:
        raise ValueError(
            f"the kNN metrics need 1 <= topk <= n - 2 = {n - 2} for {n} items, got topk={topk} (with k = n - 1 every "
            "item's neighbours are all the others, and they score 1 for any features): probe more items or lower topk"
        )
    out: dict[str, float] = {}
    for name in names:
        if name not in PAIR_METRICS:
            continue
        fn, same_dim = PAIR_METRICS[name]
        if same_dim and A.shape[1] != B.shape[1]:
            continue
        if name == "retrieval":
            out.update(fn(A, B))
        elif name == "modality_gap":
            out[name] = fn(A, B)
        elif name in KNN_METRICS:
            out[name] = fn(A, B, topk=topk, preprocess=preprocess)
        elif name == "svcca":
            out[name] = fn(A, B, cca_dim=min(10, n - 2, A.shape[1], B.shape[1]), preprocess=preprocess)
        else:
            out[name] = fn(A, B, preprocess=preprocess)
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
