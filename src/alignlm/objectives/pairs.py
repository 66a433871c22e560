"""Image-caption pairs of a batch, for the global alignment objectives (VLAP, contrastive).

Pairing rule: every image is paired with the caption of the sample it belongs to, where the caption is the
sample's supervised tokens (the text the LM loss trains on; with the ``plain`` pretraining template, the
caption and its newline). So a sample with two images gives two pairs that share one caption, a text-only
sample gives none (its caption has no image to align with), and an image whose sample supervises no token is
left out. Samples whose supervised tokens are identical share one caption too: the colour of a square, a stock
caption repeated over a web-scale set, is one caption with several images, not several captions that would be
each other's negatives. Both sides are read from what the model already computed: the visual tokens as the connector
output them, and the LLM's input-embedding table; no extra batch field is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alignlm.constants import IGNORE_INDEX
from alignlm.data.collate import sample_means


@dataclass
class Pairs:
    """Pooled visual vectors per image and mean caption embeddings per captioned sample, and who goes with whom."""

    visual: torch.Tensor  # [P, Dl] mean of each paired image's visual tokens (connector output), float32
    captions: torch.Tensor  # [C, Dl] mean input embedding of each distinct caption with at least one paired image
    caption_of_image: torch.Tensor  # [P] index into ``captions`` for each row of ``visual``

    @property
    def text(self) -> torch.Tensor:
        """The caption of each image, row-aligned with ``visual`` ``[P, Dl]``."""
        return self.captions[self.caption_of_image]


def image_caption_pairs(batch: dict[str, Any], out: Any, model: nn.Module) -> Pairs:
    """Pair every image of the batch with its own sample's caption (vectorised, no loop over samples or tokens).

    Samples are found through the model's batch index, so padded rows and packed rows pair alike. Who pairs with
    whom comes from the index (``pair_images``, ``pair_samples``, ``pair_caption``), which the collator computes
    on the CPU: selecting the pairs on the device would size tensors by data there, a wait for the host.
    """
    index = model.index(batch)
    n_samples = int(index["num_samples"])
    supervised = (batch["labels"] != IGNORE_INDEX) & (index["sample_ids"] >= 0)  # unshifted: the caption tokens
    tok_embeds = model.llm.get_input_embeddings()(batch["input_ids"]).float()
    caption_mean = sample_means(tok_embeds, index["sample_ids"], supervised, n_samples)
    visual = out.visual_tokens[index["pair_images"]].float().mean(1)  # [n_images, M, Dl] holds a zero image if none
    return Pairs(visual, caption_mean[index["pair_samples"]], index["pair_caption"])


def zero_loss(out: Any) -> torch.Tensor:
    """A zero that still touches the visual tokens: a batch without pairs keeps data-parallel ranks in step."""
    return 0.0 * out.visual_tokens.float().sum()
