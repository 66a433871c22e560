"""The throughput figures a run logs and summary.json keeps: the meter's steady window at its edges, peak memory, and
what the trainer charges and counts."""

from __future__ import annotations

import json
import time

import pytest
import torch

from alignlm.pipeline import run
from alignlm.training import throughput, trainer
from alignlm.training.throughput import Meter, model_flops_per_token
from alignlm.training.trainer import StopTraining, Trainer
from tests.conftest import compose, fake_monitor, tiny_overrides


def test_a_meter_fetched_just_as_its_warm_up_ends_gives_the_overall_rates(monkeypatch):
    """A fetch that lands on the last warm-up step (``logging.every`` equal to it) has no steady window yet: its rows
    carry the rates over the steps so far, not zero."""
    clock = iter([100.0, 112.0])  # construction, then the settle after the fetch
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    meter = Meter(warmup=3)
    for at in (101.0, 104.0, 107.0):
        meter.add(4, 40, at=at, flops=300.0)
    meter.settle()
    assert meter.rates() == pytest.approx((12 / 12.0, 120 / 12.0, 900 / 12.0))


def test_a_checkpoint_written_right_after_the_warm_up_is_left_out_of_the_steady_window(monkeypatch):
    """The window opens at the last warm-up step: a save right after it is time spent on something else, as a later
    one is."""
    clock = iter([100.0, 110.0, 130.0])
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    meter = Meter(warmup=1)
    meter.add(4, 40, at=101.0)  # the warm-up step: the window opens at its issue
    meter.settle()
    meter.leave_out(5.0)
    meter.add(4, 40, at=120.0)
    meter.settle()
    assert meter.rates()[0] == pytest.approx(4 / (130.0 - 101.0 - 5.0))


def test_peak_memory_is_the_devices_peak_not_what_it_holds_now(monkeypatch):
    """``memory/peak_gib`` and summary.json's peak: the most the device's tensors held, not what they hold at the read."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2**30)
    assert throughput.peak_memory_gib(torch.device("cuda", 0)) == 3.0
    assert throughput.peak_memory_gib(torch.device("cpu")) is None


def test_each_stage_counts_its_peak_memory_afresh_and_its_rates_in_real_tokens(colour_set, tmp_path, monkeypatch):
    """Each stage's peak starts afresh (a later stage reported an earlier, bigger one's), and summary.json's
    ``tokens_per_s`` counts tokens, many per sample."""
    resets: list[torch.device] = []
    monkeypatch.setattr(trainer, "reset_peak_memory", resets.append)
    summary = run(compose(*tiny_overrides(colour_set, tmp_path), "eval.sets=[]"))
    assert len(resets) == 2  # pretrain, finetune
    for stage in ("pretrain", "finetune"):
        rates = summary["stages"][stage]
        assert rates["tokens_per_s"] > 10 * rates["samples_per_s"] > 0


def test_a_cached_stage_charges_no_tower_and_the_clock_stops_after_the_fetch(colour_set, tmp_path, monkeypatch):
    """With the feature cache the tower does not run in the stage, so its FLOPs are not charged; and the meter's
    clock stops once the fetch has waited for the device, not before (on a GPU the steps still running would be
    left out of the time, the rates too high)."""
    built: list[tuple[Trainer, torch.nn.Module]] = []
    events: list[str] = []
    setup, fetch, settle = Trainer.setup_optimization, Trainer.fetch, Meter.settle

    def recording_setup(self, model, dataset):
        built.append((self, model))
        return setup(self, model, dataset)

    def slow_fetch(self, pending):
        rows = fetch(self, pending)
        time.sleep(0.01)
        events.append("fetched")
        return rows

    monkeypatch.setattr(Trainer, "setup_optimization", recording_setup)
    monkeypatch.setattr(Trainer, "fetch", slow_fetch)
    monkeypatch.setattr(Meter, "settle", lambda self: (events.append("settled"), settle(self))[1])
    overrides = [
        "run=[pretrain]",
        "eval.sets=[]",
        "stages.pretrain.max_steps=3",
        "stages.pretrain.data.feature_cache=true",
    ]
    run(compose(*tiny_overrides(colour_set, tmp_path), *overrides))
    ((stage, model),) = built
    assert stage.flops_per_token == pytest.approx(model_flops_per_token(model, tower_runs=False, head=False))
    assert stage.flops_per_token < model_flops_per_token(model, head=False)
    assert events and events == ["fetched", "settled"] * (len(events) // 2)


def test_a_resumed_stage_starts_its_meter_from_the_checkpoints_steady_state(colour_set, tmp_path, monkeypatch):
    """The segment after a resume adds its steady state to the earlier segments' (the checkpoint carries them), so
    summary.json's rates cover the whole stage."""
    base = tiny_overrides(colour_set, tmp_path, "run=[pretrain]", "stages.pretrain.max_steps=7", "eval.sets=[]")
    with pytest.raises(StopTraining, match="after step 5"):
        run(compose(*base, "stop_after_steps=5"))
    state = tmp_path / "t" / "pretrain" / "checkpoints" / "step_000005" / "trainer_state.json"  # the newest
    written = json.loads(state.read_text())["throughput"]
    assert written[0] == 2 * 4  # steps 4 and 5 of 4 samples, after the warm-up's 3
    earlier: list[object] = []
    init = Meter.__init__
    monkeypatch.setattr(
        Meter, "__init__", lambda self, *a, **k: (earlier.append(k.get("earlier")), init(self, *a, **k))[1]
    )
    run(compose(*base))
    assert earlier == [written]


def test_the_monitors_time_share_is_its_measurement_over_the_time_since_the_last(monkeypatch):
    """``monitor/time_share``: the measurement's seconds over all the seconds since the previous measurement ended,
    the measurement included (a share of the run's time, at most 1)."""
    from types import SimpleNamespace

    from alignlm.training import monitor

    clock = iter([10.0, 12.0])  # the measurement starts 10 s after the last one ended and takes 2 s
    monkeypatch.setattr(monitor.time, "perf_counter", lambda: next(clock))
    zero = torch.zeros(2, 3)
    features = SimpleNamespace(visual_mean=zero, text_mean=zero, a_scores=None, layers={})
    monkeypatch.setattr(monitor, "extract", lambda *args: features)
    monkeypatch.setattr(monitor, "probe_metrics", lambda *args, **kwargs: {})
    monkeypatch.setattr(monitor, "flat", lambda values: {"pooled/cka": 0.5})
    fake = fake_monitor()
    row = monitor.AlignmentMonitor.__call__(fake, 1, torch.nn.Linear(1, 1))
    assert row["monitor/seconds"] == 2.0 and row["monitor/time_share"] == pytest.approx(2.0 / 12.0)
    assert fake.last == 12.0
