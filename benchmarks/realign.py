"""Benchmark: ``alignlm realign fit`` + ``apply`` against the reference ReAlign script, same data, same machine.

The reference is ``embed_ReAlign.py`` of the public repository Yu-xm/ReVision. Its code is not copied here;
``peer`` below is written for this benchmark to reproduce its algorithm and costs faithfully:

- input: a folder of pickle files per modality, each a list of dicts whose ``"embed"`` entry is one
  embedding vector (the layout its ``embed.py`` writes; here float32, ``records`` per file);
- four passes over the text files and two over the image files, each pass unpickling every file again,
  stacking its vectors with ``np.vstack`` and widening to float64, then working in ``chunk_size`` row chunks
  (default 10,000, the reference's default);
- its overflow-safe row normalisation (NaN/Inf zeroed, rows scaled by their max magnitude before the norm,
  norms below 1e-10 replaced by 1), applied at every pass;
- pass 1: means of the unit rows, stored as float32 and widened back (as the reference does);
  pass 2: ``sum((x - mu)^2)`` per set with a finiteness check of the centred chunk (its ``strict_finite=1``),
  ``scale = sqrt(T_img / (T_txt + 1e-10))``; pass 3: ``mu_hat`` = mean of ``norm((y - mu_t) * scale + mu_i)``
  with a finiteness check; pass 4: ``norm(y_hat - mu_hat + mu_i)`` with a finiteness check, cast to float32,
  written back into copies of the records and pickled one output file per input file, then the statistics
  pickle. Progress bars and logging are left out (negligible next to the work).

``ours`` runs the two CLI commands a user runs, as subprocesses, on the same embeddings written as ``.npy``
shards (alignlm never unpickles). Each side's inputs are read once before its timed run, so both start
from a warm page cache. The script prints both times, the speed-up, and the largest absolute difference
between the two sets of aligned embeddings (and of the statistics).

    python benchmarks/realign.py                      # 1,000,000 x 768 per set: ~18 GB of temp files
    python benchmarks/realign.py --n 100000 --keep    # quicker look; --workdir picks the temp location
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from alignlm.methods.revision.realign import ReAlignStats

# ------------------------------------------------------------------------------------------------ peer


def _peer_unit(x: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """The reference's overflow-safe row normalisation (float64)."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    scale = np.max(np.abs(x), axis=1, keepdims=True)
    scale = np.where(scale > 0.0, scale, 1.0)
    norm = scale * np.linalg.norm(x / scale, axis=1, keepdims=True)
    norm = np.nan_to_num(norm, nan=0.0, posinf=0.0, neginf=0.0)
    return x / np.where(norm < eps, 1.0, norm)


def _peer_load(path: Path) -> tuple[list[dict], np.ndarray]:
    with open(path, "rb") as f:
        items = pickle.load(f)
    items = [it for it in items if it.get("embed") is not None]
    return items, np.vstack([np.asarray(it["embed"]) for it in items]).astype(np.float64)


def _peer_check(name: str, arr: np.ndarray) -> None:
    if not np.isfinite(arr).all():
        raise SystemExit(f"peer: {name} is not finite")


def peer(text_dir: Path, image_dir: Path, out_dir: Path, chunk: int = 10_000) -> None:
    """The reference algorithm, pass for pass (see the module docstring)."""
    texts, images = sorted(text_dir.glob("*.pkl")), sorted(image_dir.glob("*.pkl"))

    def mean(files: list[Path]) -> np.ndarray:
        total, count = None, 0
        for path in files:
            _, full = _peer_load(path)
            total = np.zeros(full.shape[1]) if total is None else total
            for i in range(0, len(full), chunk):
                part = _peer_unit(full[i : i + chunk])
                total += part.sum(axis=0)
                count += part.shape[0]
        return (total / count).astype(np.float32)

    mu_t32, mu_i32 = mean(texts), mean(images)
    mu_t, mu_i = mu_t32.astype(np.float64), mu_i32.astype(np.float64)

    def trace(files: list[Path], mu: np.ndarray) -> float:
        total, count = 0.0, 0
        for path in files:
            _, full = _peer_load(path)
            for i in range(0, len(full), chunk):
                centred = _peer_unit(full[i : i + chunk]) - mu
                _peer_check("centred", centred)
                total += np.sum(centred**2)
                count += centred.shape[0]
        return total / count

    t_txt, t_img = trace(texts, mu_t), trace(images, mu_i)
    scale = np.sqrt(t_img / (t_txt + 1e-10))

    def anchor_trace(rows: np.ndarray) -> np.ndarray:
        return _peer_unit((_peer_unit(rows) - mu_t) * scale + mu_i)

    total, count = np.zeros_like(mu_t), 0
    for path in texts:
        _, full = _peer_load(path)
        for i in range(0, len(full), chunk):
            hat = anchor_trace(full[i : i + chunk])
            _peer_check("y_hat", hat)
            total += hat.sum(axis=0)
            count += hat.shape[0]
    mu_hat = total / count

    (out_dir / "trace").mkdir(parents=True, exist_ok=True)
    for path in texts:
        items, full = _peer_load(path)
        parts = []
        for i in range(0, len(full), chunk):
            final = _peer_unit(anchor_trace(full[i : i + chunk]) - mu_hat + mu_i)
            _peer_check("final", final)
            parts.append(final.astype(np.float32))
        merged = np.vstack(parts)
        result = []
        for j, item in enumerate(items):
            new = item.copy()
            new["embed"] = merged[j]
            result.append(new)
        with open(out_dir / "trace" / f"{path.stem}_trace{path.suffix}", "wb") as f:
            pickle.dump(result, f)
    stats = {
        "mu_txt": mu_t32,
        "mu_img": mu_i32,
        "mu_hat": mu_hat.astype(np.float32),
        "scale": float(scale),
        "trace_txt": float(t_txt),
        "trace_img": float(t_img),
    }
    with open(out_dir / "trace_stats.pkl", "wb") as f:
        pickle.dump(stats, f)


