"""Turn a ``data`` config node into a dataset for a given model (template, image spec, token count)."""

from __future__ import annotations

from typing import Any, Mapping

from alignlm.data.llava import LlavaDataset, Source
from alignlm.data.templates import get_template


KINDS = ("llava", "revision")


def build_dataset(data_cfg: Mapping[str, Any], model: Any, seed: int, for_generation: bool = False) -> LlavaDataset:
    """A dataset over ``data.sources`` rendered with ``data.template`` for this model, of kind ``data.kind``:
    ``llava`` reads the records' images, ``revision`` feeds each caption's text embedding in place of its image."""
    sources = data_cfg.get("sources")
    if not sources:
        raise ValueError("data.sources is empty; give at least one {path, image_root, weight}")
    kind = str(data_cfg.get("kind", "llava"))
    if kind not in KINDS:
        raise ValueError(f"data.kind={kind!r} is not known; choose one of {list(KINDS)}")
    template_kwargs = dict(data_cfg.get("template_args") or {})
    common: dict[str, Any] = dict(
        tokenizer=model.tokenizer,
        template=get_template(str(data_cfg.get("template", "plain")), **template_kwargs),
        image_spec=model.image_spec,
        num_image_tokens=model.num_image_tokens,
        max_length=int(data_cfg.get("max_length", 2048)),
        on_error=str(data_cfg.get("on_error", "skip")),
        for_generation=for_generation,
        seed=seed,
        align_token_id=getattr(model, "align_token_id", None),
        align_levels=None if for_generation else _align_levels(data_cfg, model),
    )
    sources = [Source(str(s["path"]), s.get("image_root"), float(s.get("weight", 1.0))) for s in sources]
    if kind == "revision":
        return _revision(data_cfg, model, sources, common)
    return LlavaDataset(sources, **common, sea_labels=None if for_generation else _sea_labels(data_cfg, model))


def _revision(data_cfg: Mapping[str, Any], model: Any, sources: list[Source], common: dict[str, Any]) -> LlavaDataset:
    """ReVision's text-only data: caption embeddings shaped like ``model.vision``'s output for one image."""
    from alignlm.data.text_only import ReVisionDataset

    if not data_cfg.get("text_embeds"):
        raise ValueError("data.kind=revision needs data.text_embeds: the caption embedding shards (`alignlm embed --texts`)")
    if data_cfg.get("sea_labels"):
        raise ValueError("data.sea_labels label image patches; data.kind=revision has no images (set data.sea_labels=null)")
    vision = model.vision
    return ReVisionDataset(sources, **common, text_embeds=str(data_cfg["text_embeds"]), realign=data_cfg.get("realign"),
                           num_tokens=vision.num_patches, dim=vision.hidden_size, scale=getattr(vision, "scale", 1.0),
                           encoder=getattr(vision, "encoder_name", None), embed_noise=float(data_cfg.get("embed_noise") or 0.0))


def _sea_labels(data_cfg: Mapping[str, Any], model: Any) -> Any:
    """``data.sea_labels`` opened and placed on this model's visual tokens (None when SEA labels are off)."""
    from alignlm.data.sea_labels import SeaLabels, labels_spec

    spec = labels_spec(data_cfg.get("sea_labels"))
    if spec is None:
        return None
    vision = model.vision
    return SeaLabels(spec[0]).place_on_tokens(model.num_image_tokens, vision.num_patches, vision.num_prefix_tokens)


def _align_levels(data_cfg: Mapping[str, Any], model: Any) -> Any:
    """``data.align_levels`` opened for this model (None when off), checked against what the stage trains.

    Per-sample levels exist to train the level embeddings (``parts.align_levels: levels``); a stage training the gate
    mixes the levels instead, so a levels file there, or none where the levels train, is a config mistake.
    """
    from alignlm.data.aligngpt_levels import LevelLabels
    from alignlm.data.sea_labels import labels_spec

    spec = labels_spec(data_cfg.get("align_levels"), "data.align_levels")
    module = getattr(model, "align_levels", None)
    mode = getattr(module, "train_mode", None)
    if spec is None:
        if mode == "levels":
            raise ValueError("stage.parts.align_levels=levels trains the level embeddings on per-sample levels, but "
                             "stage.data.align_levels is not set; give a levels file (alignlm aligngpt-levels) or {path, make}")
        return None
    if module is None:
        raise ValueError("stage.data.align_levels is set but the model has no AlignGPT levels; add +model/align_levels=aligngpt "
                         "(or train +exp=aligngpt)")
    if mode != "levels":
        raise ValueError(f"stage.data.align_levels gives per-sample levels, which only parts.align_levels=levels uses (this stage: "
                         f"{mode!r}); a gate stage mixes the levels itself, so set stage.data.align_levels=null")
    return LevelLabels(spec[0]).check(module.num_levels)
