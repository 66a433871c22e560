"""Entropic optimal transport of a batch onto a large set of prototypes (VLAP's assignments, docs/methods.md, VLAP).

``sinkhorn(scores, log_marginals)`` returns the transport plan ``Q`` ``[B, K]`` of
``max <Q, scores> + epsilon * H(Q)`` with every row summing to 1 and the column sums ``Q.sum(0) / B``
driven toward a prior ``mu`` (exactly reached only in the limit of many iterations; each iteration ends with
the row step, so the rows are exact after any number of them).

It is a log-domain Sinkhorn: the state is the pair of dual potentials ``f`` (rows) and ``g`` (columns), and
``Q = exp(scores / epsilon + f + g)`` is only ever exponentiated after a log-domain shift that keeps every
exponent <= 0, so ``epsilon = 0.01`` with cosine scores (exponents of +-100) or with arbitrary logits stays
finite. It is also fast for K = 150k. A textbook log-domain implementation spends two ``logsumexp`` passes
(max, subtract, exp, sum) per iteration over the ``[B, K]`` matrix. Here the only exponential is taken once:

- ``A = exp(scores / epsilon - column max)`` (every entry in [0, 1], every column holds a 1);
- with ``v = exp(f - max f)``, the column sums of ``exp(scores / epsilon + f)`` are ``v @ A`` and, after the
  column step, the row sums are ``v * (A @ w)`` with ``w = B * mu / (v @ A)``: two matrix-vector products per
  iteration, the potentials updated in log space;
- the plan returned is ``A * exp(f - max f) * w``, written into ``A``'s buffer;
- when the row potentials spread by more than ``ABSORB_SPREAD`` (a row far from every word, typically once, after
  the first iteration), they are absorbed into ``A``, which is recomputed around them: one more exponential.

An entry of ``A`` that underflowed stands for a mass below float ``tiny``. That only matters for a column (or a
row) whose total mass is itself near ``tiny / eps`` (row potentials spread by more than ~80, i.e. extreme
logits); such columns and rows, and only those, are recomputed exactly with ``logsumexp`` on their own slice,
so the result equals the textbook log-domain iteration to float precision (``tests/test_vlap.py`` compares).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Row potentials (relative to A) may spread this far before A is recomputed around them: with a spread
# below 50 every column keeps a mass >= exp(-50), far above the underflow fallbacks' thresholds.
ABSORB_SPREAD = 50.0


@torch.no_grad()
def sinkhorn(scores: Tensor, log_marginals: Tensor | None = None, epsilon: float = 0.01, iterations: int = 3) -> Tensor:
    """Balanced soft assignments ``Q`` ``[B, K]`` of B samples to K prototypes (rows sum to 1, columns toward ``mu``).

    ``log_marginals`` is ``log(mu)`` ``[K]`` (a distribution over the prototypes; uniform when None). The
    computation runs without gradient in float32, or float64 when ``scores`` is float64.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn expects scores [B, K], got shape {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(
            f"sinkhorn needs epsilon > 0 and iterations >= 1, got epsilon={epsilon}, iterations={iterations}"
        )
    dtype = torch.promote_types(scores.dtype, torch.float32)
    scores = scores.to(dtype)
    b, k = scores.shape
    if log_marginals is None:
        log_mu = torch.full((k,), -math.log(k), dtype=dtype, device=scores.device)
    else:
        log_mu = log_marginals.to(device=scores.device, dtype=dtype)
        if log_mu.shape != (k,):
            raise ValueError(f"log_marginals has shape {tuple(log_mu.shape)}, expected ({k},) to match scores")
    log_col_target = log_mu + math.log(b)  # rows sum to 1, so the plan's total mass is B
    info = torch.finfo(dtype)
    plan = torch.empty_like(scores)
    frame = torch.zeros(b, dtype=dtype, device=scores.device)  # row potentials absorbed into A
    col_max = absorb(scores, None, epsilon, plan)

    def log_kernel(rows: Tensor | slice, cols: Tensor | slice) -> Tensor:
        """The log of A (before underflow) on a slice, recomputed for the exact fallbacks."""
        return (scores[rows][:, cols] / epsilon + frame[rows].unsqueeze(1)) - col_max[cols]

    f = torch.zeros(b, dtype=dtype, device=scores.device)  # row potentials on top of A: Q = exp(log A + f + g)
    for _ in range(iterations):
        # each host read below is a wait on a GPU: every flag is read once per iteration, and branches reuse it
        if f.max() - f.min() > ABSORB_SPREAD:  # rows so far apart that v below would underflow: re-centre A
            frame, f = frame + f, torch.zeros_like(f)
            col_max = absorb(scores, frame, epsilon, plan)
        shift = f.max()
        v = (f - shift).exp()
        col_sum = v @ plan
        # entries of A lost to underflow hold < tiny each: they matter only where a sum is near tiny / eps
        thin_cols = col_sum < info.tiny * v.sum() / info.eps
        any_thin_cols = bool(thin_cols.any())
        log_w = log_col_target - col_sum.log()  # g + shift on ordinary columns
        if any_thin_cols:
            thin_logits = log_kernel(slice(None), thin_cols) + f.unsqueeze(1)
            g_thin = log_col_target[thin_cols] - torch.logsumexp(thin_logits, 0)
            log_w[thin_cols] = -math.inf  # their mass is added exactly below, not through A
        w = log_w.exp()
        a_w = plan @ w
        log_row = (f - shift) + a_w.log()
        if any_thin_cols:
            log_row = torch.logaddexp(log_row, torch.logsumexp(thin_logits + g_thin, 1))
        thin_rows = a_w < info.tiny * w.sum() / info.eps
        any_thin_rows = bool(thin_rows.any())
        if any_thin_rows:
            g = log_w - shift
            if any_thin_cols:
                g[thin_cols] = g_thin
            row_logits = log_kernel(thin_rows, slice(None)) + f[thin_rows].unsqueeze(1) + g
            log_row[thin_rows] = torch.logsumexp(row_logits, 1)
        row_scale = (f - shift) - log_row  # log of exp(f_new - shift), from this iteration's local terms
        f = f - log_row
    # Q = A * exp(f_new - shift) * w. The row scale comes from local terms (potentials themselves can be ~1e6
    # with extreme logits, where a float32 difference of two of them keeps no digits) and is applied first:
    # A * w alone could underflow.
    plan.mul_(row_scale.exp().unsqueeze(1)).mul_(w)
    if any_thin_cols:
        plan[:, thin_cols] = (thin_logits - log_row.unsqueeze(1) + g_thin).exp()
    if any_thin_rows:
        plan[thin_rows] = torch.softmax(row_logits, dim=1)  # normalised as a whole: exact row sums at any scale
    return plan


def absorb(scores: Tensor, frame: Tensor | None, epsilon: float, out: Tensor) -> Tensor:
    """Write ``A = exp(scores / epsilon + frame - column max)`` into ``out`` (``frame`` None: zero); returns the
    column maxima."""
    if frame is not None:
        torch.add(frame.unsqueeze(1), scores, alpha=1.0 / epsilon, out=out)
        col_max = out.amax(0)
        out.sub_(col_max)
    else:  # the first call: one pass fewer
        col_max = scores.amax(0) / epsilon
        torch.add(-col_max, scores, alpha=1.0 / epsilon, out=out)
    out.exp_()
    return col_max
