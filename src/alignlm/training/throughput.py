"""Throughput figures: model FLOPs per token, the accelerator's peak, and a steady-state meter.

Model FLOPs per real (non-padding) token, the formula every alignlm figure uses (:func:`model_flops_per_token`): the
standard one of PaLM's appendix B and Megatron-LM, ``6 N + 12 L d s`` when everything trains, with each part charged
for the passes it takes, the LM head per supervised position (:func:`head_flops_per_target`). MFU = achieved model
FLOP/s / (peak FLOP/s of the device x devices).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from alignlm.data.collate import attended_pairs

# dense bf16 peak TFLOP/s per device, by the first name here that torch.cuda.get_device_name() holds as whole words
# (the PCIe and NVL cards, clocked lower, before the SXM ones whose names they contain; whole words, or an L40 read
# as an L4 and its MFU came out 1.5x too high)
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200 NVL": 835.0,
    "GH200": 989.0,
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "A10G": 125.0,
    "L4": 121.0,
}
WARMUP_STEPS = 3  # steps left out of the steady-state figures (allocator growth, kernel selection, compilation)


def model_flops_per_token(model: nn.Module, tower_runs: bool = True, attended: float = 0.0, head: bool = True) -> float:
    """Model FLOPs per real token of an ``AlignLM`` in its current train/freeze state, the sum of two terms.

    Weights: ``2 x m x n`` for each parameter ``n`` of every part but its embedding tables (a lookup is no matmul;
    an LM head tied to the input embedding is a matmul and counts), the forward pass's multiply-adds, with ``m`` 3 for
    a trained parameter (forward, activation gradient, weight gradient), 2 for a frozen one that gradients flow back
    through (a trained parameter in its part or upstream: the tower before the connector, every part before the
    LLM), 1 for a frozen one they do not reach. Biases and norms count as in the usual ``6 N`` (a rounding).
    Attention: ``2 x 2 x L x d x attended`` forward (``QK^T`` and ``AV`` over the ``attended`` positions a token sees
    on average, :func:`attended_positions`; ``L`` layers, ``d`` = query heads x head size), x3 where gradients flow
    back through the LLM (both products' gradients are activation gradients), else x1; ``attended`` 0 leaves it out.
    Where a visual hook supplies the tower's output (``tower_runs`` False: cached features, a method's embeddings in
    place of images) the tower does not run and is not counted. Two approximations: the tower and connector are
    charged for every token, text tokens included (each visual token does pass through them, about once; overstates
    by ``2 x tower x text share``, 0.2 % of a 7B stage 1's FLOPs, 2.3 % of the 1.1B finetune's in the benchmark), and
    the tower's own attention is left out (understates by 0.2 % and 0.6 %). ``head`` False leaves the LM head out:
    the trainer charges it per supervised position instead (:func:`head_flops_per_target`).
    """
    left_out = set() if head else {id(p) for p in lm_head_parameters(model)}
    parts = {name: getattr(model, name) for name in model.PARTS if tower_runs or name != "vision"}
    trains = {name: any(p.requires_grad for p in part.parameters()) for name, part in parts.items()}
    upstream = {"connector": ("vision",), "llm": tuple(parts)}  # the parts a part's input comes from (and itself)
    backward = {name: any(trains.get(n, False) for n in (name, *upstream.get(name, ()))) for name in parts}
    flops = 0.0
    for name, part in parts.items():
        flops += sum(
            2 * p.numel() * (3 if p.requires_grad else 2 if backward[name] else 1)
            for p in matmul_parameters(part)
            if id(p) not in left_out
        )
    cfg = model.llm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * attended
    return flops + attention * (3 if backward["llm"] else 1)


def head_flops_per_target(model: nn.Module, tower_runs: bool = True) -> float:
    """The LM head's share of :func:`model_flops_per_token`, which the trainer charges per supervised position, not
    per token: alignlm computes logits only where a label is (``models/lm_loss.py``), and model FLOPs are the work
    the model needs, so the head's product at every other position is no model FLOP (it had been charged at every
    token: 5 % of the 1.1B finetune's FLOPs at 32k words and 13 % of its tokens supervised, far more at 152k)."""
    return model_flops_per_token(model, tower_runs) - model_flops_per_token(model, tower_runs, head=False)


def lm_head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the LLM's output projection (a LoRA adapter on it included)."""
    head = model.llm.get_output_embeddings()
    return list(head.parameters()) if head is not None else []


def matmul_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters a token's forward pass multiplies by: all but embedding tables, plus a head tied to one."""
    tables = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    tied = [m.weight for m in module.modules() if isinstance(m, nn.Linear) and id(m.weight) in tables]
    return [p for p in module.parameters() if id(p) not in tables] + tied


