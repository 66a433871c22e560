"""What trains in a stage: each part frozen, fully trained or LoRA-adapted, with its own learning rate.

LoRA wraps the LLM with peft in place; ``merge_lora`` folds it back before a final save, so ``final/``
always holds plain weights that load without peft. A part may define its own modes (``TRAIN_MODES`` and
``set_train_mode``): an extra input part may train one half of itself in one stage and the other half in the next.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from alignlm.config import ConfigError
from alignlm.models.mllm import AlignLM
from alignlm.models.precision import hold_in_fp32

MODES = ("frozen", "full", "lora")
ALL_LINEAR = "all-linear"  # peft's shorthand for every linear layer (``INCLUDE_LINEAR_LAYERS_SHORTHAND``)
LINEAR_LAYERS = (nn.Linear, Conv1D)  # the layers all-linear adapts (peft's ``_maybe_include_all_linear_layers``)
# The layers LoRA can adapt: those peft's ``dispatch_default`` (peft/tuners/lora/layer.py) wraps. For any other type
# ``LoraModel._create_new_module`` raises "Target module ... is not supported" when the stage begins; peft exposes no
# predicate to ask, only that dispatch, which builds the adapter.
LORA_LAYERS = (*LINEAR_LAYERS, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def check_parts(modes: Mapping[str, str], part_modes: Mapping[str, Sequence[str]], key: str = "stage") -> None:
    """``stage.parts`` names only parts the model has, each in a mode that part has (``part_modes``; an empty list
    skips a part whose modes are known only once it is built), and trains the connector fully. The config check
    calls this before the first stage trains, and ``apply_stage`` on the built model."""
    unknown = [p for p in modes if p not in part_modes]
    if unknown:
        raise ConfigError(f"{key}.parts has unknown parts {unknown}; this model's parts are {list(part_modes)}")
    for part, mode in modes.items():
        if part_modes[part] and mode not in part_modes[part]:
            raise ConfigError(f"{key}.parts.{part}={mode!r} is not known; choose one of {list(part_modes[part])}")
    if modes.get("connector") == "lora":
        raise ConfigError(f"{key}.parts.connector=lora is not supported; train the connector fully")


@dataclass(frozen=True)
class InertTensors:
    """Tensors of a model that its output never depends on, by full name as the model (LoRA-wrapped or not) and its
    checkpoints name them: the trained parts' inert parameters, and the sub-modules whose own parameters are all
    inert (``modules``). An adapter in one of those could only be one an earlier alignlm put there (it adapted every
    linear layer), trained without a gradient. A checkpoint's tensors among them change nothing the model computes,
    so an evaluation may leave them out, and a resume can say why the checkpoint does not fit."""

    parameters: frozenset[str] = frozenset()
    modules: frozenset[str] = frozenset()

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is an inert parameter, or a LoRA tensor (``...<module>.lora_A.default.weight``) of an
        inert module."""
        if not isinstance(name, str):
            return False
        if name in self.parameters:
            return True
        components = name.split(".")
        return any(
            components[i].startswith("lora_") and ".".join(components[:i]) in self.modules
            for i in range(1, len(components))
        )


def apply_stage(model: AlignLM, parts: Mapping[str, str], lora: Mapping[str, Any] | None = None) -> InertTensors:
    """Set ``requires_grad`` per part and inject LoRA where asked; frozen parts stay in eval mode. Returns the trained
    parts' inert tensors, named as the model names them now (under its adapters).

    A part's inert parameters (``inert_parameters()``, e.g. a tower's layers above the one it reads) never train nor
    get an adapter: they get no gradient, on which data-parallel ranks would wait (DDP fails at step 2), and ZeRO
    would decay them where AdamW leaves them alone. They stay in the part, so ``final/`` and export hold them.

    Every parameter that trains is held in fp32 whatever dtype its part was loaded in (``models/precision.py``: an
    update in bf16 rounds away), and so is the whole of a part that trains fully, its inert weights too: they run in
    its forward, where without autocast a bf16 layer would meet fp32 activations. Frozen weights keep their dtype."""
    check_parts(parts, {p: getattr(getattr(model, p), "TRAIN_MODES", MODES) for p in model.PARTS})
    model.frozen_parts = set()
    params: set[str] = set()
    modules: set[str] = set()
    for part in model.PARTS:
        mode = parts.get(part, "frozen")
        module: nn.Module = getattr(model, part)
        if hasattr(module, "set_train_mode"):
            module.set_train_mode(mode)
        else:
            module.requires_grad_(mode == "full")
        if mode == "frozen":
            model.frozen_parts.add(part)
            continue
        inert = _inert_parameters(module)
        excluded = _inert_modules(module, inert)
        objects = _objects(module, inert, excluded)  # peft renames what it wraps: found again by identity
        if mode == "lora":
            setattr(model, part, _add_lora(module, dict(lora or {}), excluded))
        else:
            named = dict(module.named_parameters(remove_duplicate=False))
            for name in inert:
                named[name].requires_grad_(False)
        hold_in_fp32(getattr(model, part), only_trainable=mode != "full")
        params |= _names_now(part, getattr(model, part).named_parameters(remove_duplicate=False), objects[0])
        modules |= _names_now(part, getattr(model, part).named_modules(remove_duplicate=False), objects[1])
    model.train()
    return InertTensors(frozenset(params), frozenset(modules))


