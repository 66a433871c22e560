"""Time VLAP's Sinkhorn (``alignlm.geometry.sinkhorn``) against two naive peers on the same inputs, in one run.

    python benchmarks/sinkhorn.py                 # V=150,000 prototypes, B=256 samples, 3 iterations
    python benchmarks/sinkhorn.py --vocab 49152 --batch 64 --repeats 7

Inputs: cosine similarities between unit vectors (``--dim``; half the batch lies close to some word, as after
training, so ``S / epsilon`` reaches ~90) and a word prior ``mu`` shaped like a real one
(softmax(log(count + 1) / 0.25) over Zipf-like counts). Peers:
- ``textbook log-domain``: alternate ``logsumexp`` column and row normalisations of the [B, V] log-plan;
- ``exp-domain (SwAV-style)``: scale ``exp(S / epsilon)`` by row and column sums, as many reference codes do.
For each it prints the median and best time, whether the plan is finite, the largest row-sum error, the
column-marginal error ``sum |Q.sum(0)/B - mu|`` and the largest difference from a float64 textbook plan.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from alignlm.geometry.sinkhorn import sinkhorn


def textbook_log_domain(scores: torch.Tensor, log_mu: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Two full logsumexp passes per iteration (the straightforward log-domain implementation)."""
    log_q = scores / epsilon
    log_cols = log_mu + math.log(scores.shape[0])
    for _ in range(iterations):
        log_q = log_q - (torch.logsumexp(log_q, 0, keepdim=True) - log_cols)
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True)
    return log_q.exp()


def exp_domain(scores: torch.Tensor, log_mu: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The plain scaling iteration on exp(S / epsilon): overflows in float32 once S / epsilon exceeds ~88."""
    q = torch.exp(scores / epsilon)
    mu = log_mu.exp() * scores.shape[0]
    for _ in range(iterations):
        q = q / q.sum(0, keepdim=True) * mu
        q = q / q.sum(1, keepdim=True)
    return q


def timed(fn, repeats: int) -> tuple[list[float], torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=150_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--epsilon", type=float, default=0.01)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    words = F.normalize(torch.randn(args.vocab, args.dim, generator=g), dim=-1)
    z = torch.randn(args.batch, args.dim, generator=g)
    half = args.batch // 2  # half the batch already close to some word (cosine ~0.9), as after training
    z[:half] = words[torch.randint(args.vocab, (half,), generator=g)] * 2.0 + z[:half] / math.sqrt(args.dim)
    z = F.normalize(z, dim=-1)
    scores = (z @ words.T).contiguous()
    counts = (1e6 / torch.arange(1, args.vocab + 1).double()).floor()[torch.randperm(args.vocab, generator=g)]
    log_mu = torch.log_softmax(torch.log1p(counts) / 0.25, 0).float()
    reference = textbook_log_domain(scores.double(), log_mu.double(), args.epsilon, args.iterations)
    mu = log_mu.double().exp()

    print(
        f"Sinkhorn, B={args.batch} x V={args.vocab:,}, epsilon={args.epsilon}, {args.iterations} iterations, float32, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'implementation':28s} {'median s':>9s} {'best s':>8s} {'finite':>7s} {'row err':>9s} {'col err':>9s} {'vs f64':>9s}"
    )
    peers = [
        ("alignlm sinkhorn", lambda: sinkhorn(scores, log_mu, args.epsilon, args.iterations)),
        ("textbook log-domain", lambda: textbook_log_domain(scores, log_mu, args.epsilon, args.iterations)),
        ("exp-domain (SwAV-style)", lambda: exp_domain(scores, log_mu, args.epsilon, args.iterations)),
    ]
    results = {}
    for name, fn in peers:
        times, q = timed(fn, args.repeats)
        q64 = q.double()
        finite = bool(q.isfinite().all())
        row_err = (q64.sum(1) - 1).abs().max().item() if finite else float("nan")
        col_err = (q64.sum(0) / args.batch - mu).abs().sum().item() if finite else float("nan")
        diff = (q64 - reference).abs().max().item() if finite else float("nan")
        results[name] = statistics.median(times)
        print(
            f"{name:28s} {statistics.median(times):9.3f} {min(times):8.3f} {str(finite):>7s} {row_err:9.1e} {col_err:9.4f} {diff:9.1e}"
        )
    ours = results["alignlm sinkhorn"]
    print(
        f"speed-up over the textbook log-domain implementation: {results['textbook log-domain'] / ours:.1f}x; "
        f"target < 1 s: {'met' if ours < 1.0 else 'NOT met'} ({ours:.3f} s median)"
    )


if __name__ == "__main__":
    main()
