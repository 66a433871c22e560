"""Next-token prediction on the supervised (assistant) tokens: the loss every stage starts from."""

from __future__ import annotations

from typing import Any

from torch import nn

from alignlm.objectives.base import LossTerm, Objective


class LMObjective(Objective):
    """The model's own LM loss (normalised by the global supervised-token count the trainer sets)."""

    name = "lm"
    token_normalized = True

    def forward(self, batch: dict[str, Any], out: Any, model: nn.Module) -> LossTerm:
        return LossTerm(out.lm_loss)
