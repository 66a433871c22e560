"""Filling the vision-feature cache of a stage whose tower is frozen (``stage.data.feature_cache``).

Before the first step, every image the stage's records name is run once through the tower, exactly as the training
step would run it (same device, same autocast), and the features are written to the tower's cache folder; then the
dataset reads them instead of the images. Images already cached (an earlier stage, an earlier run, another sweep
point with the same tower) are not recomputed, unless their file changed since (size or modification time). An image
that cannot be read is left out of the cache (a batch that fails is read again image by image), so its samples fail
as they would without the cache, by ``data.on_error``. Data-parallel ranks split the missing images and wait for each
other. Each image's file is looked at once (a ``Survey``: one stat, no resolve of every folder on its path), and
what was seen serves filling and the data hook's start-up check alike; a shard's features are gathered in one buffer
of its size as they come off the tower, so filling holds about one shard per rank.
"""

from __future__ import annotations

import functools
import logging
import operator
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf

from alignlm.data.feature_cache import FeatureCache, FeatureCacheHook, Size, Survey, file_stamp
from alignlm.data.images import decoded_batches, loader_workers
from alignlm.data.llava import LlavaDataset
from alignlm.files import remove_abandoned
from alignlm.models.encoders import weights_fingerprint
from alignlm.models.io import without_local_paths
from alignlm.models.mllm import AlignLM

log = logging.getLogger(__name__)

BATCH = 32  # images per tower forward while filling
SHARD = 4096  # images per cache shard
by_parts = operator.attrgetter("parts")


FINGERPRINT = re.compile(r"[0-9a-f]{16}")  # a cache folder's name (:func:`tower_fingerprint`)


def tower_fingerprint(model: AlignLM, vision_cfg: Any, aspect_ratio: str = "pad", precision: str = "no") -> str:
    """The tower's config, the bytes of every weight, its image spec, how the stage makes its images square
    (``aspect_ratio``, ``data.image_aspect_ratio``), the artifact filter on its output and the autocast the features
    are computed under (``precision``, ``mixed_precision``), hashed: any change of a weight, of the pixels or of the
    arithmetic is another cache. A folder the config names counts by its small files, not its path
    (:func:`~alignlm.models.io.without_local_paths`): a tower copied elsewhere keeps its cache.

    A stage that crops had otherwise read the features of the padded images an earlier stage cached (the pretraining
    and finetuning stages of one tower share its folder). Padding, what every cache before the setting was filled
    with, adds nothing, so those caches stay valid. The filter (``model.vision_artifacts``, hooked on the tower by the
    model builder) is no part of ``model.vision``'s config, so it is read from the tower itself: another mode or factor
    gives other features (a run with another filter had read the features an earlier run cached). Without one,
    nothing is added either. A tower that the stage's ``final/`` saves stays fp32 under bf16, so its weights alone
    did not tell a bf16 run's features from an fp32 run's, and an fp32 run read bf16-computed ones (1e-2 apart at
    most on the tiny tower); without mixed precision (``no``) nothing is added, so fp32 caches stay valid."""
    if isinstance(vision_cfg, DictConfig):
        vision_cfg = OmegaConf.to_container(vision_cfg, resolve=True)
    context = [OmegaConf.to_yaml(without_local_paths(vision_cfg)), repr(model.image_spec)]
    if aspect_ratio != "pad":
        context.append(f"image_aspect_ratio: {aspect_ratio}")
    filt = getattr(model.vision, "artifact_filter", None)
    if filt is not None:
        context.append(f"vision_artifacts: mode={filt.mode} factor={filt.factor!r} prefix={filt.prefix}")
    if precision != "no":
        context.append(f"autocast: {precision}")
    return weights_fingerprint(model.vision, *context)


def _pixels(dataset: LlavaDataset, path: Path) -> torch.Tensor:
    """One image's pixels as the dataset prepares them (``load_visuals``: its aspect ratio, its size limit)."""
    return dataset.load_visuals([path])["pixel_values"][0]


def shard_features(
    model: AlignLM, dataset: LlavaDataset, part: Sequence[Path], acc: Accelerator, num_workers: int = 0
) -> tuple[list[Path], list[Size], torch.Tensor | None, torch.Tensor | None]:
    """The readable images of ``part``, their sizes (kept with their features, so a later run's
    ``data.max_image_pixels`` applies to them without opening them), their features and whether each is finite, run
    through the tower in batches (as the training step would: same device, same autocast) and copied as they come
    off it into one buffer of the shard's size. An image that cannot be read is left out (not cached, its samples
    fail as without the cache, by ``data.on_error``).

    ``num_workers`` processes read the images ahead of the tower (``data.images.decoded_batches``, pinned on CUDA):
    read in the rank's own process they kept the GPU waiting 5-7 ms an image. The finiteness of each image's
    features is computed on the device as they come off the tower, one flag an image, read by the caller once per
    shard: on the host, over the written shard, it cost 3.2 ms an image. The batches' features kept in a list and
    concatenated at the end had held the shard twice over: 4.4 times a shard per rank at the peak, 21 GB at
    CLIP-L/336."""
    kept: list[Path] = []
    sizes: list[Size] = []
    buffer = None
    finite = []
    prepare = functools.partial(_pixels, dataset)
    for batch in decoded_batches(part, prepare, BATCH, acc.device, num_workers, sizes=True):
        if not batch.index:
            continue
        with torch.no_grad(), acc.autocast():
            features = model.vision(batch.items.to(acc.device, non_blocking=True))
        if buffer is None:  # the tower's output shape and dtype: known at its first batch
            buffer = torch.empty((len(part), *features.shape[1:]), dtype=features.dtype)
        finite.append(torch.isfinite(features).flatten(1).all(1))
        buffer[len(kept) : len(kept) + len(batch.index)].copy_(features)
        kept += [part[i] for i in batch.index]
        sizes += batch.sizes
    if buffer is None:
        return kept, sizes, None, None
    return kept, sizes, buffer[: len(kept)], torch.cat(finite)


