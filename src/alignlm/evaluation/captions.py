"""Captioning scores: corpus BLEU-4 (Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015).

Both follow the COCO caption evaluation conventions (lower-cased words without punctuation, in any script; BLEU's
brevity penalty against the closest reference length; CIDEr-D's document frequencies over the references of the
scored set, clipped tf-idf, a Gaussian length penalty with sigma 6, times 10), in plain Python with no Java tokenizer.
CIDEr needs a corpus: with a single image every n-gram has zero idf and the score is 0 by definition.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Sequence

MAX_N = 4


def tokenize(text: str) -> list[str]:
    """Lower-cased words of letters, digits and combining marks, in any script (Unicode categories L, N, M, after
    NFC): punctuation never decides a caption score. ASCII text splits as ``[a-z0-9]+`` did; that pattern split
    "élégant" into "l", "gant" and gave a Russian caption no word at all. A script written without spaces (Chinese,
    Japanese, Thai) is one word per run of text: segment such captions first, as COCO's tokenizer does not either."""
    text = unicodedata.normalize("NFC", text.lower())
    return "".join(c if unicodedata.category(c)[0] in "LNM" else " " for c in text).split()


def ngrams(words: Sequence[str], n: int) -> Counter:
    """Counts of the n-grams of one sentence."""
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = MAX_N) -> float:
    """Corpus BLEU-``max_n``: clipped n-gram precisions pooled over the corpus, geometric mean, brevity penalty, in
    pycocoevalcap's arithmetic (its smoothing of each precision and of the length ratio)."""
    _check(hypotheses, references)
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        h, rs = tokenize(hyp), [tokenize(r) for r in refs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]  # closest length, the shorter on a tie
        for n in range(1, max_n + 1):
            counts = ngrams(h, n)
            best: Counter = Counter()
            for r in rs:
                best |= ngrams(r, n)
            matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    # pycocoevalcap's arithmetic, its smoothing included: an order without a match scores its floor (1e-15 / 1e-9 of
    # a precision), not 0 (short captions of a pretrained checkpoint had scored 0 where COCO's scorer gives 0.03)
    product = math.prod((m + _TINY) / (t + _SMALL) for m, t in zip(matches, totals))
    ratio = (hyp_len + _TINY) / (ref_len + _SMALL)
    return product ** (1.0 / max_n) * (math.exp(1.0 - 1.0 / ratio) if ratio < 1 else 1.0)


_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's bleu_scorer smoothing


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: mean over images of the tf-idf n-gram similarity to each reference, n = 1..4, x10."""
    _check(hypotheses, references)
    refs = [[tokenize(r) for r in rs] for rs in references]
    hyps = [tokenize(h) for h in hypotheses]
    doc_freq: Counter = Counter()
    for rs in refs:
        doc_freq.update({g for r in rs for n in range(1, MAX_N + 1) for g in ngrams(r, n)})
    log_docs = math.log(len(refs))

    def vectors(words: list[str]) -> list[tuple[dict, float]]:
        out = []
        for n in range(1, MAX_N + 1):
            vec = {g: c * (log_docs - math.log(max(1.0, doc_freq[g]))) for g, c in ngrams(words, n).items()}
            out.append((vec, math.sqrt(sum(v * v for v in vec.values()))))
        return out

    scores = []
    for h, rs in zip(hyps, refs):
        hv = vectors(h)
        total = 0.0
        for r in rs:
            penalty = math.exp(-((len(h) - len(r)) ** 2) / (2 * sigma**2))
            for (hvec, hnorm), (rvec, rnorm) in zip(hv, vectors(r)):
                if hnorm and rnorm:
                    dot = sum(min(v, rvec[g]) * rvec[g] for g, v in hvec.items() if g in rvec)
                    total += penalty * dot / (hnorm * rnorm)
        scores.append(10.0 * total / (MAX_N * len(rs)))
    return sum(scores) / len(scores)


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(
            f"need one reference list per hypothesis: got {len(hypotheses)} hypotheses, {len(references)} reference lists"
        )
    empty = [i for i, rs in enumerate(references) if not rs]
    if empty:
        raise ValueError(f"item {empty[0]} has no reference caption")