def attended_positions(lengths: Iterable[int]) -> float:
    """The mean number of positions a real token attends to: :func:`attended_pairs` over the tokens."""
    lengths = list(lengths)
    return attended_pairs(lengths) / max(1, sum(lengths))


def attention_flops_per_pair(model: nn.Module, tower_runs: bool = True) -> float:
    """The attention term of :func:`model_flops_per_token` per attended (query, key) pair: a step's model FLOPs are
    ``tokens x model_flops_per_token(model) + pairs x attention_flops_per_pair(model)``."""
    return model_flops_per_token(model, tower_runs, 1.0) - model_flops_per_token(model, tower_runs, 0.0)


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
    return next((v for k, v in PEAK_TFLOPS.items() if re.search(rf"(?<![A-Za-z0-9]){k}(?![A-Za-z0-9])", name)), None)


class Meter:
    """Samples, tokens and model FLOPs per second over the steps after the first ``warmup`` (whole run while still
    warming up).

    Logged values reach the host in batches (every ``logging.every`` steps), so a step's counts arrive long after it
    ran: each step is added with the host time it was issued at, and the clock stops at :meth:`settle`, called once
    the device has finished the added steps (right after a fetch), never at the moment the counts happen to arrive.
    """

    def __init__(self, warmup: int = WARMUP_STEPS, earlier: Sequence[float] | None = None) -> None:
        """``earlier``: the steady-state samples, tokens, model FLOPs and seconds of the stage's earlier segments
        (a resumed run's, from its checkpoint: :meth:`steady_totals`), which :meth:`stage_rates` adds to this one's."""
        self.warmup = warmup
        self.earlier = list(earlier) if earlier else [0, 0, 0, 0.0]
        self.steps = 0
        self.start = self.end = time.perf_counter()
        self.window = self.start
        self.counts = [0, 0, 0.0]  # samples, tokens, model FLOPs since the window opened
        self.all_counts = [0, 0, 0.0]

    def add(self, samples: int, tokens: int, at: float, flops: float = 0.0) -> None:
        """Record one step, issued at host time ``at`` (``time.perf_counter()``); ``flops``: its model FLOPs, counted
        on the host from its batches (the trainer's ``step_flops``)."""
        self.steps += 1
        step = (samples, tokens, flops)
        self.all_counts = [a + b for a, b in zip(self.all_counts, step)]
        if self.steps == self.warmup:
            self.window = at
            self.counts = [0, 0, 0.0]
        elif self.steps > self.warmup:
            self.counts = [a + b for a, b in zip(self.counts, step)]

    def settle(self) -> None:
        """The added steps are done (the device was just synchronised): the rates are measured up to now."""
        self.end = time.perf_counter()

    def leave_out(self, seconds: float) -> None:
        """Take ``seconds`` spent between settled steps on something else (a checkpoint written: minutes at 7B) out
        of the steady window: steady rates measure training steps, and had fallen 4x on the tiny model saved at every
        step. The warm-up's overall rates and the stage's wall time keep them."""
        if self.steps >= self.warmup:  # else the window opens at a later step's issue time
            self.window += seconds

    def rates(self) -> tuple[float, float, float]:
        """(samples/s, tokens/s, model FLOP/s) up to the last :meth:`settle`: steady state once past the warm-up, else
        overall."""
        steady = self.steps > self.warmup
        counts, since = (self.counts, self.window) if steady else (self.all_counts, self.start)
        elapsed = max(self.end - since, 1e-9)
        return counts[0] / elapsed, counts[1] / elapsed, counts[2] / elapsed

    def steady_totals(self) -> list[float]:
        """Samples, tokens, model FLOPs and seconds of the steady state so far, earlier segments included: what a
        checkpoint keeps for the segment that resumes from it. A segment still warming up adds nothing."""
        mine = [*self.counts, self.end - self.window] if self.steps > self.warmup else [0, 0, 0.0, 0.0]
        return [a + b for a, b in zip(self.earlier, mine)]

    def stage_rates(self) -> tuple[float, float, float]:
        """The whole stage's steady rates over every segment's steady state (each segment's warm-up left out), as
        ``summary.json`` reports them: a resumed stage had reported its last segment's alone, start-up included when
        that segment ended within its warm-up (a requeued job's short last segment, 16x too slow). Overall rates of
        this segment when no segment got past its warm-up."""
        *counts, seconds = self.steady_totals()
        if seconds <= 0:
            return self.rates()
        return counts[0] / seconds, counts[1] / seconds, counts[2] / seconds


def peak_memory_gib(device: torch.device) -> float | None:
    """The most memory the device's tensors have held so far (CUDA), in GiB."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak_memory(device: torch.device) -> None:
    """Start the device's peak-memory count afresh (each stage reports its own peak, not an earlier stage's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
