"""Which weights may be stored in half precision without changing a number of the step, and which must be fp32.

Under autocast a linear layer's weight (and bias) is cast to the autocast dtype at every use, so storing a frozen
linear layer in that dtype computes the same matmuls in half the memory, without re-casting at every step.
Embeddings and norms are not cast by autocast and keep their dtype, and so does a linear layer's bias: autocast casts
it too, but DeepSpeed ZeRO-3 replaces ``torch.nn.functional.linear`` (for the whole process) by a matmul in the
autocast dtype plus the bias added in the bias's own dtype, where a bf16 bias rounded otherwise than an fp32 one.

Trained weights are the other way round: an optimizer updates a parameter in the parameter's own dtype, so a trained
weight is held in fp32 (mixed precision's master weights; autocast computes in half precision from them) whatever
dtype its part was loaded in (``model.llm.dtype: bfloat16``): a bf16 weight keeps 8 significant bits, and AdamW's
steps of a learning rate of 2e-5 rounded away (after 3 steps 30 % of a bf16 LLM's entries had moved, all of an fp32
one's).
"""

from __future__ import annotations

from collections.abc import Mapping

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


def store_as_built(module: torch.nn.Module, dtypes: Mapping[str, torch.dtype]) -> None:
    """Each parameter of ``module`` named in ``dtypes`` stored in the dtype given there (the one it was built in), in
    place. A model rebuilt from a step checkpoint for evaluation had its trained parts widened to fp32 for training
    (:func:`hold_in_fp32`), where its stage's ``final/`` loads them in the configured dtype: at 7B twice the memory,
    and a step's figures not computed as the final's were."""
    for name, p in module.named_parameters(remove_duplicate=False):
        want = dtypes.get(name)
        if want is not None and p.dtype != want:
            p.data = p.data.to(want)


def hold_in_fp32(module: torch.nn.Module, only_trainable: bool = False) -> None:
    """Every parameter of ``module`` stored in a half-precision dtype (or only those that train) widened to fp32, in
    place: the same ``Parameter`` objects (an optimizer, a wrapper or a tied twin keeps holding them), the same
    values."""
    for p in module.parameters():
        if (p.requires_grad or not only_trainable) and p.is_floating_point() and p.element_size() < 4:
            p.data = p.data.float()
