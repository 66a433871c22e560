"""The one hook through which a method adds per-sample side data to the generic dataset and collator.

A stage lists hooks under ``data.hooks`` (name -> config node with ``_target_``); each is built with the model
(``instantiate(node, model=model)``) so it can size its fields to the model's visual tokens, then bound to the
dataset at start-up (:meth:`SampleHook.bind`), where a hook that cannot serve the stage's records fails before step 1.
Per sample it adds fields (:meth:`fields`), per batch it assembles them (:meth:`collate`). One hook per stage may
also replace what stands for each image (:attr:`replaces_visuals`: e.g. a caption's text embedding in place of its
picture). Generation datasets (evaluation) use no hooks: side data trains, it is never needed to answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from alignlm.data.records import Source


class HookedDataset(Protocol):
    """What a hook may read of the dataset it is bound to (``data.llava.LlavaDataset`` is one)."""

    sources: list[Source]
    records: Sequence[Sequence[dict[str, Any]]]
    seed: int
    on_error: str

    def distinct_records(self) -> Iterator[tuple[Source, str, dict[str, Any]]]:
        """``(source, record id, record)`` of every usable record once (to be read once: it decodes as it goes)."""

    def visual_inputs(self, source: Source, record: dict[str, Any]) -> list[Any]:
        """What stands for each image of a record, in order."""


class SampleHook:
    """Base class: a no-op that subclasses specialise; every method has a working default."""

    replaces_visuals: bool = False
    # ``visual_inputs`` gives one input per image of the record (the feature cache's: each image's features): the
    # counts are the images' own, from the start-up pass, and no record is read again to count them
    one_per_image: bool = False

    def bind(self, dataset: HookedDataset) -> None:
        """Start-up check against every record of the stage (coverage, sizes); raise ``DataError`` naming the gap."""

    def visual_inputs(self, source: Source, record: dict[str, Any]) -> list[Any]:
        """What stands for each image of a record, in order (only when ``replaces_visuals``)."""
        raise NotImplementedError  # pragma: no cover - interface

    def load_visuals(self, inputs: list[Any]) -> dict[str, torch.Tensor | None]:
        """The sample's visual fields for those inputs (only when ``replaces_visuals``)."""
        raise NotImplementedError  # pragma: no cover - interface

    def fields(self, record_id: str, record: dict[str, Any], visual_inputs: list[Any]) -> dict[str, Any]:
        """Extra fields of one sample; raise ``DataError`` to have the sample skipped (or raised) by ``data.on_error``."""
        return {}

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Batch fields from the kept samples' fields, in sample order."""
        return {}


def cat_per_image(samples: Sequence[dict[str, Any]], key: str) -> torch.Tensor:
    """A per-image field concatenated over the batch, in the same order as ``pixel_values``."""
    return torch.cat([s[key] for s in samples])
