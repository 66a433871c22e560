"""LLaVA's ``mlp{N}x_gelu`` projector: Linear(Dv, Dl), then N-1 times GELU -> Linear(Dl, Dl)."""

from __future__ import annotations

import torch
from torch import nn

from alignlm.models.connectors.base import Connector, ConnectorOutput


def mlp_stack(in_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    """The layer stack shared by the dense connector and each MoE expert (so upcycling copies 1:1)."""
    if depth < 1:
        raise ValueError(f"model.connector.depth={depth} must be >= 1")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class MLPConnector(Connector):
    """Token-wise MLP; ``depth=2`` is LLaVA-1.5's ``mlp2x_gelu``, ``depth=1`` is LLaVA-1's linear projector."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2) -> None:
        super().__init__(in_dim, out_dim)
        self.depth = depth
        self.proj = mlp_stack(in_dim, out_dim, depth)

    def forward(self, features: torch.Tensor) -> ConnectorOutput:
        return ConnectorOutput(self.proj(features))
