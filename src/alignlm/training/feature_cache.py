"""Filling the vision-feature cache of a stage whose tower is frozen (``stage.data.feature_cache``).

Before the first step, every image the stage's records name is run once through the tower, exactly as the training
step would run it (same device, same autocast), and the features are written to the tower's cache folder; then the
dataset reads them instead of the images. Images already cached (an earlier stage, an earlier run, another sweep
point with the same tower) are not recomputed. Data-parallel ranks split the missing images and wait for each other.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from alignlm.data.feature_cache import FeatureCache, FeatureCacheHook
from alignlm.data.llava import LlavaDataset
from alignlm.models.mllm import AlignLM

BATCH = 32  # images per tower forward while filling
SHARD = 4096  # images per cache shard


def tower_fingerprint(model: AlignLM, vision_cfg: Any) -> str:
    """The tower's config and the bytes of every weight, hashed: any change of a weight, a swap of two rows
    included, is another cache (once a sum and a sum of squares per tensor, which a swap leaves equal)."""
    digest = hashlib.sha256(OmegaConf.to_yaml(vision_cfg, resolve=True).encode())
    with torch.no_grad():
        for name, tensor in model.vision.state_dict().items():
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:".encode())
            digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    digest.update(repr(model.image_spec).encode())
    return digest.hexdigest()[:16]


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
    cache = FeatureCache(root / tower_fingerprint(model, vision_cfg))
    paths = sorted({p for src, _, rec in dataset.distinct_records() for p in src.image_paths(rec)})
    missing = cache.missing(paths)
    mine = missing[acc.process_index :: acc.num_processes]
    was_training = model.vision.training
    model.vision.eval()
    for start in range(0, len(mine), SHARD):
        chunk = mine[start : start + SHARD]
        feats = []
        for b in range(0, len(chunk), BATCH):
            pixels = dataset.load_visuals(chunk[b : b + BATCH])["pixel_values"].to(acc.device)
            with torch.no_grad(), acc.autocast():
                feats.append(model.vision(pixels).cpu())
        cache.write(f"rank{acc.process_index}_{len(cache.where):09d}", chunk, torch.cat(feats))
    model.vision.train(was_training)
    acc.wait_for_everyone()
    cache = FeatureCache(cache.folder)  # every rank's shards
    dataset.set_visual_hook(FeatureCacheHook(cache))
    return cache
