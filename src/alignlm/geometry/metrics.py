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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Kernel = Literal["linear", "rbf"]
Metric = Callable[[Tensor, Tensor], float]

# Largest float64 block (elements, 128 MiB) built at once by the chunked similarity computations (retrieval,
# A-score, token-word accuracy; the kNN and kernel metrics build whole n x n matrices).
_BLOCK_ELEMENTS = 2**24
# Cosines closer than this are a tie: far above float64 rounding of a dot product (d * 1e-16), far below any
# difference between real items.
TIE = 1e-9
# A centred direction counts towards a feature set's rank (SVCCA) when its singular value exceeds this times the
# features' norm: far above the rounding noise of centring (about 1e-16 of it), far below real structure.
_RANK_TOLERANCE = 1e-10


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
    """Rows projected to the unit sphere, where cosine similarity is an inner product."""
    return F.normalize(x, dim=-1)


def _chunks(n: int, row_cost: int) -> Iterator[slice]:
    """Row slices whose blocks of ``row_cost`` elements per row fit in the float64 block budget."""
    step = max(1, _BLOCK_ELEMENTS // max(row_cost, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def prepare_features(x: Tensor, q: float = 0.95) -> Tensor:
    """Clamp outlier activations, then L2-normalise rows: the Platonic Representation preprocessing.

    The threshold is one scalar per feature set, the ``q`` quantile of all entries' magnitudes taken as the
    sorted value at index ``int(q * numel)`` (the reference's exact mode); every entry is clamped to
    ``[-threshold, threshold]``. ``q = 1`` only normalises. The value comes from a sort, not ``kthvalue``: that
    has no deterministic CUDA kernel, and the training monitor runs this inside ``deterministic: true`` runs.

    A threshold of 0 (sparse features, e.g. post-ReLU, with more than a fraction ``q`` of their entries exactly 0) would
    clamp every entry to 0 and leave no row a direction; such features are only normalised. Any positive threshold
    clamps as the reference does.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    x = _matrix(x, "features")
    index = int(q * x.numel())
    if index < x.numel():
        threshold = x.abs().flatten().sort().values[index]
        if threshold > 0:
            x = x.clamp(min=-threshold, max=threshold)
    return _directions(x, "features")


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


def _others(sim: Tensor, topk: int) -> Tensor:
    """A copy of ``sim`` with the diagonal at -inf, so no item is its own neighbour; checks ``topk`` against n."""
    n = sim.shape[0]
    if not 1 <= topk <= n - 1:
        raise ValueError(f"topk must be in [1, n - 1] = [1, {n - 1}] for n = {n} items, got {topk}")
    return sim.clone().fill_diagonal_(float("-inf"))


def _knn(sim: Tensor, topk: int) -> Tensor:
    """Indices [n, topk] of each item's most similar other items, most similar first, self excluded. Exact ties
    are broken by ``topk``, i.e. by item order: the ranked lists of cycle, LCS and edit-distance kNN need one."""
    return _others(sim, topk).topk(topk, dim=1).indices


def _neighbour_weights(sim: Tensor, topk: int) -> Tensor:
    """[n, n] float64: how much each item j belongs to item i's k nearest neighbours, self excluded; rows sum to k.

    Items more similar than i's k-th most similar count 1; those tied with it (within ``TIE`` times the largest
    similarity's magnitude, which is 1 for cosines) share the remaining slots equally: their chance of being picked
    when the tie is broken uniformly at random. ``topk`` breaks ties by item order, so repeated captions made the
    set, and the metric, depend on the order the items were listed in. Without ties this is ``topk``'s set, as 0 / 1.
    """
    others = _others(sim, topk)
    tolerance = TIE * sim.abs().max()
    kth = others.topk(topk, dim=1).values[:, -1:]
    sure = others > kth + tolerance
    tied = (others >= kth - tolerance) & ~sure
    share = (topk - sure.sum(dim=1, keepdim=True)).to(torch.float64) / tied.sum(dim=1, keepdim=True)
    return torch.where(sure, 1.0, tied * share)


def _knn_mask(knn: Tensor) -> Tensor:
    """Boolean [n, n] matrix, row i true at i's neighbours."""
    n = knn.shape[0]
    return torch.zeros(n, n, dtype=torch.bool, device=knn.device).scatter_(1, knn, True)


def _knn_pair(A: Tensor, B: Tensor, topk: int, preprocess: bool) -> tuple[Tensor, Tensor]:
    """Both sides' ranked neighbour lists, for the metrics that read lists (cycle, LCS, edit distance). They have
    no order-free form as simple as ``_neighbour_weights``: under exact ties (repeated captions, duplicate images)
    these metrics depend on item order, as ``topk`` breaks ties by index."""
    a, b = _prepared_pair(A, B, preprocess)
    return _knn(a @ a.T, topk), _knn(b @ b.T, topk)


def mutual_knn(A: Tensor, B: Tensor, topk: int = 10, preprocess: bool = True) -> float:
    """Platonic Representation (Huh et al. 2024): mean_i |kNN_A(i) & kNN_B(i)| / k.

    Asks whether both models agree on which items are near each item. Identical features give 1, independent
    random features about k / (n - 1). Under ties the overlap is its expectation over random tie-breaks,
    sum_j w_A(i, j) w_B(i, j) / k with the memberships of ``_neighbour_weights``, so it does not depend on item order.
    """
    a, b = _prepared_pair(A, B, preprocess)
    overlap = (_neighbour_weights(a @ a.T, topk) * _neighbour_weights(b @ b.T, topk)).sum(dim=1)
    return (overlap / topk).mean().item()


def cycle_knn(A: Tensor, B: Tensor, topk: int = 10, preprocess: bool = True) -> float:
    """Platonic Representation (Huh et al. 2024): fraction of items i that some B-neighbour j of i has
    among its A-neighbours, i.e. the walk i -> kNN_B -> kNN_A can return to i. Under exact ties it depends on
    item order (``_knn_pair``)."""
    knn_a, knn_b = _knn_pair(A, B, topk, preprocess)
    returns = (_knn_mask(knn_b) & _knn_mask(knn_a).T).any(dim=1)
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
    [0, 1] scale as the other kNN metrics. Under exact ties it depends on item order (``_knn_pair``).
    """
    knn_a, knn_b = _knn_pair(A, B, topk, preprocess)
    return (_lcs_lengths(knn_a, knn_b).to(torch.float64) / topk).mean().item()


def edit_distance_knn(A: Tensor, B: Tensor, topk: int = 10, preprocess: bool = True) -> float:
    """Platonic Representation (Huh et al. 2024): 1 - mean edit distance of the ranked neighbour lists / k.
    Under exact ties it depends on item order (``_knn_pair``)."""
    knn_a, knn_b = _knn_pair(A, B, topk, preprocess)
    return 1.0 - (_edit_distances(knn_a, knn_b).to(torch.float64) / topk).mean().item()


# ------------------------------------------------------------------------------------- kernel metrics


def _median(x: Tensor) -> Tensor:
    """Median of all entries, averaging the two middle values of an even count (numpy's convention)."""
    values = x.flatten().sort().values
    m = values.numel()
    return (values[(m - 1) // 2] + values[m // 2]) / 2


def _gram(x: Tensor, kernel: Kernel, sigma: float | None) -> Tensor:
    """Kernel matrix: inner products, or exp(-|xi - xj|^2 / (2 sigma^2)) with sigma the median distance
    between items when not given (Kornblith et al. 2019)."""
    if kernel == "linear":
        return x @ x.T
    if kernel == "rbf":
        sq_dist = torch.cdist(x, x).square()
        bandwidth_sq = _median(sq_dist).item() if sigma is None else float(sigma) ** 2
        if not bandwidth_sq > 0:
            source = f"sigma = {sigma}" if sigma is not None else "the median distance (are most items identical?)"
            raise ValueError(f"the rbf bandwidth must be positive, got 0 from {source}")
        return torch.exp(-sq_dist / (2 * bandwidth_sq))
    raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")


def _centre(K: Tensor) -> Tensor:
    """H K H with H = I - 11^T / n, without forming H."""
    return K - K.mean(dim=0, keepdim=True) - K.mean(dim=1, keepdim=True) + K.mean()


def _hsic_biased(K: Tensor, L: Tensor) -> Tensor:
    """tr(K H L H) (Gretton et al. 2005), without the 1 / (n - 1)^2 factor that cancels in CKA."""
    return (_centre(K) * _centre(L).T).sum()


def _hsic_unbiased(K: Tensor, L: Tensor) -> Tensor:
    """Song et al. 2012, equation 5: the unbiased HSIC estimator, free of the biased one's O(1/n) offset."""
    n = K.shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 items, got {n}")
    k0, l0 = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)  # the kernels with a zero diagonal
    trace = (k0 * l0.T).sum()
    totals = k0.sum() * l0.sum() / ((n - 1) * (n - 2))
    cross = 2 * (k0.sum(dim=0) @ l0.sum(dim=1)) / (n - 2)
    return (trace + totals - cross) / (n * (n - 3))


def _normalised(kl: Tensor, kk: Tensor, ll: Tensor) -> float:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)): nan when a representation has no spread."""
    return (kl / torch.sqrt(kk * ll)).item()


def _cka(
    A: Tensor,
    B: Tensor,
    kernel: Kernel,
    sigma: float | None,
    preprocess: bool,
    hsic: Callable[[Tensor, Tensor], Tensor],
) -> float:
    a, b = _prepared_pair(A, B, preprocess)
    if _no_spread(a) or _no_spread(b):
        return float("nan")
    K, L = _gram(a, kernel, sigma), _gram(b, kernel, sigma)
    return _normalised(hsic(K, L), hsic(K, K), hsic(L, L))


def cka(A: Tensor, B: Tensor, kernel: Kernel = "linear", sigma: float | None = None, preprocess: bool = True) -> float:
    """Kornblith et al. 2019, as used in the Platonic Representation: centred kernel alignment with the biased
    HSIC, invariant to rotations and isotropic scaling of either representation. ``sigma=None`` picks the
    rbf bandwidth by the median heuristic. nan when either representation has every row equal."""
    return _cka(A, B, kernel, sigma, preprocess, _hsic_biased)


def unbiased_cka(
    A: Tensor, B: Tensor, kernel: Kernel = "linear", sigma: float | None = None, preprocess: bool = True
) -> float:
    """Platonic Representation's CKA with Song et al.'s unbiased HSIC, which does not drift with n."""
    return _cka(A, B, kernel, sigma, preprocess, _hsic_unbiased)


def cknna(A: Tensor, B: Tensor, topk: int = 10, preprocess: bool = True) -> float:
    """Platonic Representation (Huh et al. 2024): CKA restricted to local structure.

    Linear kernels keep only the entries (i, j) with j among i's k nearest neighbours in both spaces (each
    space alone for the self terms), then the unbiased HSIC. With k = n - 1 it equals ``unbiased_cka``.
    Unlike CKA it is not bounded by 1: a masked kernel is not positive semi-definite, so Cauchy-Schwarz no longer
    caps the ratio. The reference definition shares this (a 12-item probe with k = 10 gave 1.26); use n >> k.
    Under ties the masks hold the fractional memberships of ``_neighbour_weights`` (the pairs' mask their product),
    so the value does not depend on item order; without ties they are the reference's 0 / 1 masks.
    """
    if topk < 2:
        raise ValueError(f"cknna needs topk >= 2, got {topk}")
    a, b = _prepared_pair(A, B, preprocess)
    if _no_spread(a) or _no_spread(b):
        return float("nan")  # the neighbour masks would be chosen by rounding noise
    K, L = a @ a.T, b @ b.T
    mask_k, mask_l = _neighbour_weights(K, topk), _neighbour_weights(L, topk)
    both = mask_k * mask_l
    return _normalised(
        _hsic_unbiased(K * both, L * both),
        _hsic_unbiased(K * mask_k, K * mask_k),
        _hsic_unbiased(L * mask_l, L * mask_l),
    )


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
    then over images. Takes ``[n, m, d]`` and ``[n, r, d]``; ``lengths``: how many of each item's ``m`` query
    tokens are real (ragged rows padded at the end), the rest left out of the mean."""
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
    per_image = torch.cat(
        [
            (torch.bmm(visual[rows], reference[rows].transpose(1, 2)).amax(dim=2) * weight[rows]).sum(dim=1)
            for rows in _chunks(n, m * reference.shape[1])
        ]
    )
    return per_image.mean().item()


def retrieval_recall(img: Tensor, txt: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Cross-modal retrieval by cosine similarity, item i matching item i: keys ``i2t_recall@k`` (image
    queries, text gallery) and ``t2i_recall@k``.

    A match's rank counts the other items scoring at least as high, within ``TIE`` (the match's score and the
    others' come from different summation orders, whose last bits differ), so ties count against the match and
    collapsed features or repeated captions cannot score well.
    """
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"every k in ks must be a whole number >= 1, got {tuple(ks)}")
    i, t = _pair(img, txt, same_dim=True)
    i, t = _directions(i, "img"), _directions(t, "txt")
    n = i.shape[0]
    matched = (i * t).sum(dim=1)
    items = torch.arange(n, device=i.device)
    i2t_rank = torch.empty(n, dtype=torch.long, device=i.device)
    t2i_rank = torch.zeros(n, dtype=torch.long, device=i.device)
    for rows in _chunks(n, n):
        sim = i[rows] @ t.T
        others = items[rows, None] != items[None, :]
        i2t_rank[rows] = ((sim >= matched[rows, None] - TIE) & others).sum(dim=1)
        t2i_rank += ((sim >= matched[None, :] - TIE) & others).sum(dim=0)
    result = {}
    for direction, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in ks:
            result[f"{direction}_recall@{k}"] = (rank < k).to(torch.float64).mean().item()
    return result


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
    tokens, words = _directions(tokens, "visual_tokens"), _directions(words, "word_embeddings")
    nearest = torch.cat([(tokens[rows] @ words.T).argmax(dim=1) for rows in _chunks(n_tokens, vocab)])
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
