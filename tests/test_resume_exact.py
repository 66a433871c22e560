"""A stage stopped and resumed ends as the uninterrupted one, or the resume is refused naming why (docs/reliability.md).

Step checkpoints held only the parameters that train: a trained part's buffers (BatchNorm's running statistics) went
back to their values at the stage's start, and final/ wrote those. The weights the checkpoint does not hold (frozen
parts, DPO's reference) come from init_from as it is now: an earlier stage retrained since went on under the
checkpoint's weights without a word. The global batch's split into micro-batches was free on resume, though
per-micro-batch objectives compute another loss over another split. And a resume that changed fused_optimizer took
the checkpoint's kernel (crashing when it had been unfused).
"""

from __future__ import annotations

import json
import shutil
from hashlib import sha256
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from alignlm.pipeline import run
from alignlm.training import checkpoint as ckpt
from alignlm.training.trainer import StopTraining
from tests.conftest import compose, tiny_overrides

# EfficientNet-Lite (BatchNorm throughout) trained fully by the pretraining stage
BATCHNORM_TOWER = (
    "model/vision=efficientnet_lite0",
    "model.vision.weights=null",
    "model.vision.image_size=32",
    "stages.pretrain.parts.vision=full",
    "stages.pretrain.lr.vision=1e-3",
)


