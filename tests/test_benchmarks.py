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
        # one epoch pays each image's feature build once: in the projection, and in a ratio of its own
        build = result["cache_build_s_per_image"]
        one = 558_000 * (1 / result["alignlm"]["samples_per_s"] + build) / 3600
        assert 0 < build and result["projected_hours_558k"] == pytest.approx(one) and result["projection_gpus"] == 8
        assert result["projected_hours_558k_ideal_on_gpus"] == pytest.approx(one / 8)
        assert f"{one:.2f} h on one {result['device']}" in table and "on 8 of them at ideal scaling" in table
        epoch = result["alignlm"]["tokens_per_s"] / (1 + build * result["alignlm"]["samples_per_s"])
        assert result["alignlm"]["tokens_per_s_one_epoch"] == pytest.approx(epoch)
        assert result["ratio_tokens_per_s_one_epoch"] == pytest.approx(epoch / result["peer"]["tokens_per_s"])
        assert f"{1000 * build:.2f} ms/image" in table and f"{epoch:,.0f} tokens/s with it" in table
    else:  # both sides' FLOPs count attention over the timed samples' own lengths, the head per supervised token
        assert result["attended_positions"] > 0 and result["flops_per_target"] > 0
        samples = result["peer"]["samples_per_s"] * result["peer"]["seconds"]
        tokens = result["peer"]["tokens_per_s"] * result["peer"]["seconds"]
        flops = result["peer"]["tflops"] * result["peer"]["seconds"] * 1e12
        targets = (flops - tokens * result["flops_per_token"]) / result["flops_per_target"]
        assert 0 < targets < tokens - samples and targets == pytest.approx(round(targets), abs=1e-3)


@pytest.mark.parametrize("stage, rates", [("pretrain", [1.0e-3]), ("finetune", [2.0e-5, 2.0e-5])])
def test_the_peer_steps_with_the_stages_optimizer_settings(stage, rates, monkeypatch):
    """Like for like: the peer's AdamW takes the stage's learning rate per trained part, betas and weight decay, and
    its gradient is clipped to the stage's max_grad_norm at every step, as alignlm's (it had run torch's defaults:
    lr 1e-5, weight decay 0.01, no clipping)."""
    import torch

    built, clipped, decays = [], [], []
    adamw, clip = torch.optim.AdamW, torch.nn.utils.clip_grad_norm_

    def recording_adamw(groups, **kwargs):
        built.append((sorted({g["lr"] for g in groups}), kwargs))
        decays[:] = [(g["weight_decay"], {p.ndim for p in g["params"]}) for g in groups]
        return adamw(groups, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, norm: (clipped.append(norm), clip(ps, norm))[1])
    BENCH["run"]("tiny", stage, vocab=1000, batch=2, steps=2, warmup=1, cached_features=False, peer=True)
    lrs, kwargs = built[-1]  # the peer's, built after alignlm's
    assert lrs == sorted(set(rates)) and kwargs["betas"] == (0.9, 0.999)
    assert all(decay == 0.0 for decay, _ in decays)  # the stage's weight decay: 0
    assert any(dims == {1} for _, dims in decays) and any(2 in dims for _, dims in decays)  # biases apart
    assert clipped == [1.0] * 3  # the warm-up step and the two timed ones


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
    [[ -n ${SLOW:-} && "$*" =~ $SLOW ]] && { echo $$ >> "$CALLS.slow"; exec sleep 60; }  # its pid: in *_calls.txt.slow
    ;;
