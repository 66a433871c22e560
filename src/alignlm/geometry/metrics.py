"""Alignment metrics between two representations of the same items (docs/methods.md, measuring alignment).

Every function is pure and deterministic, takes tensors on any device (the work stays there), computes in
float64 and returns Python floats for scores and float64 tensors for features and vectors. Sources:

- Liang et al. 2022, "Mind the Gap: Understanding the Modality Gap in Multi-modal Contrastive Representation
  Learning" (modality gap, shift experiment; code: Weixin-Liang/Modality-Gap).
- Huh et al. 2024, "The Platonic Representation Hypothesis" (kNN metrics, CKA variants, CKNNA, SVCCA;
  code: minyoungg/platonic-rep ``metrics.py`` and ``measure_alignment.py``).
- Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited" (CKA, RBF bandwidth).
- Song et al. 2012, "Feature Selection via Dependence Maximization" (unbiased HSIC, their equation 5).
- Raghu et al. 2017, "SVCCA: Singular Vector Canonical Correlation Analysis".
- Yang et al. 2024, "Law of Vision Representation in MLLMs" (A-score).

The Platonic metrics take ``preprocess`` (default True): the reference pipeline clamps every feature set to
the 0.95 quantile of its entries' magnitudes and L2-normalises each row before any metric, so that a few
outlier channels cannot dominate inner products. With ``preprocess=False`` the features are used as given
(kNN and linear kernels then use the raw inner product, as the reference's metric functions do).

Probes hold 5k-50k items, whose n x n float64 matrix is 0.2-20 GB: no metric builds one but rbf CKA (its median
bandwidth needs every distance). The kNN metrics and CKNNA work on row blocks of the similarities, linear CKA on
the features (memory O(d^2 + n d)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor

Kernel = Literal["linear", "rbf"]
Metric = Callable[[Tensor, Tensor], float]

# Largest float64 block (elements, 128 MiB) built at once by the chunked similarity computations, shared by the
# block-sized arrays alive together (``_chunks``'s row cost counts them): retrieval, A-score, token-word accuracy, the
# kNN metrics, linear CKA and CKNNA. Only rbf CKA builds whole n x n matrices.
_BLOCK_ELEMENTS = 2**24
# Cosines closer than this are a tie (raw inner products: closer than this times both items' norms): far above
# float64 rounding of a dot product (d * 1e-16), far below any difference between real items.
TIE = 1e-9
# A centred direction counts towards a feature set's rank (SVCCA) when its singular value exceeds this times the
# features' norm: far above the rounding noise of centring (about 1e-16 of it), far below real structure.
_RANK_TOLERANCE = 1e-10
# An unbiased HSIC of a kernel with itself is zero (``_hsic_unbiased_from``) when it is under this times the sum of
# its terms' sizes: above their rounding over n^2 kernel entries (about n^2 * 1e-16 of it), below any real spread.
ROUNDING = 1e-9


# ---------------------------------------------------------------------------------------------- inputs


def _finite(x: Tensor, name: str) -> Tensor:
    """``x`` in float64, refused when empty or not finite: ``topk`` ranks NaN highest and comparisons with NaN are
    false, so one NaN would otherwise give a plausible score (an fp16 overflow in a connector does that)."""
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): there is nothing to measure")
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{name} has {bad} non-finite entries (NaN or inf) of {x.numel()}")
    return x.to(torch.float64)


def _matrix(x: Tensor, name: str) -> Tensor:
    """Check an [items, features] input and move it to float64 on its own device."""
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [items, features] tensor, got shape {tuple(x.shape)}")
    return _finite(x, name)


def _directions(x: Tensor, name: str, real: Tensor | None = None) -> Tensor:
    """Rows of ``x`` (float64) on the unit sphere, refused where a row is all zeros: it has no direction, and
    normalising would make it the origin, which is equally near everything. ``real`` (a boolean mask over the rows)
    limits the check to the rows that hold items: padding is no item, and zero padding stays zero."""
    zero_rows = (x == 0).all(dim=-1)
    zero = int((zero_rows if real is None else zero_rows & real).sum())
    if zero:
        where = "" if real is None else " among its real rows"
        raise ValueError(f"{name} has {zero} all-zero rows{where}: a cosine needs a direction")
    return _unit(x)


def _no_spread(x: Tensor) -> bool:
    """All rows equal up to rounding: a representation that separates no items (a dead connector gives its bias
    for every image). Kernel metrics are then 0 / 0, decided by rounding noise, so they report nan."""
    scale = x.abs().max()
    return bool((x - x.mean(dim=0)).abs().max() <= 1e-12 * scale) if scale > 0 else True


def _pair(A: Tensor, B: Tensor, same_dim: bool = False) -> tuple[Tensor, Tensor]:
    """Check that two feature sets describe the same items (and, if asked, live in the same space)."""
    a, b = _matrix(A, "A"), _matrix(B, "B")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"A and B must hold the same items: got {a.shape[0]} and {b.shape[0]} rows")
    if a.device != b.device:
        raise ValueError(f"A and B must be on the same device: got {a.device} and {b.device}")
    if same_dim and a.shape[1] != b.shape[1]:
        raise ValueError(f"A and B must share a feature space: got dims {a.shape[1]} and {b.shape[1]}")
    return a, b


def _unit(x: Tensor) -> Tensor:
    """Rows projected to the unit sphere, where cosine similarity is an inner product; an all-zero row (padding) stays
    zero. Each row is divided by its own norm, however small: ``F.normalize`` divides by at least 1e-12, so a row of
    norm 1e-13 had stayed off the sphere and moved every cosine metric (the gap of a set scaled by 1e-13 doubled)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def _chunks(n: int, row_cost: int) -> Iterator[slice]:
    """Row slices whose blocks of ``row_cost`` elements per row fit in the float64 block budget."""
    step = max(1, _BLOCK_ELEMENTS // max(row_cost, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def prepare_features(x: Tensor, q: float = 0.95, name: str = "features") -> Tensor:
    """Clamp outlier activations, then L2-normalise rows: the Platonic Representation preprocessing.

    The threshold is one scalar per feature set, the ``q`` quantile of all entries' magnitudes taken as the
    sorted value at index ``int(q * numel)`` (the reference's exact mode); every entry is clamped to
    ``[-threshold, threshold]``. ``q = 1`` only normalises. The value is ``kthvalue``'s on the CPU (1.5 s for 20k x
    4096 features where a whole sort took 11.8 s) and a sort's on a GPU or wherever deterministic kernels are asked
    for: ``kthvalue`` has no deterministic CUDA kernel, and the training monitor runs this inside ``deterministic:
    true`` runs. Both give the same value.

    A threshold of 0 (sparse features, e.g. post-ReLU, with more than a fraction ``q`` of their entries exactly 0) would
    clamp every entry to 0 and leave no row a direction; such features are only normalised. Any positive threshold
    clamps as the reference does. ``name``: what a refusal (a non-finite entry, a row of zeros) calls the features.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    x = _matrix(x, name)
    index = int(q * x.numel())
    if index < x.numel():
        magnitudes = x.abs().flatten()
        if magnitudes.is_cpu and not torch.are_deterministic_algorithms_enabled():
            threshold = magnitudes.kthvalue(index + 1).values
        else:
            threshold = magnitudes.sort().values[index]
        if threshold > 0:
            x = x.clamp(min=-threshold, max=threshold)
    return _directions(x, name)


def _prepared_pair(A: Tensor, B: Tensor, preprocess: bool) -> tuple[Tensor, Tensor]:
    """Both feature sets in float64, preprocessed each on its own statistics when asked."""
    a, b = _pair(A, B)
    return (prepare_features(a), prepare_features(b)) if preprocess else (a, b)


# ------------------------------------------------------------------------------------------ modality gap


def _gap(a: Tensor, b: Tensor) -> Tensor:
    return _directions(a, "A").mean(dim=0) - _directions(b, "B").mean(dim=0)


def gap_vector(A: Tensor, B: Tensor) -> Tensor:
    """Mind the Gap (Liang et al. 2022): mean(norm(A)) - mean(norm(B)), the direction separating two cones.

    Returns a float64 vector of the shared dimension; it points from modality B's centroid to A's.
    """
    return _gap(*_pair(A, B, same_dim=True))


def modality_gap(A: Tensor, B: Tensor) -> float:
    """Mind the Gap (Liang et al. 2022): distance between the modalities' centroids on the unit sphere.

    0 for identical sets, at most 2; pretrained CLIP on COCO gives about 0.82.
    """
    return gap_vector(A, B).norm().item()


def shift_along_gap(A: Tensor, B: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """Mind the Gap's shift experiment: slide both modalities along the gap direction, back onto the sphere.

    With ``u`` the unit gap direction (from B's centroid to A's), this returns
    ``A' = norm(norm(A) - delta / 2 * u)`` and ``B' = norm(norm(B) + delta / 2 * u)``, the convention of the
    Modality-Gap notebooks (A = image, B = text): ``delta > 0`` closes the gap, ``delta < 0`` widens it,
    ``delta = 0`` only normalises. Returns float64 tensors.
    """
    a, b = _pair(A, B, same_dim=True)
    gap = _gap(a, b)
    length = gap.norm()
    if length == 0:
        raise ValueError("A and B have the same normalised centroid: there is no gap direction to shift along")
    step = 0.5 * delta * gap / length
    return _unit(_unit(a) - step), _unit(_unit(b) + step)


def gap_shift_curve(A: Tensor, B: Tensor, deltas: Iterable[float], metric: Metric) -> list[tuple[float, float]]:
    """Mind the Gap's curve: a metric re-measured after each shift, to see whether closing the gap helps."""
    return [(float(delta), float(metric(*shift_along_gap(A, B, delta)))) for delta in deltas]


# ----------------------------------------------------------------------------------------- kNN metrics


def _check_topk(n: int, topk: int) -> None:
    """Refuse a ``topk`` for which an item has not that many other items."""
    if not 1 <= topk <= n - 1:
        raise ValueError(f"topk must be in [1, n - 1] = [1, {n - 1}] for n = {n} items, got {topk}")


def _similarities(x: Tensor, rows: slice) -> Tensor:
    """Inner products [rows, n] of the items in ``rows`` with every item, each item's own at -inf so that no item is
    its own neighbour. One row block at a time: a probe's 5k-50k items make a whole n x n matrix 0.2-20 GB."""
    sim = x[rows] @ x.T
    sim.diagonal(rows.start).fill_(float("-inf"))  # entries (i, rows.start + i): the items' own
    return sim


def _knn(x: Tensor, topk: int) -> Tensor:
    """Indices [n, topk] of each item's most similar other items, most similar first, self excluded. Exact ties
    are broken by item order (``_ranked``): the ranked lists of cycle, LCS and edit-distance kNN need one."""
    n = x.shape[0]
    _check_topk(n, topk)
    return torch.cat([_ranked(_similarities(x, rows), topk) for rows in _chunks(n, 2 * n)])


def _ranked(sim: Tensor, topk: int) -> Tensor:
    """Column indices [rows, topk] of each row's ``topk`` largest entries, largest first, an exact tie going to the
    lower index, on every device. ``topk``'s own indices order tied entries as its kernel happens to (CPU and CUDA
    differ, pytorch#127196; on the CPU not by index either), which gave one probe's ranked-list metrics a value per
    device. Only its values are read here, which are the same everywhere: a key with no ties, ``n`` times the
    entry's place (0 above the k-th value, 1 equal to it, 2 below) plus its index, whose k smallest are the entries
    above the k-th value and then those equal to it, each in index order; a stable sort of those k by value puts them
    in rank order. The key is int32 (``3 n`` fits), so a block holds no more than its similarities and their topk."""
    kth = sim.topk(topk, dim=1).values[:, -1:]
    n = sim.shape[1]
    key = (sim < kth).to(torch.int32)
    key += sim <= kth
    key *= n
    key += torch.arange(n, dtype=torch.int32, device=sim.device)
    picked = key.topk(topk, dim=1, largest=False).values.long() % n
    return picked.gather(1, sim.gather(1, picked).sort(dim=1, descending=True, stable=True).indices)


def _tolerance(norms: Tensor, rows: slice) -> Tensor:
    """[rows, n]: how close two similarities of item i must be to tie, ``TIE * |x_i| |x_j|`` (``TIE`` for unit
    rows): a cosine difference of ``TIE`` whatever the norms. A tolerance scaled by the largest similarity of all
    made one high-norm item (``preprocess=False``) turn every other item's distinct neighbours into ties."""
    return torch.outer(TIE * norms[rows], norms)


def _kth_and_share(sim: Tensor, tolerance: Tensor, topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of a similarity block ([rows, 1] each): its k-th largest value, the membership of each candidate
    tied with it (within ``tolerance``) and how many slots those share. They share the slots that the items clearly
    above it leave, equally: their chance of being picked when the tie is broken uniformly at random. Breaking ties
    by item order (as ``_knn`` does) made the neighbour set of repeated captions, and the metric, depend on the order
    the items were listed in."""
    kth = sim.topk(topk, dim=1).values[:, -1:]
    sure = (sim > kth + tolerance).count_nonzero(dim=1)[:, None]
    candidates = (sim >= kth - tolerance).count_nonzero(dim=1)[:, None]
    return kth, (topk - sure).to(torch.float64) / (candidates - sure), topk - sure


def _memberships(sim: Tensor, kth: Tensor, share: Tensor, tolerance: Tensor) -> Tensor:
    """How much each entry's column item belongs to its row item's k nearest neighbours: 1 above the k-th value,
    ``share`` tied with it, else 0 (an item's own -inf gives 0). With ``kth`` and ``share`` of the block's rows
    ([rows, 1]) these are the rows' memberships, each row summing to k; with every item's as a row ([1, n]), the
    transposed ones, item i's membership among j's neighbours (the similarity is symmetric). Without ties they are
    ``topk``'s sets, as 0 / 1."""
    return torch.where(sim > kth + tolerance, 1.0, (sim >= kth - tolerance) * share)


def _block_memberships(x: Tensor, norms: Tensor, rows: slice, topk: int) -> Tensor:
    """[rows, n]: every item's membership among the k nearest neighbours of the items in ``rows``."""
    sim, tolerance = _similarities(x, rows), _tolerance(norms, rows)
    kth, share, _ = _kth_and_share(sim, tolerance, topk)
    return _memberships(sim, kth, share, tolerance)


def knn_lists(A: Tensor, B: Tensor, topk: int = 10, preprocess: bool = True) -> tuple[Tensor, Tensor]:
    """Both sides' ranked neighbour lists [n, topk], which the list metrics score (:data:`LIST_SCORES`: cycle, LCS,
    edit distance; a caller computing several computes them once, each an n x n similarity per side). They have no
    order-free form as simple as the memberships: under exact ties (repeated captions, duplicate images) these
    metrics depend on item order, as ``_knn`` breaks ties by index."""
    a, b = _prepared_pair(A, B, preprocess)
    return _knn(a, topk), _knn(b, topk)


def mutual_knn(A: Tensor, B: Tensor, topk: int = 10, preprocess: bool = True) -> float:
    """Platonic Representation (Huh et al. 2024): mean_i |kNN_A(i) & kNN_B(i)| / k.

    Asks whether both models agree on which items are near each item. Identical features give 1, independent
    random features about k / (n - 1). Under ties the overlap is sum_j min(w_A(i, j), w_B(i, j)) / k with the
    memberships of ``_kth_and_share``, so it does not depend on item order. The minimum is the expected overlap when
    one random order of the items breaks the ties in both spaces (as listing them in a random order does) wherever
    j is tied in one space only or the tied candidates are the same items in both (duplicates in both: identical
    features with repeated items still give 1); elsewhere it bounds that expectation from above (the product,
    independent tie-breaks, bounds it from below). Works on row blocks: memory O(n) plus one block.
    """
    a, b = _prepared_pair(A, B, preprocess)
    n = a.shape[0]
    _check_topk(n, topk)
    norms_a, norms_b = torch.linalg.vector_norm(a, dim=1), torch.linalg.vector_norm(b, dim=1)
    overlap = torch.cat(
        [
            torch.minimum(_block_memberships(a, norms_a, rows, topk), _block_memberships(b, norms_b, rows, topk)).sum(1)
            for rows in _chunks(n, 8 * n)
        ]
    )
    return (overlap / topk).mean().item()


def cycle_knn(A: Tensor, B: Tensor, topk: int = 10, preprocess: bool = True) -> float:
    """Platonic Representation (Huh et al. 2024): fraction of items i that some B-neighbour j of i has
    among its A-neighbours, i.e. the walk i -> kNN_B -> kNN_A can return to i. Under exact ties it depends on
    item order (:func:`knn_lists`)."""
    return cycle_score(*knn_lists(A, B, topk, preprocess))


def cycle_score(knn_a: Tensor, knn_b: Tensor) -> float:
    """:func:`cycle_knn` of the two sides' ranked lists (:func:`knn_lists`)."""
    topk = knn_a.shape[1]
    items = torch.arange(knn_a.shape[0], device=knn_a.device)
    returns = torch.cat(
        [  # knn_a[knn_b[i]]: the A-neighbours of each of i's B-neighbours, [rows, k, k]
            (knn_a[knn_b[rows]] == items[rows, None, None]).flatten(1).any(dim=1)
            for rows in _chunks(len(items), topk * topk)
        ]
    )
    return returns.to(torch.float64).mean().item()


def _lcs_lengths(x: Tensor, y: Tensor) -> Tensor:
    """Longest common subsequence of each row pair of [n, k] integer tensors: the classic DP, one DP row per
    step, vectorised over the n pairs (a row is a running max because LCS only grows along it)."""
    n, k = x.shape
    row = x.new_zeros(n, k + 1)
    for i in range(k):
        match = (x[:, i : i + 1] == y).to(row.dtype)
        best = torch.maximum(row[:, :-1] + match, row[:, 1:])
        row = torch.cat([row[:, :1], best], dim=1).cummax(dim=1).values
    return row[:, -1]


def _edit_distances(x: Tensor, y: Tensor) -> Tensor:
    """Levenshtein distance (unit insert, delete, substitute) of each row pair of [n, k] integer tensors.

    One DP row per step, vectorised over the n pairs: within a row, d[j] = min(c[j], d[j - 1] + 1) unrolls
    to j + cummin(c[l] - l), so the sequential insertions become one cumulative minimum.
    """
    n, k = x.shape
    cols = torch.arange(k + 1, device=x.device)
    row = cols.expand(n, k + 1)
    for i in range(1, k + 1):
        substitute = row[:, :-1] + (x[:, i - 1 : i] != y).to(cols.dtype)
        delete = row[:, 1:] + 1
        first = torch.full((n, 1), i, dtype=cols.dtype, device=x.device)
        candidates = torch.cat([first, torch.minimum(substitute, delete)], dim=1)
        row = (candidates - cols).cummin(dim=1).values + cols
    return row[:, -1]


def lcs_knn(A: Tensor, B: Tensor, topk: int = 10, preprocess: bool = True) -> float:
    """Platonic Representation (Huh et al. 2024): mean longest common subsequence of the two ranked
    neighbour lists, divided by k, so that neighbour order counts, not only membership.

    The reference returns the raw mean length (k times this value); dividing by k puts it on the same
    [0, 1] scale as the other kNN metrics. Under exact ties it depends on item order (:func:`knn_lists`).
    """
    return lcs_score(*knn_lists(A, B, topk, preprocess))


def lcs_score(knn_a: Tensor, knn_b: Tensor) -> float:
    """:func:`lcs_knn` of the two sides' ranked lists (:func:`knn_lists`)."""
    return (_lcs_lengths(knn_a, knn_b).to(torch.float64) / knn_a.shape[1]).mean().item()


def edit_distance_knn(A: Tensor, B: Tensor, topk: int = 10, preprocess: bool = True) -> float:
    """Platonic Representation (Huh et al. 2024): 1 - mean edit distance of the ranked neighbour lists / k.
    Under exact ties it depends on item order (:func:`knn_lists`)."""
    return edit_distance_score(*knn_lists(A, B, topk, preprocess))


def edit_distance_score(knn_a: Tensor, knn_b: Tensor) -> float:
    """:func:`edit_distance_knn` of the two sides' ranked lists (:func:`knn_lists`)."""
    return 1.0 - (_edit_distances(knn_a, knn_b).to(torch.float64) / knn_a.shape[1]).mean().item()


# the metrics scoring ranked neighbour lists, by name: what each scores, given both sides' lists (:func:`knn_lists`)
LIST_SCORES: dict[str, Callable[[Tensor, Tensor], float]] = {
    "cycle_knn": cycle_score,
    "lcs_knn": lcs_score,
    "edit_distance_knn": edit_distance_score,
}


# ------------------------------------------------------------------------------------- kernel metrics


def _median(x: Tensor) -> Tensor:
    """Median of all entries, averaging the two middle values of an even count (numpy's convention)."""
    values = x.flatten().sort().values
    m = values.numel()
    return (values[(m - 1) // 2] + values[m // 2]) / 2


def _rbf_gram(x: Tensor, sigma: float | None) -> Tensor:
    """exp(-|xi - xj|^2 / (2 sigma^2)), sigma the median distance between items when not given (Kornblith et al.
    2019). A whole n x n matrix, as the median needs every distance: rbf CKA takes O(n^2) memory, several n x n
    float64 matrices (each 0.8 GB at n = 10k, 20 GB at 50k)."""
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):  # -1 had acted as 1, inf had given nan
        raise ValueError(f"the rbf bandwidth sigma must be a finite number > 0, got {sigma}")
    sq_dist = torch.cdist(x, x).square()
    bandwidth_sq = _median(sq_dist).item() if sigma is None else float(sigma) ** 2
    if not bandwidth_sq > 0:
        source = f"sigma = {sigma}" if sigma is not None else "the median distance (are most items identical?)"
        raise ValueError(f"the rbf bandwidth must be positive, got 0 from {source}")
    return torch.exp(-sq_dist / (2 * bandwidth_sq))


def _centre(K: Tensor) -> Tensor:
    """H K H with H = I - 11^T / n, without forming H."""
    return K - K.mean(dim=0, keepdim=True) - K.mean(dim=1, keepdim=True) + K.mean()


def _hsic_biased(K: Tensor, L: Tensor) -> Tensor:
    """tr(K H L H) (Gretton et al. 2005), without the 1 / (n - 1)^2 factor that cancels in CKA."""
    return (_centre(K) * _centre(L).T).sum()


def _hsic_sums(k0: Tensor, k0_t: Tensor, l0: Tensor, l0_t: Tensor) -> Tensor:
    """The four sums of Song et al.'s unbiased HSIC over K0 and L0 (kernels with a zero diagonal), [4]:
    tr(K0 L0), 1^T K0 1, 1^T L0 1 and 1^T K0 L0 1, from some rows of K0, K0^T, L0 and L0^T (the same rows of each).
    Sums over row blocks add up to the whole matrices' (1^T K0 L0 1 pairs K0's column sums, K0^T's row sums, with
    L0's row sums), so the masked kernels of CKNNA need no n x n matrix."""
    return torch.stack([(k0 * l0_t).sum(), k0.sum(), l0.sum(), (k0_t.sum(dim=1) * l0.sum(dim=1)).sum()])


def _hsic_unbiased_from(
    n: int, trace: Tensor, total_k: Tensor, total_l: Tensor, cross: Tensor, itself: bool = False
) -> Tensor:
    """Song et al. 2012, equation 5, from its four sums (``_hsic_sums``): the unbiased HSIC estimator, free of the
    biased one's O(1/n) offset.

    ``itself``: a kernel's HSIC with itself (a CKA's normaliser), nan where it is zero up to the rounding of its terms
    (``ROUNDING``). The estimator averages over quadruples of distinct items, and a representation whose items are
    all equal but one (a dead connector and one odd image) leaves every quadruple at least three equal items: it is
    zero, and what was computed was the sums' rounding, of either sign (unbiased CKA came out nan or 1e-10 by the
    seed)."""
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 items, got {n}")
    terms = (trace, total_k * total_l / ((n - 1) * (n - 2)), 2 * cross / (n - 2))
    value = (terms[0] + terms[1] - terms[2]) / (n * (n - 3))
    if not itself:
        return value
    size = (terms[0].abs() + terms[1].abs() + terms[2].abs()) / (n * (n - 3))
    return torch.where(value.abs() <= ROUNDING * size, torch.nan, value)


def _hsic_unbiased(K: Tensor, L: Tensor) -> Tensor:
    """The unbiased HSIC of two whole kernel matrices (rbf CKA); a kernel with itself as ``_hsic_unbiased_from``'s
    ``itself``."""
    k0, l0 = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    return _hsic_unbiased_from(K.shape[0], *_hsic_sums(k0, k0.T, l0, l0.T), itself=K is L)


def _gram_inner(a: Tensor, b: Tensor) -> Tensor:
    """sum_ij (a_i . a_j)(b_i . b_j) = ||a^T b||_F^2: the linear kernels' entrywise product, summed without an n x n
    matrix. In feature space, by column blocks of a^T b (n da db operations), or over row blocks of both kernels
    where that is cheaper (n^2 (da + db) operations: fewer items than about the features' width)."""
    n, da = a.shape
    db = b.shape[1]
    if da * db <= n * (da + db):
        return torch.stack([(a.T @ b[:, cols]).square().sum() for cols in _chunks(db, 2 * da)]).sum()
    return torch.stack([((a[rows] @ a.T) * (b[rows] @ b.T)).sum() for rows in _chunks(n, 3 * n)]).sum()


def _centred(x: Tensor) -> Tensor:
    """Features less their mean over the items."""
    return x - x.mean(dim=0)


def _linear_hsic_biased(a: Tensor, b: Tensor) -> Tensor:
    """``_hsic_biased`` of linear kernels from the features: H K H is the centred features' kernel, so
    tr(K H L H) = ||a~^T b~||_F^2 (memory O(d^2 + n d) at most, never n x n)."""
    return _gram_inner(_centred(a), _centred(b))


def _linear_hsic_unbiased(a: Tensor, b: Tensor) -> Tensor:
    """``_hsic_unbiased`` of linear kernels from the features (memory O(d^2 + n d) at most, never n x n). With
    K0 = a a^T less its diagonal and s = sum_i a_i: tr(K0 L0) = ||a^T b||_F^2 - sum_i |a_i|^2 |b_i|^2,
    1^T K0 1 = |s_a|^2 - sum_i |a_i|^2 and 1^T K0 L0 1 = sum_i (a_i . s_a - |a_i|^2)(b_i . s_b - |b_i|^2).

    The features are centred first. A common shift adds g_i + g_j + c to every kernel entry, which the estimator
    ignores (its U-statistic cancels such terms), but which inflates its four sums: features in one cone (most
    models') made them cancel to a fraction of their size, costing that many digits."""
    itself = a is b
    a, b = _centred(a), _centred(b)
    sq_a, sq_b = a.square().sum(dim=1), b.square().sum(dim=1)
    sum_a, sum_b = a.sum(dim=0), b.sum(dim=0)
    return _hsic_unbiased_from(
        a.shape[0],
        _gram_inner(a, b) - (sq_a * sq_b).sum(),
        sum_a.square().sum() - sq_a.sum(),
        sum_b.square().sum() - sq_b.sum(),
        ((a @ sum_a - sq_a) * (b @ sum_b - sq_b)).sum(),
        itself=itself,
    )


def _normalised(kl: Tensor, kk: Tensor, ll: Tensor) -> float:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)): nan when a representation has no spread."""
    return (kl / torch.sqrt(kk * ll)).item()


def _cka(A: Tensor, B: Tensor, kernel: Kernel, sigma: float | None, preprocess: bool, unbiased: bool) -> float:
    """CKA with the biased or the unbiased HSIC: linear kernels from the features, rbf ones as n x n matrices."""
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
    a, b = _prepared_pair(A, B, preprocess)
    if _no_spread(a) or _no_spread(b):
        return float("nan")
    if kernel == "linear":
        linear_hsic = _linear_hsic_unbiased if unbiased else _linear_hsic_biased
        return _normalised(linear_hsic(a, b), linear_hsic(a, a), linear_hsic(b, b))
    K, L = _rbf_gram(a, sigma), _rbf_gram(b, sigma)
    hsic = _hsic_unbiased if unbiased else _hsic_biased
    return _normalised(hsic(K, L), hsic(K, K), hsic(L, L))


def cka(A: Tensor, B: Tensor, kernel: Kernel = "linear", sigma: float | None = None, preprocess: bool = True) -> float:
    """Kornblith et al. 2019, as used in the Platonic Representation: centred kernel alignment with the biased
    HSIC, invariant to isotropic scaling of either representation, and to its rotations with ``preprocess=False``
    (the outlier clamp of ``preprocess`` is per coordinate, as the reference's). ``sigma=None`` picks the
    rbf bandwidth by the median heuristic. nan when either representation has every row equal. The linear kernel
    is computed in feature space (memory O(d^2 + n d)); rbf builds n x n matrices, O(n^2) memory (``_rbf_gram``)."""
    return _cka(A, B, kernel, sigma, preprocess, unbiased=False)


def unbiased_cka(
    A: Tensor, B: Tensor, kernel: Kernel = "linear", sigma: float | None = None, preprocess: bool = True
) -> float:
    """Platonic Representation's CKA with Song et al.'s unbiased HSIC, which does not drift with n. Memory as
    ``cka``: linear in feature space, rbf O(n^2)."""
    return _cka(A, B, kernel, sigma, preprocess, unbiased=True)


def _neighbour_stats(x: Tensor, norms: Tensor, topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every item's k-th largest similarity, tied share and tied slots ([n] each, ``_kth_and_share``), by row blocks:
    what ``_memberships`` needs for the transposed memberships of any block. Written into arrays made before the
    blocks: each block's small results kept between their large temporaries had left the allocator unable to give
    those back (at 20k items 6.5 GiB held, about a whole n x n float64 matrix; 1.1 GiB so)."""
    n = len(x)
    kth = torch.empty(n, dtype=x.dtype, device=x.device)
    share = torch.empty(n, dtype=torch.float64, device=x.device)
    tied = torch.empty(n, dtype=torch.long, device=x.device)
    for rows in _chunks(n, 4 * n):
        block = _kth_and_share(_similarities(x, rows), _tolerance(norms, rows), topk)
        kth[rows], share[rows], tied[rows] = (column[:, 0] for column in block)
    return kth, share, tied


def _mostly_undecided(stats: tuple[Tensor, Tensor, Tensor], topk: int) -> bool:
    """Whether over half of a space's neighbour slots (k per item) go to ties spread thin: each of the tied
    candidates belongs with a share under one half, so which ones fill the slots is mostly the tie-break's choice
    (a connector that gives one vector for most images)."""
    _, share, tied = stats
    return bool(2 * (tied * (share < 0.5)).sum() > topk * len(share))


def _kernel_and_memberships(
    x: Tensor, norms: Tensor, stats: tuple[Tensor, Tensor, Tensor], rows: slice
) -> tuple[Tensor, Tensor, Tensor]:
    """For the items in ``rows``: their rows of the linear kernel (zero diagonal), of their neighbour memberships and
    of the transposed memberships (their own among every item's neighbours), each [rows, n]."""
    kth, share, _ = stats
    sim, tolerance = _similarities(x, rows), _tolerance(norms, rows)
    mine = _memberships(sim, kth[rows, None], share[rows, None], tolerance)
    theirs = _memberships(sim, kth[None, :], share[None, :], tolerance)
    sim.diagonal(rows.start).fill_(0.0)
    return sim, mine, theirs


def cknna(A: Tensor, B: Tensor, topk: int = 10, preprocess: bool = True) -> float:
    """Platonic Representation (Huh et al. 2024): CKA restricted to local structure.

    Linear kernels keep only the entries (i, j) with j among i's k nearest neighbours in both spaces (each
    space alone for the self terms), then the unbiased HSIC. With k = n - 1 it equals ``unbiased_cka``.
    Unlike CKA it is not bounded by 1: a masked kernel is not positive semi-definite, so Cauchy-Schwarz no longer
    caps the ratio. The reference definition shares this (a 12-item probe with k = 10 gave 1.26); use n >> k.
    Under ties the masks hold the fractional memberships of ``_kth_and_share`` (the pairs' mask their minimum, as
    ``mutual_knn``: identical features give 1 with repeated items too), so the value does not depend on item order;
    without ties they are the reference's 0 / 1 masks. Where most of a space's neighbour slots go to ties spread
    thin (``_mostly_undecided``: a connector that gives one vector for all images but a few), the even shares make
    the tied items' masked kernel a constant, which the estimator removes, and the ratio rests on next to nothing
    under it: 0.3 to 28 against random captions for a connector collapsed but for 1-4 of 128 images, where
    unrelated features give 0.07. Any one tie-break would give its own value: nan.

    Works on row blocks, memory O(n) plus one block: each space's k-th similarities and tied shares first, then per
    block the masked kernels' rows and those of their transposes, which the HSIC's trace and sums need.
    """
    if topk < 2:
        raise ValueError(f"cknna needs topk >= 2, got {topk}")
    a, b = _prepared_pair(A, B, preprocess)
    n = a.shape[0]
    _check_topk(n, topk)
    if _no_spread(a) or _no_spread(b):
        return float("nan")  # the neighbour masks would be chosen by rounding noise
    norms_a, norms_b = torch.linalg.vector_norm(a, dim=1), torch.linalg.vector_norm(b, dim=1)
    stats_a, stats_b = _neighbour_stats(a, norms_a, topk), _neighbour_stats(b, norms_b, topk)
    if _mostly_undecided(stats_a, topk) or _mostly_undecided(stats_b, topk):
        return float("nan")
    sums = torch.zeros(3, 4, dtype=torch.float64, device=a.device)  # HSIC(K, L), HSIC(K, K), HSIC(L, L)
    for rows in _chunks(n, 16 * n):
        gram_a, in_a, in_a_t = _kernel_and_memberships(a, norms_a, stats_a, rows)
        gram_b, in_b, in_b_t = _kernel_and_memberships(b, norms_b, stats_b, rows)
        both, both_t = torch.minimum(in_a, in_b), torch.minimum(in_a_t, in_b_t)
        own_a, own_a_t = gram_a * in_a, gram_a * in_a_t  # each kernel masked by its own space alone
        own_b, own_b_t = gram_b * in_b, gram_b * in_b_t
        sums += torch.stack(
            [
                _hsic_sums(gram_a * both, gram_a * both_t, gram_b * both, gram_b * both_t),
                _hsic_sums(own_a, own_a_t, own_a, own_a_t),
                _hsic_sums(own_b, own_b_t, own_b, own_b_t),
            ]
        )
    kl, kk, ll = (_hsic_unbiased_from(n, *terms, itself=k > 0) for k, terms in enumerate(sums))
    return _normalised(kl, kk, ll)


def _standardise(x: Tensor) -> Tensor:
    """Zero-mean, unit-variance columns, so that SVD picks directions by shape, not by channel scale."""
    x = x - x.mean(dim=0)
    return x / (x.std(dim=0) + 1e-8)


def _rank(x: Tensor) -> int:
    """Numerical rank of the centred features: their singular values above ``_RANK_TOLERANCE`` times the norm of
    the uncentred ones. Centring leaves rounding noise the size of the entries, not of their spread, so the
    tolerance follows the entries (features all equal give rank 0, however large their common value)."""
    tolerance = _RANK_TOLERANCE * torch.linalg.vector_norm(x)
    return int((torch.linalg.svdvals(x - x.mean(dim=0)) > tolerance).sum())


def svcca(A: Tensor, B: Tensor, cca_dim: int = 10, preprocess: bool = True) -> float:
    """Raghu et al. 2017, as used in the Platonic Representation: mean canonical correlation between the top
    ``cca_dim`` singular subspaces of the standardised representations, ignoring low-variance noise directions.

    The canonical correlations of two orthonormal, centred bases are the singular values of their product,
    computed exactly (the reference uses a randomised SVD and scikit-learn's iterative CCA). Each side keeps at
    most its numerical rank of directions (``_rank``): past it the SVD fills in arbitrary, uncentred directions,
    which gave two unrelated rank-1 sets 0.9; the mean is then over the fewer canonical correlations. nan when a
    side has no spread (rank 0: every row equal, as the kernel metrics).
    """
    a, b = _prepared_pair(A, B, preprocess)
    limit = min(a.shape[0] - 2, a.shape[1], b.shape[1])  # centred data spans n - 1 directions: all of them agree
    if not 1 <= cca_dim <= limit:
        raise ValueError(f"cca_dim must be in [1, min(n - 2, da, db)] = [1, {limit}], got {cca_dim}")
    dim_a, dim_b = min(cca_dim, _rank(a)), min(cca_dim, _rank(b))
    if not (dim_a and dim_b):
        return float("nan")
    u_a = torch.linalg.svd(_standardise(a), full_matrices=False).U[:, :dim_a]
    u_b = torch.linalg.svd(_standardise(b), full_matrices=False).U[:, :dim_b]
    return torch.linalg.svdvals(u_a.T @ u_b).clamp(max=1.0).mean().item()


# ----------------------------------------------------------------------------- token- and pair-level


def a_score(visual_tokens: Tensor, reference_tokens: Tensor, lengths: Sequence[int] | None = None) -> float:
    """Law of Vision Representation (Yang et al. 2024): how well connector outputs cover a reference model's
    tokens of the same image; for each visual token the best cosine to any reference token, mean over tokens,
    then over images (``a_scores``, averaged)."""
    return a_scores(visual_tokens, reference_tokens, lengths).mean().item()


def a_scores(visual_tokens: Tensor, reference_tokens: Tensor, lengths: Sequence[int] | None = None) -> Tensor:
    """Each image's A-score ``[n]`` (float64, on the tokens' device), whose mean is ``a_score``: a caller measuring
    batch by batch keeps these, not the tokens. Takes ``[n, m, d]`` and ``[n, r, d]``; ``lengths``: how many of each
    item's ``m`` query tokens are real (ragged rows padded at the end), the rest left out of its mean."""
    if visual_tokens.ndim != 3 or reference_tokens.ndim != 3:
        raise ValueError(
            f"a_score takes [images, tokens, dim] tensors, got shapes {tuple(visual_tokens.shape)} "
            f"and {tuple(reference_tokens.shape)}"
        )
    n, m, d = visual_tokens.shape
    if reference_tokens.shape[0] != n or reference_tokens.shape[2] != d:
        raise ValueError(
            f"reference_tokens must be [{n}, r, {d}] to match visual_tokens, got {tuple(reference_tokens.shape)}"
        )
    real = torch.full((n,), m, dtype=torch.long) if lengths is None else torch.as_tensor(lengths, dtype=torch.long)
    if real.shape != (n,) or not bool(((real >= 1) & (real <= m)).all()):
        raise ValueError(f"lengths must be {n} counts in [1, {m}], got {list(real.tolist())}")
    real = real.to(visual_tokens.device)
    tokens = torch.arange(m, device=visual_tokens.device) < real[:, None]  # padding (zeros, often) is no token
    visual = _directions(_finite(visual_tokens, "visual_tokens"), "visual_tokens", tokens)
    reference = _directions(_finite(reference_tokens, "reference_tokens"), "reference_tokens")
    weight = tokens.to(torch.float64) / real[:, None]
    return torch.cat(
        [
            (torch.bmm(visual[rows], reference[rows].transpose(1, 2)).amax(dim=2) * weight[rows]).sum(dim=1)
            for rows in _chunks(n, m * reference.shape[1])
        ]
    )


RECALL_AT = (1, 5, 10)  # the k of retrieval's recall@k


def retrieval_recall(img: Tensor, txt: Tensor, ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """Cross-modal retrieval by cosine similarity, item i matching item i: keys ``i2t_recall@k`` (image
    queries, text gallery) and ``t2i_recall@k``.

    Items scoring within ``TIE`` of the match tie with it (the match's score and the others' come from different
    summation orders, whose last bits differ) and the tie is broken uniformly at random: a query counts by its
    chance of ranking its match within k, ``min(max(k - above, 0), tied + 1) / (tied + 1)`` with ``above`` items
    clearly higher and ``tied`` tied, as the kNN metrics count tied neighbours. Collapsed features score chance,
    k / n, not the 0.94 that rounding gave them; an image whose caption the probe repeats (the digits probe: 39
    texts for 128 images) scores 1 / copies for a perfect model, where counting ties against the match capped
    i2t recall@1 at 2 / 128 whatever the model.
    """
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"every k in ks must be a whole number >= 1, got {tuple(ks)}")
    i, t = _pair(img, txt, same_dim=True)
    i, t = _directions(i, "img"), _directions(t, "txt")
    n = i.shape[0]
    matched = (i * t).sum(dim=1)
    items = torch.arange(n, device=i.device)
    i2t = torch.empty(2, n, dtype=torch.long, device=i.device)  # per query: rivals clearly above, and within TIE
    t2i = torch.zeros(2, n, dtype=torch.long, device=i.device)
    for rows in _chunks(n, 2 * n):
        sim = i[rows] @ t.T
        others = items[rows, None] != items[None, :]
        i2t[0, rows] = ((sim > matched[rows, None] + TIE) & others).sum(dim=1)
        i2t[1, rows] = ((sim >= matched[rows, None] - TIE) & others).sum(dim=1)
        t2i[0] += ((sim > matched[None, :] + TIE) & others).sum(dim=0)
        t2i[1] += ((sim >= matched[None, :] - TIE) & others).sum(dim=0)
    result = {}
    for direction, (above, near) in (("i2t", i2t), ("t2i", t2i)):
        places = (near - above + 1).to(torch.float64)  # the match and its tied rivals share these ranks
        for k in ks:
            chance = torch.minimum((k - above).clamp(min=0).to(torch.float64), places) / places
            result[f"{direction}_recall@{k}"] = chance.mean().item()
    return result


def nearest_words(tokens: Tensor, words: Tensor) -> Tensor:
    """Each token's nearest word by cosine, in float64, on the tokens' device, by row blocks of the float64 budget;
    -1 for a token with no direction (a non-finite entry, all zeros), for a caller that measures only some of its
    tokens (a method's labelled ones) and refuses those. Every word needs a direction (refused otherwise)."""
    unit_words = _directions(_matrix(words, "word_embeddings"), "word_embeddings")
    picks = []
    for rows in _chunks(len(tokens), len(unit_words)):
        block = tokens[rows].to(torch.float64)
        no_direction = ~torch.isfinite(block).all(dim=-1) | (block == 0).all(dim=-1)
        picks.append((_unit(block) @ unit_words.T).argmax(dim=1).masked_fill(no_direction, -1))
    return torch.cat(picks)


def token_word_accuracy(visual_tokens: Tensor, word_embeddings: Tensor, label_word_ids: list[list[int]]) -> float:
    """Token-level alignment check (ours): the fraction of visual tokens whose nearest word embedding (cosine) is one of that
    token's label words, i.e. whether the connector put each patch next to the words describing it.

    ``visual_tokens [T, d]``, ``word_embeddings [V, d]``, one list of label word ids per token; a token with
    an empty list counts as wrong.
    """
    tokens, words = _matrix(visual_tokens, "visual_tokens"), _matrix(word_embeddings, "word_embeddings")
    n_tokens, vocab = tokens.shape[0], words.shape[0]
    if tokens.shape[1] != words.shape[1]:
        raise ValueError(
            f"visual_tokens and word_embeddings must share a dimension: got {tokens.shape[1]} and {words.shape[1]}"
        )
    if len(label_word_ids) != n_tokens:
        raise ValueError(
            f"label_word_ids needs one list per visual token: got {len(label_word_ids)} lists for {n_tokens} tokens"
        )
    nearest = nearest_words(_directions(tokens, "visual_tokens"), words)
    ids = torch.tensor([w for token_ids in label_word_ids for w in token_ids], dtype=torch.long, device=tokens.device)
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"label word ids must be in [0, {vocab}), got range [{ids.min().item()}, {ids.max().item()}]")
    owner = torch.repeat_interleave(
        torch.arange(n_tokens, device=tokens.device),
        torch.tensor([len(t) for t in label_word_ids], device=tokens.device),
    )
    correct = torch.zeros(n_tokens, dtype=torch.bool, device=tokens.device)
    correct[owner[nearest[owner] == ids]] = True
    return correct.to(torch.float64).mean().item()