def lora_exclusions(module: nn.Module) -> list[str]:
    """The sub-modules of a part that ``apply_stage`` gives no adapter (names within the part): those whose own
    parameters are all inert. The config check asks, before the first stage trains, whether a LoRA stage's targets
    leave anything else."""
    return _inert_modules(module, _inert_parameters(module))


def _inert_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters of ``module`` its output does not depend on, as the part declares them (none if it
    declares nothing)."""
    declared = getattr(module, "inert_parameters", None)
    return declared() if declared is not None else []


def _inert_modules(module: nn.Module, inert: Sequence[str]) -> list[str]:
    """Sub-modules whose own parameters are all inert: an adapter there would never get a gradient."""
    names = set(inert)
    out = []
    for name, sub in module.named_modules(remove_duplicate=False):
        own = [f"{name}.{n}" if name else n for n, _ in sub.named_parameters(recurse=False, remove_duplicate=False)]
        if own and names.issuperset(own):
            out.append(name)
    return out


def _objects(module: nn.Module, inert: Sequence[str], excluded: Sequence[str]) -> tuple[set[int], set[int]]:
    """``id``s of the named inert parameters and excluded sub-modules of ``module``."""
    params, modules = set(inert), set(excluded)
    return (
        {id(p) for n, p in module.named_parameters(remove_duplicate=False) if n in params},
        {id(m) for n, m in module.named_modules(remove_duplicate=False) if n in modules},
    )


def _names_now(part: str, named: Iterable[tuple[str, object]], ids: set[int]) -> set[str]:
    """The full names that the objects of :func:`_objects` have in a part as it is now (perhaps wrapped by peft)."""
    return {f"{part}.{n}" for n, obj in named if id(obj) in ids}


def _add_lora(module: nn.Module, lora: dict[str, Any], exclude: list[str]) -> nn.Module:
    """``module`` wrapped by peft, with no adapter in the ``exclude`` sub-modules (full names). peft is imported here,
    not with the module: importing it takes seconds (most of a CLI call's or a rank's start) and few stages use it."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 - seconds to import, LoRA stages only

    config = LoraConfig(
        r=int(lora.get("r", 16)),
        lora_alpha=float(lora.get("alpha", 32)),  # scaling alpha / r; int() made an alpha of 0.5 a scaling of 0
        lora_dropout=float(lora.get("dropout", 0.05)),
        target_modules=lora.get("target_modules", ALL_LINEAR),
        exclude_modules=exclude or None,  # peft warns of an exclusion list that excludes nothing
    )
    return get_peft_model(module, config)


def lora_matches(targets: str | list[str], names: Iterable[str], exclude: list[str] | None = None) -> list[str]:
    """The module names of ``names`` that peft adapts for ``target_modules=targets`` less ``exclude``, matched as peft
    matches them (a list entry: the name or its last components; a string: a pattern matched whole), so the config
    check asks peft itself, before any stage trains."""
    from peft import LoraConfig  # noqa: PLC0415 - seconds to import, LoRA stages only
    from peft.tuners.tuners_utils import check_target_module_exists  # noqa: PLC0415

    config = LoraConfig(target_modules=targets, exclude_modules=exclude or None)
    return [n for n in names if check_target_module_exists(config, n)]  # an excluded name matches as falsy


def lora_adapted(module: nn.Module, targets: str | list[str], exclude: list[str] | None = None) -> list[str]:
    """The names of the sub-modules of ``module`` (a part) that peft adapts for ``target_modules=targets`` less
    ``exclude``: ``all-linear`` as peft expands it (every linear layer but a transformers model's output embeddings,
    its LM head), anything else matched by :func:`lora_matches`. What the config check finds in them (a layer LoRA
    cannot adapt, a weight tied to another module's) is what peft meets when the stage begins."""
    named = [(n, m) for n, m in module.named_modules() if n]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        head = module.get_output_embeddings() if isinstance(module, PreTrainedModel) else None
        targets = [n for n, m in named if isinstance(m, LINEAR_LAYERS) and m is not head]
    return lora_matches(targets, [n for n, _ in named], exclude) if targets else []


