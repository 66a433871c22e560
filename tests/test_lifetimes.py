"""What a stage and a run hold, and for how long: a finished stage's model and optimizer are let go of before the
next stage, a stage that raises finishes its wandb run as failed, a second ``run`` in the same process trains (other
settings, or under torchrun), and each stage's fp16 loss scaler starts afresh (docs/reliability.md)."""

from __future__ import annotations

import gc
import io
import logging
import sys
import textwrap
import types
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from tqdm.auto import tqdm

from alignlm.objectives.base import LossTerm
from alignlm.objectives.lm import LMObjective
from alignlm.pipeline import make_accelerator, run
from alignlm.training.logging import get_logger
from alignlm.training.trainer import StopTraining, Trainer, TrainingError
from tests.conftest import RANKS, compose, tiny_overrides


def two_stages(colour_set: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """Pretraining then finetuning, one step each, no checkpoint but ``final/``, no evaluation."""
    return tiny_overrides(
        colour_set,
        out,
        "eval.sets=[]",
        "stages.pretrain.max_steps=1",
        "stages.finetune.max_steps=1",
        "stages.pretrain.save_every=0",
        "stages.finetune.save_every=0",
        *extra,
    )


def watch_stages(monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[str, Any]], dict[str, list[str]]]:
    """Weak references to each stage's model, optimizer (its AdamW, with the state) and DeepSpeed engine as set up,
    and, at each stage's start, the earlier stages whose model, optimizer or engine was still alive."""
    built: list[tuple[str, Any]] = []
    alive_at_start: dict[str, list[str]] = {}
    setup = Trainer.setup

    def watched(self: Trainer) -> None:
        gc.collect()
        alive_at_start[self.name] = alive(built)
        setup(self)
        objects = [self.core(), getattr(self.optimizer, "optimizer", self.optimizer), self.engine]
        built.append((self.name, [weakref.ref(o) for o in objects if o is not None]))

    monkeypatch.setattr(Trainer, "setup", watched)
    return built, alive_at_start


def alive(built: list[tuple[str, Any]]) -> list[str]:
    gc.collect()
    return [name for name, refs in built if any(ref() is not None for ref in refs)]


@pytest.mark.parametrize("launcher", ["ddp", "zero2"])
def test_a_finished_stages_model_and_optimizer_are_let_go_before_the_next_stage(
    colour_set, tmp_path, monkeypatch, launcher
):
    """The run's one accelerator kept every stage's model and optimizer (``prepare`` appends them to its lists) until
    the run ended: stage 2, DPO and the evaluation ran beside every earlier stage's weights and AdamW state (a 7B
    finetune: 28 GB and 56 GB). DeepSpeed's engine, which alignlm makes itself, is destroyed with its stage."""
    if launcher == "zero2":
        pytest.importorskip("deepspeed")
    built, alive_at_start = watch_stages(monkeypatch)
    run(compose(*two_stages(colour_set, tmp_path, f"launcher={launcher}")))
    assert [name for name, _ in built] == ["pretrain", "finetune"]
    assert alive_at_start == {"pretrain": [], "finetune": []}
    assert alive(built) == []


class WandbRun:
    """A stand-in for the run ``wandb.init`` returns: records how it was finished."""

    def __init__(self, runs: list[WandbRun], **settings: Any) -> None:
        self.name, self.exit_code = settings["name"], "never finished"
        runs.append(self)

    def log(self, row: dict[str, Any], step: int) -> None:
        pass

    def finish(self, exit_code: int | None = None) -> None:
        self.exit_code = exit_code


def test_a_stage_that_raises_finishes_its_wandb_run_as_failed_and_lets_go_of_its_model(
    colour_set, tmp_path, monkeypatch
):
    """A stage that raised (divergence, bad data, out of memory, Ctrl-C) left its progress bar and wandb run open, and
    the next ``wandb.init`` in the process (a sweep's next config) finished that run as a success. Now it is finished
    with exit code 1, and its model and optimizer are let go of even while the caller holds the exception (a
    notebook's last traceback). A clean stop (stop_after_steps) is no failure: its rerun continues the run."""
    runs: list[WandbRun] = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: WandbRun(runs, **kw)))
    built, _ = watch_stages(monkeypatch)
    step = Trainer.step

    def failing(self: Trainer, micro: list[dict[str, Any]], n: int) -> Any:
        if self.name == "finetune":
            raise RuntimeError("injected: CUDA out of memory")
        return step(self, micro, n)

    monkeypatch.setattr(Trainer, "step", failing)
    args = two_stages(colour_set, tmp_path, "logging.wandb.mode=offline", "stages.pretrain.max_steps=2")
    with pytest.raises(StopTraining):
        run(compose(*args, "stop_after_steps=1"))
    with pytest.raises(RuntimeError, match="injected") as raised:
        run(compose(*args))
    assert [(r.name, r.exit_code) for r in runs] == [("t/pretrain", None), ("t/pretrain", None), ("t/finetune", 1)]
    assert raised.tb is not None and alive(built) == []
    assert not getattr(tqdm, "_instances", ())  # every stage's progress bar closed


