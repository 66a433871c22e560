"""Sharded data parallelism (``distributed.strategy: fsdp2``): parameters, gradients and optimizer state split over
the ranks with PyTorch's FSDP2 (``fully_shard``), on the CPU (gloo) as on GPUs (NCCL), one code path for both.

Why alignlm shards the model itself rather than through accelerate's FSDP plugin: accelerate applies FSDP only to
GPU process groups, so a CPU run (and every test) would take another path than a GPU run.

Units. Each unit gathers its parameters for its own forward and frees them after (``reshard_after_forward``):
every decoder layer, the vision tower, the connector and each extra input part; the root (``AlignLM``) keeps the
rest of the LLM (token embeddings, final norm, LM head), which ``AlignLM.forward`` uses piecemeal (it embeds the
tokens itself, and the chunked loss reads the head's weight) and which the root's own forward gathers. A unit holds one dtype (FSDP2 needs it), which the layout gives: a frozen part stored in
bf16 is a unit of its own.

Checkpoints gather the whole weights (buffers included: FSDP2 leaves them whole) and optimizer state on rank 0
(:func:`full_state`, :func:`optimizer_state`) and write the same files as unsharded training; resume loads them back
into the shards. The alignment monitor, which calls the parts outside a forward, is not available under FSDP2.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from alignlm.models.io import check_known_keys, load_part_state
from alignlm.models.loading import finite
from alignlm.training import zero

STRATEGIES = ("ddp", "fsdp2", *zero.STAGES)  # zero2 / zero3: DeepSpeed (training/zero.py)


def decoder_layers(llm: nn.Module) -> list[nn.Module]:
    """The decoder's repeated blocks: the ``ModuleList`` holding the classes transformers marks as not to be split."""
    names = set(getattr(llm, "_no_split_modules", None) or [])
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else llm
    for module in decoder.modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in names:
            return list(module)
    layers = getattr(decoder, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as units, innermost first; the model itself is the root, added by :func:`shard`."""
    out: list[nn.Module] = decoder_layers(model.llm)
    out += [model.vision, model.connector]
    out += [getattr(model, name) for name in getattr(model, "extras", {})]
    return [m for m in out if any(True for _ in m.parameters())]


def shard(model: nn.Module, device: torch.device, reshard_after_forward: bool = True) -> None:
    """Shard ``model`` in place over every rank of the default process group (a one-rank group when the run has no
    launcher: FSDP2 at world size 1 still shards nothing but keeps the same code path)."""
    if not torch.distributed.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    # FSDP2 warns that a unit returns a view (its pre-backward hook would be lost on an in-place change of it);
    # alignlm never changes a part's output in place, so the warning (one per unit and step) says nothing here
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for unit in units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's whole state dict on CPU, on rank 0 (empty elsewhere); a collective under FSDP2, every rank calls it.
    None for a model that is not sharded: its own tensors are whole."""
    if not is_sharded(model):
        return None
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients without reducing them (every micro-batch but the last), as DDP's ``no_sync``."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_gradients(groups: Sequence[Iterable[nn.Parameter]], max_norm: float) -> torch.Tensor:
    """Clip the gradients of every group by one global norm and return it (as DeepSpeed clips everything it steps):
    the model's parameters (shards under FSDP2, their norm taken over every rank) and the objectives' own."""
    params = [list(g) for g in groups]
    groups = [[p for p in g if p.grad is not None] for g in params]
    norms = [full_value(torch.nn.utils.get_total_norm([p.grad for p in g])) for g in groups if g]
    if not norms:  # on the parameters' device, like the norm of a step that has gradients (the log stacks them)
        return torch.zeros((), device=next((p.device for g in params for p in g), None))
    total = torch.linalg.vector_norm(torch.stack(norms))
    for g in groups:
        if g:
            torch.nn.utils.clip_grads_with_norm_(g, max_norm, total)
    return total


def full_value(x: Any) -> Any:
    """A sharded scalar (the gradient norm over DTensor gradients) as a plain tensor."""
    return x.full_tensor() if isinstance(x, DTensor) else x


def optimizer_owner(model: nn.Module, objectives: nn.Module | None) -> nn.Module:
    """The module that holds every parameter the optimizer steps (the model's and the objectives'), which names them
    in a sharded optimizer state."""
    return nn.ModuleDict({"model": model, "objectives": objectives if objectives is not None else nn.ModuleDict()})


def optimizer_state(owner: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state to save (``owner``: :func:`optimizer_owner`): whole, on CPU (a collective under FSDP2)."""
    if not is_sharded(owner["model"]):
        return optimizer.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(owner, optimizer, options=options)


def load_optimizer_state(owner: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore what :func:`optimizer_state` saved (under FSDP2 every rank reads it and keeps its shard)."""
    if not is_sharded(owner["model"]):
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(owner, optimizer, state, options=StateDictOptions(full_state_dict=True))


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole weights (``part.param`` keys, a subset of the model's) into the model, sharded or not."""
    if zero.is_partitioned(model):
        check_known_keys(state, model.state_dict())
        zero.load_weights(model, state)
        return
    if not is_sharded(model):
        load_part_state(model, state, [])
        return
    check_known_keys(state, model.state_dict())
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def nonfinite_trainable(model: nn.Module) -> list[str]:
    """Names of trainable parameters holding a non-finite value; under FSDP2 and ZeRO-3 each rank checks its shard
    (gather the lists over ranks for the answer)."""
    bad = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            local = p.to_local() if isinstance(p, DTensor) else getattr(p, "ds_tensor", p)
            if not finite(local.detach()):
                bad.append(name)
    return bad
