"""What every loader of weights from a folder checks before the weights are used: a folder is data, never code
(its ``config.json`` may not name a Hub repository of kernels, which transformers would download and run), and its
weights are finite (a NaN surfaced later as a loss of nan, or as an evaluation scoring 0 % with exit status 0)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import PretrainedConfig

from alignlm.config import ConfigError


def refuse_hub_kernel_attention(name_or_path: str) -> None:
    """Refuse a model folder (or Hub model) whose ``config.json`` names a Hub repository as an ``attn_implementation``
    at any level (``text_config.attn_implementation``, a mapping per sub-config): transformers would download and run
    that repository's kernels when it builds the model, without asking for trust_remote_code. transformers never
    writes the key itself, so one there was put by hand; a built-in attention's name (sdpa, eager) is no code and
    stays the folder's choice. Raises ``ConfigError`` naming the file and the key."""
    found = _hub_kernel(PretrainedConfig.get_config_dict(name_or_path)[0], "")
    if found is not None:
        key, value = found
        raise ConfigError(
            f"{name_or_path}/config.json: {key}={value!r} names a Hub repository of kernels, code transformers would "
            "download and run; a model folder is data, never code: remove the key from the file, or set a built-in "
            "attention there (sdpa, eager, flash_attention_2, ...)"
        )


def _hub_kernel(node: Any, key: str) -> tuple[str, Any] | None:
    """The first ``attn_implementation`` under ``node`` (a ``config.json``) holding a name with a ``/`` (transformers'
    Hub kernel form ``<org>/<repo>``), as ``(key, value)``."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        here = f"{key}.{k}" if key else str(k)
        if k == "attn_implementation" and _names_repository(v):
            return here, v
        if (found := _hub_kernel(v, here)) is not None:
            return found
    return None


def _names_repository(value: Any) -> bool:
    """Whether an ``attn_implementation`` value, or any name in it (a mapping per sub-config), holds a ``/``."""
    if isinstance(value, str):
        return "/" in value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return any(_names_repository(v) for v in items)


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or inf before any is copied, naming them: they would surface later as a loss of nan
    or a linear-algebra error in a metric."""
    bad = sorted(k for k, v in state.items() if not finite(v))
    if bad:
        held = [
            name
            for name, test in (("NaN", torch.isnan), ("inf", torch.isinf))
            if any(test(state[k]).any() for k in bad)
        ]
        raise ValueError(
            f"checkpoint weights hold {' and '.join(held)}: {bad[:5]} ({len(bad)} tensors of {source}); nothing was "
            "loaded"
        )


def finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of a tensor is finite, from its least and greatest entries (NaN propagates to both; an
    infinity is one of them): on the CPU 0.3 s per GiB of bf16 weights, where ``isfinite(...).all()`` took 3.5 s,
    about 45 s for a 7B LLM at every load. A complex tensor is read as its real and imaginary parts; an integer or
    bool one is finite."""
    if tensor.numel() == 0 or not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    if tensor.is_complex():  # aminmax has no order for complex numbers; a conjugate view is resolved first
        tensor = torch.view_as_real(tensor.resolve_conj())
    if tensor.element_size() == 1:  # float8 (a quantised folder): aminmax has no kernel, and e8m0's isfinite misses NaN
        tensor = tensor.float()
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))
