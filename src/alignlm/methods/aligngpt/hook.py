"""AlignGPT's data hook: each pretraining sample's alignment level, for the model's ``align_levels`` part.

Configured as ``stage.data.hooks.levels`` (``configs/exp/aligngpt.yaml``). Levels train the level embeddings only, so
the hook is refused unless the model has the part and the stage trains it in ``levels`` mode; a levels file bucketed
for another number of levels, or covering none of the stage's records, fails at start-up; records it lacks are
reported, then skipped per ``data.on_error``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from alignlm.data.hooks import HookedDataset, SampleHook
from alignlm.data.records import DataError
from alignlm.methods.aligngpt.levels import LevelLabels
from alignlm.methods.aligngpt.part import LEVELS_KEY, AlignLevels

log = logging.getLogger(__name__)


class LevelHook(SampleHook):
    """Looks up each record's level by id in a levels file."""

    def __init__(self, path: str | Path, model: Any, part: str = "align_levels") -> None:
        module = getattr(model, part, None)
        if not isinstance(module, AlignLevels):
            raise ValueError(
                f"data.hooks.levels gives per-sample levels but the model has no AlignGPT part "
                f"model.extras.{part}; add +model/align_levels=aligngpt (or train +exp=aligngpt)"
            )
        if module.train_mode != "levels":
            raise ValueError(
                f"data.hooks.levels gives per-sample levels, which only parts.{part}=levels uses (this stage: "
                f"{module.train_mode!r}); a gate stage mixes the levels itself, so remove the hook"
            )
        self.levels = LevelLabels(path).check(module.num_levels)

    def bind(self, dataset: HookedDataset) -> None:
        """A levels file that covers none of the stage's records fails; gaps are reported, then skipped."""
        ids = [rid for _, rid, _ in dataset.distinct_records()]
        missing = [rid for rid in ids if self.levels.get(rid) is None]
        if len(missing) == len(ids) or (missing and dataset.on_error == "raise"):
            raise DataError(
                f"AlignGPT levels {self.levels.path} have no level for {len(missing)} of the {len(ids)} records "
                f"of {[s.path for s in dataset.sources]}, e.g. {missing[:3]}; write them for this data "
                "(alignlm aligngpt-levels --data ...)"
            )
        if missing:
            log.warning(
                "AlignGPT levels %s have no level for %d of %d records (e.g. %s); those are skipped",
                self.levels.path,
                len(missing),
                len(ids),
                missing[:3],
            )

    def fields(self, record_id: str, record: dict[str, Any], visual_inputs: list[Any]) -> dict[str, Any]:
        level = self.levels.get(record_id)
        if level is None:
            raise DataError(f"AlignGPT levels {self.levels.path} have no level for this record")
        return {"align_level": level}

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {LEVELS_KEY: torch.tensor([s["align_level"] for s in samples], dtype=torch.long)}
