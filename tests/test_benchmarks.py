"""The throughput benchmark's tiny size runs here, on the CPU, and prints both sides and their ratio."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

BENCH = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "train_throughput.py"))


@pytest.mark.parametrize("stage,cached", [("finetune", False), ("pretrain", True)])
def test_tiny_throughput_benchmark_prints_both_sides_and_the_ratio(stage, cached, capsys):
    """Both sides' figures and their ratio; stage 1 also projects LLaVA-1.5's 558k captions."""
    result = BENCH["run"]("tiny", stage, vocab=1000, batch=2, steps=2, warmup=1, cached_features=cached, peer=True)
    for side in ("alignlm", "peer"):
        assert result[side]["tokens_per_s"] > 0 and result[side]["samples_per_s"] > 0 and result[side]["steps"] == 2
    assert result["ratio_tokens_per_s"] == pytest.approx(
        result["alignlm"]["tokens_per_s"] / result["peer"]["tokens_per_s"]
    )
    table = BENCH["table"]([result])
    assert "transformers Llava (peer)" in table and "alignlm" in table and "x |" in table
    if stage == "pretrain":  # 558k captions: one device's hours first, then 8 GPUs' (LLaVA-1.5's 3.5 h) said ideal
        one = 558_000 / result["alignlm"]["samples_per_s"] / 3600
        assert result["projected_hours_558k"] == pytest.approx(one) and result["projection_gpus"] == 8
        assert result["projected_hours_558k_ideal_on_gpus"] == pytest.approx(one / 8)
        assert f"{one:.2f} h on one {result['device']}" in table and "on 8 of them at ideal scaling" in table
    else:  # both sides' FLOPs per token count attention over the timed samples' own lengths
        assert result["attended_positions"] > 0
        flops = result["peer"]["tflops"] / result["peer"]["tokens_per_s"] * 1e12
        assert flops == pytest.approx(result["flops_per_token"])


def test_alignlm_figures_are_saved_before_the_peer_runs_and_kept_when_it_runs_out_of_memory(monkeypatch):
    """On a GPU the peer may not fit a batch alignlm fits: alignlm's figures are saved first and kept, the peer's
    failure is recorded (benchmarks/gpu_check.sh then retries the point at half the batch)."""
    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setitem(BENCH["run"].__globals__, "bench_peer", out_of_memory)  # run_path returned a copy
    saved = []
    result = BENCH["run"]("tiny", "finetune", 1000, 2, 1, 1, False, True, save=lambda r: saved.append(dict(r)))
    assert "peer" not in saved[0] and saved[0]["alignlm"]["tokens_per_s"] > 0
    assert result["peer_error"] == "OutOfMemoryError at batch 2" and saved[-1] == result
    assert "OutOfMemoryError at batch 2" in BENCH["table"]([result])


def test_strategies_benchmark_stops_resumes_and_matches_plain_training(tmp_path):
    """benchmarks/strategies.py, tiny and fp32: DeepSpeed ZeRO-2 (FSDP2 without DeepSpeed) in fresh one-rank processes
    (no launcher), stopped halfway and resumed by the same command, ends with plain training's losses; the halfway
    checkpoint of the stopped process is the only step checkpoint written (1.1B ones cost seconds each on a GPU)."""
    import importlib.util
    import json
    import subprocess
    import sys

    sharded = "zero2" if importlib.util.find_spec("deepspeed") else "fsdp2"
    script = Path(__file__).parents[1] / "benchmarks" / "strategies.py"
    args = ["--size", "tiny", "--vocab", "1000", "--steps", "4", "--batch", "2", "--precision", "no"]
    args += ["--set", "deterministic=true"]  # a GPU's atomic additions would differ between the runs
    proc = subprocess.run(
        [sys.executable, str(script), *args, "--strategies", "ddp", sharded, "--out", str(tmp_path)]
        + ["--work", str(tmp_path / "work"), "--keep-runs"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, other = json.loads((tmp_path / "strategies.json").read_text())
    assert ddp["ok"] and other["ok"] and other["resumed"] and other["resumed_at"] == 2 and other["final_saved"]
    assert [p["returncode"] for p in other["processes"]] == [75, 0]
    assert other["losses"] == pytest.approx(ddp["losses"], rel=1e-5) and len(ddp["losses"]) == 4
    assert f"| {sharded} |" in (tmp_path / "strategies.md").read_text()
    runs = tmp_path / "work"
    steps = {
        s: sorted(p.name for p in (runs / s / "finetune" / "checkpoints").glob("step_*")) for s in ("ddp", sharded)
    }
    assert steps == {"ddp": [], sharded: ["step_000002"]}


FAKE_PYTHON = r"""#!/bin/bash
# python3 on a stand-in GPU machine: notes each call (its Python path and what each path entry holds), answers it
sees=$(for d in ${PYTHONPATH//:/ }; do ls "$d" 2> /dev/null; done | tr '\n' ' ')
echo "ran $* | PYTHONPATH=$PYTHONPATH | sees $sees| alloc=${PYTORCH_CUDA_ALLOC_CONF:-}" >> "$CALLS"
case "$*" in
  "-c import deepspeed") [[ -z ${BROKEN_DEEPSPEED:-} ]] || { echo "ImportError: deepspeed is broken" >&2; exit 1; } ;;
  "-c import alignlm.commands") [[ -z ${BROKEN_ALIGNLM:-} ]] || { echo "No module named 'hydra'" >&2; exit 1; } ;;
  "-c import xdist") exit 1 ;;
  -c*) echo "torch 2.11" ;;
  -) cat > /dev/null; echo "missing: []" ;;
  *)
    args=("$@")
    for ((i = 0; i < ${#args[@]}; i++)); do  # a benchmark point's figures (as json.dumps indent=2), the strategies'
      [[ ${args[i]} == --json ]] && printf '{\n  "file": "%s"\n}' "${args[i+1]##*/}" > "${args[i+1]}"
      [[ ${args[i]} == --out ]] && mkdir -p "${args[i+1]}" && echo '[{"strategy": "ddp"}]' > "${args[i+1]}/strategies.json"
    done
    [[ -n ${OOM:-} && "$*" == *"$OOM"* ]] && echo "torch.OutOfMemoryError: CUDA out of memory"
    echo "| 1.1b | finetune | 32000 | 8 | alignlm | 1 | 1 | 1 | 40 % | 50 | 1.6x |"
    [[ -n ${SLOW:-} && "$*" =~ $SLOW ]] && exec sleep 60
    ;;
esac
exit 0
"""


def gpu_check(tmp_path: Path, out: str, **env: str) -> tuple[int, list[str], list[str]]:
    """benchmarks/gpu_check.sh on a stand-in machine (nvidia-smi and python3 faked, a carried site with hydra and
    deepspeed): its exit status, the files it left in $OUT, and the python3 calls it made."""
    import os
    import subprocess

    fake = tmp_path / "bin"
    if not fake.exists():
        fake.mkdir()
        (fake / "nvidia-smi").write_text(
            '#!/bin/bash\n[[ "$*" == *noheader* ]] && echo 81559 || echo "H100, 81559 MiB"\n'
        )
        (fake / "python3").write_text(FAKE_PYTHON)
        for f in fake.iterdir():
            f.chmod(0o755)
        for name in ("hydra", "deepspeed", "deepspeed-0.19.8.dist-info"):
            (tmp_path / "site" / name).mkdir(parents=True)
    calls = tmp_path / f"{out}_calls.txt"
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(tmp_path / out), "CALLS": str(calls), **env}
    env["CARRY_SITE"] = str(tmp_path / "site")
    root = Path(__file__).parents[1]
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=root, env={**os.environ, **env}, capture_output=True)
    return proc.returncode, sorted(p.name for p in (tmp_path / out).iterdir()), calls.read_text().splitlines()


def test_the_gpu_check_returns_three_files_in_the_planned_order_without_a_broken_deepspeed(tmp_path):
    """A device call returns at most 8 files: $OUT holds log.txt, results.jsonl (one JSON line per benchmark point,
    in the order planned: the issue's targets first, a point out of memory again at half its batch) and details.tgz
    (everything else). src/ and the carried packages are on PYTHONPATH, a carried deepspeed that does not import is
    left off it (accelerate would import it) and the zero strategies are skipped; the GPU tests run the metrics check
    first and leave the slow sharded test to the strategies part; the suite leaves tests/test_gpu.py out."""
    import json
    import tarfile

    rc, files, calls = gpu_check(tmp_path, "call1", BROKEN_DEEPSPEED="1", OOM="pt_7b_32k.json")
    assert rc == 0 and files == ["details.tgz", "log.txt", "results.jsonl"]
    root = Path(__file__).parents[1]
    log = (tmp_path / "call1" / "log.txt").read_text()
    assert "deepspeed does not import (ImportError: deepspeed is broken): the carried deepspeed left off" in log
    lines = [json.loads(line) for line in (tmp_path / "call1" / "results.jsonl").read_text().splitlines()]
    names = ["ft_1.1b_32k", "pt_1.1b_cached", "pt_7b_32k", "pt_7b_32k_b8", "ft_1.1b_32k_packed"]
    assert [r["name"] for r in lines] == names and all(r["result"] == {"file": f"{r['name']}.json"} for r in lines)
    ran = [c.split(" | ")[0] for c in calls]
    bench = [c for c in calls if "train_throughput.py" in c]
    assert len(bench) == 5 and all(c.endswith("alloc=expandable_segments:True") for c in bench)
    assert all(f"PYTHONPATH={root}/src:" in c and "hydra" in c and "deepspeed" not in c.split("sees")[1] for c in bench)
    gpu = ran.index(
        "ran -m pytest -v -p no:cacheprovider -p no:randomly --tb=short tests/test_metrics.py::test_cuda_matches_cpu "
        "tests/test_gpu.py -k not sharded"
    )
    suite = next(i for i, c in enumerate(ran) if c.startswith("ran -m pytest -q"))
    assert ran.index(next(c for c in ran if "ft_1.1b_32k_packed" in c)) < gpu < suite
    assert ran[suite].endswith("--ignore=tests/test_gpu.py")
    with tarfile.open(tmp_path / "call1" / "details.tgz") as tgz:
        packed = set(tgz.getnames())
    assert {"details/preflight.txt", "details/bench_ft_1.1b_32k.txt", "details/pytest_gpu.txt"} <= packed

    rc, files, calls = gpu_check(tmp_path, "call2", BROKEN_DEEPSPEED="1", PARTS="strategies nonsense")
    assert rc == 0 and files == ["details.tgz", "log.txt", "results.jsonl"]
    ran = [c.split(" | ")[0] for c in calls]
    assert ran[-2].endswith("tests/test_gpu.py -k sharded") and ran[-1].endswith("--strategies ddp fsdp2")
    (line,) = (tmp_path / "call2" / "results.jsonl").read_text().splitlines()
    assert json.loads(line) == {"name": "strategies", "rc": 0, "result": [{"strategy": "ddp"}]}
    assert "unknown part nonsense" in (tmp_path / "call2" / "log.txt").read_text()


def test_the_gpu_check_cuts_a_step_at_its_timeout_and_skips_what_no_longer_fits(tmp_path):
    """The first benchmark point hangs: it is cut at its own timeout (its saved figures still recorded) and the
    next points run; the GPU tests hang too and are cut; the suite, with under 40 s left of the deadline less a
    margin of 15 s, is skipped, and each is said in the log."""
    import json

    # the GPU tests start after 3 s and by 25 s (80 - 15 - 40: else skipped), and end after 28 s, past 25: the suite
    # cannot have 40 s
    rc, files, _ = gpu_check(
        tmp_path, "out", SLOW="ft_1.1b_32k.json|test_gpu", DEADLINE="80", BENCH_TIMEOUT="3", GPUTESTS_TIMEOUT="25"
    )
    log = (tmp_path / "out" / "log.txt").read_text()
    assert rc == 0 and files == ["details.tgz", "log.txt", "results.jsonl"]
    assert "bench ft_1.1b_32k: cut at its timeout of 3 s" in log and "metrics check" in log
    assert "cut at its timeout of 25 s" in log and "suite: the whole suite but tests/test_gpu.py: skipped" in log
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["name"], r["rc"]) for r in lines][:2] == [("ft_1.1b_32k", 124), ("pt_1.1b_cached", 0)]
    assert lines[0]["result"] == {"file": "ft_1.1b_32k.json"}


def test_the_gpu_check_stops_at_once_when_alignlm_does_not_import(tmp_path):
    """Nothing can run without alignlm: the script stops after the pre-flight, the reason in log.txt."""
    rc, files, calls = gpu_check(tmp_path, "out", BROKEN_ALIGNLM="1")
    log = (tmp_path / "out" / "log.txt").read_text()
    assert rc == 1 and files == ["details.tgz", "log.txt"]
    assert "alignlm.commands does not import (No module named 'hydra'): stopping here" in log
    assert [c.split(" | ")[0] for c in calls][-2:] == ["ran -c import deepspeed", "ran -c import alignlm.commands"]
