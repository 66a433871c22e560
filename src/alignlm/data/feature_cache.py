"""A cache of a frozen vision tower's features, read in place of the images (``data.feature_cache``).

While the tower is frozen its features of an image never change, so a stage that reads its images more than once
(several epochs, captions and questions about the same image, a sweep over connectors) can compute them once. The
cache is a folder per tower (named by its fingerprint, so another tower or other weights never hit it) of
safetensors shards: ``features`` ``[n, N, Dv]`` in the tower's output dtype (bf16 stays bf16, bit for bit), with the
images' resolved paths as ``ids`` in the metadata. :class:`FeatureCacheHook` serves them as ``image_embeds``; the
training layer fills the cache (``training/feature_cache.py``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alignlm.data.hooks import HookedDataset, SampleHook
from alignlm.data.records import DataError, Source

TENSOR = "features"


def image_key(path: str | Path) -> str:
    """An image's key in the cache: its resolved path."""
    return str(Path(path).resolve())


class FeatureCache:
    """The shards of one tower's folder, looked up by image path; rows are read lazily."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.where: dict[str, tuple[Path, int]] = {}
        self.layout: tuple[tuple[int, ...], str] | None = None  # (shape of one image's features, dtype), all shards
        for shard in sorted(self.folder.glob("*.safetensors")) if self.folder.exists() else []:
            ids = self._check(shard)
            self.where.update({key: (shard, row) for row, key in enumerate(ids)})
        self._handles: dict[Path, Any] = {}

    def _check(self, shard: Path) -> list[str]:
        """A shard's ids, once its index, rows, shape and dtype agree (a damaged shard fails here, at start-up, not
        at the step that first reads it)."""
        try:
            with safe_open(str(shard), "pt") as f:
                ids = json.loads((f.metadata() or {}).get("ids", "[]"))
                if TENSOR not in f.keys():
                    raise ValueError(f"no {TENSOR!r} tensor")
                part = f.get_slice(TENSOR)
                shape, dtype = tuple(part.get_shape()), str(part.get_dtype())
        except Exception as e:  # noqa: BLE001 - whatever the file holds, the message names it
            raise DataError(f"feature cache shard {shard} cannot be read: {type(e).__name__}: {e}") from e
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(ids) != shape[0]:
            raise DataError(f"feature cache shard {shard}: its index does not list one image per row of {shape}")
        if self.layout is not None and (shape[1:], dtype) != self.layout:
            raise DataError(
                f"feature cache shard {shard} holds {shape[1:]} {dtype} features per image, the folder's others "
                f"{self.layout[0]} {self.layout[1]}"
            )
        self.layout = (shape[1:], dtype)
        return ids

    def __getstate__(self) -> dict[str, Any]:  # data-loader workers open their own handles
        return {**self.__dict__, "_handles": {}}

    def missing(self, paths: Sequence[str | Path]) -> list[Path]:
        """The images with no cached features, each once, in the order given."""
        return list(dict.fromkeys(Path(p) for p in paths if image_key(p) not in self.where))

    def get(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """``[len(paths), N, Dv]`` features of these images."""
        rows = []
        for p in paths:
            shard, row = self.where[image_key(p)]
            if shard not in self._handles:
                self._handles[shard] = safe_open(str(shard), "pt")
            rows.append(self._handles[shard].get_slice(TENSOR)[row])
        return torch.stack(rows)

    def write(self, name: str, paths: Sequence[str | Path], features: torch.Tensor) -> Path:
        """One more shard (atomically: a temporary name, then a rename)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        keys = [image_key(p) for p in paths]
        if not bool(torch.isfinite(features).all()):
            raise DataError(f"the tower's features of {len(paths)} images, e.g. {paths[0]}, are not finite: not cached")
        save_file({TENSOR: features.detach().cpu().contiguous()}, str(tmp), metadata={"ids": json.dumps(keys)})
        os.replace(tmp, path)
        self.where.update({key: (path, row) for row, key in enumerate(keys)})
        return path


class FeatureCacheHook(SampleHook):
    """Each image of a record is read from the cache as ``image_embeds``; the files themselves are never opened."""

    replaces_visuals = True

    def __init__(self, cache: FeatureCache) -> None:
        self.cache = cache

    def bind(self, dataset: HookedDataset) -> None:
        missing = self.cache.missing([p for src, _, rec in dataset.distinct_records() for p in src.image_paths(rec)])
        if missing:
            raise DataError(f"the feature cache {self.cache.folder} lacks {len(missing)} images, e.g. {missing[:2]}")

    def visual_inputs(self, source: Source, record: dict[str, Any]) -> list[Path]:
        return source.image_paths(record)

    def load_visuals(self, inputs: list[Path]) -> dict[str, torch.Tensor | None]:
        return {"pixel_values": None, "image_embeds": self.cache.get(inputs) if inputs else None}
