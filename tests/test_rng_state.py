"""A step checkpoint's per-rank RNG file on a CUDA machine, simulated on the CPU: torch's own torch.cuda RNG functions
run against stand-in generators, one per visible GPU, with CUDA "initialised" and the current device set as accelerate
sets it (each process its own)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.cuda.random as cuda_random

from alignlm.training.checkpoint import rng_state, set_rng_state


class Generator:
    """What torch.cuda.default_generators holds for one visible GPU: a state to get and set."""

    def __init__(self, state: int) -> None:
        self.state = torch.full((16,), state, dtype=torch.uint8)

    def get_state(self) -> torch.Tensor:
        return self.state.clone()

    def set_state(self, state: torch.Tensor) -> None:
        self.state = state.clone()


def gpus(monkeypatch: pytest.MonkeyPatch, visible: int, current: int) -> list[Generator]:
    """A process that sees ``visible`` GPUs and trains on ``current``; the generators, their states 10, 11, ..."""
    generators = [Generator(10 + i) for i in range(visible)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "default_generators", tuple(generators))
    for module in (torch.cuda, cuda_random):
        monkeypatch.setattr(module, "current_device", lambda: current)
        monkeypatch.setattr(module, "device_count", lambda: visible)
    monkeypatch.setattr(cuda_random, "_lazy_init", lambda: None)
    monkeypatch.setattr(cuda_random, "_lazy_call", lambda callback, **kwargs: callback())
    monkeypatch.setattr(cuda_random, "is_initialized", lambda: True)
    return generators


def saved_by(monkeypatch: pytest.MonkeyPatch, visible: int, current: int, tmp_path) -> dict:
    """The RNG file a process seeing ``visible`` GPUs and training on ``current`` writes, read back as a resume does."""
    gpus(monkeypatch, visible, current)
    torch.save(rng_state(), tmp_path / "rng_0.pt")
    return torch.load(tmp_path / "rng_0.pt", weights_only=True)


@pytest.mark.parametrize(
    "written,resumed",
    [
        ((2, 1), (1, 0)),  # rank 1 of 2 GPUs, resumed where it sees its GPU alone (one GPU per task): once IndexError
        ((2, 0), (1, 0)),  # one process on a 2-GPU node, resumed with CUDA_VISIBLE_DEVICES=0: once IndexError
        ((1, 0), (4, 3)),  # one GPU per task, resumed as rank 3 seeing 4: once restored onto device 0, not 3
    ],
)
def test_a_resume_restores_the_cuda_state_of_the_device_it_trained_on_onto_the_one_it_trains_on(
    monkeypatch, tmp_path, written, resumed
):
    """Only the training device's generator is saved, and restored onto the device the resumed process trains on,
    however many GPUs either process saw; the others are left alone."""
    state = saved_by(monkeypatch, *written, tmp_path)
    generators = gpus(monkeypatch, *resumed)
    set_rng_state(state)
    device = resumed[1]
    assert generators[device].state.tolist() == [10 + written[1]] * 16
    assert all(g.state.tolist() == [10 + i] * 16 for i, g in enumerate(generators) if i != device)


@pytest.mark.parametrize("saw,visible,current,entry", [(2, 2, 1, 1), (2, 1, 0, 0), (1, 3, 2, 0)])
def test_an_older_checkpoint_with_every_visible_gpus_state_resumes_from_the_own_entry(
    monkeypatch, saw, visible, current, entry
):
    """Older RNG files hold a list, one state per GPU the writer saw: the entry of the device the process trains on,
    or the only one, is restored onto it."""
    generators = gpus(monkeypatch, visible, current)
    old = [torch.full((16,), 100 + i, dtype=torch.uint8) for i in range(saw)]
    set_rng_state({"cpu": torch.get_rng_state(), "cuda": old})
    assert generators[current].state.tolist() == [100 + entry] * 16


def test_an_older_checkpoint_without_a_state_for_this_device_starts_the_cuda_generator_fresh_and_says_so(
    monkeypatch, caplog
):
    """Rank 2 of 3 resuming a list written by a process that saw 2 GPUs: no state of its own, a warning, no crash."""
    generators = gpus(monkeypatch, 3, 2)
    monkeypatch.setattr(logging.getLogger("alignlm"), "propagate", True)  # get_logger may have turned it off
    old = [torch.full((16,), 100 + i, dtype=torch.uint8) for i in range(2)]
    with caplog.at_level(logging.WARNING, logger="alignlm"):
        set_rng_state({"cpu": torch.get_rng_state(), "cuda": old})
    assert [g.state.tolist()[0] for g in generators] == [10, 11, 12]
    assert "CUDA generator states for 2 GPUs, none for this process's cuda:2" in caplog.text
    assert "starts fresh" in caplog.text
