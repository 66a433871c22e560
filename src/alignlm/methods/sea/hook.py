"""SEA's data hook: each image's per-patch word labels laid out on the model's visual tokens.

Configured as ``stage.data.hooks.sea`` (``configs/exp/sea.yaml``). Every sample gets ``sea_words`` / ``sea_scores``
``[n_images, M, k]`` (word id -1 = no candidate; unlabelled images get all -1), concatenated over the batch in the
same order as ``pixel_values``. A labels file that labels none of the stage's images fails at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignlm.data.hooks import HookedDataset, SampleHook, cat_per_image
from alignlm.data.records import DataError
from alignlm.methods.sea.labels import SeaLabels

log = logging.getLogger(__name__)

FIELDS = ("sea_words", "sea_scores")


class SeaLabelHook(SampleHook):
    """Opens a labels file and places it on ``model``'s visual tokens (the counts must line up, or it fails here)."""

    def __init__(self, path: str | Path, model: Any) -> None:
        self.labels = SeaLabels(path).place_on_model(model)

    def bind(self, dataset: HookedDataset) -> None:
        self.labels.check_aspect_ratio(
            getattr(dataset, "image_aspect_ratio", "pad"), "the stage's data.image_aspect_ratio"
        )
        uses = sum(self.labels.coverage(dataset.visual_inputs(src, rec)) for src, _, rec in dataset.distinct_records())
        if uses == 0:
            raise DataError(
                f"SEA labels {self.labels.path} label none of the images of {[s.path for s in dataset.sources]}"
            )
        log.info("SEA labels %s cover %d image uses of this stage's data", self.labels.path, uses)

    def fields(self, record_id: str, record: dict[str, Any], visual_inputs: list[Any]) -> dict[str, Any]:
        words, scores = self.labels.for_images(visual_inputs)
        return {"sea_words": words, "sea_scores": scores}

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The fields concatenated, and ``sea_labelled``: the images with a label, counted on the host where the batch
        is made, so that a micro-batch without one measures no accuracy with nothing read back from the device."""
        fields: dict[str, Any] = {key: cat_per_image(samples, key) for key in FIELDS}
        fields["sea_labelled"] = int((fields["sea_words"][..., 0] >= 0).any(-1).sum())
        return fields
