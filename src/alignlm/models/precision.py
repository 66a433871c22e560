"""Which weights may be stored in half precision without changing a number of the step.

Under autocast a linear layer's weight (and bias) is cast to the autocast dtype at every use, so storing a frozen
linear layer in that dtype computes the same matmuls in half the memory, without re-casting at every step.
Embeddings and norms are not cast by autocast and keep their dtype, and so does a linear layer's bias: autocast casts
it too, but DeepSpeed ZeRO-3 replaces ``torch.nn.functional.linear`` (for the whole process) by a matmul in the
autocast dtype plus the bias added in the bias's own dtype, where a bf16 bias rounded otherwise than an fp32 one.
"""

from __future__ import annotations

import torch


def frozen_linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    """The linear layers of ``module`` that nothing trains, less any whose weight a layer of another kind shares (a head
    tied to the token embeddings: the table is also read by lookup, where autocast casts nothing)."""
    shared = {
        id(p) for m in module.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)
    }
    return [
        m
        for m in module.modules()
        if isinstance(m, torch.nn.Linear)
        and not any(p.requires_grad or id(p) in shared for p in m.parameters(recurse=False))
    ]


def store_weight(linear: torch.nn.Linear, dtype: torch.dtype) -> None:
    """Store ``linear``'s weight (not its bias: see the module docstring) in ``dtype``, in place."""
    linear.weight.data = linear.weight.data.to(dtype)
