"""Cluster behaviour on the CPU (gloo): a dead or hung rank ends the job naming the rank and the step; the stop
signal checkpoints every rank at the same step; a two-node job on loopback trains and resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignlm.pipeline import run
from tests.conftest import RANKS, compose, free_port, read_losses, tiny_overrides

pytestmark = RANKS

ROOT = Path(__file__).resolve().parents[1]


def torchrun(
    overrides: list[str],
    nodes: int = 1,
    per_node: int = 2,
    timeout: float = 300,
    entry: tuple[str, ...] = ("-m", "alignlm.commands", "train"),
) -> subprocess.CompletedProcess:
    """``alignlm train`` (or ``entry``) as gloo ranks on this machine (``--cpu`` semantics also on a GPU machine):
    ``nodes`` torchrun launchers of ``per_node`` ranks each, meeting on loopback as separate machines would. Returns
    the launchers' worst exit status and their stderr together."""
    port = str(free_port())
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launchers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nnodes={nodes}",
                f"--node_rank={node}",
                f"--nproc_per_node={per_node}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                *entry,
                *overrides,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in range(nodes)
    ]
    outs = [p.communicate(timeout=timeout) for p in launchers]
    status = max((p.returncode for p in launchers), key=abs)
    return subprocess.CompletedProcess(
        launchers[0].args, status, "".join(o for o, _ in outs), "".join(e for _, e in outs)
    )


def fault(action: str, after: int) -> list[str]:
    return [
        "+stages.pretrain.data.hooks.fault._target_=tests.faults.Fault",
        "+stages.pretrain.data.hooks.fault.rank=1",
        f"+stages.pretrain.data.hooks.fault.after={after}",
        f"+stages.pretrain.data.hooks.fault.action={action}",
    ]


def deepspeed_on_cpu() -> None:
    """Skip unless DeepSpeed's CPU accelerator can run here: it compiles its shared-memory op at first use, with ninja
    and a C++ compiler (a GPU machine may have neither; its GPU path needs no build)."""
    pytest.importorskip("deepspeed")
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available() or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("DeepSpeed's CPU accelerator builds its shared-memory op with ninja and a C++ compiler: not here")


def partitioning_zero3(tmp_path: Path) -> list[str]:
    """A DeepSpeed JSON that partitions every parameter under ZeRO-3: by default it keeps whole any of under 100k
    elements, which is every parameter of the tiny model, so the gathers and releases would never run."""
    path = tmp_path / "partition_all.json"
    path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    return [f"distributed.deepspeed_config={path}"]


def base(colour_set, tmp_path, *extra: str) -> list[str]:
    return tiny_overrides(
        colour_set,
        tmp_path,
        "run=[pretrain]",
        "eval.sets=[]",
        "stages.pretrain.max_steps=8",
        "stages.pretrain.per_device_batch_size=2",
        "mixed_precision=no",
        *extra,
    )


@pytest.mark.parametrize("action", ["hang", "die"])
def test_a_hung_or_dead_rank_ends_the_job_naming_rank_and_step(colour_set, tmp_path, action):
    start = time.monotonic()
    proc = torchrun([*base(colour_set, tmp_path, "distributed.timeout_s=10"), *fault(action, after=4)])
    took = time.monotonic() - start
    assert proc.returncode != 0 and took < 120, (took, proc.stderr[-2000:])
    # rank 1 stopped inside step 3 (its 5th sample, 2 per step); rank 0 fails there, saying so
    assert "rank 0 of 2: stage pretrain failed at step 3" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "t" / "pretrain" / "final").exists()


SLOW_EVALUATION = """
import sys, time
from alignlm import commands, pipeline
evaluate = pipeline.evaluate_final
pipeline.evaluate_final = lambda *args: time.sleep(8) or evaluate(*args)
sys.exit(commands.main(["train", *sys.argv[1:]]))
"""


def test_the_main_processs_prepare_steps_and_evaluation_may_outlast_the_collective_timeout(colour_set, tmp_path):
    """A prepare step and the final evaluation run on the main process alone. The other ranks waited for them in a
    barrier that distributed.timeout_s bounds (600 s): a longer step or evaluation failed the job, and every rerun
    again. Now they wait for the prepare steps without that bound and end before the evaluation."""
    slow = tmp_path / "slow_evaluation.py"
    slow.write_text(SLOW_EVALUATION)
    job = base(
        colour_set,
        tmp_path,
        "distributed.timeout_s=5",
        "stages.pretrain.max_steps=2",
        "+stages.pretrain.prepare.slow={_target_:time.sleep,_args_:[8]}",
        f"eval.sets=[{{name:colours,path:{colour_set['test']}}}]",
    )
    proc = torchrun(job, entry=(str(slow),))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    questions = len(json.loads(colour_set["test"].read_text()))
    assert summary["eval"]["colours"]["n"] == questions and summary["stages"]["pretrain"]["world_size"] == 2


def test_a_main_process_that_dies_in_a_prepare_step_ends_the_job(colour_set, tmp_path):
    """The other ranks' wait for the prepare steps has no short timeout (distributed.prepare_timeout_s, a day): a main
    process that dies there still ends the job at once."""
    start = time.monotonic()
    proc = torchrun(base(colour_set, tmp_path, "+stages.pretrain.prepare.die={_target_:os._exit,_args_:[3]}"))
    assert proc.returncode != 0 and time.monotonic() - start < 60, proc.stderr[-3000:]
    assert "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]