esac
exit 0
"""


# gpu_check.sh's own settings: the caller's (a rerun of the script with PARTS=suite on the device runs this file's
# stand-in calls) never reach the stand-in script, only what a test sets
KNOBS = ("PARTS", "DEADLINE", "MARGIN", "MIN_STEP", "STRATEGY_STEPS")


def stand_in(tmp_path: Path, out: str, **env: str) -> dict[str, str]:
    """The environment of benchmarks/gpu_check.sh on a stand-in machine (nvidia-smi and python3 faked, a carried site
    with hydra and deepspeed, $OUT at ``tmp_path / out``): the caller's less the script's settings, and ``env``."""
    import os

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
    inherited = {k: v for k, v in os.environ.items() if k not in KNOBS and not k.endswith("_TIMEOUT")}
    calls = str(tmp_path / f"{out}_calls.txt")
    stand = {"PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(tmp_path / out), "CALLS": calls}
    return {**inherited, **stand, **env, "CARRY_SITE": str(tmp_path / "site")}


def gpu_check(tmp_path: Path, out: str, **env: str) -> tuple[int, list[str], list[str]]:
    """benchmarks/gpu_check.sh on a stand-in machine (:func:`stand_in`): its exit status, the files it left in $OUT,
    and the python3 calls it made."""
    import subprocess

    env = stand_in(tmp_path, out, **env)
    root = Path(__file__).parents[1]
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=root, env=env, capture_output=True)
    files = sorted(p.name for p in (tmp_path / out).iterdir())
    return proc.returncode, files, Path(env["CALLS"]).read_text().splitlines()


def test_the_gpu_check_returns_three_files_in_the_planned_order_without_a_broken_deepspeed(tmp_path, monkeypatch):
    """A device call returns at most 8 files: $OUT holds log.txt, results.jsonl (one JSON line per benchmark point,
    in the order planned: the issue's targets first, a point out of memory again at half its batch) and details.tgz
    (everything else). src/ and the carried packages are on PYTHONPATH, a carried deepspeed that does not import is
    left off it (accelerate would import it) and the zero strategies are skipped; the GPU tests run the metrics check
    first and leave the slow sharded test to the strategies part; the suite leaves tests/test_gpu.py out. The
    settings of a gpu_check.sh that runs this suite (a rerun of its suite part) do not reach the stand-in."""
    import json
    import tarfile

    for knob, value in {"PARTS": "suite", "DEADLINE": "1", "BENCH_TIMEOUT": "1", "MIN_STEP": "999"}.items():
        monkeypatch.setenv(knob, value)
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
    next points run; the GPU tests hang too and are cut; the suite, with under MIN_STEP left of the deadline less
    MARGIN, is skipped, and each is said in the log."""
    import json
    import re

    # the GPU tests start after 1 s and by 6 s (9 - 1 - 2: else skipped), and run to their timeout of 6 s or to
    # DEADLINE less MARGIN, whichever comes first: the suite then cannot have 2 s
    knobs = {"DEADLINE": "9", "MARGIN": "1", "MIN_STEP": "2", "BENCH_TIMEOUT": "1", "GPUTESTS_TIMEOUT": "6"}
    rc, files, _ = gpu_check(tmp_path, "out", SLOW="ft_1.1b_32k.json|test_gpu", **knobs)
    log = (tmp_path / "out" / "log.txt").read_text()
    assert rc == 0 and files == ["details.tgz", "log.txt", "results.jsonl"]
    assert "bench ft_1.1b_32k: cut at its timeout of 1 s" in log and "metrics check" in log
    assert re.search(r"but the sharded one: cut at its timeout of \d s", log)
    assert "suite: the whole suite but tests/test_gpu.py: skipped" in log
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


def test_the_gpu_check_stopped_from_outside_stops_its_step_at_once_and_keeps_what_it_wrote(tmp_path):
    """The device tool cuts a call past its time with a TERM (a KILL seconds later): the running step (strategies.py,
    hanging) is stopped at once with its whole process group, its results line written (rc 143, what it saved), its
    partial output packed into details.tgz, the temporary folder removed and the stop logged."""
    import contextlib
    import json
    import os
    import signal
    import subprocess
    import tarfile
    import time

    env = stand_in(tmp_path, "out", PARTS="strategies", SLOW="strategies.py", TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    slow = Path(env["CALLS"] + ".slow")
    proc = subprocess.Popen(["bash", "benchmarks/gpu_check.sh"], cwd=Path(__file__).parents[1], env=env)
    try:
        for _ in range(100):  # until the strategies benchmark hangs
            if slow.exists() and slow.read_text().strip():
                break
            time.sleep(0.1)
        pid = int(slow.read_text())
        group = os.getpgid(pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 143
    finally:  # nothing left behind should the script not stop
        proc.kill()
        for left in slow.read_text().split() if slow.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(left), signal.SIGKILL)
    time.sleep(0.2)  # an orphan's reaping
    assert not running(group)
    out = tmp_path / "out"
    (line,) = (out / "results.jsonl").read_text().splitlines()
    assert json.loads(line) == {"name": "strategies", "rc": 143, "result": [{"strategy": "ddp"}]}
    assert "stopped by a signal during strategies: 1.1b finetune" in (out / "log.txt").read_text()
    with tarfile.open(out / "details.tgz") as tgz:
        assert {"details/strategies.txt", "details/strategies/strategies.json"} <= set(tgz.getnames())
    assert list((tmp_path / "tmp").iterdir()) == []


def running(group: int) -> list[int]:
    """The processes of a process group that have not ended (zombies left out), read from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        if int(pgrp) == group and state != "Z":
            pids.append(int(stat.parent.name))
    return pids
