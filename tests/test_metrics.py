"""Alignment metrics: hand-checkable cases, invariances, chance levels, and agreement with naive, loop-based
implementations written straight from the papers' formulas."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alignlm.geometry import metrics as M
from alignlm.training.determinism import deterministic

PLATONIC = [M.mutual_knn, M.cycle_knn, M.lcs_knn, M.edit_distance_knn, M.cka, M.unbiased_cka, M.cknna, M.svcca]
KNN = [M.mutual_knn, M.cycle_knn, M.lcs_knn, M.edit_distance_knn]


def related_pair(n: int = 64, da: int = 24, db: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two feature sets of the same items that share structure, so that every metric lands mid-range."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, da, generator=g)
    B = A @ torch.randn(da, db, generator=g) + 5.0 * torch.randn(n, db, generator=g)
    return A, B


def random_rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


# ------------------------------------------------------------------ naive references, from the formulas


def naive_prepare(x: torch.Tensor, q: float = 0.95) -> np.ndarray:
    """Clamp every entry to the sorted |entry| at index int(q * numel), then divide each row by its norm."""
    magnitudes = sorted(abs(v) for v in x.flatten().tolist())
    t = magnitudes[int(q * len(magnitudes))]
    rows = []
    for row in x.tolist():
        clamped = [max(-t, min(t, v)) for v in row]
        norm = math.sqrt(sum(v * v for v in clamped))
        rows.append([v / norm for v in clamped])
    return np.array(rows)


def naive_knn(x: np.ndarray, k: int) -> list[list[int]]:
    """Each item's k most similar other items by inner product, most similar first; the products correctly rounded,
    so that repeated items tie exactly, broken by item order."""
    n = len(x)
    sim = np.array([[math.fsum(p * q for p, q in zip(x[i], x[j])) for j in range(n)] for i in range(n)])
    return [sorted((j for j in range(n) if j != i), key=lambda j: -sim[i, j])[:k] for i in range(n)]


def naive_lcs(x: list[int], y: list[int]) -> int:
    dp = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            dp[i][j] = dp[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(dp[i - 1][j], dp[i][j - 1])
    return dp[-1][-1]


def naive_edit(x: list[int], y: list[int]) -> int:
    dp = [[i + j if i * j == 0 else 0 for j in range(len(y) + 1)] for i in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            dp[i][j] = min(dp[i - 1][j] + 1, dp[i][j - 1] + 1, dp[i - 1][j - 1] + (x[i - 1] != y[j - 1]))
    return dp[-1][-1]


def naive_knn_metric(name: str, a: np.ndarray, b: np.ndarray, k: int) -> float:
    na, nb = naive_knn(a, k), naive_knn(b, k)
    n = len(a)
    if name == "mutual_knn":
        return float(np.mean([len(set(na[i]) & set(nb[i])) / k for i in range(n)]))
    if name == "cycle_knn":
        return float(np.mean([any(i in na[j] for j in nb[i]) for i in range(n)]))
    if name == "lcs_knn":
        return float(np.mean([naive_lcs(na[i], nb[i]) / k for i in range(n)]))
    return 1.0 - float(np.mean([naive_edit(na[i], nb[i]) / k for i in range(n)]))


def naive_gram(x: np.ndarray, kernel: str, sigma: float | None) -> np.ndarray:
    n = len(x)
    if kernel == "linear":
        return np.array([[float(np.dot(x[i], x[j])) for j in range(n)] for i in range(n)])
    sq = np.array([[float(np.sum((x[i] - x[j]) ** 2)) for j in range(n)] for i in range(n)])
    bandwidth_sq = np.median(sq) if sigma is None else sigma**2
    return np.exp(-sq / (2 * bandwidth_sq))


def naive_hsic_biased(K: np.ndarray, L: np.ndarray) -> float:
    n = len(K)
    H = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(K @ H @ L @ H))


def naive_hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. 2012, eq. 5, with explicit ones vectors."""
    n = len(K)
    Kt, Lt = K * (1 - np.eye(n)), L * (1 - np.eye(n))
    one = np.ones(n)
    return float(
        (
            np.trace(Kt @ Lt)
            + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ Kt @ Lt @ one)
        )
        / (n * (n - 3))
    )


def naive_hsic_u_statistic(K: np.ndarray, L: np.ndarray) -> float:
    """The unbiased HSIC as the U-statistic it is: mean over distinct (i, j, q, r) of k_ij l_ij + k_ij l_qr
    - 2 k_ij l_iq (Song et al. 2012, Theorem 2)."""
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(len(K)), 4):
        total += K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
        count += 1
    return total / count


def naive_cka(a: np.ndarray, b: np.ndarray, kernel: str, sigma: float | None, hsic) -> float:
    K, L = naive_gram(a, kernel, sigma), naive_gram(b, kernel, sigma)
    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def naive_cknna(a: np.ndarray, b: np.ndarray, k: int) -> float:
    n = len(a)
    K, L = naive_gram(a, "linear", None), naive_gram(b, "linear", None)
    na, nb = naive_knn(a, k), naive_knn(b, k)
    in_a = np.array([[1.0 if j in set(na[i]) else 0.0 for j in range(n)] for i in range(n)])
    in_b = np.array([[1.0 if j in set(nb[i]) else 0.0 for j in range(n)] for i in range(n)])
    both = in_a * in_b
    return naive_hsic_unbiased(K * both, L * both) / math.sqrt(
        naive_hsic_unbiased(K * in_a, K * in_a) * naive_hsic_unbiased(L * in_b, L * in_b)
    )


def naive_top_subspace(x: np.ndarray, dim: int) -> np.ndarray:
    x = (x - x.mean(axis=0)) / (x.std(axis=0, ddof=1) + 1e-8)
    return np.linalg.svd(x, full_matrices=False)[0][:, :dim]