def test_a_second_run_in_the_process_may_change_the_precision(colour_set, tmp_path):
    """A sweep script or a notebook calling ``run`` twice: accelerate's process-wide state stayed from the first, and
    the second, in bf16, failed with "AcceleratorState has already been initialized and cannot be changed". Each run
    resets what it made (without the tests' own reset, which runs after each test)."""
    for precision in ("no", "bf16"):
        args = two_stages(colour_set, tmp_path, "run=[pretrain]", f"mixed_precision={precision}")
        run(compose(*args, f"run_name={precision}"))
    assert (tmp_path / "bf16" / "pretrain" / "final" / "model.safetensors").exists()
    assert not any(state._shared_state for state in (PartialState, AcceleratorState, GradientState))


@RANKS
def test_a_second_run_under_torchrun_joins_a_new_process_group(colour_set, tmp_path):
    """Two gloo ranks calling ``run`` twice in one process each: the first run's ranks leave its process group before
    the evaluation, and the second failed ("Default process group has not been initialized"), then, its state reset,
    hung in its first collective, reading the ended group's addresses from torchrun's store."""
    from tests.test_cluster import torchrun

    script = tmp_path / "sweep.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys

            from alignlm.config import compose
            from alignlm.pipeline import run

            for name in ("first", "second"):
                run(compose([*sys.argv[1:], f"run_name={name}"]))
            """
        )
    )
    args = two_stages(colour_set, tmp_path, "run=[pretrain]", "stages.pretrain.per_device_batch_size=2")
    job = torchrun(args, timeout=120, entry=(str(script),))
    assert job.returncode == 0, job.stderr[-3000:]
    assert all((tmp_path / name / "pretrain" / "final" / "model.safetensors").exists() for name in ("first", "second"))


def test_each_stage_starts_with_a_fresh_fp16_loss_scale(colour_set, tmp_path):
    """fp16's loss scaler is the accelerator's, one for every stage of a run: stage 2 started from stage 1's last scale
    and growth count, where a rerun that skips the finished stage 1 starts at the initial scale, so the two skipped
    different steps. fp16 itself is refused on the CPU: the accelerator gets a GradScaler as accelerate's fp16 mode
    sets one up, before the first stage prepares it."""
    cfg = compose(
        *two_stages(
            colour_set,
            tmp_path,
            "nonfinite.stop_after=0",
            "stages.pretrain.max_steps=2",
            "stages.finetune.init_from=null",
        )
    )
    acc = make_accelerator(cfg)
    # fp32 gradients overflow at 2**127 as fp16's do at 2**16; one back-off brings the scale to 2**27, where they fit
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    fresh = acc.scaler.state_dict()
    first = Trainer(cfg, "pretrain", acc)
    acc.unscale_gradients = lambda optimizer=None: acc.scaler.unscale_(first.optimizer.optimizer)
    first.setup()
    batches = iter(first.loader())
    first.fetch([first.step([next(batches)], n) for n in (1, 2)])  # step 1 backs off, step 2 counts towards growth
    assert (acc.scaler.get_scale(), acc.scaler._get_growth_tracker()) == (2.0**27, 1)
    Trainer(cfg, "finetune", acc).setup()
    assert acc.scaler.state_dict() == fresh


def scaled_trainer(cfg, scaler: torch.amp.GradScaler) -> Trainer:
    """The stage's trainer with fp16's loss scaler as accelerate's fp16 mode sets one up (fp16 itself is refused on
    the CPU)."""
    acc = make_accelerator(cfg)
    acc.scaler = scaler
    trainer = Trainer(cfg, "pretrain", acc)
    acc.unscale_gradients = lambda optimizer=None: acc.scaler.unscale_(trainer.optimizer.optimizer)
    return trainer


def test_a_stage_whose_every_update_the_fp16_scaler_skipped_writes_nothing(colour_set, tmp_path):
    """Every step's gradient overflowed and the scaler backed off each time: the stage had ended with exit 0 and a
    final/ holding the weights it started from, its summary "loss 6.237 -> 6.199 (8 steps)"."""
    cfg = compose(*two_stages(colour_set, tmp_path, "run=[pretrain]", "stages.pretrain.max_steps=3"))
    # fp32 gradients overflow at 2**127 as fp16's do at 2**16; a back-off factor near 1 keeps the scale there
    trainer = scaled_trainer(cfg, torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=0.99))
    with pytest.raises(TrainingError, match=r"stage pretrain: no step updated the weights: of its 3 steps, fp16's loss scaler skipped 3 "):  # fmt: skip
        trainer.fit()
    assert not (tmp_path / "t" / "pretrain" / "final").exists()


class GradientNotFinite(LMObjective):
    """The LM loss plus a term worth 0 whose gradient is NaN (a square root's at 0): a finite loss, no finite
    gradient."""

    def forward(self, batch, out, model):
        term = super().forward(batch, out, model)
        return LossTerm(term.loss + torch.sqrt((out.visual_tokens - out.visual_tokens.detach()).abs().sum()))


def test_a_gradient_not_finite_at_a_scale_of_one_is_divergence_not_the_scalers_back_off(colour_set, tmp_path):
    """An overflow at a loss scale of 1 or below is no scaling's doing: it had been taken for the scaler's back-off at
    every step (nothing updated, the stage never stopped, the scale halving towards 0); it counts as a non-finite step
    and stops the stage as one does."""
    cfg = compose(
        *two_stages(colour_set, tmp_path, "run=[pretrain]", "stages.pretrain.max_steps=3", "nonfinite.stop_after=2"),
        f"stages.pretrain.objectives.lm._target_={__name__}.GradientNotFinite",
    )
    trainer = scaled_trainer(cfg, torch.amp.GradScaler("cpu", init_scale=1.0))
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient"):
        trainer.fit()
    # fewer such steps than stop the stage, after one back-off at a scale of 2: none updated, nothing written (the
    # guard had counted the non-finite steps as updates, and the stage wrote its starting weights)
    cfg = compose(
        *two_stages(colour_set, tmp_path / "short", "run=[pretrain]", "stages.pretrain.max_steps=3"),
        f"stages.pretrain.objectives.lm._target_={__name__}.GradientNotFinite",
    )
    trainer = scaled_trainer(cfg, torch.amp.GradScaler("cpu", init_scale=2.0))
    stopped = r"no step updated the weights: of its 3 steps, fp16's loss scaler skipped 1 .* and 2 had a gradient that"
    with pytest.raises(TrainingError, match=stopped):
        trainer.fit()
    assert not (tmp_path / "short" / "t" / "pretrain" / "final").exists()


def test_the_console_log_goes_to_stderr_as_it_is_at_each_line(monkeypatch):
    """The logger kept the ``sys.stderr`` of the moment it was made: a notebook or a program that swapped it later got
    nothing, and once that stream was closed (a test's capture, when the suite ran in another order), each line became
    a "--- Logging error ---" traceback."""
    first, second = io.StringIO(), io.StringIO()
    name = "alignlm.test_current_stderr"
    try:
        monkeypatch.setattr(sys, "stderr", first)
        get_logger(name, 0).info("one")
        first.close()
        monkeypatch.setattr(sys, "stderr", second)
        get_logger(name, 0).info("two")
    finally:
        logging.getLogger(name).handlers.clear()
    assert second.getvalue().endswith(" two\n") and "Logging error" not in second.getvalue(), second.getvalue()


def test_a_warning_every_rank_makes_alike_is_printed_by_rank_zero_alone(monkeypatch):
    """A warning that comes from the config or the data (a record left out at start-up, a template's preamble) is
    made alike by every rank: rank 0 prints it, where a 64-rank job had printed it 64 times. A rank's own warning (a
    checkpoint file it alone cannot read) is still printed by that rank, and a child logger's records pass the same
    way."""
    from alignlm.constants import ALIKE_ON_EVERY_RANK

    name = "alignlm.test_alike_on_every_rank"
    said = io.StringIO()
    monkeypatch.setattr(sys, "stderr", said)
    try:
        for rank in (1, 0):
            log = get_logger(name, rank)
            log.warning("rank %d: from the data", rank, extra=ALIKE_ON_EVERY_RANK)
            log.warning("rank %d: its own", rank)
            logging.getLogger(f"{name}.child").warning("rank %d: a child's, alike", rank, extra=ALIKE_ON_EVERY_RANK)
    finally:
        logging.getLogger(name).handlers.clear()
    lines = [line.split("] ", 1)[1] for line in said.getvalue().splitlines()]
    assert lines == ["rank 1: its own", "rank 0: from the data", "rank 0: its own", "rank 0: a child's, alike"]


def test_a_test_that_launches_ranks_without_the_ranks_mark_is_stopped():
    """Every launch of ranks asks conftest's free_port for its port; a test without RANKS is stopped there, naming the
    mark, where it would run beside the other such tests and time out now and then on two cores."""
    from tests.conftest import free_port

    with pytest.raises(pytest.fail.Exception, match=r"launches ranks: mark it @RANKS"):
        free_port()
