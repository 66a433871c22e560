"""The connector contract: visual features ``[B, N, Dv]`` in, LLM-width tokens ``[B, M, Dl]`` out.

A connector may also report auxiliary losses (MoE balancing) and metrics (expert load); the model
passes them on in ``AlignOutput.aux_losses`` so objectives and logs see them without special cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
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

    def num_tokens(self, num_patches: int) -> int:
        """How many visual tokens ``M`` one image becomes; token-preserving connectors return ``N``."""
        return num_patches

    def forward(self, features: torch.Tensor) -> ConnectorOutput:  # pragma: no cover - interface
        raise NotImplementedError
