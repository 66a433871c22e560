"""Weight files of parts of an ``AlignLM``: save, load strictly, and rebuild a model from ``final/``.

Lives with the models (not the trainer) so evaluation and export reload a checkpoint with no training code.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from alignlm.models.build import build_model


def _unique_state(module: nn.Module, prefix: str, only_trainable: bool) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    params = dict(module.named_parameters())
    for name, t in module.state_dict().items():
        if only_trainable and not (name in params and params[name].requires_grad):
            continue
        ptr = t.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[prefix + name] = t.detach().contiguous().cpu()
    return out


def part_state(model: nn.Module, parts: Iterable[str], only_trainable: bool = False) -> dict[str, torch.Tensor]:
    """Weights of the named parts, keyed ``part.param``."""
    state: dict[str, torch.Tensor] = {}
    for part in parts:
        state.update(_unique_state(getattr(model, part), f"{part}.", only_trainable))
    return state


def load_part_state(model: nn.Module, state: dict[str, torch.Tensor], parts: Iterable[str]) -> None:
    """Load part weights strictly: every key of these parts must arrive unless it is tied to one that did.

    A part may define ``adapt_state(sub_state) -> sub_state`` to accept another layout of its weights (the MoE
    connector upcycles a dense connector's weights this way).
    """
    state = adapt_parts(model, state, parts)
    full = model.state_dict()
    wanted = {k for k in full if k.split(".", 1)[0] in set(parts)}
    unknown = set(state) - set(full)
    if unknown:
        raise KeyError(
            f"checkpoint has weights the model lacks (was it built from another config?): {sorted(unknown)[:5]}"
        )
    loaded_ptrs = {full[k].data_ptr() for k in state}
    missing = [k for k in wanted - set(state) if full[k].data_ptr() not in loaded_ptrs]
    if missing:
        raise KeyError(f"checkpoint lacks weights for {sorted(missing)[:5]} ({len(missing)} in all)")
    with torch.no_grad():
        for k, v in state.items():
            full[k].copy_(v.to(full[k].dtype))


def adapt_parts(model: nn.Module, state: dict[str, torch.Tensor], parts: Iterable[str]) -> dict[str, torch.Tensor]:
    """Pass each part's weights through its ``adapt_state`` hook, if it has one."""
    state = dict(state)
    for part in parts:
        adapt = getattr(getattr(model, part, None), "adapt_state", None)
        if adapt is None:
            continue
        prefix = f"{part}."
        sub = {k[len(prefix) :]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        state.update({prefix + k: v for k, v in adapt(sub).items()})
    return state


def final_parts(final_dir: Path) -> list[str]:
    """Which parts a ``final/`` checkpoint carries."""
    with safe_open(str(final_dir / "model.safetensors"), "pt") as f:
        parts = (f.metadata() or {}).get("parts", "")
    return [p for p in parts.split(",") if p]


def load_final_weights(model: nn.Module, final_dir: Path) -> list[str]:
    """Overlay a ``final/`` checkpoint's weights onto a freshly built model; returns the parts loaded."""
    final_dir = Path(final_dir)
    if not (final_dir / "model.safetensors").exists():
        raise FileNotFoundError(f"{final_dir} is not a final checkpoint (no model.safetensors)")
    parts = final_parts(final_dir)
    load_part_state(model, load_file(str(final_dir / "model.safetensors")), parts)
    return parts


def load_model(final_dir: str | Path) -> Any:
    """Rebuild a trained model from a ``final/`` folder: its saved config, then its weights."""
    final_dir = Path(final_dir)
    cfg = OmegaConf.load(final_dir / "config.yaml")
    model = build_model(cfg.model)
    load_final_weights(model, final_dir)
    model.eval()
    return model