# ------------------------------------------------------------------------------------------------ data


def build(root: Path, n: int, dim: int, records: int, seed: int) -> None:
    """Two unpaired cones (image, text) of float32 embeddings, as pickles for the peer and .npy for alignlm."""
    rng = np.random.default_rng(seed)
    centres = {m: rng.standard_normal(dim) for m in ("image", "text")}
    spread = {"image": 0.035, "text": 0.05}
    for modality, key in (("image", "image_path"), ("text", "caption")):
        c = centres[modality] / np.linalg.norm(centres[modality])
        for k, start in enumerate(range(0, n, records)):
            rows = min(records, n - start)
            x = (c + spread[modality] * rng.standard_normal((rows, dim))) * rng.uniform(0.5, 3.0, (rows, 1))
            x = x.astype(np.float32)
            (root / "pkl" / modality).mkdir(parents=True, exist_ok=True)
            (root / "npy" / modality).mkdir(parents=True, exist_ok=True)
            np.save(root / "npy" / modality / f"{modality}_{k:05d}.npy", x)
            items = [{"id": f"{modality}{start + j}", key: f"{start + j}", "embed": x[j]} for j in range(rows)]
            with open(root / "pkl" / modality / f"{modality}_{k:05d}.pkl", "wb") as f:
                pickle.dump(items, f, protocol=pickle.HIGHEST_PROTOCOL)


def warm(folder: Path) -> None:
    """Read every file once, so the timed run starts from the page cache."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def compare(root: Path) -> dict[str, float]:
    """Largest absolute differences between the peer's and alignlm's outputs and statistics."""
    worst = 0.0
    for ours in sorted((root / "ours" / "aligned").glob("*.npy")):
        with open(root / "peer" / "trace" / f"{ours.stem}_trace.pkl", "rb") as f:
            theirs = np.vstack([it["embed"] for it in pickle.load(f)])
        worst = max(worst, float(np.abs(np.load(ours).astype(np.float64) - theirs).max()))
    with open(root / "peer" / "trace_stats.pkl", "rb") as f:
        ref = pickle.load(f)
    stats = ReAlignStats.load(root / "ours" / "stats.safetensors")
    diff = lambda a, b: float(np.abs(np.asarray(a, dtype=np.float64) - b.numpy()).max())  # noqa: E731
    return {
        "aligned_embeddings": worst,
        "mu_x": diff(ref["mu_img"], stats.mu_x),
        "mu_y": diff(ref["mu_txt"], stats.mu_y),
        "mu1": diff(ref["mu_hat"], stats.mu1),
        "s": abs(ref["scale"] - stats.s),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="embeddings per set")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--records", type=int, default=10_000, help="embeddings per file (shard)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="parent of the temporary folder (default: the system's)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--peer-run", nargs=3, metavar=("TEXT", "IMAGE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer_run:
        peer(*map(Path, args.peer_run))
        return 0
    root = Path(tempfile.mkdtemp(prefix="bench_realign_", dir=args.workdir))
    try:
        print(f"building {args.n:,} x {args.dim} float32 image and text embeddings in {root} ...", flush=True)
        build(root, args.n, args.dim, args.records, args.seed)
        warm(root / "pkl")
        t_peer = timed(
            [
                sys.executable,
                __file__,
                "--peer-run",
                str(root / "pkl" / "text"),
                str(root / "pkl" / "image"),
                str(root / "peer"),
            ]
        )
        print(f"reference (peer) fit + apply: {t_peer:8.1f} s", flush=True)
        warm(root / "npy")
        cli = [sys.executable, "-m", "alignlm.commands", "realign"]
        stats = str(root / "ours" / "stats.safetensors")
        t_fit = timed(
            [
                *cli,
                "fit",
                "--images",
                str(root / "npy" / "image"),
                "--texts",
                str(root / "npy" / "text"),
                "--out",
                stats,
            ]
        )
        t_apply = timed(
            [
                *cli,
                "apply",
                "--stats",
                stats,
                "--texts",
                str(root / "npy" / "text"),
                "--out",
                str(root / "ours" / "aligned"),
            ]
        )
        t_ours = t_fit + t_apply
        print(f"alignlm realign fit + apply:  {t_ours:8.1f} s  (fit {t_fit:.1f} s, apply {t_apply:.1f} s)")
        print(f"speed-up: {t_peer / t_ours:.1f}x")
        diffs = compare(root)
        print("max |difference|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
        print(
            json.dumps(
                {
                    "n": args.n,
                    "dim": args.dim,
                    "peer_s": round(t_peer, 2),
                    "ours_s": round(t_ours, 2),
                    "fit_s": round(t_fit, 2),
                    "apply_s": round(t_apply, 2),
                    "speedup": round(t_peer / t_ours, 2),
                    "max_abs_diff": diffs["aligned_embeddings"],
                    "agree_1e-5": diffs["aligned_embeddings"] <= 1e-5,
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
