"""Throughput figures: model FLOPs per token, the accelerator's peak, and a steady-state meter.

Model FLOPs per real (non-padding) token, the formula every alignlm figure uses:
``2 * (all parameters a token passes through)`` for the forward pass, ``+ 2 * (LLM parameters)`` for the activation
gradients that flow back through the LLM to whatever trains before it, ``+ 2 * (trainable parameters)`` for their
weight gradients: the usual ``6 N`` when everything trains, ``4 N`` for LLaVA's stage 1 (frozen LLM and tower).
Where a visual hook supplies the tower's output (cached features, a method's embeddings in place of images) the
tower does not run and is not counted. Two approximations, in opposite directions: attention's own FLOPs (which grow
with sequence length) are left out, as in the usual ``6 N`` convention, which understates; the tower and connector
are charged for every token, text tokens included (each visual token does pass through them, about once), which
overstates by ``2 x tower x text share``: about 0.2 % of a 7B stage 1's FLOPs (a CLIP-L/336 tower, ~9 % text), a
few % of a 1.1B finetune's.
MFU = achieved model FLOP/s / (peak FLOP/s of the device x devices).
"""

from __future__ import annotations

import time

import torch
from torch import nn

# dense bf16 peak TFLOP/s per device, by the first substring of torch.cuda.get_device_name() found here (the PCIe
# and NVL cards, clocked lower, before the SXM ones whose names they contain)
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200 NVL": 835.0,
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
}
WARMUP_STEPS = 3  # steps left out of the steady-state figures (allocator growth, kernel selection, compilation)


def model_flops_per_token(model: nn.Module, tower_runs: bool = True) -> float:
    """The formula of the module docstring, for an ``AlignLM`` in its current train/freeze state; ``tower_runs``
    False: features come from a cache, the tower's parameters pass no token."""
    total = sum(p.numel() for p in model.parameters())
    if not tower_runs:
        total -= sum(p.numel() for p in model.vision.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return float(2 * total + 2 * sum(p.numel() for p in model.llm.parameters()) + 2 * trainable)


def peak_tflops(setting: float | str | None, device: torch.device) -> float | None:
    """``logging.peak_tflops``: a number, ``auto`` (looked up from the name of ``device`` when it is a GPU; None when
    unknown or a CPU, also a CPU rank on a GPU machine), or null."""
    if setting is None:
        return None
    if setting != "auto":
        return float(setting)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class Meter:
    """Samples and tokens per second over the steps after the first ``warmup`` (whole run while still warming up).

    Logged values reach the host in batches (every ``logging.every`` steps), so a step's counts arrive long after it
    ran: each step is added with the host time it was issued at, and the clock stops at :meth:`settle`, called once
    the device has finished the added steps (right after a fetch), never at the moment the counts happen to arrive.
    """

    def __init__(self, warmup: int = WARMUP_STEPS) -> None:
        self.warmup = warmup
        self.steps = 0
        self.start = self.end = time.perf_counter()
        self.window = self.start
        self.counts = [0, 0]  # samples, tokens since the window opened
        self.all_counts = [0, 0]

    def add(self, samples: int, tokens: int, at: float) -> None:
        """Record one step, issued at host time ``at`` (``time.perf_counter()``)."""
        self.steps += 1
        self.all_counts = [self.all_counts[0] + samples, self.all_counts[1] + tokens]
        if self.steps == self.warmup:
            self.window = at
            self.counts = [0, 0]
        elif self.steps > self.warmup:
            self.counts = [self.counts[0] + samples, self.counts[1] + tokens]

    def settle(self) -> None:
        """The added steps are done (the device was just synchronised): the rates are measured up to now."""
        self.end = time.perf_counter()

    def rates(self) -> tuple[float, float]:
        """(samples/s, tokens/s) up to the last :meth:`settle`: steady state once past the warm-up, else overall."""
        if self.steps > self.warmup:
            elapsed = max(self.end - self.window, 1e-9)
            return self.counts[0] / elapsed, self.counts[1] / elapsed
        elapsed = max(self.end - self.start, 1e-9)
        return self.all_counts[0] / elapsed, self.all_counts[1] / elapsed


def peak_memory_gib(device: torch.device) -> float | None:
    """The most memory the device's tensors have held so far (CUDA), in GiB."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak_memory(device: torch.device) -> None:
    """Start the device's peak-memory count afresh (each stage reports its own peak, not an earlier stage's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
