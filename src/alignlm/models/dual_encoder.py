"""Dense patch features of a Hugging Face dual encoder (CLIPModel, SiglipModel) in its joint image-text space.

A dual encoder only trains its pooled image feature against text, but its patch tokens, sent through the same
final layer norm and projection, land in the same space well enough to name what each patch shows (the
MaskCLIP observation). SEA's ``dual_encoder`` label source scores those patch features against words.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from alignlm.models.vision import ImageSpec

# per model family: prefix tokens before the patch grid, the final norm and projection the pooled feature gets
# (None: the family's last hidden state is already normed / already in the joint space), padding for text.
FAMILIES: dict[str, dict[str, Any]] = {
    "clip": {"prefix": 1, "norm": "vision_model.post_layernorm", "proj": "visual_projection", "padding": True,
             "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)},
    "siglip": {"prefix": 0, "norm": None, "proj": None, "padding": "max_length", "mean": (0.5,) * 3, "std": (0.5,) * 3},
}


class HFDualEncoder(nn.Module):
    """A CLIPModel / SiglipModel by name or local path: ``patch_embeddings`` and ``text_embeddings`` in the joint space."""

    def __init__(self, name_or_path: str, trust_remote_code: bool = False) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if config.model_type not in FAMILIES:
            raise ValueError(f"{name_or_path} is a {config.model_type!r} model; the dual_encoder label source supports "
                             f"{sorted(FAMILIES)} (or pass any object with patch_embeddings / text_embeddings)")
        self.family = FAMILIES[config.model_type]
        self.model = AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        vision = config.vision_config
        self.grid = vision.image_size // vision.patch_size
        mean, std = self.family["mean"], self.family["std"]
        try:  # the checkpoint's own normalisation when it ships a processor config
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(name_or_path)
            mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        except (OSError, ValueError, AttributeError):
            pass
        self.image_spec = ImageSpec(size=int(vision.image_size), mean=mean, std=std)

    def _module(self, dotted: str | None) -> nn.Module:
        if dotted is None:
            return nn.Identity()
        mod: Any = self.model
        for name in dotted.split("."):
            mod = getattr(mod, name)
        return mod

    @torch.no_grad()
    def patch_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, rows, cols, D]``: the last layer's patch tokens through the final norm and the visual projection."""
        hidden = self.model.vision_model(pixel_values=pixel_values.to(self.model.dtype)).last_hidden_state
        patches = hidden[:, self.family["prefix"]:]
        patches = self._module(self.family["proj"])(self._module(self.family["norm"])(patches))
        return patches.reshape(patches.shape[0], self.grid, self.grid, patches.shape[-1])

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """``[n, D]`` text features (the model's own pooled and projected text output)."""
        inputs = self.tokenizer(list(texts), padding=self.family["padding"], truncation=True, return_tensors="pt")
        out = self.model.get_text_features(**inputs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output
