"""Entropic optimal transport of a batch onto a large set of prototypes (VLAP's assignments, docs/methods.md, VLAP).

``sinkhorn(scores, log_marginals)`` returns the transport plan ``Q`` ``[B, K]`` of
``max <Q, scores> + epsilon * H(Q)`` with every row summing to 1 and the column sums ``Q.sum(0) / B``
driven toward a prior ``mu`` (exactly reached only in the limit of many iterations; each iteration ends with
the row step, so the rows are exact after any number of them).

It is a log-domain Sinkhorn whose state is the row potential ``frame`` ``[B]``; ``epsilon = 0.01`` with cosine
scores (exponents of +-100) or with arbitrary logits stays finite. Each iteration:

- column step: ``L = scores / epsilon + frame - column max`` (every entry <= 0, every column holds a 0), and
  ``log w = log(B * mu) - log(exp(L).sum(0))``: each column sum is at least 1, so no entry lost to underflow
  can matter;
- row step: ``log_row = logsumexp(L + log w)`` along each row, exact however far a row lies from every column
  (a row dominated in every column underflows in ``exp(L)``, so a product with it would not do);
  ``frame -= log_row``.

The potentials, which reach ~1e6 with extreme logits, enter only through ``scores / epsilon + frame``; the column
maxima are taken off before the small terms (``log w``, ``log(B * mu)``) are added, so float32 keeps their digits
where a textbook iteration on ``log Q`` loses them (``tests/test_vlap.py`` compares with float64). There is no
branch on the data: every iteration re-centres and normalises exactly, so nothing is read back from the device
(the cost is two exponentials of ``[B, K]`` per iteration; a faster variant that re-centred only when needed and
took exact row sums only for underflowed rows waited for the GPU three times per iteration to decide). No
matrix product either, so autocast leaves it in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
    frame = torch.zeros(b, dtype=dtype, device=scores.device)
    log_plan = torch.empty_like(scores)
    for _ in range(iterations):
        torch.add(frame.unsqueeze(1), scores, alpha=1.0 / epsilon, out=log_plan)
        log_plan.sub_(log_plan.amax(0))  # L: each column's largest entry is 0
        log_plan.add_(log_col_target - log_plan.exp().sum(0).log())  # + log w: the column step
        log_row = log_plan.logsumexp(1)
        frame = frame - log_row
    return log_plan.sub_(log_row.unsqueeze(1)).exp_()  # the row step applied: Q = exp(L + log w - log_row)
