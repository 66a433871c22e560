"""Preference optimisation on pairs of answers to one prompt: DPO, its conservative variant, and IPO.

With ``h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))`` over the summed log-probabilities
of the chosen (``y_c``) and rejected (``y_r``) answers' tokens (masks from the template, the final answer only):

- ``sigmoid`` (DPO, Rafailov et al. 2023): ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``; ``eps`` is
  ``label_smoothing``, > 0 giving conservative DPO (a share ``eps`` of the labels assumed flipped);
- ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 beta))^2``, which does not push the margin to infinity; it has no labels
  to smooth, so ``label_smoothing`` > 0 with it is refused (it was ignored).

The reference is the stage's starting model. When every trained parameter is a LoRA adapter, it is the model itself
with its adapters disabled (no second copy in memory); otherwise a frozen copy taken when the stage starts (kept out
of the objective's state, so checkpoints do not carry it). Under mixed precision the copy's linear layers are stored
in the autocast dtype at its first use (``models/precision.py``): autocast casts them to it at every use anyway, so
its log-probabilities are the same numbers, and the copy of a 7B LLM takes 13 GiB less than in float32. Logged per step: the implicit rewards
``beta (log pi - log ref)`` of both answers, their margin, the share of pairs whose chosen answer has the higher
reward, and both answers' log-probabilities.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from alignlm.config import POSITIVE
from alignlm.models.precision import frozen_linears, store_weight
from alignlm.objectives.base import LossTerm, Objective
from alignlm.objectives.pairs import zero_loss

LOSSES = ("sigmoid", "ipo")
REFERENCES = ("auto", "adapters", "copy")


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The per-pair loss of the module docstring from summed log-probabilities ``[pairs]``."""
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"dpo loss={loss!r} is not known; choose one of {list(LOSSES)}")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Every LoRA-wrapped part of ``model`` answering with its base weights only."""
    with contextlib.ExitStack() as stack:
        for part in model.children():
            if hasattr(part, "disable_adapter"):  # a peft model
                stack.enter_context(part.disable_adapter())
        yield


class PreferenceObjective(Objective):
    """DPO / conservative DPO / IPO over the batch's (chosen, rejected) pairs (``data.preference: true``)."""

    name = "dpo"
    requires_batch_keys = ("pair", "chosen")
    needs_sample_logps = True
    metric_names = (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "logps/chosen",
        "logps/rejected",
    )

    def __init__(
        self,
        beta: Annotated[float, POSITIVE] = 0.1,
        loss: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference: str = "auto",
    ) -> None:
        super().__init__()
        POSITIVE.check("dpo beta", beta)
        if loss not in LOSSES:
            raise ValueError(f"dpo loss={loss!r} is not known; choose one of {list(LOSSES)}")
        if reference not in REFERENCES:
            raise ValueError(f"dpo reference={reference!r} is not known; choose one of {list(REFERENCES)}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"dpo needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        if loss == "ipo" and label_smoothing > 0:  # IPO's squared loss has no labels to smooth: it was ignored
            raise ValueError(
                f"dpo label_smoothing={label_smoothing} is conservative DPO's, of loss=sigmoid; loss=ipo has no "
                "labels to smooth and would ignore it: set label_smoothing=0 for loss=ipo, or loss=sigmoid"
            )
        self.beta, self.loss, self.label_smoothing, self.reference = (
            float(beta),
            loss,
            float(label_smoothing),
            reference,
        )

    def setup(self, model: nn.Module, dataset: Any) -> None:
        """Choose the reference (see the module docstring) from what the stage trains."""
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        adapters_only = bool(trained) and all("lora_" in n for n in trained)
        if self.reference == "adapters" and not adapters_only:
            raise ValueError(
                "dpo reference=adapters needs a stage whose only trained parameters are LoRA adapters (parts: llm: "
                f"lora, the others frozen); this one also trains {[n for n in trained if 'lora_' not in n][:3]}. "
                "Use reference=copy (or auto)"
            )
        if self.reference == "auto":
            self.reference = "adapters" if adapters_only else "copy"
        if self.reference == "copy":
            frozen = copy.deepcopy(model).eval().requires_grad_(False)
            object.__setattr__(self, "frozen_reference", frozen)  # not a submodule: never saved, never stepped
            self.reference_dtype: torch.dtype | None = None  # what its linear weights were stored in (None: as copied)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Any], model: nn.Module) -> torch.Tensor:
        if self.reference == "adapters":
            with adapters_disabled(model):
                return model(batch, sample_logps=True).sample_logps
        device = batch["input_ids"].device.type
        # once, not at every step: walking a 7B model's modules per micro-batch is host time the step does not need
        if torch.is_autocast_enabled(device) and self.reference_dtype != torch.get_autocast_dtype(device):
            self.reference_dtype = torch.get_autocast_dtype(device)
            for linear in frozen_linears(self.frozen_reference):
                store_weight(linear, self.reference_dtype)
        return self.frozen_reference(batch, sample_logps=True).sample_logps

    def forward(self, batch: dict[str, Any], out: Any, model: nn.Module) -> LossTerm:
        if batch.get("pair") is None:  # a rank's stand-in for a micro-batch of bad data: in step, nothing learned
            return LossTerm(0.0 * out.lm_loss + zero_loss(out))
        pairs = int(batch["num_samples"]) // 2  # both answers of a pair are kept or skipped together
        chosen = batch["chosen"].to(out.sample_logps.dtype)

        def split(logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Per pair (scatter-adds, no host sync): the chosen and the rejected answer's log-probability."""
            zeros = logps.new_zeros(pairs)
            return zeros.index_add(0, batch["pair"], logps * chosen), zeros.index_add(
                0, batch["pair"], logps * (1 - chosen)
            )

        policy_c, policy_r = split(out.sample_logps)
        ref_c, ref_r = split(self.reference_logps(batch, model))
        loss = preference_loss(policy_c, policy_r, ref_c, ref_r, self.beta, self.loss, self.label_smoothing)
        reward_c, reward_r = self.beta * (policy_c - ref_c).detach(), self.beta * (policy_r - ref_r).detach()
        metrics = {
            "rewards/chosen": reward_c.mean(),
            "rewards/rejected": reward_r.mean(),
            "rewards/margin": (reward_c - reward_r).mean(),
            "rewards/accuracy": (reward_c > reward_r).float().mean(),
            "logps/chosen": policy_c.detach().mean(),
            "logps/rejected": policy_r.detach().mean(),
        }
        return LossTerm(loss.mean(), metrics)
