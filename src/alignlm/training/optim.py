"""Optimiser and learning-rate schedule for a stage: AdamW per parameter group, warmup then decay."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from alignlm.config import ConfigError
from alignlm.models.mllm import AlignLM
from alignlm.training.stages import param_groups

SCHEDULES = ("cosine", "linear", "constant")


def check_schedule(schedule: Any, key: str = "stage") -> None:
    """``schedule`` is one ``lr_lambda`` knows (checked for every stage before the first trains, and again here)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"{key}.scheduler={schedule!r} is not known; choose one of {list(SCHEDULES)}")


def warmup_steps(ratio: float, total_steps: int) -> int:
    """``ratio`` of the steps, rounded up as transformers' Trainer counts them (LLaVA-1.5's 2,180 steps at 0.03: 66);
    the product is rounded to 6 places first, so 100 x 0.03 (3.0000000000000004 in floating point) is 3, not 4."""
    return math.ceil(round(ratio * total_steps, 6))


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str = "cosine"):
    """Linear warmup then cosine (or constant / linear) decay to zero, as LLaVA trains. The warmup's first update uses
    ``1 / warmup`` of the rate where transformers' uses 0 (an update that changes nothing), so the ramp is one step
    ahead of theirs and reaches the peak one step early; after the warmup the two schedules are the same."""
    check_schedule(schedule)

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return f


def build_optimizer(
    model: AlignLM,
    stage: Mapping[str, Any],
    total_steps: int,
    objective_params: Sequence[torch.nn.Parameter] = (),
    fused: bool | None = None,
):
    """AdamW over the stage's parameter groups (fused when every parameter is on CUDA, unless ``fused=False``: the
    optimizer state will live elsewhere) plus its warmup/decay schedule.

    ``objective_params`` (a learnable contrastive temperature, ...) form one more group at ``stage.lr.objectives``,
    without weight decay: they live outside the model, so a stage config can tune them apart from the parts.
    """
    groups = param_groups(model, stage["lr"], float(stage.get("weight_decay", 0.0)))
    if objective_params:
        if "objectives" not in stage["lr"]:
            raise ValueError("stage.lr.objectives is missing but an objective of this stage has trainable parameters")
        groups.append(
            {
                "params": list(objective_params),
                "lr": float(stage["lr"]["objectives"]),
                "weight_decay": 0.0,
                "name": "objectives",
            }
        )
    params = [p for g in groups for p in g["params"]]
    if fused is None:
        fused = all(p.is_cuda and p.dtype.is_floating_point for p in params)  # one kernel for every tensor on CUDA
    optimizer = torch.optim.AdamW(groups, betas=tuple(stage.get("betas", (0.9, 0.999))), eps=1e-8, fused=fused or None)
    warmup = warmup_steps(float(stage.get("warmup_ratio", 0.03)), total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup, stage.get("scheduler", "cosine"))
    )
    return optimizer, scheduler
