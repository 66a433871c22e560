"""VLAP's connector: one linear map into the LLM's word-embedding space (optionally without bias)."""

from __future__ import annotations

import torch
from torch import nn

from alignlm.models.connectors.base import Connector, ConnectorOutput


class LinearConnector(Connector):
    """A single ``Linear(Dv, Dl)``: the smallest bridge, so alignment objectives must do the work."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__(in_dim, out_dim)
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, features: torch.Tensor) -> ConnectorOutput:
        return ConnectorOutput(self.proj(features))
