"""Filling the vision-feature cache of a stage whose tower is frozen (``stage.data.feature_cache``).

Before the first step, every image the stage's records name is run once through the tower, exactly as the training
step would run it (same device, same autocast), and the features are written to the tower's cache folder; then the
dataset reads them instead of the images. Images already cached (an earlier stage, an earlier run, another sweep
point with the same tower) are not recomputed, unless their file changed since (size or modification time). An image
that cannot be read is left out of the cache (a batch that fails is read again image by image), so its samples fail
as they would without the cache, by ``data.on_error``. Data-parallel ranks split the missing images and wait for each
other.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from alignlm.data.feature_cache import FeatureCache, FeatureCacheHook, file_stamp, image_key
from alignlm.data.images import image_size
from alignlm.data.llava import LlavaDataset
from alignlm.data.records import DataError
from alignlm.models.encoders import weights_fingerprint
from alignlm.models.mllm import AlignLM

log = logging.getLogger(__name__)

BATCH = 32  # images per tower forward while filling
SHARD = 4096  # images per cache shard


def tower_fingerprint(model: AlignLM, vision_cfg: Any, aspect_ratio: str = "pad", precision: str = "no") -> str:
    """The tower's config, the bytes of every weight, its image spec, how the stage makes its images square
    (``aspect_ratio``, ``data.image_aspect_ratio``), the artifact filter on its output and the autocast the features
    are computed under (``precision``, ``mixed_precision``), hashed: any change of a weight, of the pixels or of the
    arithmetic is another cache.

    A stage that crops had otherwise read the features of the padded images an earlier stage cached (the pretraining
    and finetuning stages of one tower share its folder). Padding, what every cache before the setting was filled
    with, adds nothing, so those caches stay valid. The filter (``model.vision_artifacts``, hooked on the tower by the
    model builder) is no part of ``model.vision``'s config, so it is read from the tower itself: another mode or factor
    gives other features (a run with another filter had read the features an earlier run cached). Without one,
    nothing is added either. A tower that the stage's ``final/`` saves stays fp32 under bf16, so its weights alone
    did not tell a bf16 run's features from an fp32 run's, and an fp32 run read bf16-computed ones (1e-2 apart at
    most on the tiny tower); without mixed precision (``no``) nothing is added, so fp32 caches stay valid."""
    context = [OmegaConf.to_yaml(vision_cfg, resolve=True), repr(model.image_spec)]
    if aspect_ratio != "pad":
        context.append(f"image_aspect_ratio: {aspect_ratio}")
    filt = getattr(model.vision, "artifact_filter", None)
    if filt is not None:
        context.append(f"vision_artifacts: mode={filt.mode} factor={filt.factor!r} prefix={filt.prefix}")
    if precision != "no":
        context.append(f"autocast: {precision}")
    return weights_fingerprint(model.vision, *context)


def readable(
    dataset: LlavaDataset, paths: Sequence[Path]
) -> tuple[list[Path], list[tuple[int, int]], torch.Tensor | None]:
    """The images of ``paths`` that can be read, their sizes (kept with their features, so a later run's
    ``data.max_image_pixels`` applies to them without opening them) and their pixels: a batch that fails is read image
    by image, and an image that fails is left out (not cached, its samples fail as without the cache, by
    ``data.on_error``)."""
    try:
        pixels = dataset.load_visuals(list(paths))["pixel_values"]
        return list(paths), [image_size(p) for p in paths], pixels
    except DataError:
        pass
    kept, sizes, pixels = [], [], []
    for path in paths:
        try:
            one, size = dataset.load_visuals([path])["pixel_values"], image_size(path)
        except DataError:
            continue
        kept.append(path)
        sizes.append(size)
        pixels.append(one)
    return kept, sizes, torch.cat(pixels) if pixels else None


def attach_feature_cache(
    model: AlignLM, dataset: LlavaDataset, setting: Any, default_root: Path, vision_cfg: Any, acc: Accelerator
) -> FeatureCache | None:
    """Fill the cache for ``dataset``'s images and make it read them from there; None when the setting is off.

    ``setting``: false / null (off), true (``default_root``), or a folder. Refused for a tower that trains.
    """
    if not setting:
        return None
    if "vision" not in model.frozen_parts:
        raise ValueError(
            "stage.data.feature_cache caches a frozen tower's features, but this stage trains model.vision"
        )
    if dataset.visual_hook is not None:
        raise ValueError(
            f"stage.data.feature_cache: the data hook {type(dataset.visual_hook).__name__} already replaces "
            "the images of this stage; turn one of them off"
        )
    root = default_root if setting is True else Path(str(setting))
    precision = str(acc.mixed_precision)
    cache = FeatureCache(root / tower_fingerprint(model, vision_cfg, dataset.image_aspect_ratio, precision))
    paths = sorted({p for src, _, rec in dataset.distinct_records() for p in src.image_paths(rec)})
    missing = cache.missing(paths)
    changed = [p for p in missing if image_key(p) in cache.where]
    if changed and acc.is_main_process:
        log.info(
            "feature cache: %d images changed since their features were cached (size or modification time), "
            "computing them again, e.g. %s",
            len(changed),
            changed[0],
        )
    mine = missing[acc.process_index :: acc.num_processes]
    was_training = model.vision.training
    model.vision.eval()
    for start in range(0, len(mine), SHARD):
        part = mine[start : start + SHARD]
        chunk, stamps, sizes, feats = [], [], [], []
        for b in range(0, len(part), BATCH):
            batch = part[b : b + BATCH]
            before = dict(zip(batch, map(file_stamp, batch)))  # before reading: an edit meanwhile is seen next time
            kept, kept_sizes, pixels = readable(dataset, batch)
            if pixels is None:
                continue
            with torch.no_grad(), acc.autocast():
                feats.append(model.vision(pixels.to(acc.device)).cpu())
            chunk += kept
            sizes += kept_sizes
            stamps += [before[p] for p in kept]
        if chunk:  # a unique name: a concurrent run or rank never replaces another's shard
            cache.write(f"rank{acc.process_index}_{uuid.uuid4().hex}", chunk, stamps, torch.cat(feats), sizes)
    model.vision.train(was_training)
    acc.wait_for_everyone()
    cache = FeatureCache(cache.folder)  # every rank's shards
    crop = dataset.image_spec.size if dataset.image_aspect_ratio == "crop" else None
    dataset.set_visual_hook(FeatureCacheHook(cache, dataset.max_image_pixels, crop))
    return cache