def lora_base(module: nn.Module) -> nn.Module:
    """The part a peft wrapper (a LoRA part of ``apply_stage``) holds, or ``module`` itself: where the part's own
    attributes are read (a tower's transformers ``model``; the wrapper's ``model`` is the part). peft is looked up,
    not imported: when it is not loaded, no part was wrapped by it."""
    peft = sys.modules.get("peft")
    return module.get_base_model() if peft is not None and isinstance(module, peft.PeftModel) else module


def merged_name(name: str) -> str:
    """A model parameter's name once LoRA is merged (``merge_lora``), as a ``final/`` names it: a part peft wraps
    (``llm.base_model.model.…``) loses the wrapper's two levels, an adapted layer's weight its ``base_layer``."""
    part, dot, rest = name.partition(".base_model.model.")
    return f"{part}.{rest.replace('.base_layer.', '.')}" if dot else name


def merge_lora(model: AlignLM) -> None:
    """Fold LoRA adapters into their base weights (for final saves and export), in fp32: the adapted part is widened
    to fp32 first, base weights stored in bf16 or fp16 included, so the merged part is held (and ``final/`` saves it)
    in fp32 as a part trained fully is. Added to a bf16 base, the fp32 delta rounded: 12 % of it was lost (a bf16
    weight keeps 8 significant bits). A base that came in fp32 has its unrounded values back first
    (``checkpoint.restore_unrounded``)."""
    for part in AlignLM.PARTS:
        module = getattr(model, part)
        if lora_base(module) is not module:
            hold_in_fp32(module)
            setattr(model, part, module.merge_and_unload())


def trainable_parts(parts: Mapping[str, str]) -> list[str]:
    """Parts whose weights this stage changes (and a final save must therefore include)."""
    return [p for p, mode in parts.items() if mode != "frozen"]


def decays(name: str, p: torch.nn.Parameter) -> bool:
    """Whether weight decay applies to the parameter ``name``: not to 1-D ones nor to biases (stacked MoE biases are
    2-D, told by their name)."""
    return p.ndim >= 2 and not name.rsplit(".", 1)[-1].startswith("bias")


def param_groups(model: AlignLM, lr: Mapping[str, float], weight_decay: float) -> list[dict[str, Any]]:
    """One group per (part, lr scale, decay) triple: biases and norm weights are never decayed.

    The rule is by shape, not by layer class: every 1-D parameter (biases, norm weights, and also CLIP's
    ``class_embedding`` and BatchNorm weights, which transformers' Trainer decays) and every bias is left undecayed,
    so a tower or connector of a kind no list names is covered too.

    A part may define ``lr_scales() -> {parameter-name prefix: multiplier}`` for sub-modules that need a smaller
    step than the rest of the part (the MoE router: at the connector's learning rate its logits swing by whole
    units per step and routing collapses); the longest matching prefix wins.
    """
    groups = []
    for part in model.PARTS:
        module = getattr(model, part)
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not params:
            continue
        if part not in lr:
            raise ValueError(f"stage.lr.{part} is missing but the {part} trains in this stage")
        scales = getattr(module, "lr_scales", dict)()
        by_key: dict[tuple[str, float, bool], list[torch.nn.Parameter]] = {}
        for n, p in params:
            prefix = max((k for k in scales if n == k or n.startswith(k + ".")), key=len, default="")
            by_key.setdefault((prefix, float(scales.get(prefix, 1.0)), decays(n, p)), []).append(p)
        for (prefix, scale, decayed), ps in by_key.items():
            groups.append(
                {
                    "params": ps,
                    "lr": float(lr[part]) * scale,
                    "weight_decay": weight_decay if decayed else 0.0,
                    "name": f"{part}.{prefix}" if prefix else part,
                }
            )
    if not groups:
        raise ValueError("stage trains nothing: set at least one of stage.parts to full or lora")
    return groups


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, for the start-of-stage summary."""
    size = lambda p: getattr(p, "ds_numel", p.numel())  # a ZeRO-3 parameter holds only its partition
    total = sum(size(p) for p in model.parameters())
    return sum(size(p) for p in model.parameters() if p.requires_grad), total
