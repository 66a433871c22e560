"""Turn a ``data`` config node into a dataset for a given model (template, image spec, token count, hooks)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from alignlm.config import instantiate
from alignlm.constants import ALIKE_ON_EVERY_RANK
from alignlm.data.hooks import SampleHook
from alignlm.data.images import MAX_PIXELS, ImageReading, check_aspect_ratio
from alignlm.data.llava import LlavaDataset
from alignlm.data.records import Source
from alignlm.data.templates import Template, TemplateError, answer_preamble, get_template


def build_dataset(
    data_cfg: Mapping[str, Any], model: Any, seed: int, for_generation: bool = False, key: str = "data"
) -> LlavaDataset:
    """A dataset over ``data.sources`` rendered with ``data.template`` for this model, with the ``data.hooks`` of the
    stage's methods (none for generation: side data only trains).

    ``model`` is anything with ``tokenizer``, ``image_spec``, ``num_image_tokens`` and, optionally, ``slot_token_ids``
    (an ``AlignLM``); hooks receive it whole to size their fields. ``key`` is where ``data_cfg`` sits in the config
    (``stages.<stage>.data`` for a stage's), which the errors name: ``data.hooks.q`` did not say which stage's.
    """
    sources = data_cfg.get("sources")
    if not sources:
        raise ValueError(f"{key}.sources is empty; give at least one {{path, image_root, weight}}")
    hooks = [] if for_generation else build_hooks(data_cfg.get("hooks"), model, f"{key}.hooks")
    reading = image_reading_of(data_cfg)
    template = template_of(data_cfg)
    if not for_generation:
        warn_of_preamble(template, model.tokenizer, key)
    return LlavaDataset(
        [Source.from_config(s, f"{key}.sources[{i}]") for i, s in enumerate(sources)],
        tokenizer=model.tokenizer,
        template=template,
        image_spec=model.image_spec,
        num_image_tokens=model.num_image_tokens,
        max_length=int(data_cfg.get("max_length", 2048)),
        on_error=str(data_cfg.get("on_error", "skip")),
        for_generation=for_generation,
        seed=seed,
        hooks=hooks,
        slot_token_ids=getattr(model, "slot_token_ids", ()),
        image_only_slot_ids=getattr(model, "image_only_slot_ids", ()),
        max_image_pixels=reading.max_pixels,
        min_usable_fraction=float(data_cfg.get("min_usable_fraction", 0.5)),
        preference=bool(data_cfg.get("preference", False)) and not for_generation,
        image_aspect_ratio=reading.aspect_ratio,
    )


def warn_of_preamble(template: Template, tokenizer: Any, key: str) -> None:
    """Warn where the template supervises text of its own before every answer (:func:`answer_preamble`), naming it."""
    try:
        preamble = answer_preamble(template, tokenizer)
    except TemplateError:  # a template that takes no one-question exchange: the dataset's own checks say so
        return
    if preamble:
        logging.getLogger("alignlm").warning(
            "%s.template %r writes %r before every answer, inside the span it supervises: the model learns to write "
            "it and its generated answers start with it; model.llm.chat_template (chatml, or a Jinja file of your "
            "own) trains without it (Qwen3's empty think block: chatml)",
            key,
            template.name,
            preamble,
            extra=ALIKE_ON_EVERY_RANK,
        )


def template_of(data_cfg: Mapping[str, Any]) -> Template:
    """The template a ``data`` node names (``template``, default ``plain``), built with its ``template_args``."""
    return get_template(str(data_cfg.get("template", "plain")), **dict(data_cfg.get("template_args") or {}))


def image_reading_of(data_cfg: Mapping[str, Any]) -> ImageReading:
    """How a ``data`` node reads its images (:func:`aspect_ratio_of`, ``max_image_pixels``): its dataset, and what
    reads images for its stage's checkpoint besides training."""
    return ImageReading(aspect_ratio_of(data_cfg), data_cfg.get("max_image_pixels", MAX_PIXELS))


def aspect_ratio_of(data_cfg: Mapping[str, Any]) -> str:
    """How a ``data`` node makes its images square (``image_aspect_ratio``: ``pad`` or ``crop``). Every stage file sets
    it; a node without it is the config of a checkpoint saved before the setting existed, whose images were all
    padded, so ``pad`` (not the pretraining stage's ``crop``): ``alignlm eval`` and export then preprocess as it
    trained."""
    return check_aspect_ratio(data_cfg.get("image_aspect_ratio", "pad"))


def build_hooks(nodes: Mapping[str, Any] | None, model: Any, key: str = "data.hooks") -> list[SampleHook]:
    """``data.hooks`` (name -> node with ``_target_``; null entries are off), each built with the model; ``key`` is
    where they sit in the config (``stages.<stage>.data.hooks``), named in the errors."""
    hooks = []
    for name, node in (nodes or {}).items():
        if node is None:
            continue
        hook = instantiate(node, f"{key}.{name}", model=model)
        if not isinstance(hook, SampleHook):
            raise TypeError(f"{key}.{name} built a {type(hook).__name__}, not an alignlm SampleHook")
        hooks.append(hook)
    return hooks