def test_sigterm_inside_a_step_names_the_rank_and_step(colour_set, tmp_path):
    """torchrun SIGTERMs the surviving ranks once one dies, which can reach a rank before its next collective fails:
    that rank still names itself and its step (here one process terminates itself inside step 3, in process). SIGTERM
    is no stop request (docs/cluster.md): the message said only "or the job was cancelled", where SLURM's preemption
    and time limit end the ranks with no checkpoint."""
    import logging
    import signal

    from alignlm.training.trainer import Terminated

    records: list[logging.LogRecord] = []
    catch = logging.Handler(logging.ERROR)
    catch.emit = records.append
    logging.getLogger("alignlm").addHandler(catch)
    before = signal.getsignal(signal.SIGTERM)
    job = [*base(colour_set, tmp_path, "stages.pretrain.data.num_workers=0"), *fault("term", after=4)]
    try:
        with pytest.raises(Terminated, match="SIGTERM"):
            run(compose(*[o.replace("fault.rank=1", "fault.rank=0") for o in job]))
    finally:
        logging.getLogger("alignlm").removeHandler(catch)
    said = [r.getMessage() for r in records]
    assert any("rank 0 of 1: stage pretrain failed at step 3: Terminated: SIGTERM" in m for m in said), said
    # SLURM's preemption and time limit send it too: it says that no checkpoint is written, and what stops with one
    assert any("preempted or reached its time limit (no checkpoint now" in m for m in said), said
    assert signal.getsignal(signal.SIGTERM) is before  # the handler lives only as long as the step loop
    assert not (tmp_path / "t" / "pretrain" / "final").exists()


def test_data_loader_workers_ignore_the_stop_signal(colour_set, tmp_path):
    """The stop signal sent to a rank's whole process group asks the rank to stop; its data-loader workers (forked
    before the rank's handler exists) ignore it instead of dying mid-epoch."""
    import signal

    from alignlm.pipeline import make_accelerator
    from alignlm.training.trainer import Trainer

    cfg = compose(*base(colour_set, tmp_path, "stages.pretrain.data.num_workers=1"))
    trainer = Trainer(cfg, "pretrain", make_accelerator(cfg))
    trainer.setup()
    batches = iter(trainer.loader())
    next(batches)
    for worker in batches._workers:
        os.kill(worker.pid, signal.SIGUSR1)
    time.sleep(0.5)
    assert all(w.is_alive() for w in batches._workers)
    assert next(batches)["num_samples"] == 2


def test_a_two_node_job_stops_on_the_signal_at_one_step_and_resumes_exactly(colour_set, tmp_path, monkeypatch):
    """Two "nodes" on loopback, one rank each. SIGUSR1 reaches rank 1 alone during step 3; both ranks stop after
    step 4 (the next fetch of logged values, logging.every=2) with a checkpoint there, and the resumed job's losses
    are those of one uninterrupted process with the same global batch."""
    job = base(colour_set, tmp_path, "logging.every=2", "run_name=ddp")
    proc = torchrun([*job, *fault("signal", after=4)], nodes=2, per_node=1)
    assert proc.returncode != 0  # 75 from each rank; the launcher reports the ranks' failure
    assert proc.stderr.count("stopped after step 4 of 8 (distributed.stop_signal or stop_file); rerun to resume") == 2
    stage = tmp_path / "ddp" / "pretrain"
    assert sorted(p.name for p in (stage / "checkpoints").iterdir())[-1] == "step_000004"
    assert len(read_losses(stage)) == 4 and not (stage / "final").exists()
    # the rerun resumes at step 5, without the fault hook: a change of the stage's data hooks, allowed explicitly
    assert torchrun([*job, "resume_allow_changes=true"], nodes=2, per_node=1).returncode == 0
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    run(compose(*base(colour_set, tmp_path, "run_name=one", "stages.pretrain.grad_accum=2")))
    assert read_losses(stage) == pytest.approx(read_losses(tmp_path / "one" / "pretrain"), rel=1e-5)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())["stages"]["pretrain"]
    assert summary["steps"] == 8 and summary["world_size"] == 2