def naive_svcca(a: np.ndarray, b: np.ndarray, dim: int) -> float:
    """SVD step, then textbook CCA: singular values of Cxx^-1/2 Cxy Cyy^-1/2 on the reduced data."""
    x, y = naive_top_subspace(a, dim), naive_top_subspace(b, dim)
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)

    def inv_sqrt(c: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(c)
        return v @ np.diag(w**-0.5) @ v.T

    whitened = inv_sqrt(x.T @ x) @ (x.T @ y) @ inv_sqrt(y.T @ y)
    return float(np.mean(np.linalg.svd(whitened, compute_uv=False)))


# ------------------------------------------------------------------------------ hand-checkable cases


@pytest.mark.parametrize("metric", PLATONIC, ids=lambda f: f.__name__)
def test_identical_features_score_one(metric):
    A, _ = related_pair()
    assert metric(A, A) == pytest.approx(1.0, abs=1e-9)


def test_identical_features_have_no_gap():
    A, _ = related_pair()
    assert M.modality_gap(A, A) == 0.0
    assert torch.equal(M.gap_vector(A, A), torch.zeros(A.shape[1], dtype=torch.float64))


def test_known_gap_between_two_clusters():
    # A around e1, B around e2, offsets +-s*e3 in pairs: the normalised means are e_i / sqrt(1 + s^2).
    s, n = 0.5, 20
    e = torch.eye(4)
    signs = torch.tensor([1.0, -1.0]).repeat(n // 2)[:, None]
    A = e[0] + s * signs * e[2]
    B = e[1] + s * signs * e[2]
    assert M.modality_gap(A, B) == pytest.approx(math.sqrt(2) / math.sqrt(1 + s**2), abs=1e-12)
    assert torch.allclose(M.gap_vector(A, B), (e[0] - e[1]).double() / math.sqrt(1 + s**2))


def test_shift_closes_the_gap_and_matches_the_notebook_convention():
    e = torch.eye(3)
    A, B = e[0].repeat(8, 1), e[1].repeat(8, 1)
    closed_a, closed_b = M.shift_along_gap(A, B, math.sqrt(2))  # moves each cone half way to the other
    assert torch.allclose(closed_a, closed_b) and M.modality_gap(closed_a, closed_b) < 1e-12
    curve = M.gap_shift_curve(A, B, [-0.5, 0.0, 0.5], M.modality_gap)
    assert [d for d, _ in curve] == [-0.5, 0.0, 0.5]
    assert curve[1][1] == pytest.approx(math.sqrt(2))
    assert curve[0][1] > curve[1][1] > curve[2][1]

    img, txt = related_pair(n=32, da=16, db=16)
    img_n = img.double() / img.double().norm(dim=-1, keepdim=True)
    txt_n = txt.double() / txt.double().norm(dim=-1, keepdim=True)
    direction = img_n.mean(dim=0) - txt_n.mean(dim=0)
    direction = direction / direction.norm()
    want_img, want_txt = img_n - 0.5 * 0.3 * direction, txt_n + 0.5 * 0.3 * direction
    got_img, got_txt = M.shift_along_gap(img, txt, 0.3)
    assert torch.allclose(got_img, want_img / want_img.norm(dim=-1, keepdim=True), atol=1e-12)
    assert torch.allclose(got_txt, want_txt / want_txt.norm(dim=-1, keepdim=True), atol=1e-12)


def test_random_features_mutual_knn_near_chance():
    g = torch.Generator().manual_seed(1)
    n, k = 200, 10
    A, B = torch.randn(n, 128, generator=g), torch.randn(n, 96, generator=g)
    assert M.mutual_knn(A, B, topk=k) == pytest.approx(k / (n - 1), abs=0.02)


@pytest.mark.parametrize("metric", KNN + [M.cka, M.unbiased_cka, M.cknna], ids=lambda f: f.__name__)
def test_invariant_to_orthogonal_rotation(metric):
    # Without the clamp, whose per-entry threshold is tied to the coordinate axes.
    A, B = related_pair()
    rotated = A.double() @ random_rotation(A.shape[1], seed=3)
    assert metric(rotated, B, preprocess=False) == pytest.approx(metric(A, B, preprocess=False), abs=1e-9)


def test_rbf_cka_invariant_to_rotation_and_scale_with_median_bandwidth():
    A, B = related_pair()
    moved = 5.0 * A.double() @ random_rotation(A.shape[1], seed=4)
    want = M.cka(A, B, kernel="rbf", preprocess=False)
    assert M.cka(moved, B, kernel="rbf", preprocess=False) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("metric", PLATONIC, ids=lambda f: f.__name__)
@pytest.mark.parametrize("preprocess", [True, False])
@pytest.mark.parametrize("scale", [7.5, 1e-13])
def test_invariant_to_isotropic_scaling(metric, preprocess, scale):
    """1e-13: rows of norm under 1e-12 (F.normalize's floor) had stayed off the unit sphere."""
    if metric is M.svcca and scale < 1e-8:
        pytest.skip("SVCCA divides each column by its deviation + 1e-8, as the reference: not scale-free below that")
    A, B = related_pair()
    want = metric(A, B, preprocess=preprocess)
    assert metric(scale * A.double(), B, preprocess=preprocess) == pytest.approx(want, abs=1e-7)


def test_modality_gap_and_retrieval_are_invariant_to_the_scale_of_a_side():
    A, B = related_pair()
    B = B[:, : A.shape[1]]  # one feature space
    for metric in (M.modality_gap, M.retrieval_recall):
        assert metric(1e-13 * A.double(), B) == pytest.approx(metric(A, B), abs=1e-12)


def test_cknna_over_all_neighbours_is_unbiased_cka():
    A, B = related_pair()
    assert M.cknna(A, B, topk=A.shape[0] - 1) == pytest.approx(M.unbiased_cka(A, B), abs=1e-12)


def test_retrieval_perfect_for_identical_and_chance_for_random():
    g = torch.Generator().manual_seed(5)
    n = 200
    feats = torch.randn(n, 32, generator=g)
    assert set(M.retrieval_recall(feats, feats).values()) == {1.0}
    recalls = M.retrieval_recall(feats, torch.randn(n, 32, generator=g), ks=(10, 50))
    for direction in ("i2t", "t2i"):
        assert recalls[f"{direction}_recall@10"] == pytest.approx(10 / n, abs=0.05)
        assert recalls[f"{direction}_recall@50"] == pytest.approx(50 / n, abs=0.1)


def test_retrieval_breaks_ties_at_random_collapsed_features_score_chance():
    collapsed = torch.ones(10, 4)
    got = M.retrieval_recall(collapsed, collapsed, ks=(1, 5, 10))
    assert got == pytest.approx({f"{d}_recall@{k}": k / 10 for d in ("i2t", "t2i") for k in (1, 5, 10)})


def test_token_word_accuracy_on_a_constructed_case():
    words = torch.eye(4)  # four words on the axes
    tokens = torch.tensor([[1.0, 0.1, 0, 0], [0, 0, 2.0, 0.5], [0.2, 1.0, 0, 0], [0, 0, 0, 1.0]])
    # nearest words: 0, 2, 1, 3
    labels = [[0], [1, 2], [3], []]
    assert M.token_word_accuracy(tokens, words, labels) == pytest.approx(2 / 4)


def test_a_score_is_one_when_the_reference_contains_the_visual_tokens():
    g = torch.Generator().manual_seed(6)
    visual = torch.randn(5, 7, 16, generator=g)
    reference = torch.cat([torch.randn(5, 3, 16, generator=g), 2.0 * visual.flip(1)], dim=1)
    assert M.a_score(visual, reference) == pytest.approx(1.0, abs=1e-12)


# --------------------------------------------------------------------- agreement with naive references


def test_prepare_features_matches_the_reference_clamp():
    A, _ = related_pair()
    A[0, 0] = 50.0  # an outlier that the clamp must cut
    got = M.prepare_features(A)
    assert got[0, 0].item() < 0.9
    np.testing.assert_allclose(got.numpy(), naive_prepare(A), atol=1e-12)


def test_prepare_features_runs_with_deterministic_kernels():
    """The training monitor clamps features inside ``deterministic: true`` runs, where ``kthvalue`` (no deterministic
    CUDA kernel) would stop a GPU run: the clamp's threshold comes from a sort. conftest raises as a GPU would."""
    A, _ = related_pair()
    with deterministic(True):
        got = M.prepare_features(A)
    np.testing.assert_allclose(got.numpy(), naive_prepare(A), atol=1e-12)


@pytest.mark.parametrize("name", [f.__name__ for f in KNN])
@pytest.mark.parametrize("preprocess", [True, False])
def test_knn_metrics_match_naive(name, preprocess):
    A, B = related_pair(seed=7)
    a, b = (naive_prepare(A), naive_prepare(B)) if preprocess else (A.double().numpy(), B.double().numpy())
    got = getattr(M, name)(A, B, topk=10, preprocess=preprocess)
    assert got == pytest.approx(naive_knn_metric(name, a, b, 10), abs=1e-5)
    assert 0.0 < got < 1.0


def test_vectorised_lcs_and_edit_distance_match_the_classic_dp():
    g = torch.Generator().manual_seed(8)
    x, y = torch.randint(0, 4, (50, 9), generator=g), torch.randint(0, 4, (50, 9), generator=g)
    assert M._lcs_lengths(x, y).tolist() == [naive_lcs(p, q) for p, q in zip(x.tolist(), y.tolist())]
    assert M._edit_distances(x, y).tolist() == [naive_edit(p, q) for p, q in zip(x.tolist(), y.tolist())]


@pytest.mark.parametrize("kernel,sigma", [("linear", None), ("rbf", None), ("rbf", 1.0)])
@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_matches_naive(kernel, sigma, unbiased):
    A, B = related_pair(seed=9)
    metric, hsic = (M.unbiased_cka, naive_hsic_unbiased) if unbiased else (M.cka, naive_hsic_biased)
    want = naive_cka(naive_prepare(A), naive_prepare(B), kernel, sigma, hsic)
    assert metric(A, B, kernel=kernel, sigma=sigma) == pytest.approx(want, abs=1e-5)


def test_unbiased_hsic_is_the_u_statistic():
    A, B = related_pair(n=8, da=3, db=5, seed=10)
    a, b = A.double().numpy(), B.double().numpy()
    want = naive_cka(a, b, "linear", None, naive_hsic_u_statistic)
    assert M.unbiased_cka(A, B, preprocess=False) == pytest.approx(want, abs=1e-9)


def test_cknna_matches_naive():
    A, B = related_pair(seed=11)
    got = M.cknna(A, B, topk=10)
    assert got == pytest.approx(naive_cknna(naive_prepare(A), naive_prepare(B), 10), abs=1e-5)
    assert 0.0 < got < 1.0


def test_svcca_matches_textbook_cca_and_the_reference_pipeline():
    from sklearn.cross_decomposition import CCA

    A, B = related_pair(seed=12)
    a, b = naive_prepare(A), naive_prepare(B)
    got = M.svcca(A, B, cca_dim=10)
    assert got == pytest.approx(naive_svcca(a, b, 10), abs=1e-5)
    # The reference's route: scikit-learn's iterative CCA on the singular subspaces, mean score correlation.
    x, y = naive_top_subspace(a, 10), naive_top_subspace(b, 10)
    xs, ys = CCA(n_components=10, max_iter=5000, tol=1e-12).fit(x, y).transform(x, y)
    assert got == pytest.approx(np.mean([np.corrcoef(xs[:, i], ys[:, i])[0, 1] for i in range(10)]), abs=1e-4)


def test_modality_gap_matches_naive():
    A, B = related_pair(n=40, da=16, db=16, seed=13)
    mean_a, mean_b = np.zeros(16), np.zeros(16)
    for row_a, row_b in zip(A.double().numpy(), B.double().numpy()):
        mean_a += row_a / np.linalg.norm(row_a) / len(A)
        mean_b += row_b / np.linalg.norm(row_b) / len(B)
    assert M.modality_gap(A, B) == pytest.approx(float(np.linalg.norm(mean_a - mean_b)), abs=1e-12)


def test_retrieval_matches_the_notebook_definition():
    img, txt = related_pair(n=100, da=16, db=16, seed=14)
    i = img.double() / img.double().norm(dim=-1, keepdim=True)
    t = txt.double() / txt.double().norm(dim=-1, keepdim=True)
    sim = i @ t.T
    got = M.retrieval_recall(img, txt)
    for k in (1, 5, 10):
        by_row, by_col = sim.argsort(dim=1), sim.argsort(dim=0)
        assert got[f"i2t_recall@{k}"] == pytest.approx(np.mean([q in by_row[q, -k:] for q in range(100)]))
        assert got[f"t2i_recall@{k}"] == pytest.approx(np.mean([q in by_col[-k:, q] for q in range(100)]))
    assert 0.0 < got["i2t_recall@1"] < 1.0


def test_a_score_matches_naive():
    g = torch.Generator().manual_seed(15)
    visual, reference = torch.randn(4, 6, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    per_image = []
    for v_img, r_img in zip(visual.double(), reference.double()):
        best = [max(float(v @ r / (v.norm() * r.norm())) for r in r_img) for v in v_img]
        per_image.append(sum(best) / len(best))
    assert M.a_score(visual, reference) == pytest.approx(sum(per_image) / len(per_image), abs=1e-12)


def test_token_word_accuracy_matches_naive():
    g = torch.Generator().manual_seed(16)
    words = torch.randn(30, 8, generator=g)
    tokens = words[torch.randint(0, 30, (60,), generator=g)] + 0.8 * torch.randn(60, 8, generator=g)
    labels = [torch.randint(0, 30, (int(c),), generator=g).tolist() for c in torch.randint(0, 4, (60,), generator=g)]
    hits = 0
    for token, ids in zip(tokens.double(), labels):
        cosines = [float(token @ w / (token.norm() * w.norm())) for w in words.double()]
        hits += cosines.index(max(cosines)) in ids
    assert M.token_word_accuracy(tokens, words, labels) == pytest.approx(hits / 60)


# --------------------------------------------------------------------------------- determinism, errors


@pytest.mark.parametrize("metric", PLATONIC + [M.modality_gap], ids=lambda f: f.__name__)
def test_same_call_same_result(metric):
    A, B = related_pair(da=24, db=24, seed=17)
    assert metric(A, B) == metric(A, B)


def test_errors_name_the_problem():
    A, B = related_pair()
    with pytest.raises(ValueError, match="same items"):
        M.mutual_knn(A, B[:10])
    with pytest.raises(ValueError, match="topk"):
        M.mutual_knn(A, B, topk=A.shape[0])
    with pytest.raises(ValueError, match="share a feature space"):
        M.modality_gap(A, B)
    with pytest.raises(ValueError, match="kernel"):
        M.cka(A, B, kernel="cosine")
    with pytest.raises(ValueError, match="one list per visual token"):
        M.token_word_accuracy(A, A, [[0]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    A, B = related_pair(seed=18)
    for metric in PLATONIC:
        assert metric(A.cuda(), B.cuda()) == pytest.approx(metric(A, B), abs=1e-9)
    C = B[:, :24]
    assert M.modality_gap(A.cuda(), C.cuda()) == pytest.approx(M.modality_gap(A, C), abs=1e-12)
    assert M.retrieval_recall(A.cuda(), C.cuda()) == M.retrieval_recall(A, C)


def test_retrieval_ties_from_rounding_are_ties():
    """Collapsed features and repeated captions: the match's cosine and its rivals' differ only in their last bits
    (a row sum against a matmul), which used to decide the rank (recall@1 0.94). Tied, the match ranks first with
    chance 1 / (tied + 1); counting every tie against the match instead capped a perfect model's i2t recall@1 at
    2 / 128 on the digits probe, whose captions repeat."""
    g = torch.Generator().manual_seed(19)
    n, d = 64, 4096
    img = torch.randn(1, d, generator=g, dtype=torch.float64).expand(n, d).clone()
    txt = torch.randn(1, d, generator=g, dtype=torch.float64).expand(n, d).clone()
    got = M.retrieval_recall(img, txt)
    assert got["i2t_recall@1"] == pytest.approx(1 / n) and got["t2i_recall@5"] == pytest.approx(5 / n)
    img = torch.randn(n, 768, generator=g, dtype=torch.float64)
    captions = torch.randn(4, 768, generator=g, dtype=torch.float64)[torch.arange(n) % 4]  # 16 of each caption
    got = M.retrieval_recall(img + captions, captions, ks=(1, 16, 17))
    assert got["i2t_recall@1"] == pytest.approx(1 / 16) and got["i2t_recall@16"] == got["i2t_recall@17"] == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_text_to_image_retrieval_is_image_to_text_retrieval_with_the_sets_swapped(seed):
    """The two directions are one computation on swapped sets: a rounding tie is a tie both ways (a single seed had
    let t2i count rivals that tie only by rounding as above the match: recall@1 0 for collapsed features at seed 2)."""
    g = torch.Generator().manual_seed(seed)
    n, d = 64, 4096
    img = torch.randn(1, d, generator=g, dtype=torch.float64).expand(n, d).clone()
    txt = torch.randn(1, d, generator=g, dtype=torch.float64).expand(n, d).clone()
    for a, b in ((img, txt), (torch.randn(n, 32, generator=g, dtype=torch.float64), txt[:, :32] + 0.1 * img[:, :32])):
        forward, swapped = M.retrieval_recall(a, b), M.retrieval_recall(b, a)
        for k in (1, 5, 10):
            assert forward[f"t2i_recall@{k}"] == swapped[f"i2t_recall@{k}"], k
            assert forward[f"i2t_recall@{k}"] == swapped[f"t2i_recall@{k}"], k


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_or_empty_features_are_refused(bad):
    A, B = related_pair(da=24, db=24, seed=20)
    A[3, 0] = bad
    for metric in [*PLATONIC, M.modality_gap, M.retrieval_recall]:
        with pytest.raises(ValueError, match="1 non-finite entries"):
            metric(A, B)
    with pytest.raises(ValueError, match="non-finite"):
        M.a_score(A[None], B[None])
    with pytest.raises(ValueError, match="non-finite"):
        M.token_word_accuracy(A, B, [[0]] * A.shape[0])
    with pytest.raises(ValueError, match="empty"):
        M.modality_gap(A[:0], B[:0])


def test_all_zero_rows_have_no_direction():
    A, B = related_pair(da=24, db=24, seed=21)
    A[2] = 0
    for metric in (M.modality_gap, M.retrieval_recall, M.mutual_knn):
        with pytest.raises(ValueError, match="1 all-zero rows"):
            metric(A, B)
    assert M.mutual_knn(A, B, preprocess=False) >= 0  # raw inner products need no direction


@pytest.mark.parametrize("d", [48, 100, 777])
def test_kernel_metrics_of_a_collapsed_representation_are_nan(d):
    """A dead connector gives its bias for every image: 0 / 0, which rounding noise used to decide (cknna 0.70)."""
    g = torch.Generator().manual_seed(22)
    A = torch.randn(1, d, generator=g).expand(64, d).clone()
    B = torch.randn(64, d, generator=g)
    for value in (M.cka(A, B), M.unbiased_cka(A, B), M.cknna(A, B), M.cka(A, B, kernel="rbf"), M.cka(B, A)):
        assert math.isnan(value)


@pytest.mark.parametrize("odd", [1, 2, 4, 10])
def test_a_representation_collapsed_but_for_a_few_items_is_no_alignment(odd):
    """A dead connector and a few odd images against random captions: unbiased CKA's normaliser is zero (every
    quadruple of items holds three equal ones) and came out as rounding of either sign (nan or 1e-10); CKNNA's tied
    items shared their neighbour slots evenly, leaving next to nothing under its ratio: 0.3 to 28, where unrelated
    features give 0.07. Both nan where undefined; repeated items that decide their neighbours still score."""
    g = torch.Generator().manual_seed(40 + odd)
    A = torch.randn(1, 64, generator=g).repeat(128, 1)
    A[:odd] = torch.randn(odd, 64, generator=g)
    B = torch.randn(128, 64, generator=g)
    assert math.isnan(M.cknna(A, B)) and math.isnan(M.cknna(B, A))
    if odd == 1:
        assert math.isnan(M.unbiased_cka(A, B)) and math.isnan(M.unbiased_cka(B, A))
    else:
        assert abs(M.unbiased_cka(A, B)) < 0.05
    assert M.cknna(torch.randn(128, 64, generator=g), B) == pytest.approx(0.07, abs=0.05)
    classes = torch.randn(10, 64, generator=g)[torch.arange(128) % 10]  # 12-13 copies of each, k = 10
    assert M.cknna(classes, classes) == pytest.approx(1.0) and abs(M.cknna(classes, B)) < 0.2


def test_suite_refuses_a_topk_that_makes_knn_metrics_trivial():
    """With k = n - 1 every item's neighbours are all the others: the kNN metrics were 1 for independent features."""
    from alignlm.geometry.suite import pair_metrics

    g = torch.Generator().manual_seed(23)
    A, B = torch.randn(11, 16, generator=g), torch.randn(11, 16, generator=g)
    with pytest.raises(ValueError, match="topk <= n - 2 = 9"):
        pair_metrics(A, B, ["mutual_knn"], topk=10)
    got = pair_metrics(A, B, ["mutual_knn", "svcca", "cka"], topk=9)
    assert got["mutual_knn"] < 1 and got["svcca"] < 1
    assert pair_metrics(A, B, ["cka"], topk=10)["cka"] < 1  # no kNN metric asked: no limit
    with pytest.raises(ValueError, match="cca_dim"):
        M.svcca(A, B, cca_dim=10)  # n - 1 centred directions span everything: always 1


def test_the_suite_clamps_each_feature_set_once_and_gives_each_metrics_own_value(monkeypatch):
    """Every clamping metric had clamped both sets itself (a sort of every entry, 11.8 s a time for 20k x 4096 features
    on one CPU thread, 8 times per pair); the suite clamps them once and passes them on, to the same numbers. Each
    list metric (cycle, LCS, edit distance) had ranked both sets' neighbours itself: the suite ranks them once."""
    from alignlm.geometry import suite

    A, B = related_pair(seed=9)
    A[3, 5] = 40.0  # an outlier the clamp cuts
    names = [n for n in suite.PAIR_METRICS if n != "retrieval"]
    alone = {n: v for name in names for n, v in suite.pair_metrics(A, B, [name], topk=10).items()}
    calls = []
    prepare = M.prepare_features
    monkeypatch.setattr(M, "prepare_features", lambda x, *a, **k: calls.append(x.shape) or prepare(x, *a, **k))
    ranked, knn = [], M._knn
    monkeypatch.setattr(M, "_knn", lambda x, topk: ranked.append(x.shape) or knn(x, topk))
    together = suite.pair_metrics(A, B, names, topk=10)
    assert together == alone and len(calls) == 2 and len(ranked) == 2
    B[7, 2] = float("nan")
    with pytest.raises(ValueError, match="^B has 1 non-finite"):  # which set, as each metric named it
        suite.pair_metrics(A, B, ["cka"])


def test_the_suite_reports_no_recall_at_k_of_k_or_fewer_items():
    """recall@10 of 10 items is 1 whatever the features: it was reported beside the others."""
    from alignlm.geometry.suite import pair_metrics

    g = torch.Generator().manual_seed(27)
    A, B = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    assert M.retrieval_recall(A, B)["i2t_recall@10"] == 1.0
    assert sorted(pair_metrics(A, B, ["retrieval"])) == [f"{d}_recall@{k}" for d in ("i2t", "t2i") for k in (1, 5)]
    assert len(pair_metrics(torch.cat([A, B]), torch.cat([B, A]), ["retrieval"])) == 6


def test_a_score_averages_over_real_query_tokens_only():
    g = torch.Generator().manual_seed(24)
    text = [torch.randn(t, 8, generator=g) for t in (2, 5, 3)]
    visual = torch.randn(3, 6, 8, generator=g)
    padded = torch.stack([torch.cat([r, r[-1:].expand(5 - len(r), -1)]) for r in text])
    one_by_one = [M.a_score(r[None], visual[i : i + 1]) for i, r in enumerate(text)]
    got = M.a_score(padded, visual, [len(r) for r in text])
    assert got == pytest.approx(sum(one_by_one) / 3, abs=1e-12) and got != pytest.approx(M.a_score(padded, visual))
    with pytest.raises(ValueError, match="lengths"):
        M.a_score(padded, visual, [0, 5, 3])


def test_svcca_keeps_at_most_each_sides_rank_and_is_nan_without_spread():
    """Past a side's rank the SVD fills in arbitrary, uncentred directions: two unrelated two-kind sets (rank 1 once
    centred) scored 0.89 with cca_dim 10, and a collapsed side 0.31, where the kernel metrics say nan."""
    from alignlm.geometry.suite import pair_metrics

    g = torch.Generator().manual_seed(25)
    n, d = 64, 32
    kind_a, kind_b = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    A = torch.randn(2, d, generator=g, dtype=torch.float64)[kind_a]
    B = torch.randn(2, d, generator=g, dtype=torch.float64)[kind_b]
    label_correlation = abs(torch.corrcoef(torch.stack([kind_a.double(), kind_b.double()]))[0, 1].item())
    assert M.svcca(A, B, cca_dim=10) == pytest.approx(label_correlation, abs=1e-9)
    assert M.svcca(A, B, cca_dim=10) == pytest.approx(M.svcca(A, B, cca_dim=1), abs=1e-12)
    collapsed = torch.randn(1, d, generator=g).expand(n, d).clone()
    assert math.isnan(M.svcca(collapsed, torch.randn(n, d, generator=g)))
    assert math.isnan(pair_metrics(collapsed, collapsed + 1, ["svcca"])["svcca"])


def digits_like_probe(n: int = 128, d: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits probe's shape: 10 digits x 4 caption templates, so its 128 captions hold 40 distinct rows."""
    g = torch.Generator().manual_seed(26)
    digit, template = torch.randint(0, 10, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)
    captions = torch.randn(10, d, generator=g)[digit] + 0.5 * torch.randn(4, d, generator=g)[template]
    images = torch.randn(10, d, generator=g)[digit] + torch.randn(n, d, generator=g)
    return images, captions


@pytest.mark.parametrize("metric", [M.mutual_knn, M.cknna], ids=lambda f: f.__name__)
def test_knn_ties_do_not_depend_on_item_order(metric):
    """Repeated captions tie at the k-th neighbour; topk broke the tie by index, so listing the same items in another
    order moved the value (mutual kNN 0.755 to 0.765, CKNNA 0.686 to 0.710 over six orders of one such probe)."""
    images, captions = digits_like_probe()
    want = metric(images, captions)
    for seed in (1, 2, 3):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        assert metric(images[order], captions[order]) == pytest.approx(want, abs=1e-12)


def test_mutual_knn_under_ties_lies_between_independent_and_shared_tie_breaks():
    """With exact ties (integer features) on different items in the two spaces: the mean overlap when one order of
    the items breaks the ties in both (every order of the six items) lies between the overlap of independent
    tie-breaks (the mean memberships multiplied, which mutual kNN used to report) and the mean memberships' minimum,
    which it reports."""
    A = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [1, 1, 0]], dtype=torch.float64)
    B = torch.tensor([[0, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float64)
    n, k = len(A), 2
    orders = list(itertools.permutations(range(n)))

    def neighbours(x: torch.Tensor, place: dict[int, int]) -> list[set[int]]:
        sim = (x @ x.T).tolist()
        return [
            set(sorted((j for j in range(n) if j != i), key=lambda j: (-sim[i][j], place[j]))[:k]) for i in range(n)
        ]

    shared, in_a, in_b = 0.0, np.zeros((n, n)), np.zeros((n, n))
    for order in orders:
        place = {item: p for p, item in enumerate(order)}
        sets_a, sets_b = neighbours(A, place), neighbours(B, place)
        shared += np.mean([len(sets_a[i] & sets_b[i]) / k for i in range(n)]) / len(orders)
        for i in range(n):
            in_a[i, list(sets_a[i])] += 1 / len(orders)
            in_b[i, list(sets_b[i])] += 1 / len(orders)
    got = M.mutual_knn(A, B, topk=k, preprocess=False)
    assert got == pytest.approx(float(np.mean(np.minimum(in_a, in_b).sum(axis=1) / k)), abs=1e-12)
    assert float(np.mean((in_a * in_b).sum(axis=1) / k)) < shared - 0.1 < got - 0.1


def duplicate_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """20 related (image, caption) pairs, each listed twice (a data set's duplicates): ties in both spaces, between
    the same two copies."""
    rng = np.random.default_rng(1)
    a0 = rng.standard_normal((20, 16))
    b0 = a0 @ rng.standard_normal((16, 12)) + 0.1 * rng.standard_normal((20, 12))
    return torch.tensor(np.repeat(a0, 2, axis=0)), torch.tensor(np.repeat(b0, 2, axis=0))


def test_identical_features_with_repeated_items_score_one():
    """The two spaces broke a tie independently (memberships multiplied), so identical features listing an item twice
    scored below 1 (mutual kNN 0.667 with k = 1, CKNNA 0.958); one tie-break shared by both picks the same copy."""
    X = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    for k in range(1, 5):
        assert M.mutual_knn(X, X, topk=k, preprocess=False) == pytest.approx(1.0, abs=1e-12)
    images, captions = duplicate_pairs()
    for k in (2, 3, 5):
        assert M.mutual_knn(images, images, topk=k) == pytest.approx(1.0, abs=1e-12)
        assert M.cknna(images, images, topk=k) == pytest.approx(1.0, abs=1e-12)
    n = len(images)
    assert M.cknna(images, captions, topk=n - 1) == pytest.approx(M.unbiased_cka(images, captions), abs=1e-12)


def test_duplicate_pairs_score_what_every_item_order_gives():
    """Every order of the items breaks the copies' ties the same way in both spaces, so every order gives the
    reference the same value (0.625 for k = 2); multiplying the memberships gave 0.5625."""
    images, captions = duplicate_pairs()
    a, b = naive_prepare(images), naive_prepare(captions)
    for k in (2, 3):
        got = M.mutual_knn(images, captions, topk=k)
        for seed in range(4):
            order = np.random.default_rng(seed).permutation(len(a))
            assert got == pytest.approx(naive_knn_metric("mutual_knn", a[order], b[order], k), abs=1e-12)
    assert M.mutual_knn(images, captions, topk=2) == pytest.approx(0.625, abs=1e-12)


def test_one_high_norm_item_makes_no_ties_without_preprocessing():
    """With ``preprocess=False`` the tie tolerance was 1e-9 times the largest inner product of all: one item scaled by
    1e5 turned every other item's distinct neighbours into ties (mutual kNN 0.051 where the reference gives 0.473).
    It is per pair, 1e-9 |x_i| |x_j|: a cosine difference, as with unit rows."""
    rng = np.random.default_rng(0)
    n, k = 100, 10
    a = rng.standard_normal((n, 32))
    b = a + 0.5 * rng.standard_normal((n, 32))
    a[0] *= 1e5
    A, B = torch.tensor(a), torch.tensor(b)
    assert M.mutual_knn(A, B, topk=k, preprocess=False) == pytest.approx(naive_knn_metric("mutual_knn", a, b, k))
    assert M.cknna(A, B, topk=k, preprocess=False) == pytest.approx(naive_cknna(a, b, k), rel=1e-9)


# ----------------------------------------------- the whole-matrix implementation the blocked metrics replaced


def dense_memberships(x: torch.Tensor, k: int) -> torch.Tensor:
    """[n, n]: j's membership among i's k nearest neighbours: 1 above the k-th similarity, those tied with it (within
    TIE |x_i| |x_j|) sharing the slots left equally."""
    sim = (x @ x.T).fill_diagonal_(float("-inf"))
    norms = x.norm(dim=1)
    tolerance = M.TIE * norms[:, None] * norms[None, :]
    kth = sim.topk(k, dim=1).values[:, -1:]
    sure = sim > kth + tolerance
    tied = (sim >= kth - tolerance) & ~sure
    share = (k - sure.sum(dim=1, keepdim=True)).double() / tied.sum(dim=1, keepdim=True)
    return torch.where(sure, 1.0, tied * share)


def dense_hsic_biased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    def centre(X: torch.Tensor) -> torch.Tensor:
        return X - X.mean(dim=0, keepdim=True) - X.mean(dim=1, keepdim=True) + X.mean()

    return (centre(K) * centre(L).T).sum()


def dense_hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    n = len(K)
    k0, l0 = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    totals = k0.sum() * l0.sum() / ((n - 1) * (n - 2))
    return ((k0 * l0.T).sum() + totals - 2 * (k0.sum(dim=0) @ l0.sum(dim=1)) / (n - 2)) / (n * (n - 3))


def dense_metrics(A: torch.Tensor, B: torch.Tensor, k: int, preprocess: bool) -> dict[str, float]:
    """Mutual kNN, linear CKA, unbiased CKA and CKNNA from whole n x n matrices (the pairs' mask the minimum)."""
    a, b = (M.prepare_features(A), M.prepare_features(B)) if preprocess else (A.double(), B.double())
    K, L = a @ a.T, b @ b.T
    in_a, in_b = dense_memberships(a, k), dense_memberships(b, k)
    both = torch.minimum(in_a, in_b)

    def ratio(hsic, kl: tuple, kk: tuple, ll: tuple) -> float:
        return (hsic(*kl) / torch.sqrt(hsic(*kk) * hsic(*ll))).item()

    got = {
        "mutual_knn": (both.sum(dim=1) / k).mean().item(),
        "cka": ratio(dense_hsic_biased, (K, L), (K, K), (L, L)),
    }
    if len(a) >= 4:
        got["unbiased_cka"] = ratio(dense_hsic_unbiased, (K, L), (K, K), (L, L))
        if k >= 2:
            kl, kk, ll = (K * both, L * both), (K * in_a, K * in_a), (L * in_b, L * in_b)
            got["cknna"] = ratio(dense_hsic_unbiased, kl, kk, ll)
    return got


def blocked_metrics(A: torch.Tensor, B: torch.Tensor, k: int, preprocess: bool, names) -> dict[str, float]:
    knn = {"mutual_knn", "cknna"}
    return {
        name: getattr(M, name)(A, B, **({"topk": k} if name in knn else {}), preprocess=preprocess) for name in names
    }


def small_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, int]]:
    """n = 3 to 6 items with every k, k = n - 1 included."""
    cases = []
    for n in range(3, 7):
        A, B = related_pair(n=n, da=5, db=4, seed=40 + n)
        cases += [(f"n={n}, k={k}", A, B, k) for k in range(1, n)]
    return cases


def equality_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, int]]:
    integers = torch.Generator().manual_seed(34)
    repeated = torch.randint(-3, 4, (15, 6), generator=integers).double().repeat(2, 1)  # exact duplicates and ties
    return [
        ("random", *related_pair(seed=31), 10),
        ("fewer items than features", *related_pair(n=40, da=64, db=96, seed=32), 5),
        ("in one cone", *(x + 2.0 for x in related_pair(seed=33)), 10),
        ("repeated captions", *digits_like_probe(), 10),
        ("duplicate pairs", *duplicate_pairs(), 3),
        ("integer duplicates", repeated, repeated @ torch.randint(-2, 3, (6, 5), generator=integers).double(), 4),
        ("k = n - 1", *related_pair(n=12, seed=35), 11),
        *small_cases(),
    ]


@pytest.mark.parametrize("preprocess", [True, False])
def test_blocked_metrics_equal_the_whole_matrix_ones(preprocess):
    """Mutual kNN, linear CKA, unbiased CKA and CKNNA built several n x n float64 matrices (past 24 GiB at 17k-23k
    items); now row blocks and feature space. The same values to 1e-10, with and without ties, down to 3 items."""
    for name, A, B, k in equality_cases():
        want = dense_metrics(A, B, k, preprocess)
        got = blocked_metrics(A, B, k, preprocess, want)
        for metric, value in want.items():
            assert got[metric] == pytest.approx(value, rel=1e-10, abs=1e-14), (name, metric)


@pytest.mark.parametrize("preprocess", [True, False])
def test_knn_memberships_without_ties_are_topks(preprocess):
    """Without ties the fractional memberships are topk's 0 / 1 sets, so mutual kNN and CKNNA are the reference's."""

    def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
        nearest = (x @ x.T).fill_diagonal_(float("-inf")).topk(k, dim=1).indices
        return torch.zeros(len(x), len(x), dtype=torch.bool).scatter_(1, nearest, True)

    for seed, k in ((27, 10), (28, 3)):
        A, B = related_pair(seed=seed)
        a, b = (M.prepare_features(A), M.prepare_features(B)) if preprocess else (A.double(), B.double())
        mask_a, mask_b = topk_mask(a, k), topk_mask(b, k)
        mutual = ((mask_a & mask_b).sum(dim=1).to(torch.float64) / k).mean().item()
        assert M.mutual_knn(A, B, topk=k, preprocess=preprocess) == mutual
        K, L, both = a @ a.T, b @ b.T, mask_a & mask_b
        kl, kk, ll = (
            dense_hsic_unbiased(*m) for m in ((K * both, L * both), (K * mask_a, K * mask_a), (L * mask_b, L * mask_b))
        )
        want = (kl / torch.sqrt(kk * ll)).item()
        assert M.cknna(A, B, topk=k, preprocess=preprocess) == pytest.approx(want, abs=1e-12)


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_metrics_never_build_an_n_by_n_matrix(monkeypatch):
    """Real probes hold 5k-50k items, whose n x n float64 matrix is 0.2-20 GB, and mutual kNN, CKA and CKNNA built
    5 to 10 of them. With small blocks no operation makes a tensor of n x n / 8 elements, and the values do not
    move with the block size."""
    n = 1200
    A, B = related_pair(n=n, da=16, db=12, seed=36)
    metrics = [*KNN, M.cka, M.unbiased_cka, M.cknna]
    want = [metric(A, B) for metric in metrics]
    monkeypatch.setattr(M, "_BLOCK_ELEMENTS", 2**17)
    for metric, value in zip(metrics, want):
        with LargestTensor() as largest:
            got = metric(A, B)
        assert largest.numel < n * n // 8, metric.__name__
        assert got == pytest.approx(value, rel=1e-12), metric.__name__


def test_a_score_ignores_zero_padding_past_lengths():
    """Ragged queries zero-padded at the end (pad_sequence's default) were refused as all-zero rows."""
    g = torch.Generator().manual_seed(29)
    lengths = [6, 4, 2]
    text = torch.randn(3, 6, 8, generator=g)
    for i, length in enumerate(lengths):
        text[i, length:] = 0
    visual = torch.randn(3, 5, 8, generator=g)
    one_by_one = [M.a_score(text[i : i + 1, :length], visual[i : i + 1]) for i, length in enumerate(lengths)]
    assert M.a_score(text, visual, lengths) == pytest.approx(sum(one_by_one) / 3, abs=1e-12)
    text[1, 3] = 0  # a real token with no direction is still refused
    with pytest.raises(ValueError, match="visual_tokens has 1 all-zero rows among its real rows"):
        M.a_score(text, visual, lengths)


def test_sparse_features_are_normalised_not_erased():
    """Post-ReLU features with over 95 % exact zeros have a 0.95-quantile clamp threshold of 0, which erased every
    row ("features has 64 all-zero rows"); they are only normalised."""
    g = torch.Generator().manual_seed(30)
    A = torch.relu(torch.randn(64, 256, generator=g) - 1.9)
    assert (A == 0).double().mean() > 0.95 and not (A == 0).all(dim=1).any()
    assert torch.equal(M.prepare_features(A), torch.nn.functional.normalize(A.double(), dim=-1))
    assert 0 < M.mutual_knn(A, A + 0.01 * torch.rand(64, 256, generator=g)) <= 1


def test_sign_test_is_exact_for_small_counts():
    from fractions import Fraction

    from alignlm.evaluation.paired import sign_test

    for n in range(41):
        for wins in range(n + 1):
            tail = sum(math.comb(n, i) for i in range(min(wins, n - wins) + 1))
            want = float(min(Fraction(1), Fraction(2 * tail, 2**n)))
            assert sign_test(wins, n - wins) == pytest.approx(want, rel=1e-14, abs=0)


@pytest.mark.timeout(30)
def test_sign_test_is_fast_for_many_discordant_questions():
    """A math.comb per term took 36 s for 20,000 discordant questions; the normal approximation is close this far out."""
    from alignlm.evaluation.paired import sign_test

    n = 200_000
    for wins in (n // 2 - 300, n // 2 - 1000):
        z = (n - 2 * wins - 1) / math.sqrt(n)  # continuity-corrected
        assert sign_test(wins, n - wins) == pytest.approx(math.erfc(z / math.sqrt(2)), rel=2e-2)
    assert sign_test(n // 2, n // 2) == 1.0 and sign_test(0, n) == 0.0


# ------------------------------------------------------------------------ probes and monitor, on the device


def _probe_reference(model, probe) -> dict[str, float]:
    """The probe's A-score and pooled features the old way: every item's tokens held whole (captions padded to the
    longest by their own last token), measured at once in float64."""
    from alignlm.data.templates import plain_text_ids

    tok, embed = model.tokenizer, model.llm.get_input_embeddings()
    ids = [i or [tok.eos_token_id] for i in plain_text_ids(probe.captions, tok)]
    lengths = torch.tensor([len(i) for i in ids])
    longest = int(lengths.max())
    with torch.no_grad():
        visual = model.connector(model.vision(probe.pixels(model.image_spec)[:])).tokens
        words = embed(torch.tensor([i + [i[-1]] * (longest - len(i)) for i in ids]))
    return {
        "visual_mean": visual.float().mean(dim=1),
        "a_score_visual_to_text": M.a_score(visual, words),
        "a_score_text_to_visual": M.a_score(words, visual, lengths),
    }


def test_the_probe_measures_the_a_score_batch_by_batch_as_over_the_whole_set(tiny_model, colour_set):
    """``extract`` copied every item's tokens to the host (5 MiB an item for a bfloat16 7B model) for an A-score
    taken on the CPU; it measures each item's A-score on the model's device batch by batch now, keeps no token, and
    gives the figures of the whole set's tokens, whatever the batch size."""
    from alignlm.models.probes import extract, load_probe_set, probe_metrics

    model, probe = tiny_model(), load_probe_set(colour_set["pretrain"], 12)
    model.eval()
    reference = _probe_reference(model, probe)
    for batch_size in (5, 12):
        feats = extract(model, probe, batch_size=batch_size, tokens=True)
        assert not hasattr(feats, "visual_tokens") and not hasattr(feats, "text_tokens")
        assert all(s.shape == (12,) and s.dtype == torch.float64 for s in feats.a_scores)
        values = probe_metrics(feats, ["a_score"], topk=4, encoder=False)["per_token"]
        for key, value in values.items():
            assert value == pytest.approx(reference[key], rel=0, abs=1e-10), key
        torch.testing.assert_close(feats.visual_mean, reference["visual_mean"])
    with pytest.raises(ValueError, match="a_score reads every item's tokens"):
        probe_metrics(extract(model, probe, batch_size=5), ["a_score"], topk=4)


def test_the_monitor_reports_the_whole_sets_figures(tiny_model, colour_set):
    """The monitor measures through the same ``extract``, so its A-score and pooled metrics are the whole set's
    figures, measured the old way."""
    from alignlm.geometry.suite import pair_metrics
    from alignlm.models.probes import extract, load_probe_set
    from alignlm.training.monitor import AlignmentMonitor

    model = tiny_model()
    metrics = ["modality_gap", "cka", "mutual_knn", "a_score"]
    cfg = {"every": 1, "probe": str(colour_set["pretrain"]), "n": 12, "topk": 4, "batch_size": 5, "metrics": metrics}
    monitor = AlignmentMonitor(cfg, model)
    values = monitor(1, model)
    model.eval()
    probe = load_probe_set(colour_set["pretrain"], 12)
    reference = _probe_reference(model, probe)
    text_mean = extract(model, probe, batch_size=12).text_mean
    pooled = pair_metrics(reference["visual_mean"], text_mean, metrics, 4)
    for key in ("a_score_visual_to_text", "a_score_text_to_visual"):
        assert values[f"monitor/per_token/{key}"] == pytest.approx(reference[key], rel=0, abs=1e-10)
    for key, value in pooled.items():
        assert values[f"monitor/pooled/{key}"] == pytest.approx(value, rel=0, abs=1e-10), key


def test_the_probe_images_are_decoded_a_batch_at_a_time(tiny_model, colour_set, monkeypatch):
    """``ProbeSet.pixels`` decoded every probe image into one float32 tensor before the first batch ran, and kept
    it (13.5 GB at 10k items of 336 px; the monitor held it for the whole run on every rank). The images are decoded
    as the batches are read now: when the tower sees a batch, no more than it has been decoded, and nothing is kept."""
    from alignlm.data import images
    from alignlm.models.probes import extract
    from alignlm.training.monitor import AlignmentMonitor

    model, decoded, seen = tiny_model(), [], []
    real_preprocess, real_vision = images.preprocess, model.vision.forward
    monkeypatch.setattr(images, "preprocess", lambda *a, **k: decoded.append(1) or real_preprocess(*a, **k))

    def vision(pixels, *a, **k):
        seen.append((len(pixels), len(decoded)))
        return real_vision(pixels, *a, **k)

    monkeypatch.setattr(model.vision, "forward", vision)
    cfg = {"every": 1, "probe": str(colour_set["pretrain"]), "n": 12, "topk": 4, "batch_size": 5}
    monitor = AlignmentMonitor(cfg, model)
    assert not decoded  # nothing decoded ahead of the measurements
    for _ in range(2):
        decoded.clear(), seen.clear()
        assert monitor(1, model)
        assert [b for b, _ in seen] == [5, 5, 2]
        assert [d for _, d in seen] == [5, 10, 12]  # each batch decoded as it was read, none held before
    assert not [v for v in vars(monitor.probe).values() if isinstance(v, dict) and v]  # no pixel cache
    probe = monitor.probe
    decoded.clear(), seen.clear()
    extract(model, probe, batch_size=4)
    assert seen == [(4, 4), (4, 8), (4, 12)]


@pytest.mark.parametrize("n, d", [(40, 16), (6, 32)])  # more rows than dims, and fewer
def test_the_pca_plot_projects_as_the_whole_svd_without_one(n, d, monkeypatch):
    """The PCA plot took a whole float64 SVD of ``[2n, d]`` to keep two directions; the smaller Gram matrix's top
    eigenvectors give the same coordinates (to the sign the plot fixes)."""
    from alignlm.evaluation.plots import pca_2d

    image, text = related_pair(n, d, d, seed=3)
    x = torch.cat([torch.nn.functional.normalize(t.double(), dim=1) for t in (image, text)])
    x = x - x.mean(0)
    expected = x @ torch.linalg.svd(x, full_matrices=False).Vh[:2].T
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: pytest.fail("a whole SVD"))
    got = torch.cat(pca_2d(image, text))
    for j in range(2):
        sign = torch.sign((got[:, j] * expected[:, j]).sum())
        assert (got[:, j] - sign * expected[:, j]).abs().max() <= 1e-6 * expected[:, j].abs().max()


@pytest.mark.parametrize("sigma", [-1.0, 0.0, float("inf"), float("nan")])
def test_an_rbf_bandwidth_that_is_not_a_finite_positive_number_is_refused_naming_it(sigma):
    """sigma=-1 had given the same CKA as sigma=1, inf a silent nan, and nan a message saying it was 0."""
    x = torch.randn(12, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"sigma must be a finite number > 0, got {sigma}"):
        M.cka(x, x, kernel="rbf", sigma=sigma)


def test_per_layer_caption_means_ignore_the_padding_of_a_batch(tiny_model, colour_set, tmp_path):
    """``extract(layers=...)``: each caption's per-layer mean is over its own tokens: batched with longer captions
    (padded), it is the same as alone."""
    import json

    import torch

    from alignlm.models.probes import extract, load_probe_set

    root = colour_set["pretrain"].parent
    captions = ["red", "A green square on a white page, seen from above.", "blue square", "A red one."]
    records = [
        {
            "id": f"c{i}",
            "image": f"images/{i}.png",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": c}],
        }
        for i, c in enumerate(captions)
    ]
    path = root / "probe_lengths.json"
    path.write_text(json.dumps(records))
    model, probe = tiny_model(), load_probe_set(path, 4)
    batched = extract(model, probe, batch_size=4, layers=[1, 2])
    alone = extract(model, probe, batch_size=1, layers=[1, 2])
    for i in (1, 2):
        torch.testing.assert_close(batched.layers[i][1], alone.layers[i][1], rtol=1e-4, atol=1e-5)
