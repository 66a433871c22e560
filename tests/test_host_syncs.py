"""Host synchronisations around the training step: fp16's optimizer step with a fused AdamW, the monitor's clock, and
the stand-in batch for bad data."""

from __future__ import annotations

import types

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer

from alignlm.data.collate import Skipped
from alignlm.training import monitor as monitor_module
from alignlm.training.monitor import AlignmentMonitor
from alignlm.training.trainer import Trainer
from tests.conftest import DeviceWaits, compose, tiny_overrides

# (gradient factor, loss finite, some rank had data): an overflow, ordinary steps, a step of no data (stand-ins: zero
# gradients), a non-finite loss under finite gradients (skipped, and the scaler grows as on an ordinary step)
STEPS = [(float("inf"), False, True), (1.0, True, True), (0.0, True, False), (0.5, True, True), (1.0, False, True)]


def fp16_steps(fused: bool, waits: list[str] | None = None) -> tuple[torch.Tensor, list[tuple[float, int]], list]:
    """``STEPS`` through ``Trainer.optimizer_step`` under a CPU GradScaler, as accelerate's fp16 wraps the optimizer:
    the final weight, the scale and growth count after each step, the optimizer's step counts. ``waits`` collects what
    ``DeviceWaits`` saw inside ``optimizer_step``."""
    weight = torch.nn.Parameter(torch.ones(3))
    inner = torch.optim.AdamW([weight], lr=0.1, fused=fused or None, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1)
    Accelerator(cpu=True)  # the state accelerate's optimizer wrapper reads
    trainer = types.SimpleNamespace(
        optimizer=AcceleratedOptimizer(inner, device_placement=False, scaler=scaler),
        acc=types.SimpleNamespace(scaler=scaler),
    )
    scales = []
    for factor, finite, data in STEPS:
        scaler.scale((weight * factor).sum()).backward()
        scaler.unscale_(inner)  # what accelerate's unscale_gradients does before clipping
        finite_t, data_t = torch.tensor(finite), torch.tensor(data)
        with DeviceWaits() as w:
            Trainer.optimizer_step(trainer, finite_t, data_t)
        if waits is not None:
            waits.extend(w.seen)
        scales.append((scaler.get_scale(), scaler._get_growth_tracker()))
        inner.zero_grad(set_to_none=True)
    steps = [float(s["step"]) for s in inner.state.values()]
    return weight.detach().clone(), scales, steps


def test_an_fp16_step_with_a_fused_optimizer_reads_nothing_back():
    """Under fp16 the skip flag went to the fused kernel only without a loss scaler, and accelerate always makes one:
    the step read ``update`` on the host after the backward. Now the fused kernel takes the flag under the scaler too,
    and the scaler's update (a no-data step keeping its scale) happens on the device."""
    waits: list[str] = []
    fp16_steps(fused=True, waits=waits)
    assert waits == []


def test_an_fp16_step_skips_and_scales_alike_fused_or_not():
    """The fused path's numbers are the host path's (kept for an unfused optimizer): the same updates skipped, the
    same scale and growth count after every step, the same weights (to the kernels' rounding) and step counts."""
    fused_weight, fused_scales, fused_steps = fp16_steps(fused=True)
    weight, scales, steps = fp16_steps(fused=False)
    assert fused_scales == scales == [(2.0**15, 0), (2.0**16, 0), (2.0**16, 0), (2.0**17, 0), (2.0**18, 0)]
    assert fused_steps == steps == [2.0]
    torch.testing.assert_close(fused_weight, weight)
    assert not torch.equal(weight, torch.ones(3))


def test_the_monitor_starts_its_clock_after_the_queued_training_steps(monkeypatch):
    """Its clock started before its first read back to the host, which on a GPU waits for the steps queued before it:
    ``monitor/seconds`` and ``monitor/time_share`` counted training time. The device is synchronised first now."""
    events: list[str] = []
    monitor = AlignmentMonitor({"every": 0}, None)
    monitor.every = 1
    monkeypatch.setattr(monitor_module, "wait_for_device", lambda device: events.append(f"wait {device.type}"))
    monkeypatch.setattr(monitor_module.time, "perf_counter", lambda: events.append("clock") or 0.0)

    def measure(model):
        raise StopIteration("measured")

    monkeypatch.setattr(monitor, "frozen_tower_features", measure)
    with pytest.raises(StopIteration, match="measured"):
        monitor(1, torch.nn.Linear(1, 1))
    assert events == ["wait cpu", "clock"]


def test_waiting_for_the_device_synchronises_cuda_only(monkeypatch):
    synced: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", synced.append)
    monitor_module.wait_for_device(torch.device("cpu"))
    monitor_module.wait_for_device(torch.device("cuda", 1))
    assert synced == [torch.device("cuda", 1)]


def test_the_stand_in_for_bad_data_is_made_once_per_stage_and_pinned_on_cuda(monkeypatch):
    """It was collated in the main process for every bad micro-batch and not pinned, so its ``non_blocking`` copy to
    the GPU waited. Now it is made once, pinned as the loader's batches are."""
    dataset = types.SimpleNamespace(
        tokenizer=types.SimpleNamespace(pad_token_id=0),
        image_token_id=5,
        num_image_tokens=4,
        slots_for=lambda with_images: [],
    )
    pinned: list[torch.Size] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t.shape) or t)
    on_cpu = types.SimpleNamespace(dataset=dataset, acc=types.SimpleNamespace(device=torch.device("cpu")))
    on_cuda = types.SimpleNamespace(dataset=dataset, acc=types.SimpleNamespace(device=torch.device("cuda")))
    batch = Trainer.stand_in_batch.__get__(on_cpu)
    assert Trainer.stand_in_batch.__get__(on_cpu) is batch and not pinned
    cuda_batch = Trainer.stand_in_batch.__get__(on_cuda)
    tensors = [k for k, v in cuda_batch.items() if isinstance(v, torch.Tensor)]
    assert len(pinned) == len(tensors) > 0 and cuda_batch["num_samples"] == 1 and cuda_batch["lm_targets"].numel() == 0


def test_steps_with_bad_micro_batches_share_one_unchanged_stand_in(colour_set, tmp_path, monkeypatch):
    """Two steps whose first micro-batch was all bad data: the stand-in is collated once and no step writes to it."""
    from alignlm.pipeline import make_accelerator
    from alignlm.training import trainer as trainer_module

    cfg = compose(*tiny_overrides(colour_set, tmp_path), "stages.pretrain.grad_accum=2")
    trainer = Trainer(cfg, "pretrain", make_accelerator(cfg))
    trainer.setup()
    batches = iter(trainer.loader())  # its collator made before counting
    made = []
    collator = trainer_module.Collator
    monkeypatch.setattr(trainer_module, "Collator", lambda *a, **k: made.append(1) or collator(*a, **k))
    bad = {"skipped": [Skipped("x", "unreadable image")], "ids": []}
    for step in (1, 2):
        trainer.step([bad, next(batches)], step)
    assert len(made) == 1
    fresh = Trainer.stand_in_batch.func(trainer)
    for key, value in trainer.stand_in_batch.items():
        assert torch.equal(value, fresh[key]) if isinstance(value, torch.Tensor) else value == fresh[key], key