def test_ranks_resume_from_one_checkpoint_when_one_rank_finds_its_own_file_damaged(colour_set, tmp_path):
    """Each rank hashes only the checkpoint files it reads: rank 1 alone found its random state in the newest
    checkpoint damaged and fell back to the one before, while rank 0 resumed from the newest (steps apart: a hang at a
    collective). The ranks agree on one verdict: both resume from the checkpoint before, and the stage ends."""
    job = base(colour_set, tmp_path, "stages.pretrain.save_every=2", "run_name=r", "distributed.timeout_s=60")
    assert torchrun([*job, "stop_after_steps=4"]).returncode != 0  # stopped (75 from each rank)
    newest = tmp_path / "r" / "pretrain" / "checkpoints" / "step_000004"
    state = newest / "rng_1.pt"
    state.write_bytes(bytes(b ^ 0xFF for b in state.read_bytes()))  # same size, other bytes: only its hash tells
    proc = torchrun(job, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("rng_1.pt does not match its SHA-256 in the manifest (damaged); falling back") == 2
    assert proc.stderr.count("resume: rank 1: ") == 2  # every rank names the rank that found it
    assert "step_000002 (step 2)" in proc.stderr and "step_000004 (step 4)" not in proc.stderr  # rank 0's log
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["stages"]["pretrain"]["steps"] == 8


def test_ranks_fall_back_together_when_one_rank_cannot_read_a_checkpoint_file(colour_set, tmp_path):
    """Under FSDP2 loading weights takes collectives: rank 1 alone failed to read the newest checkpoint's weights (an
    I/O error its manifest could not foresee) while rank 0 went on loading them, and the ranks waited in different
    collectives until the timeout. Every rank reads first and the ranks agree: both resume from the one before."""
    job = base(colour_set, tmp_path, "launcher=fsdp2", "stages.pretrain.save_every=2", "run_name=r")
    # the fault from the start (a resume compares a hook's settings); the first run reads no checkpoint
    job += [*fault("unreadable", 0), "+stages.pretrain.data.hooks.fault.file=step_000004/trainable.safetensors"]
    assert torchrun([*job, "distributed.timeout_s=60", "stop_after_steps=4"]).returncode != 0  # stopped (75 each)
    proc = torchrun([*job, "distributed.timeout_s=60"], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("resume: rank 1: ") == 2 and "Input/output error" in proc.stderr
    assert "step_000002 (step 2)" in proc.stderr and "step_000004 (step 4)" not in proc.stderr
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["stages"]["pretrain"]["steps"] == 8


def test_a_resume_that_one_rank_alone_refuses_is_refused_by_every_rank(colour_set, tmp_path):
    """Each rank compares its own view of the stage's files with the checkpoint's: rank 1 alone, whose node holds
    other data, refused the resume and died while rank 0 went on into the next collective (a launcher without
    torchrun's agent left it there until the timeout). Every rank now raises the same refusal, naming the rank."""
    job = base(colour_set, tmp_path, "stages.pretrain.save_every=2", "run_name=r", "distributed.timeout_s=60")
    job += fault("other_data", 0)  # from the start (a resume compares a hook's settings); a fresh start compares none
    assert torchrun([*job, "stop_after_steps=4"]).returncode != 0  # stopped (75 from each rank)
    proc = torchrun(job, timeout=240)
    # whichever rank exits first, torchrun ends the other: one rank's line at least, the same on each
    refusal = f"rank 1: {tmp_path / 'r' / 'pretrain' / 'checkpoints' / 'step_000004'} was written from other files: "
    assert proc.returncode != 0 and refusal + "stages.pretrain.data.sources[0].path" in proc.stderr, proc.stderr[-3000:]
    assert "Connection closed" not in proc.stderr and "could not be loaded" not in proc.stderr


def test_a_stop_file_stops_cleanly_once_and_is_consumed(colour_set, tmp_path):
    from alignlm.training.trainer import StopTraining

    overrides = base(colour_set, tmp_path, "logging.every=2", "stages.pretrain.max_steps=6")
    (tmp_path / "t").mkdir(parents=True)
    (tmp_path / "t" / "STOP").touch()  # as `touch outputs/<run>/STOP`, or the sbatch scripts on SLURM's warning
    with pytest.raises(StopTraining, match="stopped after step 2 of 6"):
        run(compose(*overrides))
    assert not (tmp_path / "t" / "STOP").exists()  # served: the rerun goes on
    assert run(compose(*overrides))["stages"]["pretrain"]["steps"] == 6


@pytest.mark.parametrize(
    "override, match",
    [("distributed.timeout_s=0", "distributed.timeout_s"), ("distributed.stop_signal=SIGFOO", "signal name")],
)
def test_distributed_settings_are_checked_at_start_up(colour_set, tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        run(compose(*base(colour_set, tmp_path, override)))


def stand_in_slurm(tmp_path: Path, srun: str) -> dict[str, str]:
    """The environment of scripts/slurm/train.sbatch under SLURM on one node, with stand-in ``srun`` (its body given)
    and ``scontrol`` (which records a requeue in ``tmp_path/requeued``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/usr/bin/env bash\n{srun}\n")
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\ncase "$1" in show) echo 127.0.0.1 ;; requeue) echo "$2" >> {tmp_path}/requeued ;; esac\n'
    )
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    outer = {
        k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("MAIN_PORT", "GPUS_PER_NODE")
    }
    return {
        **outer,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_ID": "42",
        "ALIGNLM_CONFIG_DIR": str(ROOT / "configs"),
    }


def test_the_slurm_script_checkpoints_and_requeues_on_slurms_warning(colour_set, tmp_path):
    """scripts/slurm/train.sbatch under stand-in srun / scontrol, one node, torchrun: SIGUSR1 to the batch script (what
    `--signal=B:USR1@600` sends) touches the stop file, the rank checkpoints and exits, the job requeues itself."""
    import signal

    env = stand_in_slurm(tmp_path, 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"')
    env |= {"LAUNCHER": "torchrun", "GPUS_PER_NODE": "1", "MAIN_PORT": str(free_port()), "ACCELERATE_USE_CPU": "true"}
    overrides = base(
        colour_set, tmp_path, "logging.every=2", "stages.pretrain.max_steps=2000", "stages.pretrain.save_every=0"
    )
    job = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "slurm" / "train.sbatch"), *overrides],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "t" / "pretrain" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=120)
    assert (tmp_path / "requeued").read_text().split() == ["42"], out[-3000:]
    checkpoints = sorted((tmp_path / "t" / "pretrain" / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and "stopped after step" in out and not (tmp_path / "t" / "STOP").exists()
    assert int(checkpoints[0].name.split("_")[1]) == len(read_losses(tmp_path / "t" / "pretrain")) < 2000


@pytest.mark.parametrize("ending", ["finished", "failed", "stopped"])
def test_the_slurm_script_requeues_only_a_run_that_stopped_on_the_warning(tmp_path, ending):
    """SLURM's warning reaches the script before the run has made its folder; the stop file is made there anyway. A
    run that then finishes (exit 0) or fails without serving the stop file is not requeued (and the file is removed);
    one that served it (removed it after its checkpoint) and exited non-zero, as the launchers report a rank's 75, is."""
    import signal

    stop = tmp_path / "out" / "r" / "STOP"
    served = f"rm {stop}; exit 1" if ending == "stopped" else ("exit 0" if ending == "finished" else "exit 1")
    # the launch: say it started, wait (at most 20 s) for the stop file, then end as `ending` says
    srun = f"touch {tmp_path}/started; for i in $(seq 200); do [ -e {stop} ] && break; sleep 0.1; done; {served}"
    env = stand_in_slurm(tmp_path, srun)
    job = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "slurm" / "train.sbatch"), f"output_dir={tmp_path / 'out'}", "run_name=r"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=60)
    requeued = (tmp_path / "requeued").exists()
    assert requeued == (ending == "stopped"), out
    assert job.returncode == (0 if ending == "finished" else 1) and not stop.exists(), out


@pytest.mark.parametrize("failing", ["print-config", "system python3"])
def test_the_slurm_script_launches_nothing_without_the_runs_stop_file(tmp_path, failing):
    """The stop file was read by an unchecked `alignlm train --print-config | python3 -c 'import yaml ...'`: when that
    failed (a bad override, or a system python3 without PyYAML beside alignlm's own environment) the job launched with
    STOP="", its warning touched '' and it requeued, claiming a checkpoint. The YAML is read with the python beside
    alignlm (this test's, under a python3 without PyYAML), and an unread stop file stops the job before it launches."""
    env = stand_in_slurm(tmp_path, f"touch {tmp_path}/launched")
    stale = tmp_path / "out" / "r" / "STOP"  # an earlier job's: removed before the launch
    stale.parent.mkdir(parents=True)
    stale.touch()
    tools = tmp_path / "alignlm_env"  # an environment of alignlm (stand-in) and its python, first on PATH
    tools.mkdir()
    if failing == "print-config":
        alignlm = "echo 'alignlm train: unknown key foo' >&2; exit 2"
    else:
        alignlm = f"printf 'run_name: r\\ndistributed:\\n  stop_file: {stale}\\n'"
        (tools / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (tools / "python").chmod(0o755)
        (tmp_path / "bin" / "python3").write_text("#!/bin/sh\necho \"No module named 'yaml'\" >&2; exit 1\n")
        (tmp_path / "bin" / "python3").chmod(0o755)
    (tools / "alignlm").write_text(f"#!/usr/bin/env bash\n{alignlm}\n")
    (tools / "alignlm").chmod(0o755)
    env["PATH"] = f"{tools}:{env['PATH']}"
    job = ["bash", str(ROOT / "scripts" / "slurm" / "train.sbatch"), "run_name=r"]
    proc = subprocess.run(job, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    if failing == "print-config":
        assert proc.returncode == 2 and not (tmp_path / "launched").exists(), proc.stderr
        assert "could not read distributed.stop_file" in proc.stderr and "nothing launched" in proc.stderr
        assert "unknown key foo" in proc.stderr and stale.exists()
    else:
        assert proc.returncode == 0 and (tmp_path / "launched").exists(), proc.stderr
        assert not stale.exists()


def test_the_slurm_script_gives_srun_the_jobs_cpus_gpus_and_a_port_of_its_own(tmp_path):
    """srun gets the job's --cpus-per-task (SLURM 22.05+ does not pass it on), a rank per GPU SLURM gave the node, and
    a rendezvous port from the job id (two jobs on one node would otherwise both take 29500)."""
    env = stand_in_slurm(tmp_path, f'printf "%s\\n" "$@" > {tmp_path}/srun_args')
    env |= {"SLURM_NNODES": "2", "SLURM_JOB_ID": "12345", "SLURM_CPUS_PER_TASK": "16", "SLURM_GPUS_ON_NODE": "4"}
    job = ["bash", str(ROOT / "scripts" / "slurm" / "train.sbatch"), f"output_dir={tmp_path / 'out'}", "run_name=r"]
    proc = subprocess.run(job, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert "--cpus-per-task=16" in args, args
    launch = args[-1]  # bash -c "<the launch>"
    assert "--num_processes 8 " in launch and "--main_process_port 32345 " in launch, launch


def test_fsdp2_refuses_what_it_cannot_do(colour_set, tmp_path):
    """The alignment monitor calls the parts outside a forward; a checkpoint of one strategy does not resume under
    the other (their optimizer states differ in layout)."""
    probe = [f"monitor.probe={colour_set['pretrain']}", "monitor.every=2"]
    with pytest.raises(ValueError, match="monitor.every > 0 is not available"):
        run(compose(*base(colour_set, tmp_path, "distributed.strategy=fsdp2", *probe)))
    from alignlm.training.trainer import StopTraining

    with pytest.raises(StopTraining):  # a DDP checkpoint at step 2 ...
        run(compose(*base(colour_set, tmp_path, "stop_after_steps=2")))
    # ... does not resume under fsdp2 (one process: the run makes its own one-rank group, so in a subprocess)
    cmd = [sys.executable, "-m", "alignlm.commands", "train", *base(colour_set, tmp_path, "distributed.strategy=fsdp2")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "was written with distributed.strategy=ddp, this run has fsdp2" in proc.stderr


def test_an_accelerate_deepspeed_config_launches_zero3_with_offloading(colour_set, tmp_path):
    """`accelerate launch --config_file configs/accelerate/zero3_offload.yaml` (2 CPU processes) trains under ZeRO-3
    with the optimizer and the parameters offloaded: the launch config chose the strategy (distributed.strategy=auto)."""
    deepspeed_on_cpu()
    # CPU ranks on a GPU machine too: accelerate's DeepSpeed launcher has no --cpu, the variable reaches the ranks
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "configs/accelerate/zero3_offload.yaml",
    ]
    launch += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port())]
    job = base(colour_set, tmp_path, "stages.pretrain.max_steps=2", "stages.pretrain.save_every=0")
    proc = subprocess.run([*launch, "train.py", *job], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes, zero3, offload_optimizer, offload_param" in proc.stderr
    assert (tmp_path / "t" / "pretrain" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("env", "overrides", "message"),
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, [], "alignlm shards with FSDP2"),
        # the launch config's resharding had replaced the command line's under distributed.strategy=auto
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"},
            ["distributed.reshard_after_forward=false"],
            "asks for fsdp2 with reshard_after_forward=True; this run's command line has "
            "distributed.reshard_after_forward=False: make them agree",
        ),
        # what an accelerate FSDP config switches on that alignlm's FSDP2 does not do is refused, not dropped
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"},
            [],
            "sets fsdp_offload_params: true, which alignlm's FSDP2 does not do .*zero3_offload.yaml",
        ),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"},
            [],
            r"sets fsdp_activation_checkpointing: true.*stages.<stage>.gradient_checkpointing=true",
        ),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, [], "runs stages 2 and 3"),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            ["launcher=fsdp2"],
            "asks for zero3",
        ),
        (
            {},
            ["launcher=zero2", "distributed.offload_param=true"],
            "offload_param=true needs distributed.strategy=zero3",
        ),
        (  # on a CPU fp16 is refused before the strategy is looked at
            {},
            ["launcher=zero2", "mixed_precision=fp16"],
            "fp16 is not available with distributed.strategy=zero2|fp16 does not train on the CPU",
        ),
        # what an accelerate DeepSpeed config sets that alignlm cannot take from it is refused, not dropped
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
            | {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4", "ACCELERATE_GRADIENT_CLIPPING": "0.5"},
            [],
            r"stages.<name>.grad_accum, stages.<name>.max_grad_norm: remove gradient_accumulation_steps: 4, gradient_",
        ),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
            | {"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "nvme"},
            [],
            "offload_optimizer_device: nvme; alignlm offloads to the CPU only",
        ),
        (  # configs/accelerate/zero3_offload.yaml under launcher=zero3: the offload would have been dropped
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
            | {
                "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
                "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu",
            },
            ["launcher=zero3"],
            "asks for zero3, offload_optimizer=True, offload_param=True; this run has distributed.strategy=zero3, "
            "distributed.offload_optimizer=False, distributed.offload_param=False",
        ),
        (  # zero3_init_flag: true asked for a partitioned build that alignlm does not do
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
            | {"ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"},
            [],
            "sets zero3_init_flag: true; alignlm builds the model whole on each rank",
        ),
        (  # a DeepSpeed JSON is read under DeepSpeed only; under ddp it was dropped without a word
            {},
            ["launcher=ddp", "distributed.deepspeed_config=ds.json"],
            "distributed.deepspeed_config=ds.json is read under DeepSpeed only, which distributed.strategy=ddp",
        ),
        (  # `accelerate launch --mixed_precision bf16` (or the config file's) against alignlm's explicit no
            {"ACCELERATE_MIXED_PRECISION": "bf16"},
            [],
            "asks for mixed_precision bf16, this run has mixed_precision=no",
        ),
    ],
)
def test_strategy_settings_that_cannot_work_are_refused(colour_set, tmp_path, monkeypatch, env, overrides, message):
    if any("zero" in o for o in overrides):
        pytest.importorskip("deepspeed")
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=message):
        run(compose(*base(colour_set, tmp_path, *overrides)))