def pretrain(colour_set: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """A 3-step pretraining stage alone, no evaluation."""
    return tiny_overrides(colour_set, out, "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=3", *extra)


def stopped(overrides: list[str], steps: int) -> None:
    with pytest.raises(StopTraining):
        run(compose(*overrides, f"stop_after_steps={steps}"))


def as_written_before_buffers(folder: Path, buffers: list[str]) -> None:
    """Make a step checkpoint what an alignlm that saved no buffers wrote: without them in its weights and layout."""
    weights = load_file(str(folder / "trainable.safetensors"))
    save_file({k: v for k, v in weights.items() if k not in buffers}, str(folder / "trainable.safetensors"))
    state = json.loads((folder / "trainer_state.json").read_text())
    state["layout"] = {k: v for k, v in state["layout"].items() if k not in buffers}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    (folder / ckpt.MANIFEST).unlink()
    ckpt.write_manifest(folder)


def test_a_resumed_batchnorm_tower_ends_with_the_uninterrupted_runs_running_statistics(
    colour_set, tmp_path, alignlm_log
):
    """EfficientNet-Lite trained fully: its running statistics are in the step checkpoint and its layout, so the
    resumed final/ equals the uninterrupted one tensor for tensor (147 of 300 differed). A checkpoint written before
    buffers were saved still resumes, the warning naming them."""
    whole = pretrain(colour_set, tmp_path, *BATCHNORM_TOWER, "run_name=whole")
    resumed = pretrain(colour_set, tmp_path, *BATCHNORM_TOWER, "run_name=resumed")
    run(compose(*whole))
    stopped(resumed, 2)
    stage = tmp_path / "resumed" / "pretrain"
    held = load_file(str(ckpt.step_dirs(stage)[-1] / "trainable.safetensors"))
    buffers = [k for k in held if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert buffers and all(k.startswith("vision.") for k in buffers)
    layout = json.loads((ckpt.step_dirs(stage)[-1] / "trainer_state.json").read_text())["layout"]
    assert set(buffers) <= set(layout)
    older = tmp_path / "older" / "pretrain"
    shutil.copytree(stage, older)

    run(compose(*resumed))
    theirs = load_file(str(tmp_path / "whole" / "pretrain" / "final" / "model.safetensors"))
    ours = load_file(str(stage / "final" / "model.safetensors"))
    assert [k for k in theirs if not torch.allclose(theirs[k].float(), ours[k].float(), rtol=1e-5, atol=1e-7)] == []
    assert "holds no buffers" not in alignlm_log.text

    as_written_before_buffers(ckpt.step_dirs(older)[-1], buffers)
    run(compose(*pretrain(colour_set, tmp_path, *BATCHNORM_TOWER, "run_name=older")))
    assert f"{ckpt.step_dirs(older)[-1]} holds no buffers of the parts this stage trains" in alignlm_log.text
    count = next(k for k in buffers if k.endswith("num_batches_tracked"))
    kept = load_file(str(older / "final" / "model.safetensors"))[count]
    assert int(kept) == 1 and int(theirs[count]) == 3  # counted from the stage's start: the one resumed step


def test_a_checkpoint_without_this_ranks_random_state_is_resumed_with_a_warning(colour_set, tmp_path, alignlm_log):
    """A rank the checkpoint's run did not have, or an rng file gone from a checkpoint without a manifest: its random
    draws go on from the seed, not as the uninterrupted run's, which was resumed without a word."""
    base = pretrain(colour_set, tmp_path)
    stopped(base, 2)
    step = ckpt.step_dirs(tmp_path / "t" / "pretrain")[-1]
    (step / "rng_0.pt").unlink()
    (step / ckpt.MANIFEST).unlink()  # written before manifests: its files are trusted as they are
    run(compose(*base))
    assert f"rank 0: {step} holds no random state of this rank (rng_0.pt)" in alignlm_log.text


def test_a_checkpoint_that_recorded_no_settings_is_refused_unless_changes_are_allowed(
    colour_set, tmp_path, alignlm_log
):
    """A step checkpoint of an alignlm from before they recorded their settings (no ``recipe`` in its trainer state)
    was resumed as if its settings were this run's: nothing could differ, and the stage went on along another data
    order and settings without a word. It is refused, saying how to go on; allowed, the warning says so."""
    base = pretrain(colour_set, tmp_path)
    stopped(base, 2)
    step = ckpt.step_dirs(tmp_path / "t" / "pretrain")[-1]
    state = json.loads((step / "trainer_state.json").read_text())
    del state["recipe"]
    (step / "trainer_state.json").write_text(json.dumps(state))
    (step / ckpt.MANIFEST).unlink()
    ckpt.write_manifest(step)
    with pytest.raises(ValueError, match="from before step checkpoints recorded the settings they were trained with"):
        run(compose(*base))
    run(compose(*base, "resume_allow_changes=true"))
    assert "continuing with this run's settings and files (the stage's settings: not recorded -> this run's" in (
        alignlm_log.text
    )
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["stages"]["pretrain"]["steps"] == 3


def test_a_sharded_step_checkpoint_holds_the_trained_buffers_too(colour_set, tmp_path):
    """Under fsdp2 the checkpoint's weights come from the gathered whole state (``sharding.full_state``): the buffers
    of a tower trained fully are there, as the steps left them."""
    stopped(pretrain(colour_set, tmp_path, *BATCHNORM_TOWER, "launcher=fsdp2", "monitor.every=0"), 2)
    held = load_file(str(ckpt.step_dirs(tmp_path / "t" / "pretrain")[-1] / "trainable.safetensors"))
    counts = [int(v) for k, v in held.items() if k.endswith("num_batches_tracked")]
    assert counts and set(counts) == {2}


def test_a_resume_after_its_starting_weights_changed_is_refused_or_allowed_and_still_named(colour_set, tmp_path):
    """finetune stopped after its first step, pretrain retrained under it: its step checkpoint holds what finetune
    trains, the rest (the frozen tower) would come from the new pretrain. Refused, in the finished-stage check's words;
    allowed, it resumes, and final/ records the weights its first segment started from, so a later rerun names the
    change again (as a finished stage kept with resume_allow_changes is)."""
    base = tiny_overrides(colour_set, tmp_path, "stages.pretrain.max_steps=2", "stages.finetune.max_steps=3")
    base += ["eval.sets=[]", "stages.finetune.save_every=1"]
    pretrain_final = tmp_path / "t" / "pretrain" / "final"
    new_lr = "stages.pretrain.lr.connector=5e-3"
    stopped(base, 3)  # pretrain's 2 steps and finetune's first
    first = sha256((pretrain_final / ckpt.TRAINED_FROM).read_bytes()).hexdigest()
    run(compose(*base, "run=[pretrain]", "resume=never", new_lr))  # sets aside pretrain only
    with pytest.raises(ValueError) as refused:
        run(compose(*base, "run=[finetune]"))
    message = str(refused.value)
    assert f"stages.finetune.init_from ({pretrain_final}): its weights changed since this stage trained from them" in (
        message
    )
    assert "resume_allow_changes=true" in message
    run(compose(*base, "run=[finetune]", "resume_allow_changes=true"))
    record = json.loads((tmp_path / "t" / "finetune" / "final" / ckpt.TRAINED_FROM).read_text())
    assert record[f"stages.finetune.init_from{ckpt.START}"]["trained_from sha256"] == first
    with pytest.raises(ValueError, match=r"stages\.finetune\.init_from .*its weights changed"):
        run(compose(*base, new_lr))


def test_another_split_of_the_same_global_batch_on_resume_is_refused_naming_it(colour_set, tmp_path):
    """4 x 1 resumed as 2 x 2: the global batch is the same, but contrastive negatives, the MoE balance loss and
    LoRA's dropout are per micro-batch (the contrastive loss went 7.145 -> 6.766)."""
    base = pretrain(colour_set, tmp_path)
    stopped(base, 2)
    split = ["stages.pretrain.per_device_batch_size=2", "stages.pretrain.grad_accum=2"]
    with pytest.raises(
        ValueError,
        match=r"per_device_batch_size=4, stages\.pretrain\.grad_accum=1, this run has "
        r"stages\.pretrain\.per_device_batch_size=2, stages\.pretrain\.grad_accum=2.*resume_allow_changes",
    ):
        run(compose(*base, *split))
    run(compose(*base, *split, "resume_allow_changes=true"))


def test_a_record_written_while_the_split_was_free_is_not_taken_for_a_change():
    ours = {"stages.pretrain.per_device_batch_size": 4, "stages.pretrain.grad_accum": 1, "seed": 0}
    assert ckpt.recipe_changes({"seed": 0}, ours) == {}
    assert ckpt.recipe_changes(ours | {"stages.pretrain.grad_accum": 2}, ours) == {"stages.pretrain.grad_accum": (2, 1)}


def test_a_resume_that_turns_compilation_on_is_refused_naming_it(colour_set, tmp_path):
    """Compiled layers draw their dropout masks from another random stream: a resume that turned ``compile`` on was
    free, and trained on with other masks (LoRA dropout 0.1: the losses parted at the next step). A record written
    while it was free says nothing of it."""
    base = pretrain(colour_set, tmp_path)
    stopped(base, 2)
    with pytest.raises(
        ValueError, match=r"stages\.pretrain\.compile=False, this run has stages\.pretrain\.compile=True"
    ):
        run(compose(*base, "stages.pretrain.compile=true"))
    ours = {"stages.pretrain.compile": True, "seed": 0}
    assert ckpt.recipe_changes({"seed": 0}, ours) == {}


def test_a_resume_that_turns_the_fused_optimizer_on_trains_fused(colour_set, tmp_path):
    """The checkpoint's parameter groups came back unfused while the trainer read the optimizer's defaults (fused)
    and handed it its skip flag: "Expected grad_scale and found_inf to be None" at the first resumed step."""
    base = pretrain(colour_set, tmp_path)
    stopped([*base, "stages.pretrain.fused_optimizer=false"], 2)
    run(compose(*base, "stages.pretrain.fused_optimizer=true"))
    assert (tmp_path / "t" / "pretrain" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize(("saved", "ours"), [(None, True), (True, None)])
def test_a_loaded_optimizer_state_keeps_this_runs_kernel(saved, ours):
    """Loading restored the checkpoint's ``fused`` in every group: fused stayed fused whatever this run said."""
    model = torch.nn.Linear(3, 2)
    first = torch.optim.AdamW(model.parameters(), fused=saved)
    model(torch.ones(1, 3)).sum().backward()
    first.step()
    second = torch.optim.AdamW(model.parameters(), fused=ours)
    second.load_state_dict(first.state_dict())
    ckpt.keep_kernels(second)
    assert [g["fused"] for g in second.param_groups] == [ours]
    step = second.state[model.weight]["step"]
    assert step.dtype == torch.float32 and step.device == model.weight.device
    second.step()
