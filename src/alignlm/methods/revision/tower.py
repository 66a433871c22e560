"""``DualEncoderTower``: a dual encoder's global image embedding as the vision tower, for ReVision.

ReVision (docs/methods.md) pretrains the connector on caption embeddings standing in for images, so at
image time the connector must receive the same kind of input: the dual encoder's pooled image embedding,
L2-normalised (ReAlign lands text embeddings on the unit sphere, where the normalised image embeddings are),
times ``scale``, and broadcast to ``num_tokens`` identical tokens, as the reference broadcasts its one vector to
LLaVA's 576. The text-embedding data hook (:mod:`alignlm.methods.revision.text_embeds`) feeds caption embeddings in
exactly this form.

``scale`` sets the norm the connector sees: 1.0 keeps the reference's unit vectors (coordinates ~ 1/sqrt(D));
``sqrt(D)`` gives coordinates of order one, like the CNN and ViT features connector initialisations and learning
rates are usually tuned on.

The encoder is an ``alignlm dual-encoder fit`` folder or a Hugging Face CLIP / SigLIP (``load_encoder``), and
the tower is always frozen: the caption embeddings and ReAlign's statistics describe its space as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignlm.models.encoders import load_encoder
from alignlm.models.vision import VisionTower


class DualEncoderTower(VisionTower):
    """Pixels -> ``[B, num_tokens, D]``: the unit global image embedding times ``scale``, on every token."""

    def __init__(self, encoder: str, num_tokens: int = 576, scale: float = 1.0, name: str | None = None) -> None:
        super().__init__()
        if int(num_tokens) < 1:
            raise ValueError(f"model.vision.num_tokens={num_tokens} must be at least 1")
        if not float(scale) > 0:
            raise ValueError(
                f"model.vision.scale={scale} must be positive (the norm of the embedding the connector sees)"
            )
        self.scale = float(scale)
        self.encoder = load_encoder(str(encoder), name=name)
        self.encoder.requires_grad_(False).eval()
        self.encoder_name: str = self.encoder.name
        self.image_spec = self.encoder.image_spec  # the data pipeline prepares images as the encoder expects
        size = self.image_spec.size
        with torch.no_grad():
            self.hidden_size = int(self.encoder.encode_pixels(torch.zeros(1, 3, size, size)).shape[-1])
        self.num_patches = int(num_tokens)
        self.num_prefix_tokens = self.num_patches  # every token is the pooled embedding; none describes a patch

    def requires_grad_(self, requires_grad: bool = True) -> DualEncoderTower:
        """Refuse to train: text embeddings and ReAlign statistics were computed in the frozen encoder's space."""
        if requires_grad:
            raise ValueError(
                "stage.parts.vision must be frozen with model.vision=dual_encoder: the caption embeddings "
                "and ReAlign statistics describe the frozen encoder's space"
            )
        return super().requires_grad_(False)

    def forward(self, pixel_values: Tensor) -> Tensor:
        embedding = F.normalize(self.encoder.encode_pixels(pixel_values).float(), dim=-1) * self.scale
        return embedding.unsqueeze(1).expand(-1, self.num_patches, -1)
