"""A Hugging Face dual encoder (CLIPModel, SiglipModel) in its joint image-text space: global image and text
features (``alignlm embed``, ReAlign) and dense patch features (SEA's ``dual_encoder`` label source).

A dual encoder only trains its pooled image feature against text, but its patch tokens, sent through the same
final layer norm and projection, land in the same space well enough to name what each patch shows (the
MaskCLIP observation).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from alignlm.models.vision import ImageSpec

# per model family: prefix tokens before the patch grid, the final norm and projection the pooled feature gets
# (None: the family's last hidden state is already normed / already in the joint space), text padding (SigLIP was
# trained on texts padded to the full length; CLIP pools at the EOS token, any padding works), and the
# normalisation used when the checkpoint ships no image processor.
FAMILIES: dict[str, dict[str, Any]] = {
    "clip": {"prefix": 1, "norm": "vision_model.post_layernorm", "proj": "visual_projection", "padding": True,
             "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)},
    "siglip": {"prefix": 0, "norm": None, "proj": None, "padding": "max_length", "mean": (0.5,) * 3, "std": (0.5,) * 3},
    "siglip2": {"prefix": 0, "norm": None, "proj": None, "padding": "max_length", "mean": (0.5,) * 3, "std": (0.5,) * 3},
}


def _features(out: object) -> Tensor:
    """transformers < 5 returns the projected features; >= 5 returns an output whose pooler_output holds them."""
    return out if isinstance(out, Tensor) else out.pooler_output  # type: ignore[attr-defined]


class HFDualEncoder(nn.Module):
    """A CLIPModel / SiglipModel by name or local path, with its tokenizer and (when it ships one) image processor."""

    def __init__(self, name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 name: str | None = None, trust_remote_code: bool = False) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if config.model_type not in FAMILIES:
            raise ValueError(f"{name_or_path}: model_type {config.model_type!r} is not a supported dual encoder; expected "
                             f"one of {sorted(FAMILIES)}, a folder from `alignlm dual-encoder fit`, or (for SEA labels) "
                             "any object with patch_embeddings / encode_texts")
        self.family = FAMILIES[config.model_type]
        self.name = name or str(name_or_path)
        self.device = torch.device(device)
        self.model = AutoModel.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        self.max_length = config.text_config.max_position_embeddings
        mean, std = self.family["mean"], self.family["std"]
        try:  # the checkpoint's own preprocessing when it ships a processor config
            self.image_processor = AutoImageProcessor.from_pretrained(name_or_path)
            mean, std = tuple(self.image_processor.image_mean), tuple(self.image_processor.image_std)
        except (OSError, ValueError, AttributeError):
            self.image_processor = None
        self.image_spec = ImageSpec(size=int(config.vision_config.image_size), mean=mean, std=std)

    def _module(self, dotted: str | None) -> nn.Module:
        if dotted is None:
            return nn.Identity()
        mod: Any = self.model
        for part in dotted.split("."):
            mod = getattr(mod, part)
        return mod

    @torch.inference_mode()
    def encode_images(self, images: list) -> Tensor:
        """``[n, D]`` pooled image features of PIL images (the processor's own resize and crop when there is one)."""
        if self.image_processor is not None:
            pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        else:
            from alignlm.data.images import preprocess

            pixels = torch.stack([preprocess(im, self.image_spec) for im in images])
        return self.encode_pixels(pixels.to(self.device)).float().cpu()

    def encode_pixels(self, pixel_values: Tensor) -> Tensor:
        """``[B, D]`` pooled image features of preprocessed pixels, on their device (the ReVision tower's forward)."""
        return _features(self.model.get_image_features(pixel_values=pixel_values.to(self.model.dtype)))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """``[n, D]`` text features (the model's own pooled and projected text output)."""
        batch = self.tokenizer(list(texts), padding=self.family["padding"], truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        keys = ("input_ids", "attention_mask") if "attention_mask" in batch else ("input_ids",)
        return _features(self.model.get_text_features(**{k: batch[k].to(self.device) for k in keys})).float().cpu()

    @torch.inference_mode()
    def patch_embeddings(self, pixel_values: Tensor) -> Tensor:
        """``[B, rows, cols, D]``: the last layer's patch tokens through the final norm and the visual projection."""
        hidden = self.model.vision_model(pixel_values=pixel_values.to(self.device, self.model.dtype)).last_hidden_state
        patches = hidden[:, self.family["prefix"]:]
        patches = self._module(self.family["proj"])(self._module(self.family["norm"])(patches))
        grid = math.isqrt(patches.shape[1])
        if grid * grid != patches.shape[1]:
            raise ValueError(f"{self.name}: {patches.shape[1]} patch tokens do not form a square grid")
        return patches.reshape(patches.shape[0], grid, grid, patches.shape[-1]).float().cpu()
