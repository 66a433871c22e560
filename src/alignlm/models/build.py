"""Build an ``AlignLM`` from the ``model`` config node: each part is a class named by ``_target_``.

A user adds a vision tower, connector or LLM loader by writing a class and a YAML file; nothing here
needs to change. Errors name the config key and what went wrong.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from hydra._internal.utils import _locate
from torch import nn

from alignlm.config import instantiate
from alignlm.models.artifacts import attach_filter
from alignlm.models.connectors.base import Connector
from alignlm.models.extras import InputPart
from alignlm.models.mllm import AlignLM
from alignlm.models.vision import VisionTower


def build_model(model_cfg: Mapping[str, Any]) -> AlignLM:
    """Vision tower, LLM and connector (sized between them) assembled into one model.

    Every random initialisation (tiny parts, the connector, the new ``<image>`` embedding row) is drawn
    under ``model.init_seed``, so a config always rebuilds the same model and a ``final/`` checkpoint
    only needs to store the parts that trained.
    """
    for part, example in (("vision", "clip_vit_l14_336"), ("connector", "mlp2x_gelu"), ("llm", "vicuna_7b")):
        if part not in model_cfg:
            raise ValueError(f"config model.{part} is missing; pick one, e.g. model/{part}={example}")
    with _init_stream(int(model_cfg.get("init_seed", 0))):
        return _assemble(model_cfg)


@contextmanager
def _init_stream(seed: int) -> Iterator[None]:
    """Random draws seeded with ``seed`` inside, every generator as it was outside. ``torch.manual_seed`` seeds
    the CPU's and every CUDA device's generator, so all of them are forked: forking the CPU's alone had left the GPUs
    seeded with ``model.init_seed + k`` after every build, so that a stage's dropout, LoRA dropout and objectives'
    random draws on the GPU were the same whatever ``seed`` said.

    Where CUDA is not initialised yet (a ``--cpu`` run on a GPU machine), nothing touches it: reading the GPUs' states
    would initialise CUDA, on every visible GPU, in every rank. The CPU's generator alone is seeded and forked then,
    and the seed ``torch.manual_seed`` queued for the GPUs' first use (the stage's ``seed``) stays queued."""
    cuda = torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda else (), device_type="cuda"):
        if cuda:
            torch.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        yield


class _NoTower(nn.Module):
    """Stands in for a vision tower where ``model.vision_artifacts`` is checked before any is built: the filter is
    built and hooked onto it by the builder's own :func:`attach_filter`, so its checks are the ones a build runs."""

    num_prefix_tokens = 0