@pytest.mark.parametrize(
    ("launched", "ours", "trains"), [("bf16", "auto", "bf16"), ("no", "no", "no"), ("no", "bf16", "bf16")]
)
def test_auto_precision_follows_the_accelerate_launch_config(launched, ours, trains, monkeypatch):
    """``mixed_precision: auto`` trains in the precision a launch config asks for (bf16 here also on the CPU, where
    auto alone would be fp32); an explicit one equal to the launch's stands (the refusal of a different one is above);
    a launch's ``no``, which plain ``accelerate launch`` always passes, asks for nothing and leaves alignlm's own.
    In this process: accelerate's state starts afresh for each test (conftest), as in a launched process."""
    from omegaconf import OmegaConf

    from alignlm.pipeline import make_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert make_accelerator(OmegaConf.create({"mixed_precision": ours})).mixed_precision == trains


@pytest.mark.parametrize("config", ["zero2", "zero3", "zero3_offload"])
def test_a_multi_node_deepspeed_launch_runs_one_torchrun_per_node(config):
    """What `accelerate launch` does on node 1 of 2 with the arguments scripts/slurm/train.sbatch gives it: torchrun
    for this node's ranks (as SLURM starts one launcher per node), not DeepSpeed's pdsh launcher over ssh."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    argv = [
        *("--config_file", str(ROOT / "configs" / "accelerate" / f"{config}.yaml")),
        *("--num_machines", "2", "--num_processes", "16", "--machine_rank", "1"),
        *("--main_process_ip", "node0", "--main_process_port", "29500", "train.py"),
    ]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    deepspeed_cmd, _ = prepare_deepspeed_cmd_env(args)
    assert deepspeed_cmd is None, deepspeed_cmd  # else accelerate runs `deepspeed --launcher pdsh ...`
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")


def test_accelerates_launch_command_also_starts_the_cpu_ranks(tmp_path):
    """`accelerate-launch --cpu --num_processes 2` (accelerate's console script) starts one process, as `accelerate
    launch` does: alignlm reads the 2 from it and starts the ranks, instead of training on one."""
    launcher = Path(sys.executable).parent / "accelerate-launch"
    if not launcher.exists():
        pytest.skip("accelerate's accelerate-launch script is not installed beside this Python")
    probe = tmp_path / "probe.py"
    probe.write_text("from alignlm.commands.launch import cpu_processes_to_spawn\nprint(cpu_processes_to_spawn())\n")
    flags = "--cpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no".split()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(launcher), *flags, str(probe)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "2", (proc.stdout, proc.stderr[-2000:])


def with_text_only_records(instruct: Path) -> Path:
    """The instruction set with a text-only record after every third one, beside the images it names: with one sample
    per micro-batch, some ranks run the zero-image path while others see images (ZeRO-3's classic hang)."""
    mixed = instruct.parent / "instruct_mixed.json"
    if not mixed.exists():
        out = []
        for i, record in enumerate(json.loads(instruct.read_text())):
            out.append(record)
            if i % 3 == 2:
                turns = [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": str(i)}]
                out.append({"id": f"text{i}", "conversations": turns})
        mixed.write_text(json.dumps(out))
    return mixed


def sharded_stages(colour_set) -> list[str]:
    """Pretraining, then LoRA finetuning on a set with text-only records, one sample per micro-batch: 20 steps."""
    mixed = with_text_only_records(Path(colour_set["instruct"]))
    return [
        "run=[pretrain,finetune]",
        "stages.finetune.parts.llm=lora",
        "stages.finetune.lora.dropout=0.0",  # each rank draws its own masks: two ranks never draw one process's
        f"stages.finetune.data.sources=[{{path:{mixed}}}]",
        "stages.finetune.data.group_by_length=false",  # else the short text-only records meet in the same steps
        "stages.pretrain.per_device_batch_size=1",
        "stages.finetune.per_device_batch_size=1",
        "stages.pretrain.max_steps=16",  # 20 steps in all with the finetuning's 4
    ]


@pytest.fixture(scope="module")
def one_process_run(colour_set, tmp_path_factory) -> Path:
    """The run every sharded strategy is compared with: one process, the same global batch (4 accumulated samples).
    Run once for the three strategies: each had run it again."""
    tmp_path = tmp_path_factory.mktemp("one_process")
    one = ["stages.pretrain.grad_accum=4", "stages.finetune.grad_accum=4"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "true")
        run(compose(*base(colour_set, tmp_path, "run_name=one", *sharded_stages(colour_set), *one)))
    return tmp_path / "one"


@pytest.mark.parametrize("strategy", ["fsdp2", "zero2", "zero3"])
def test_sharded_training_matches_one_process_and_resumes_exactly(
    colour_set, one_process_run, tmp_path, monkeypatch, strategy
):
    """Two gloo ranks under FSDP2 or DeepSpeed ZeRO, 20 steps (pretrain, then LoRA finetuning on a set with text-only
    records, one sample per micro-batch, 2 accumulated: in this order rank 1's second micro-batch has no image, rank
    0's has one), stopped after step 5 and resumed, give the losses (fp32, rel. 1e-5) and the final weights of one DDP
    process with the same global batch."""
    if strategy.startswith("zero"):
        deepspeed_on_cpu()
    from safetensors.torch import load_file

    partition = partitioning_zero3(tmp_path) if strategy == "zero3" else []
    job = base(colour_set, tmp_path, f"run_name={strategy}", f"launcher={strategy}", *sharded_stages(colour_set))
    job += partition
    accumulate = ["stages.pretrain.grad_accum=2", "stages.finetune.grad_accum=2"]
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # DeepSpeed's ranks stay on the CPU on a GPU machine too
    assert torchrun([*job, *accumulate, "stop_after_steps=5"]).returncode != 0  # stopped (75 from each rank)
    step5 = tmp_path / strategy / "pretrain" / "checkpoints" / "step_000005"
    partitions = ["optimizer_rank0.pt", "optimizer_rank1.pt"] if strategy.startswith("zero") else []
    assert step5.exists() and sorted(p.name for p in step5.glob("optimizer_rank*.pt")) == partitions
    resumed = torchrun([*job, *accumulate])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for stage in ("pretrain", "finetune"):
        theirs = read_losses(one_process_run / stage)
        assert read_losses(tmp_path / strategy / stage) == pytest.approx(theirs, rel=1e-5)
    ours, theirs = (
        load_file(r / "finetune" / "final" / "model.safetensors") for r in (tmp_path / strategy, one_process_run)
    )
    assert ours.keys() == theirs.keys() and not any("lora" in k for k in ours)  # LoRA merged
    # Adam's first steps on LoRA's zero-initialised B turn reduction-order noise into ~4e-5 on merged weights of
    # scale 0.1; DDP against one process differs by the same 4.2e-5
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-4), k
    summary = json.loads((tmp_path / strategy / "summary.json").read_text())["stages"]
    assert summary["pretrain"]["steps"] == 16 and summary["finetune"]["world_size"] == 2


def test_a_deepspeed_json_tunes_zero_but_leaves_the_step_to_the_stage(tmp_path):
    """distributed.deepspeed_config merges its ZeRO knobs; "auto" entries (accelerate/transformers style) are filled
    by alignlm; a batch size, clipping or precision of its own is refused, as is another ZeRO stage."""
    from alignlm.training.zero import deepspeed_config

    def config(extra: dict, strategy: str = "zero3") -> dict:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(extra))
        return deepspeed_config(strategy, {"deepspeed_config": str(path)}, 2, 4, 8, 1.0, "bf16")

    got = config({"train_batch_size": "auto", "bf16": {"enabled": "auto"}, "zero_optimization": {"overlap_comm": True}})
    assert got["train_batch_size"] == 64 and got["gradient_accumulation_steps"] == 4 and got["gradient_clipping"] == 1.0
    assert got["zero_optimization"] == {"stage": 3, "overlap_comm": True} and "bf16" not in got
    assert got["torch_autocast"]["enabled"] and got["torch_autocast"]["lower_precision_safe_modules"] == []
    with pytest.raises(ValueError, match=r"sets \['gradient_clipping'\], which alignlm sets itself, from stages.<n"):
        config({"gradient_clipping": 0.5})
    with pytest.raises(ValueError, match="zero_optimization.stage=2, distributed.strategy=zero3"):
        config({"zero_optimization": {"stage": 2}})
    # offloading from the JSON left alignlm's switch off: a fused GPU AdamW over optimizer state on the CPU
    with pytest.raises(ValueError, match=r"offload_optimizer.device='cpu': .*distributed.offload_optimizer=true"):
        config({"zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memory": True}}})
    assert config({"zero_optimization": {"offload_param": {"device": "none"}}})["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("launcher", ["zero3", "zero3_offload"])
def test_zero3_partitions_objective_parameters_and_resumes_like_ddp(colour_set, tmp_path, launcher):
    """One process: ZeRO-3 (also with the optimizer and parameters offloaded) holds the contrastive objective's learned
    temperature with the model's parameters; stopped after step 2 and resumed, the losses and the temperature are
    DDP's (fp32, rel. 1e-5)."""
    pytest.importorskip("deepspeed")
    from torch.utils.cpp_extension import CUDA_HOME

    from alignlm.training.trainer import StopTraining

    if launcher == "zero3_offload" and torch.cuda.is_available() and CUDA_HOME is None:
        pytest.skip("on a GPU, DeepSpeed builds the offloaded optimizer's CPU Adam with the CUDA toolkit: none here")
    job = contrastive_job(colour_set, tmp_path)
    zero = ["run_name=zero", f"launcher={launcher}", *partitioning_zero3(tmp_path)]
    with pytest.raises(StopTraining):
        run(compose(*job, *zero, "stop_after_steps=2"))
    run(compose(*job, *zero))
    run(compose(*job, "run_name=ddp"))
    assert_temperature_trains_like_ddp(tmp_path, "zero")


def test_fsdp2_trains_an_objectives_learned_temperature_like_ddp(colour_set, tmp_path):
    """Under FSDP2 the contrastive objective's learned temperature lives outside the sharded model and must be in the
    optimizer all the same: one process, the losses and the temperature are DDP's (fp32, rel. 1e-5), and it moved."""
    job = contrastive_job(colour_set, tmp_path)
    run(compose(*job, "run_name=fsdp2", "launcher=fsdp2"))
    run(compose(*job, "run_name=ddp"))
    assert_temperature_trains_like_ddp(tmp_path, "fsdp2")


def contrastive_job(colour_set, tmp_path: Path) -> list[str]:
    """A tiny fp32 stage 1 of 4 steps with the contrastive objective and its learned temperature."""
    return [
        "+exp=contrastive",
        *tiny_overrides(colour_set, tmp_path, "model=tiny", "run=[pretrain]", "offline_datasets=[]", "eval.sets=[]"),
        "stages.pretrain.max_steps=4",
        "mixed_precision=no",
    ]


def assert_temperature_trains_like_ddp(tmp_path: Path, name: str) -> None:
    """Run ``name``'s losses and temperature are run ``ddp``'s (rel. 1e-5), and its temperature moved."""
    rows = {
        r: [json.loads(x) for x in (tmp_path / r / "pretrain" / "metrics.jsonl").read_text().splitlines()]
        for r in (name, "ddp")
    }
    for key in ("loss/total", "loss/contrastive", "contrastive/temperature"):
        assert [x[key] for x in rows[name]] == pytest.approx([x[key] for x in rows["ddp"]], rel=1e-5), key
    assert rows[name][-1]["contrastive/temperature"] != rows[name][0]["contrastive/temperature"]  # it trained


def tied_tiny(**kw):
    """The tiny Llama with its LM head tied to the token embeddings, as SmolLM2's and Qwen2.5's are."""
    from alignlm.models.llm import tiny

    model, tok = tiny(**kw)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model, tok


def test_zero3_writes_the_final_weights_of_an_llm_with_a_tied_head_as_ddp_does(colour_set, tmp_path):
    """One process, ZeRO-3, the LLM trained whole with its head tied to its embeddings: final/ holds what DDP's holds
    (the tied head was missing from the gathered state, and the stage failed writing final/ after training)."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    job = [
        *base(colour_set, tmp_path, "stages.pretrain.max_steps=2", "stages.pretrain.parts.llm=full"),
        "stages.pretrain.lr.llm=1e-3",
        "model.llm._target_=tests.test_cluster.tied_tiny",
    ]
    run(compose(*job, "run_name=zero", "launcher=zero3", *partitioning_zero3(tmp_path)))
    run(compose(*job, "run_name=ddp"))
    ours, theirs = (load_file(tmp_path / r / "pretrain" / "final" / "model.safetensors") for r in ("zero", "ddp"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-6), k


def test_every_rank_raises_the_first_ranks_refusal_of_its_kind(monkeypatch):
    """`agreed`: a refusal one rank alone makes (a config's mistake, a file its node lacks) is raised by every rank,
    naming that rank, of its kind; an OSError on one rank had been left out, and the others waited at the gather."""
    from types import SimpleNamespace

    from alignlm.config import ConfigError
    from alignlm.training import agreement

    two = SimpleNamespace(num_processes=2)
    for theirs, kind in (
        (("file", "data/a.json: No such file or directory"), OSError),
        (("config", "x changed"), ConfigError),
    ):
        monkeypatch.setattr(agreement, "gather_object", lambda mine, theirs=theirs: [*mine, theirs])
        with pytest.raises(kind, match=f"^rank 1: {theirs[1]}$"):
            agreement.agreed(two, lambda: "fine")  # this rank (0) passed
    monkeypatch.setattr(agreement, "gather_object", lambda mine: [*mine, None])
    with pytest.raises(OSError, match="^rank 0: gone$"):
        agreement.agreed(two, lambda: (_ for _ in ()).throw(FileNotFoundError("gone")))
    assert agreement.agreed(two, lambda: 7) == 7


def test_a_bug_on_one_rank_inside_an_agreed_check_ends_every_rank(monkeypatch):
    """`agreed`: another error than a refusal (a bug) on one rank had propagated on that rank alone, and the others
    waited at the gather until the timeout; every rank raises now: the failing one its own error, traceback whole,
    the others a RuntimeError naming the rank and the error's type."""
    from types import SimpleNamespace

    from alignlm.training import agreement

    two = SimpleNamespace(num_processes=2)
    gathered = []

    def gather(mine, theirs=("error", "KeyError: 'recipe'")):
        gathered.append(mine)
        return [*mine, theirs]

    monkeypatch.setattr(agreement, "gather_object", gather)
    with pytest.raises(RuntimeError, match=r"^rank 1: KeyError: 'recipe'$"):
        agreement.agreed(two, lambda: "fine")  # this rank (0) passed: it leaves too
    monkeypatch.setattr(agreement, "gather_object", lambda mine: (gathered.append(mine), [*mine, None])[1])
    with pytest.raises(TypeError, match="^unhashable$"):  # this rank's own bug, as it was raised
        agreement.agreed(two, lambda: (_ for _ in ()).throw(TypeError("unhashable")))
    assert gathered[-1] == [("error", "TypeError: unhashable")]  # what the other ranks were told
    assert len(gathered) == 2  # both ranks reached the gather every time


def test_the_slurm_script_gives_each_node_its_own_machine_rank(tmp_path):
    """scripts/slurm/train.sbatch: the launch's ``--machine_rank`` is expanded by srun's shell on each node (its own
    ``SLURM_NODEID``), never once in the batch script on the first node, which gave every node rank 0."""
    import subprocess

    from tests.test_cluster import ROOT, stand_in_slurm

    env = stand_in_slurm(tmp_path, f'printf "%s\\n" "$@" > {tmp_path}/srun_args')
    env |= {"SLURM_NNODES": "2", "SLURM_JOB_ID": "12345", "SLURM_GPUS_ON_NODE": "4", "SLURM_NODEID": "0"}
    job = ["bash", str(ROOT / "scripts" / "slurm" / "train.sbatch"), f"output_dir={tmp_path / 'out'}", "run_name=r"]
    proc = subprocess.run(job, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    launch = (tmp_path / "srun_args").read_text().splitlines()[-1]  # bash -c "<the launch>", as srun runs it
    on_node_1 = subprocess.run(
        ["bash", "-c", f"echo {launch}"], env={**env, "SLURM_NODEID": "1"}, capture_output=True, text=True
    )
    assert "--machine_rank 1 " in on_node_1.stdout, (launch, on_node_1.stdout)


def test_accelerate_launch_cpu_keeps_the_work_on_the_cpu_on_a_gpu_machine(monkeypatch):
    """``ACCELERATE_USE_CPU`` (``accelerate launch --cpu``, inherited by every rank alignlm respawns) is the CPU for
    prepare steps, evaluation and the accelerator even where a GPU is present; without it a GPU machine uses CUDA."""
    from alignlm.models import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert device.cpu_only() and device.default_device() == "cpu"
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert not device.cpu_only() and device.default_device() == "cuda"


def test_a_single_cpu_process_asked_of_accelerate_starts_no_ranks(monkeypatch):
    """``accelerate launch --cpu --num_processes 1``: the one process accelerate started is the run; only N > 1 is
    respawned as N gloo ranks (a respawn of one rank ran the run under torchrun for nothing)."""
    from alignlm.commands import launch

    for var in launch._RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for n, spawned in (("1", 0), ("2", 2)):
        argv = ["--cpu", "--num_processes", n, "train.py"]
        monkeypatch.setattr(launch, "_launcher_argv", lambda pid, argv=argv: argv)
        assert launch.cpu_processes_to_spawn() == spawned


@pytest.mark.parametrize("mode", ["lora", "frozen"])
def test_fsdp2_saves_an_llm_an_earlier_stage_trained_unrounded(colour_set, tmp_path, monkeypatch, mode):
    """Under fsdp2 the main process writes ``final/`` from a model built again from the config: an LLM a preset loads
    in bf16 (``model.llm.dtype``) got there the fp32 weights a full finetune had saved rounded to bf16, frozen or
    adapted by LoRA in the next stage. The next stage's ``final/`` now holds the finetune's LLM exactly (LoRA's
    learning rate too small to move its adapters)."""
    from safetensors.torch import load_file

    from alignlm.models.build import build_model
    from alignlm.training import trainer as trainer_module

    def bf16_llm(cfg):  # what model.llm.dtype=bfloat16 loads (the tiny LLM is built, not loaded)
        model = build_model(cfg)
        model.llm.to(torch.bfloat16)
        return model

    monkeypatch.setattr(trainer_module, "build_model", bf16_llm)
    job = tiny_overrides(
        colour_set,
        tmp_path,
        "mixed_precision=bf16",
        "eval.sets=[]",
        "run=[finetune,next]",
        "stages.finetune.init_from=null",
        "stages.finetune.lr.llm=1e-4",
        "+stage@stages.next=finetune",
        "stages.next.init_from=finetune",
        f"stages.next.parts={{vision:frozen,connector:full,llm:{mode}}}",
        "stages.next.lr.llm=1e-30",
        "stages.next.max_steps=2",
        "stages.next.per_device_batch_size=4",
        f"stages.next.data.sources=[{{path:{colour_set['instruct']}}}]",
        "launcher=fsdp2",
    )
    run(compose(*job))
    finetuned, saved = (load_file(tmp_path / "t" / s / "final" / "model.safetensors") for s in ("finetune", "next"))
    llm = {k: v for k, v in finetuned.items() if k.startswith("llm.")}
    assert all(v.dtype == torch.float32 for v in llm.values())
    assert all(torch.equal(saved[k], v) for k, v in llm.items())
