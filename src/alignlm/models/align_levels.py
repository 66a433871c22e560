"""AlignGPT's alignment levels (METHODS.md section 6): one extra input token per sample telling the LLM how well its
image and text agree, so it can learn to lean on the image more or less.

- Pretraining: each image-caption pair carries a level ``0..L-1`` (its dual-encoder image-text cosine, bucketed into
  equal-count bins by ``alignlm aligngpt-levels``) and the token is the learned row ``H[level]``.
- Finetuning and inference have no label: a gate ``MLP(M -> hidden -> GELU -> L-1)`` over the ``M`` dot products
  between the sample's visual tokens and its mean text embedding gives softmax weights ``a``, and the token is
  ``a @ H[0:L-1] + H[L-1]``: the top level (the best-aligned pairs) always counts in full, the gate mixes the rest.

``AlignLM`` owns one of these as its optional ``align_levels`` part and writes the token at the ``<align>`` slot the
data pipeline inserts after BOS. Which half trains is the stage's ``parts.align_levels``: ``levels`` (H, the gate
frozen: pretraining), ``gate`` (the gate, H frozen: finetuning) or ``frozen``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AlignLevels(nn.Module):
    """Level embeddings ``H [L, D]`` and the gate that mixes them when a sample has no level label."""

    TRAIN_MODES = ("frozen", "levels", "gate")

    def __init__(self, hidden_size: int, num_visual_tokens: int, embed_std: float, num_levels: int = 8,
                 gate_hidden: int = 256, init_std: float | None = None) -> None:
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"model.align_levels.num_levels={num_levels}: AlignGPT needs at least 2 levels "
                             "(the gate mixes levels 0..L-2 on top of level L-1)")
        if gate_hidden < 1:
            raise ValueError(f"model.align_levels.gate_hidden={gate_hidden} must be >= 1")
        std = embed_std if init_std is None else init_std
        if not std > 0:
            raise ValueError(f"model.align_levels.init_std={init_std!r} must be > 0 (null: the LLM embedding table's std)")
        self.num_levels, self.num_visual_tokens = int(num_levels), int(num_visual_tokens)
        self.embeddings = nn.Parameter(torch.randn(num_levels, hidden_size) * std)
        self.gate = nn.Sequential(nn.Linear(num_visual_tokens, gate_hidden), nn.GELU(), nn.Linear(gate_hidden, num_levels - 1))
        self.train_mode = "frozen"

    def set_train_mode(self, mode: str) -> None:
        """Called by the stage for ``parts.align_levels``: ``levels`` trains H, ``gate`` trains the gate, H stays."""
        if mode not in self.TRAIN_MODES:
            raise ValueError(f"stage.parts.align_levels={mode!r} is not known; choose one of {list(self.TRAIN_MODES)}")
        self.embeddings.requires_grad_(mode == "levels")
        self.gate.requires_grad_(mode == "gate")
        self.train_mode = mode

    def gate_weights(self, visual: Tensor, text: Tensor) -> Tensor:
        """Mixture weights ``[B, L-1]`` (rows sum to 1) from visual tokens ``[B, M, D]`` and mean text ``[B, D]``."""
        if visual.shape[1] != self.num_visual_tokens:
            raise ValueError(f"the align-levels gate takes {self.num_visual_tokens} visual tokens per sample, got {visual.shape[1]}")
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
