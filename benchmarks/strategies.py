"""Sharded strategies against plain data parallelism on one device: train, stop, resume, compare losses and memory.

Each strategy runs the same finetune (connector + LLM in full, frozen tower; a model of ``--size``'s shape with random
weights, ``train_throughput.py``'s shapes) on the offline shapes questions, with alignlm's own ``train`` command in a
process of its own (every strategy needs its own process group):

- ``ddp``, the reference: ``--steps`` steps uninterrupted;
- each sharded strategy (``zero2``, ``zero3``, ``fsdp2``): one process that stops itself halfway
  (``stop_after_steps``, exit status 75, a step checkpoint written), then the same command again, which resumes
  from that checkpoint and finishes, writing ``final/``.

That halfway checkpoint is the only one written (no ``save_every``, ``keep_last=1``): each costs seconds at 1.1B.

Printed (and written under ``--out``): per strategy, its loss at the last step and the mean over the last 10 steps
against the reference's (relative difference), the peak device memory of each process, their wall times, and whether
the resumed process started from the halfway checkpoint. "Within bf16 noise" is judged by the caller; the tiny CPU
run (fp32) is the logic check (tests/test_benchmarks.py).

    python benchmarks/strategies.py --size tiny --steps 4 --batch 2 --strategies ddp fsdp2 --out /tmp/strat  # CPU
    python benchmarks/strategies.py --size 1.1b --steps 50 --batch 8 --out strategies_out                    # GPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from alignlm.data.shapes import generate
from train_throughput import SIZES, shape_overrides

SHARDED = ("zero2", "zero3", "fsdp2")
STOPPED = 75  # alignlm train's exit status when stop_after_steps ended the process (rerun to resume)


def overrides(
    size: str,
    vocab: int,
    batch: int,
    steps: int,
    precision: str,
    extra: list[str],
    data: Path,
    out: Path,
    strategy: str,
) -> list[str]:
    """The ``alignlm train`` arguments of one strategy's run (``extra``: the caller's Hydra overrides, last)."""
    return shape_overrides(size, vocab) + [
        f"output_dir={out}",
        f"run_name={strategy}",
        f"launcher={strategy}",
        "run=[finetune]",
        "stages.finetune.parts={vision: frozen, connector: full, llm: full}",
        "stages.finetune.init_from=null",
        f"stages.finetune.max_steps={steps}",
        f"stages.finetune.per_device_batch_size={batch}",
        # no periodic checkpoint (a 1.1B one with its optimizer state is 13-18 GB): ddp needs none, a sharded
        # strategy's stop writes the one it resumes from
        "stages.finetune.save_every=0",
        "stages.finetune.keep_last=1",
        f"stages.finetune.data.sources=[{{path:{data / 'shapes' / 'instruct.json'}}}]",
        "logging.every=1",
        f"mixed_precision={precision}",
        *extra,
    ]


def launch(args: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """One ``alignlm train`` process; its exit status ("timeout" when killed at ``timeout``), wall time and log."""
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            code: int | str = subprocess.run(
                [sys.executable, "-m", "alignlm.commands", "train", *args],
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return {"returncode": code, "seconds": time.perf_counter() - start, "log": str(log)}


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "finetune" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def peak_gib(rows: list[dict[str, Any]], first: int, last: int) -> float | None:
    """The highest peak device memory logged over steps ``first``..``last`` (one process's steps)."""
    peaks = [r["memory/peak_gib"] for r in rows if first <= r["step"] <= last and "memory/peak_gib" in r]
    return max(peaks) if peaks else None


def run_strategy(
    strategy: str, common: dict[str, Any], work: Path, logs: Path, timeout: float, keep: bool
) -> dict[str, Any]:
    """The reference runs straight through; a sharded strategy stops halfway and is resumed by the same command."""
    run_dir = work / strategy
    try:
        args = overrides(strategy=strategy, out=work, **common)
        return _run_strategy(strategy, args, run_dir, logs, common["steps"], timeout)
    finally:
        if not keep:  # a 1.1B run's checkpoints with optimizer state are tens of GiB; the figures are in the result
            shutil.rmtree(run_dir, ignore_errors=True)


def _run_strategy(
    strategy: str, args: list[str], run_dir: Path, logs: Path, steps: int, timeout: float
) -> dict[str, Any]:
    half = max(1, steps // 2) if strategy != "ddp" else 0
    procs = []
    if half:
        procs.append(launch([*args, f"stop_after_steps={half}"], logs / f"{strategy}_stop.txt", timeout))
        if procs[-1]["returncode"] != STOPPED:
            return {"strategy": strategy, "processes": procs, "ok": False}
    procs.append(launch(args, logs / f"{strategy}.txt", timeout))
    if procs[-1]["returncode"] != 0:
        return {"strategy": strategy, "processes": procs, "ok": False}
    rows = metric_rows(run_dir)
    spans = [(1, half), (half + 1, steps)] if half else [(1, steps)]
    for proc, (first, last) in zip(procs, spans):
        proc["peak_memory_gib"] = peak_gib(rows, first, last)
    resumed = not half or any(  # the resumed process's own log line, with the step it started from
        "resumed stage finetune" in line and f"(step {half})" in line
        for line in Path(procs[-1]["log"]).read_text().splitlines()
    )
    return {
        "strategy": strategy,
        "processes": procs,
        "ok": True,
        "resumed_at": half or None,
        "resumed": resumed,
        "losses": {r["step"]: r["loss/total"] for r in rows if r.get("loss/total") is not None},
        "final_saved": (run_dir / "finetune" / "final").is_dir(),
    }


def compare(results: list[dict[str, Any]], steps: int) -> None:
    """Each strategy's last loss and last-10 mean against the reference's, as relative differences."""
    ref = next((r for r in results if r["strategy"] == "ddp" and r["ok"]), None)
    for r in results:
        if not r["ok"]:
            continue
        tail = [r["losses"][s] for s in range(max(1, steps - 9), steps + 1) if s in r["losses"]]
        r["last_loss"] = r["losses"].get(steps)
        r["tail_mean"] = sum(tail) / len(tail) if tail else None
        if ref is not None and r is not ref and r["last_loss"] is not None:
            r["rel_diff_last"] = abs(r["last_loss"] - ref["losses"][steps]) / abs(ref["losses"][steps])
            r["rel_diff_tail"] = abs(r["tail_mean"] - ref["tail_mean"]) / abs(ref["tail_mean"])


def table(results: list[dict[str, Any]], steps: int) -> str:
    def gib(p: dict[str, Any]) -> str:
        return f"{p['peak_memory_gib']:.1f}" if p.get("peak_memory_gib") is not None else "-"

    lines = [
        f"| strategy | loss at step {steps} | mean of the last 10 | rel. diff vs ddp (last / last 10) | "
        "peak GiB (per process) | seconds (per process) | resumed | final/ |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        procs = r["processes"]
        mem = " / ".join(gib(p) for p in procs)
        secs = " / ".join(f"{p['seconds']:.0f}" for p in procs)
        if not r["ok"]:
            codes = ", ".join(str(p["returncode"]) for p in procs)
            lines.append(f"| {r['strategy']} | failed (exit {codes}; {procs[-1]['log']}) | | | {mem} | {secs} | | |")
            continue
        resumed = "-" if not r["resumed_at"] else f"at step {r['resumed_at']}" if r["resumed"] else "NO"
        diff = f"{r['rel_diff_last']:.2%} / {r['rel_diff_tail']:.2%}" if "rel_diff_last" in r else "(reference)"
        lines.append(
            f"| {r['strategy']} | {r['last_loss']:.4f} | {r['tail_mean']:.4f} | {diff} | {mem} | {secs} | "
            f"{resumed} | {'yes' if r['final_saved'] else 'no'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1.1b")
    ap.add_argument("--vocab", type=int, default=32000, help="embedding and LM-head rows")
    ap.add_argument("--batch", type=int, default=8, help="samples per step")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--precision", default="auto", help="mixed_precision: auto (bf16 on a GPU), no (fp32), bf16")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a Hydra override for every run")
    ap.add_argument("--strategies", nargs="+", default=["ddp", *SHARDED], choices=["ddp", *SHARDED])
    ap.add_argument("--out", type=Path, default=Path("strategies_out"))
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="the runs' folders and data (checkpoints: tens of GiB at 1.1B; default: a new folder in the system's "
        "temporary directory); --out gets only the logs and the results",
    )
    ap.add_argument("--keep-runs", action="store_true", help="keep each run's folder (checkpoints, final/, metrics)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per process")
    args = ap.parse_args()
    # a time limit's SIGTERM (timeout, a scheduler) as an exception: the running process is killed and the runs'
    # folders are removed on the way out, not left behind with their checkpoints
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="alignlm_strategies_"))
    print(f"runs in {work}", flush=True)
    data = work / "data"
    if not (data / "shapes" / "info.json").exists():
        generate(data / "shapes", seed=0, n_train=max(64, args.batch * args.steps // 2), n_test=8)
    common = {
        "size": args.size,
        "vocab": args.vocab,
        "batch": args.batch,
        "steps": args.steps,
        "precision": args.precision,
        "extra": args.set,
        "data": data,
    }
    results = []
    for strategy in args.strategies:
        results.append(run_strategy(strategy, common, work, logs, args.timeout, args.keep_runs))
        compare(results, args.steps)
        (args.out / "strategies.json").write_text(json.dumps(results, indent=2, default=str))
        print(table(results, args.steps), flush=True)
    (args.out / "strategies.md").write_text(table(results, args.steps) + "\n")
    if args.work is None and not args.keep_runs:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