def check_model_settings(model_cfg: Mapping[str, Any]) -> None:
    """The settings of ``model`` that :func:`build_model` checks as it builds, checked by the same code without
    building anything (a ``ValueError`` naming the key): the start-up checks call it before the offline sets and
    prepare steps run, which a mistake here had waited out (hours for a method's encoder) to fail with exit status 1
    when the first stage built its model. ``model.vision_artifacts`` (:func:`attach_filter`),
    ``model.visual_token_norm`` (:func:`token_norm_factor`) and whether the connector takes one: a connector whose
    ``token_norm`` setter refuses a value (its tokens must keep their own norm) refuses it here too; ``init_seed``; and
    the tower's own settings (``VisionTower.check_settings``)."""
    seed = model_cfg.get("init_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:  # 1.9 had seeded as 1, "abc" failed unnamed
        raise ValueError(f"model.init_seed={seed!r} must be a whole number >= 0")
    vision = model_cfg.get("vision") or {}
    try:
        tower = _locate(str(vision.get("_target_")))  # get_class logged an error for a function (model=llava_hf)
    except (ImportError, ValueError, AttributeError):
        tower = None  # building the tower names its target
    if isinstance(tower, type) and issubclass(tower, VisionTower):
        tower.check_settings(vision)
    attach_filter(_NoTower(), model_cfg.get("vision_artifacts"))
    factor = token_norm_factor(model_cfg)
    target = (model_cfg.get("connector") or {}).get("_target_")
    try:
        cls = _locate(str(target))
    except (ImportError, ValueError, AttributeError):
        return  # building the connector names its target
    setter = getattr(inspect.getattr_static(cls, "token_norm", None), "fset", None)
    if setter is not None:  # a connector's own rule for the norm (its property), asked of a bare instance
        setter(cls.__new__(cls), factor)


def _assemble(model_cfg: Mapping[str, Any]) -> AlignLM:
    vision = instantiate(model_cfg["vision"], "model.vision")
    if not isinstance(vision, VisionTower):
        raise TypeError(f"model.vision built a {type(vision).__name__}, not an alignlm VisionTower")
    attach_filter(vision, model_cfg.get("vision_artifacts"))
    llm, tokenizer = instantiate(model_cfg["llm"], "model.llm")
    # The connector draws from its own stream, so swapping connectors (dense -> MoE upcycling) leaves the
    # other random inits, such as the new <image> embedding row, unchanged.
    with _init_stream(int(model_cfg.get("init_seed", 0)) + 1):
        connector = instantiate(
            model_cfg["connector"],
            "model.connector",
            in_dim=vision.hidden_size,
            out_dim=llm.get_input_embeddings().embedding_dim,
        )
    if not isinstance(connector, Connector):
        raise TypeError(f"model.connector built a {type(connector).__name__}, not an alignlm Connector")
    connector.bind_vocabulary(llm.get_input_embeddings().weight.detach(), tokenizer)
    connector.token_norm = _visual_token_norm(model_cfg, llm)
    return AlignLM(vision, connector, llm, tokenizer, _extras(model_cfg, vision, connector, llm))


def _embedding_sample(llm: Any) -> torch.Tensor:
    """~4k rows of the LLM's input embedding table in float32 (a 128k-row bf16 table need not be copied whole)."""
    table = llm.get_input_embeddings().weight.detach()
    return table[:: max(1, table.shape[0] // 4096)].float()


def token_norm_factor(model_cfg: Mapping[str, Any]) -> float | None:
    """``model.visual_token_norm``: a number > 0 (a multiple of the LLM's mean token-embedding norm), or None."""
    factor = model_cfg.get("visual_token_norm")
    if factor is None:
        return None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ValueError(
            f"model.visual_token_norm={factor!r} must be a number > 0 (a multiple of the LLM's mean "
            "token-embedding norm), or null to leave the connector's outputs as they are"
        )
    return float(factor)


def _visual_token_norm(model_cfg: Mapping[str, Any], llm: Any) -> float | None:
    """``model.visual_token_norm`` times the mean norm of the LLM's token embeddings, or None when the knob is null.

    Measured on the LLM as the config builds it (before any checkpoint loads), so a rebuilt model gets the same value.
    """
    factor = token_norm_factor(model_cfg)
    if factor is None:
        return None
    return factor * float(_embedding_sample(llm).norm(dim=-1).mean())


def _extras(model_cfg: Mapping[str, Any], vision: VisionTower, connector: Connector, llm: Any) -> dict[str, InputPart]:
    """The optional ``model.extras`` input parts (null entries are off), sized to the LLM and the connector's tokens.

    Each draws from its own seed stream (after the connector's), so adding one leaves the other parts' initialisation
    as it was (only the slot rows of the embedding table differ, and the model writes over their slots).
    """
    nodes = {k: v for k, v in (model_cfg.get("extras") or {}).items() if v is not None}
    if not nodes:
        return {}
    sample = _embedding_sample(llm)
    parts = {}
    for i, (name, node) in enumerate(nodes.items()):
        with _init_stream(int(model_cfg.get("init_seed", 0)) + 2 + i):
            part = instantiate(
                node,
                f"model.extras.{name}",
                hidden_size=sample.shape[1],
                num_visual_tokens=connector.num_tokens(vision.num_patches),
                embed_std=float(sample.std()),
            )
        if not isinstance(part, InputPart):
            raise TypeError(f"model.extras.{name} built a {type(part).__name__}, not an alignlm InputPart")
        parts[name] = part
    return parts
