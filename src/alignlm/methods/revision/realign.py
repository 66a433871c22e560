"""ReAlign (docs/methods.md, ReAlign): move text embeddings into the image-embedding distribution, training-free.

With ``x`` the unit image embeddings and ``y`` the unit text embeddings of *unpaired* sets::

    s  = sqrt(T_x / (T_y + 1e-10))               T = mean ||v - mu||^2, mu = mean of unit vectors
    y1 = norm((y - mu_y) * s + mu_x)             Anchor + Trace
    mu1 = mean(y1) over the whole text set       its own pass
    y2 = norm(y1 - mu1 + mu_x)                   Centroid

An extension beyond the paper, off by default (``covariance``, a shrinkage ``lam >= 0``): Anchor + Covariance
replaces the single scale ``s`` by the matrix ``A = C_x^1/2 (C_y + lam T_y/D I)^-1/2`` (``C`` the covariances of
the unit embeddings), ``y1 = norm((y - mu_y) A^T + mu_x)``, so the text set takes the images' covariance, not
only their total variance. Why: text embeddings vary in directions images do not (a caption's wording, which no
image shows); the trace step keeps that variance, and a connector pretrained on it learns to read the wording,
which a real image embedding fills with noise. ``A`` shrinks text directions to the images' spread. With equal
isotropic covariances it is ``s I`` (the trace step); ``lam`` regularises a text covariance of low rank (few
distinct captions). Its statistics still stream: :class:`Moments` then also folds the co-moment matrix.

Statistics are float64 and streamed: every pass folds row chunks into a small mergeable record
(:class:`Moments`, :class:`CentroidSum`), so chunks and shards each fold their part and the merged record
equals one pass over everything. Fitting reads the images once and the texts
twice (moments, then ``mu1``); applying reads the texts once more. Inputs are float16/32 shards
(:mod:`alignlm.methods.revision.shards`); each chunk is widened to float64 in a reused buffer, so memory stays at
a few chunks whatever the set size.

The per-chunk kernels are memory-bound and short, so the passes run on ``threads`` intra-op threads
(default 1): OpenMP teams on short kernels gain little and stall badly when the cores are shared with
other jobs. It runs in one process: the pipeline's prepare step runs on the main process alone while the other ranks
wait, and a collective there would wait for ranks that never join it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from alignlm.config import Bounds
from alignlm.files import replace_file
from alignlm.methods.revision.shards import Shard, list_shards, shard_metadata, write_shard

EPS_TRACE = 1e-10  # the paper's s = sqrt(T_x / (T_y + 1e-10))
CHUNK_ROWS = 256  # rows widened to float64 at once: 256 x 768 x 8 B = 1.5 MiB, stays in cache across the ops
SHRINKAGE = Bounds(0)  # the Anchor + Covariance step's shrinkage of the text covariance (the flag, the knob)
THREADS = 1  # intra-op threads of the streaming passes (module doc: memory-bound, one process)
FORMAT = "alignlm.realign/1"


# ------------------------------------------------------------------------------------ mergeable records


@dataclass
class Moments:
    """Count, centroid and total squared deviation of unit vectors, mergeable without a second pass.

    ``m2`` is ``sum ||v - mean||^2`` about this record's own mean; :meth:`merge` is Chan et al.'s pairwise
    update, which stays accurate when the spread is small next to the centroid's length (where the
    shortcut ``mean ||v||^2 - ||mean||^2`` cancels).
    """

    count: int
    mean: Tensor
    m2: float
    comoment: Tensor | None = None  # sum (v - mean)(v - mean)^T, only when the full covariance is asked for

    @classmethod
    def empty(cls, dim: int, full: bool = False) -> Moments:
        zeros = torch.zeros(dim, dim, dtype=torch.float64) if full else None
        return cls(0, torch.zeros(dim, dtype=torch.float64), 0.0, zeros)

    @classmethod
    def of(cls, unit: Tensor, full: bool = False) -> Moments:
        """Moments of a float64 chunk of unit rows; the chunk is left centred (it is a scratch buffer)."""
        mean = unit.mean(dim=0)
        unit.sub_(mean)
        flat = unit.reshape(-1)
        return cls(unit.shape[0], mean, torch.dot(flat, flat).item(), unit.T @ unit if full else None)

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets together."""
        n = self.count + other.count
        if n == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        weight = self.count * other.count / n
        m2 = self.m2 + other.m2 + torch.dot(delta, delta).item() * weight
        comoment = None
        if self.comoment is not None and other.comoment is not None:
            comoment = self.comoment + other.comoment + torch.outer(delta, delta) * weight
        return Moments(n, mean, m2, comoment)

    @property
    def trace(self) -> float:
        """``T = mean ||v - mu||^2``: the total variance, the trace of the covariance."""
        return self.m2 / self.count

    @property
    def covariance(self) -> Tensor:
        """``C = mean (v - mu)(v - mu)^T`` (needs ``full=True`` records)."""
        if self.comoment is None:
            raise ValueError("these moments were folded without the co-moment matrix (full=False)")
        return self.comoment / self.count


