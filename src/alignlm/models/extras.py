"""Extra input parts: optional model parts that write one input embedding per sample at a reserved slot.

A method that needs the LLM to read something besides text and images (e.g. an alignment-level token) adds a
part under ``model.extras.<name>``. The part owns a special token (``slot_token``); the data pipeline inserts it
right after BOS in every sequence (by id, never from text), or only in those of samples with an image where the part
says ``with_images_only``, and after the visual tokens are spliced in, the model asks the part for each sample's
embedding at that slot. The part is saved, loaded and trained like any other
(``stage.parts.<name>``, with its own ``TRAIN_MODES`` if it defines them), and export refuses a model that has one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class InputPart(nn.Module):
    """Base class. Built with ``hidden_size`` (the LLM's), ``num_visual_tokens`` (per image) and ``embed_std`` (the
    LLM input-embedding table's std, a natural init scale) plus its own knobs from config."""

    slot_token: str = ""
    with_images_only: bool = False  # a text-only sample gets no slot (its sequence is as without the part)

    @property
    def requires_batch_keys(self) -> tuple[str, ...]:
        """Batch fields the part needs in its current train mode; checked on the first batch, like objectives'."""
        return ()

    def forward(
        self,
        batch: dict[str, Any],
        embeds: torch.Tensor,
        visual: torch.Tensor | None,
        is_image: torch.Tensor,
        is_slot: torch.Tensor,
        index: dict[str, Any],
    ) -> torch.Tensor:  # pragma: no cover - interface
        """Each sample's embedding ``[B, D]`` for its slot.

        ``embeds`` ``[B, T, D]`` are the input embeddings with visual tokens spliced in; ``visual`` ``[n_images, M, D]``
        the connector's tokens (None when the batch has no image); ``is_image`` / ``is_slot`` ``[rows, T]`` mark the
        visual positions and every extra part's slot; ``index`` is ``AlignLM.index(batch)`` (which sample each token
        and each image belongs to; samples may be packed several to a row). Rows of the result follow sample order;
        a sample without a slot (``with_images_only``, no image) has a row all the same, which nothing reads.
        """
        raise NotImplementedError
