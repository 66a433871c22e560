"""Turn a ``data`` config node into a dataset for a given model (template, image spec, token count)."""

from __future__ import annotations

from typing import Any, Mapping

from alignlm.data.llava import LlavaDataset, Source
from alignlm.data.templates import get_template


def build_dataset(data_cfg: Mapping[str, Any], model: Any, seed: int, for_generation: bool = False) -> LlavaDataset:
    """A LLaVA dataset over ``data.sources`` rendered with ``data.template`` for this model."""
    sources = data_cfg.get("sources")
    if not sources:
        raise ValueError("data.sources is empty; give at least one {path, image_root, weight}")
    template_kwargs = dict(data_cfg.get("template_args") or {})
    return LlavaDataset(
        [Source(str(s["path"]), s.get("image_root"), float(s.get("weight", 1.0))) for s in sources],
        tokenizer=model.tokenizer,
        template=get_template(str(data_cfg.get("template", "plain")), **template_kwargs),
        image_spec=model.image_spec,
        num_image_tokens=model.num_image_tokens,
        max_length=int(data_cfg.get("max_length", 2048)),
        on_error=str(data_cfg.get("on_error", "skip")),
        for_generation=for_generation,
        seed=seed,
        sea_labels=None if for_generation else _sea_labels(data_cfg, model),
    )


def _sea_labels(data_cfg: Mapping[str, Any], model: Any) -> Any:
    """``data.sea_labels`` opened and placed on this model's visual tokens (None when SEA labels are off)."""
    from alignlm.data.sea_labels import SeaLabels, labels_spec

    spec = labels_spec(data_cfg.get("sea_labels"))
    if spec is None:
        return None
    vision = model.vision
    return SeaLabels(spec[0]).place_on_tokens(model.num_image_tokens, vision.num_patches, vision.num_prefix_tokens)
