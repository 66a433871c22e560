"""AlignGPT's alignment levels (docs/methods.md, AlignGPT): one extra input token per sample with an image telling the
LLM how well its image and text agree, so it can learn to lean on the image more or less (a text-only sample gets
none, as in the authors' code).

- Pretraining: each image-caption pair carries a level ``0..L-1`` (its dual-encoder image-text cosine, bucketed into
  equal-count bins by ``alignlm aligngpt-levels``) and the token is the learned row ``H[level]``.
- Finetuning and inference have no label: a gate ``MLP(M -> hidden -> GELU -> L-1)`` over the ``M`` dot products
  between the sample's visual tokens and its mean text embedding gives softmax weights ``a``, and the token is
  ``a @ H[0:L-1] + H[L-1]``: the top level (the best-aligned pairs) always counts in full, the gate mixes the rest.

An extra input part of the model (``model.extras.align_levels``, ``models/extras.py``): the model writes its token at
the ``<align>`` slot the data pipeline inserts after BOS. Which half trains is the stage's ``parts.align_levels``:
``levels`` (H, the gate frozen: pretraining, needs per-sample levels from the ``levels`` data hook), ``gate`` (the
gate, H frozen: finetuning) or ``frozen``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from alignlm.constants import IGNORE_INDEX
from alignlm.data.collate import sample_means
from alignlm.models.extras import InputPart

ALIGN_TOKEN = "<align>"
LEVELS_KEY = "align_levels"  # the batch field of per-sample levels, written by the levels data hook


def before_first_answer(labels: Tensor, sample_ids: Tensor, num_samples: int) -> Tensor:
    """``[rows, T]``: the positions of each sample before its first supervised token (all of a sample with none).

    A sample's tokens are one run within its row (padded or packed), so "before" is a smaller flat index. Computed on
    the tokens' device, nothing read back: each sample's first supervised flat index by a scatter-min."""
    flat = torch.arange(labels.numel(), device=labels.device).view_as(labels)
    supervised = (labels != IGNORE_INDEX) & (sample_ids >= 0)
    owner = torch.where(supervised, sample_ids, num_samples).flatten()
    first = torch.full((num_samples + 1,), labels.numel(), device=labels.device, dtype=flat.dtype)
    first = first.scatter_reduce(0, owner, flat.flatten(), reduce="amin")
    return flat < first[sample_ids.clamp(min=0)]


class AlignLevels(InputPart):
    """Level embeddings ``H [L, D]`` and the gate that mixes them when a sample has no level label."""

    TRAIN_MODES = ("frozen", "levels", "gate")
    slot_token = ALIGN_TOKEN
    # as the official code: a sample without an image gets no level token (its gate ran on nothing but its prompt
    # and gave every text-only sample one learned constant token, which the gate's training then served too)
    with_images_only = True

    def __init__(
        self,
        hidden_size: int,
        num_visual_tokens: int,
        embed_std: float,
        num_levels: int = 8,
        gate_hidden: int = 256,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        if num_levels < 2:
            raise ValueError(
                f"model.align_levels.num_levels={num_levels}: AlignGPT needs at least 2 levels "
                "(the gate mixes levels 0..L-2 on top of level L-1)"
            )
        if gate_hidden < 1:
            raise ValueError(f"model.align_levels.gate_hidden={gate_hidden} must be >= 1")
        std = embed_std if init_std is None else init_std
        if not std > 0:
            raise ValueError(
                f"model.align_levels.init_std={init_std!r} must be > 0 (null: the LLM embedding table's std)"
            )
        self.num_levels, self.num_visual_tokens = int(num_levels), int(num_visual_tokens)
        self.embeddings = nn.Parameter(torch.randn(num_levels, hidden_size) * std)
        self.gate = nn.Sequential(
            nn.Linear(num_visual_tokens, gate_hidden), nn.GELU(), nn.Linear(gate_hidden, num_levels - 1)
        )
        self.train_mode = "frozen"

    def set_train_mode(self, mode: str) -> None:
        """Called by the stage for ``parts.align_levels``: ``levels`` trains H, ``gate`` trains the gate, H stays."""
        if mode not in self.TRAIN_MODES:
            raise ValueError(f"stage.parts.align_levels={mode!r} is not known; choose one of {list(self.TRAIN_MODES)}")
        self.embeddings.requires_grad_(mode == "levels")
        self.gate.requires_grad_(mode == "gate")
        self.train_mode = mode

    @property
    def requires_batch_keys(self) -> tuple[str, ...]:
        """Training the level embeddings needs each sample's level (the ``levels`` data hook provides it)."""
        return (LEVELS_KEY,) if self.train_mode == "levels" else ()

    def gate_weights(self, visual: Tensor, text: Tensor) -> Tensor:
        """Mixture weights ``[B, L-1]`` (rows sum to 1) from visual tokens ``[B, M, D]`` and mean text ``[B, D]``."""
        if visual.shape[1] != self.num_visual_tokens:
            raise ValueError(
                f"the align-levels gate takes {self.num_visual_tokens} visual tokens per sample, got {visual.shape[1]}"
            )
        dots = torch.einsum("bmd,bd->bm", visual, text.to(visual.dtype))
        return self.gate(dots.to(self.gate[0].weight.dtype)).softmax(dim=-1)

    def mixture(self, weights: Tensor) -> Tensor:
        """``a @ H[0:L-1] + H[L-1]`` per sample, ``[B, D]``."""
        return weights.to(self.embeddings.dtype) @ self.embeddings[:-1] + self.embeddings[-1]

    def labelled(self, levels: Tensor) -> Tensor:
        """Pretraining's level token ``H[level]`` per sample, ``[B, D]``."""
        return self.embeddings[levels]

    def gated(self, visual: Tensor, text: Tensor) -> Tensor:
        """Finetuning's and inference's level token, the gated mixture per sample, ``[B, D]``."""
        return self.mixture(self.gate_weights(visual, text))

    def forward(
        self,
        batch: dict[str, Any],
        embeds: Tensor,
        visual: Tensor | None,
        is_image: Tensor,
        is_slot: Tensor,
        index: dict[str, Any],
    ) -> Tensor:
        """Each sample's level token: ``H[level]`` with ``batch["align_levels"]`` (pretraining); without (finetuning,
        generation) the gate's mixture from the sample's visual tokens (mean over its images; a sample without one has
        no slot, and its row, made from zeros, is read by nothing) and
        the mean embedding of its text before its first supervised token: the prompt of the first answer, which is all
        that generating that answer sees, so training matches it (later turns, questions included, come after it)."""
        levels = batch.get(LEVELS_KEY)
        if levels is not None:
            return self.labelled(levels)
        sample_ids, n = index["sample_ids"], int(index["num_samples"])
        text = (sample_ids >= 0) & ~is_image & ~is_slot
        if batch.get("labels") is not None:
            text = text & before_first_answer(batch["labels"], sample_ids, n)
        text_mean = sample_means(embeds, sample_ids, text, n)
        return self.gated(self._per_sample_visual(visual, index["image_sample"], n), text_mean)

    def _per_sample_visual(self, visual: Tensor | None, image_sample: Tensor, n: int) -> Tensor:
        """Each sample's visual tokens ``[n, M, D]``, averaged over its images; zeros for a sample without any (which
        has no slot: its row is read by nothing)."""
        dtype = self.embeddings.dtype if visual is None else visual.dtype
        out = torch.zeros(n, self.num_visual_tokens, self.embeddings.shape[1], device=image_sample.device, dtype=dtype)
        if visual is None:
            return out
        counts = image_sample.new_zeros(n).index_add_(0, image_sample, torch.ones_like(image_sample))
        return out.index_add(0, image_sample, visual) / counts.clamp(min=1).to(dtype)[:, None, None]
