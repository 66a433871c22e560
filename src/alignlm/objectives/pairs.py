"""Image-caption pairs of a batch, for the global alignment objectives (VLAP, contrastive).

Pairing rule: every image is paired with the caption of the sample it belongs to, where the caption is the
sample's supervised tokens (the text the LM loss trains on; with the ``plain`` pretraining template, the
caption and its newline). So a sample with two images gives two pairs that share one caption, a text-only
sample gives none (its caption has no image to align with), and an image whose sample supervises no token is
left out. Both sides are read from what the model already computed: the visual tokens as the connector
output them, and the LLM's input-embedding table; no extra batch field is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alignlm.constants import IGNORE_INDEX


@dataclass
class Pairs:
    """Pooled visual vectors per image and mean caption embeddings per captioned sample, and who goes with whom."""

    visual: torch.Tensor  # [P, Dl] mean of each paired image's visual tokens (connector output), float32
    captions: torch.Tensor  # [C, Dl] mean input embedding of each caption that has at least one paired image
    caption_of_image: torch.Tensor  # [P] index into ``captions`` for each row of ``visual``

    @property
    def text(self) -> torch.Tensor:
        """The caption of each image, row-aligned with ``visual`` ``[P, Dl]``."""
        return self.captions[self.caption_of_image]


def image_caption_pairs(batch: dict[str, Any], out: Any, model: nn.Module) -> Pairs:
    """Pair every image of the batch with its own sample's caption (vectorised, no loop over samples or tokens)."""
    visual_tokens = out.visual_tokens  # [n_images, M, Dl]; one zero image when the batch has none
    per_image = visual_tokens.shape[1]
    images_per_sample = out.image_positions.sum(1) // per_image  # [B]
    sample_of_image = torch.repeat_interleave(
        torch.arange(len(images_per_sample), device=visual_tokens.device), images_per_sample
    )
    n_images = int(images_per_sample.sum())

    supervised = batch["labels"] != IGNORE_INDEX  # [B, T]: labels are unshifted, so these positions are the caption
    rows, cols = supervised.nonzero(as_tuple=True)
    table = model.llm.get_input_embeddings()
    tok_embeds = table(batch["input_ids"][rows, cols]).float()  # [n_supervised, Dl]
    n_samples = supervised.shape[0]
    sums = tok_embeds.new_zeros(n_samples, tok_embeds.shape[-1]).index_add_(0, rows, tok_embeds)
    counts = supervised.sum(1)
    caption_mean = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)

    keep_image = counts[sample_of_image] > 0
    sample_of_image = sample_of_image[keep_image]
    visual = visual_tokens[:n_images][keep_image].float().mean(1)
    captioned = torch.zeros(n_samples, dtype=torch.bool, device=visual.device)
    captioned[sample_of_image] = True
    caption_index = torch.cumsum(captioned.long(), 0) - 1  # sample -> row of ``captions``
    return Pairs(visual, caption_mean[captioned], caption_index[sample_of_image])


def zero_loss(out: Any) -> torch.Tensor:
    """A zero that still touches the visual tokens: a batch without pairs keeps data-parallel ranks in step."""
    return 0.0 * out.visual_tokens.float().sum()
