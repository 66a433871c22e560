"""Batch assembly: pad token sequences, concatenate images in reading order, drop skipped samples.

The fields a method's :class:`~alignlm.data.hooks.SampleHook` added to each sample are assembled by that hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from alignlm.constants import IGNORE_INDEX
from alignlm.data.hooks import SampleHook


@dataclass(frozen=True)
class Skipped:
    """A sample the data policy dropped; carried to the collator so the trainer can count and report it."""

    id: str
    reason: str


@dataclass
class Collator:
    """Pads to the longest sample (right for training, left for generation) and stacks images."""

    pad_token_id: int
    padding_side: str = "right"
    hooks: Sequence[SampleHook] = field(default_factory=tuple)

    def __call__(self, samples: Sequence[dict[str, Any] | Skipped]) -> dict[str, Any]:
        kept = [s for s in samples if not isinstance(s, Skipped)]
        skipped = [s for s in samples if isinstance(s, Skipped)]
        batch: dict[str, Any] = {"skipped": skipped, "ids": [s["id"] for s in kept]}
        if not kept:
            return batch
        length = max(len(s["input_ids"]) for s in kept)
        n = len(kept)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        for i, s in enumerate(kept):
            k = len(s["input_ids"])
            sl = slice(length - k, length) if self.padding_side == "left" else slice(0, k)
            input_ids[i, sl] = s["input_ids"]
            labels[i, sl] = s["labels"]
            attention[i, sl] = 1
        batch.update(input_ids=input_ids, labels=labels, attention_mask=attention)
        for key in ("pixel_values", "image_embeds"):  # images (or the embeddings standing in for them) in reading order
            images = [s[key] for s in kept if s.get(key) is not None]
            batch[key] = torch.cat(images) if images else None
        batch["image_counts"] = torch.tensor([s["n_images"] for s in kept])
        for hook in self.hooks:
            batch.update(hook.collate(kept))
        for key in ("answer", "meta"):
            if key in kept[0]:
                batch[key] = [s.get(key) for s in kept]
        return batch