@dataclass
class CentroidSum:
    """Sum and count of vectors: the streaming form of ``mu1``."""

    count: int
    total: Tensor

    @classmethod
    def empty(cls, dim: int) -> CentroidSum:
        return cls(0, torch.zeros(dim, dtype=torch.float64))

    @classmethod
    def of(cls, rows: Tensor) -> CentroidSum:
        return cls(rows.shape[0], rows.sum(dim=0))

    def merge(self, other: CentroidSum) -> CentroidSum:
        return CentroidSum(self.count + other.count, self.total + other.total)

    @property
    def mean(self) -> Tensor:
        return self.total / self.count


# ------------------------------------------------------------------------------------------- streaming


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` intra-op threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _unit_rows_(x: Tensor, where: str, first_row: int) -> Tensor:
    """Normalise float64 rows in place; a zero or non-finite row is an error naming its place."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    bad = ~torch.isfinite(norms) | (norms == 0)
    if bad.any():
        row = first_row + int(bad.nonzero()[0, 0])
        raise ValueError(f"{where}: row {row} is zero or not finite; ReAlign needs a direction for every embedding")
    return x.div_(norms)


def unit_chunks(shards: Sequence[Shard], rows: int = CHUNK_ROWS) -> Iterator[tuple[Shard, Tensor]]:
    """Unit float64 rows of every shard, a chunk at a time, in one reused buffer (consume before the next)."""
    if not shards:
        return
    buffer = torch.empty(rows, shards[0].dim, dtype=torch.float64)
    for shard in shards:
        start = 0
        for chunk in shard.chunks(rows):
            x = buffer[: len(chunk)]
            x.copy_(torch.from_numpy(chunk))
            yield shard, _unit_rows_(x, str(shard.path), start)
            start += len(chunk)


def moments(shards: Sequence[Shard], rows: int = CHUNK_ROWS, full: bool = False) -> Moments:
    """``mu`` and ``T`` (and with ``full`` the covariance) of a set of shards, one pass."""
    total = Moments.empty(shards[0].dim, full)
    for _, x in unit_chunks(shards, rows):
        total = total.merge(Moments.of(x, full))
    return total


def _sym_power(c: Tensor, power: float) -> Tensor:
    """``C^power`` of a symmetric positive semi-definite matrix, by eigendecomposition (negative noise clipped)."""
    eigval, eigvec = torch.linalg.eigh(c)
    return (eigvec * eigval.clamp_min(0).pow(power)) @ eigvec.T


def covariance_map(image: Moments, text: Moments, shrinkage: float) -> Tensor:
    """``A = C_x^1/2 (C_y + shrinkage * T_y/D * I)^-1/2``: the Anchor + Covariance matrix (see the module doc)."""
    SHRINKAGE.check("ReAlign covariance shrinkage", shrinkage, note=" (or null: the trace step)")
    c_y = text.covariance
    dim = c_y.shape[0]
    c_y = c_y + shrinkage * text.trace / dim * torch.eye(dim, dtype=torch.float64)
    eigval = torch.linalg.eigvalsh(c_y)
    if eigval[0] <= 1e-12 * eigval[-1]:
        rank = int((eigval > 1e-12 * eigval[-1]).sum())
        raise ValueError(
            f"the text covariance has rank {rank} < {dim} (few distinct captions): give a positive "
            f"covariance shrinkage (revision.covariance / --covariance), e.g. 1.0"
        )
    return _sym_power(image.covariance, 0.5) @ _sym_power(c_y, -0.5)


# ------------------------------------------------------------------------------------------ statistics


@dataclass
class ReAlignStats:
    """Everything ReAlign needs to map a text embedding, and where it came from."""

    mu_x: Tensor
    mu_y: Tensor
    mu1: Tensor
    s: float
    T_x: float
    T_y: float
    n_image: int
    n_text: int
    encoder: str = "unknown"
    extra: dict[str, Any] = field(default_factory=dict)
    A: Tensor | None = None  # Anchor + Covariance matrix; None: the paper's trace step
    covariance: float | None = None  # its shrinkage

    def anchor_(self, y: Tensor) -> Tensor:
        """``y1 = norm((y - mu_y) * s + mu_x)``, or ``(y - mu_y) A^T`` in place of ``* s``; float64 unit rows, in place."""
        y.sub_(self.mu_y)
        if self.A is None:
            y.mul_(self.s)
        else:
            y.copy_(y @ self.A.T)
        y.add_(self.mu_x)
        return _unit_rows_(y, "Anchor + Trace" if self.A is None else "Anchor + Covariance", 0)

    def apply_(self, y: Tensor) -> Tensor:
        """``y2``: the ReAligned rows of float64 unit text embeddings, in place."""
        self.anchor_(y).sub_(self.mu1).add_(self.mu_x)
        return _unit_rows_(y, "Centroid", 0)

    def __call__(self, embeddings: Tensor) -> Tensor:
        """ReAlign raw text embeddings of any dtype and device; float64 result on their device."""
        y = embeddings.to(torch.float64, copy=True)
        device = y.device
        stats = self.to(device)
        return stats.apply_(_unit_rows_(y, "text embeddings", 0))

    def to(self, device: torch.device | str) -> ReAlignStats:
        return ReAlignStats(
            self.mu_x.to(device),
            self.mu_y.to(device),
            self.mu1.to(device),
            self.s,
            self.T_x,
            self.T_y,
            self.n_image,
            self.n_text,
            self.encoder,
            self.extra,
            None if self.A is None else self.A.to(device),
            self.covariance,
        )

    def summary(self) -> dict[str, Any]:
        """The scalars, for logs and the file's JSON metadata."""
        return {
            "format": FORMAT,
            "encoder": self.encoder,
            "dim": int(self.mu_x.numel()),
            "n_image": self.n_image,
            "n_text": self.n_text,
            "s": self.s,
            "T_x": self.T_x,
            "T_y": self.T_y,
            "gap_before": (self.mu_y - self.mu_x).norm().item(),
            "covariance": self.covariance,
            **self.extra,
        }

    def save(self, path: str | Path) -> Path:
        """One safetensors file: float64 tensors, and the summary as JSON metadata under ``realign``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        scalar = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        tensors = {
            "mu_x": self.mu_x,
            "mu_y": self.mu_y,
            "mu1": self.mu1,
            "s": scalar(self.s),
            "T_x": scalar(self.T_x),
            "T_y": scalar(self.T_y),
        }
        if self.A is not None:
            tensors["A"] = self.A
        tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
        metadata = {"realign": json.dumps(self.summary())}
        return replace_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: str | Path) -> ReAlignStats:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("realign", "{}"))
            if meta.get("format") != FORMAT:
                raise ValueError(
                    f"{path}: not a ReAlign statistics file (format {meta.get('format')!r}, want {FORMAT!r})"
                )
            t = {k: f.get_tensor(k) for k in f.keys()}
        known = {"format", "encoder", "dim", "n_image", "n_text", "s", "T_x", "T_y", "gap_before", "covariance"}
        return cls(
            t["mu_x"],
            t["mu_y"],
            t["mu1"],
            t["s"].item(),
            t["T_x"].item(),
            t["T_y"].item(),
            meta["n_image"],
            meta["n_text"],
            meta.get("encoder", "unknown"),
            {k: v for k, v in meta.items() if k not in known},
            t.get("A"),
            meta.get("covariance"),
        )


def _encoder_of(images: Sequence[Shard], texts: Sequence[Shard], given: str | None) -> str:
    """The dual encoder both sets come from; mixing encoders is an error (their spaces are unrelated)."""
    names = {s.encoder for s in (*images, *texts) if s.encoder}
    if given:
        names.add(given)
    if len(names) > 1:
        raise ValueError(f"image and text shards come from different encoders {sorted(names)}; ReAlign needs one space")
    return names.pop() if names else "unknown"


def fit(
    image_sources: Any,
    text_sources: Any,
    *,
    encoder: str | None = None,
    rows: int = CHUNK_ROWS,
    threads: int = THREADS,
    covariance: float | None = None,
) -> ReAlignStats:
    """Fit ReAlign's statistics on unpaired image and text shard sets (folders or files).

    ``covariance``: ``None`` for the paper's trace step, or a shrinkage ``>= 0`` for Anchor + Covariance
    (module doc); the co-moment matrices then stream too (``D x D`` float64 per record).

    One process reads every shard, whether or not a process group is initialised (see the module doc).
    """
    images, texts = list_shards(image_sources), list_shards(text_sources)
    if images[0].dim != texts[0].dim:
        raise ValueError(f"image embeddings have dim {images[0].dim}, text embeddings {texts[0].dim}: not one space")
    name = _encoder_of(images, texts, encoder)
    full = covariance is not None
    with _threads(threads):
        image_m = moments(images, rows, full)
        text_m = moments(texts, rows, full)
    if image_m.count == 0 or text_m.count == 0:
        raise ValueError(f"empty set: {image_m.count} image and {text_m.count} text embeddings")
    s = (image_m.trace / (text_m.trace + EPS_TRACE)) ** 0.5
    a = covariance_map(image_m, text_m, float(covariance)) if full else None
    stats = ReAlignStats(
        image_m.mean,
        text_m.mean,
        torch.zeros_like(image_m.mean),
        s,
        image_m.trace,
        text_m.trace,
        image_m.count,
        text_m.count,
        name,
        A=a,
        covariance=covariance,
    )
    centroid = CentroidSum.empty(texts[0].dim)
    with _threads(threads):
        for _, y in unit_chunks(texts, rows):
            centroid = centroid.merge(CentroidSum.of(stats.anchor_(y)))
    stats.mu1 = centroid.mean
    return stats


def apply(
    stats: ReAlignStats,
    text_sources: Any,
    out_dir: str | Path,
    *,
    rows: int = CHUNK_ROWS,
    dtype: torch.dtype = torch.float32,
    threads: int = THREADS,
) -> list[Path]:
    """Write ReAligned text embeddings, one output shard per input shard (same name and format, ids kept)."""
    texts = list_shards(text_sources)
    if texts[0].dim != stats.mu_x.numel():
        raise ValueError(f"text embeddings have dim {texts[0].dim}, the statistics {stats.mu_x.numel()}")
    out_dir = Path(out_dir)
    written = []
    for shard in texts:
        out = torch.empty(shard.rows, shard.dim, dtype=dtype)
        start = 0
        with _threads(threads):
            for _, y in unit_chunks([shard], rows):
                out[start : start + len(y)] = stats.apply_(y)
                start += len(y)
        meta = None
        if shard.path.suffix == ".safetensors":
            meta = shard_metadata(shard.ids, stats.encoder, "text_realigned")
        written.append(write_shard(out_dir / shard.path.name, out, meta))
    return written