def fill(
    model: AlignLM,
    dataset: LlavaDataset,
    cache: FeatureCache,
    survey: Survey,
    images: Sequence[Path],
    acc: Accelerator,
    num_workers: Any = "auto",
) -> None:
    """Compute and write the features of ``images`` (this rank's share of those missing), a shard of ``SHARD`` at a
    time, each image with the key and stamp the survey saw: taken before it is read, so an edit meanwhile counts as a
    change next time. An image the survey could not stat (it appeared since) is stamped now, before it is read: written
    with no stamp it matched nothing, and the stage stopped saying the cache lacked it. ``num_workers``: the stage's
    ``data.num_workers`` (a number, or auto), decoding the images ahead as its own loader's workers do."""
    was_training = model.vision.training
    model.vision.eval()
    workers = loader_workers(num_workers, acc.device, acc.num_processes)  # as many as the stage's own loader
    for start in range(0, len(images), SHARD):
        for p in images[start : start + SHARD]:
            key, stamp = survey.missing[p]
            if stamp is None:
                survey.missing[p] = (key, file_stamp(p))
        kept, sizes, features, finite = shard_features(model, dataset, images[start : start + SHARD], acc, workers)
        if features is not None:  # a unique name: a concurrent run or rank never replaces another's shard
            keys, stamps = zip(*(survey.missing[p] for p in kept))
            name = f"rank{acc.process_index}_{uuid.uuid4().hex}"
            cache.write(name, kept, stamps, features, sizes, keys, finite=finite.cpu())
    model.vision.train(was_training)


def other_caches(root: Path, folder: Path) -> list[str]:
    """The cache folders under ``root`` beside ``folder`` (named by a tower fingerprint, :func:`tower_fingerprint`)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p != folder and p.is_dir() and FINGERPRINT.fullmatch(p.name))


def attach_feature_cache(
    model: AlignLM,
    dataset: LlavaDataset,
    setting: Any,
    default_root: Path,
    vision_cfg: Any,
    acc: Accelerator,
    num_workers: Any = "auto",
) -> FeatureCache | None:
    """Fill the cache for ``dataset``'s images and make it read them from there; None when the setting is off.

    ``setting``: false / null (off), true (``default_root``), or a folder. Refused for a tower that trains.
    ``num_workers``: the stage's ``data.num_workers``, which the fill's image decoding follows (a stage that set 0,
    say for a container's small /dev/shm, had got up to 8 workers).
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
    if acc.is_local_main_process:  # a fill killed mid-shard left up to SHARD images' features (4.8 GB at CLIP-L/336)
        files, size = remove_abandoned(cache.folder, "*.safetensors")
        if files:
            log.info("feature cache: removed %d shards that killed fills left unfinished (%.1f GB)", files, size / 1e9)
    # one order on every rank (they split what is missing): by parts, as Paths compare, but compared in C (a sort of
    # 558k Paths took 6 s)
    paths = sorted({p for src, _, rec in dataset.distinct_records() for p in src.image_paths(rec)}, key=by_parts)
    survey = cache.survey(paths)
    missing = list(survey.missing)
    changed = [p for p in missing if survey.missing[p][0] in cache.where]
    if changed and acc.is_main_process:
        log.info(
            "feature cache: %d images changed since their features were cached (size or modification time), "
            "computing them again, e.g. %s",
            len(changed),
            changed[0],
        )
    if missing and not cache.where and acc.is_main_process:
        others = other_caches(root, cache.folder)
        if others:  # hours of tower passes and their disk again: say why, and what lies unread beside it
            log.warning(
                "feature cache: none of this stage's images are cached for its tower as it is now (%s: its config, "
                "weights, image handling and precision), so all %d are computed into it; %s holds %d other caches this "
                "stage does not read (another tower or settings, or an older alignlm's key: delete any no longer "
                "wanted): %s",
                cache.folder.name,
                len(missing),
                root,
                len(others),
                ", ".join(others[:5]) + (", ..." if len(others) > 5 else ""),
            )
    fill(model, dataset, cache, survey, missing[acc.process_index :: acc.num_processes], acc, num_workers)
    acc.wait_for_everyone()
    cache.refresh(survey)  # the other ranks' shards
    crop = dataset.image_spec.size if dataset.image_aspect_ratio == "crop" else None
    dataset.set_visual_hook(FeatureCacheHook(cache, dataset.max_image_pixels, crop, survey))
    return cache
