"""The connector contract: visual features ``[B, N, Dv]`` in, LLM-width tokens ``[B, M, Dl]`` out.

A connector may also report auxiliary losses (MoE balancing) and metrics (expert load); the model
passes them on in ``AlignOutput.aux_losses`` so objectives and logs see them without special cases.

``token_norm`` (``model.visual_token_norm``, set by the model builder) fixes the L2 norm of every output token,
for every connector and every caller (the model, probes, scripts): a connector trained against a frozen LLM
can otherwise lower its loss by inflating its outputs far beyond the LLM's own token embeddings (caption
pretraining on text embeddings reached ~100x in the study of docs/experiments/), a start that later training cannot undo.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ConnectorOutput:
    """Visual tokens plus whatever side losses and metrics the connector wants trained and logged."""

    tokens: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Connector(nn.Module):
    """Base class. Subclasses take ``in_dim`` and ``out_dim`` (filled in by the model) plus their own knobs."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.token_norm: float | None = None  # None: the subclass's outputs as they are
        self.register_forward_hook(_fix_token_norm)

    def num_tokens(self, num_patches: int) -> int:
        """How many visual tokens ``M`` one image becomes; token-preserving connectors return ``N``."""
        return num_patches

    def forward(self, features: torch.Tensor) -> ConnectorOutput:  # pragma: no cover - interface
        raise NotImplementedError


def _fix_token_norm(module: Connector, args: tuple, output: ConnectorOutput) -> ConnectorOutput:
    """Rescale each visual token to ``module.token_norm`` (a hook, so subclasses need not remember to)."""
    if module.token_norm is not None:
        output.tokens = F.normalize(output.tokens, dim=-1) * module.token_norm
    return output
