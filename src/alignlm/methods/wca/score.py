"""Weighted visual-text cross alignment: a zero-shot score that compares local views of an image with several
descriptions of each class, instead of the whole image with one prompt.

For an image ``x`` with ``N`` random crops ``x_i`` (areas ``scale`` of the image, aspect kept) and class ``c`` with
``M`` descriptions ``d_cj`` and a class prompt ``p_c``, all embedded by the dual encoder and L2-normalised:

    w_i  = softmax_i( cos(x_i, x) / tau_crop )          crops that look like the whole image weigh more
    v_cj = softmax_j( cos(d_cj, p_c) / tau_text )       descriptions close to the class prompt weigh more
    WCA(x, c) = cos( sum_i w_i x_i, sum_j v_cj d_cj )

and the predicted class is the arg max; the plain zero-shot score is ``cos(x, p_c)``. The cosine is the official
code's (tmlr-group/WCA renormalises each class's weighted description embedding, and the weighted crop embedding);
``normalise=False`` gives the paper's equation, ``sum_i sum_j w_i v_cj cos(x_i, d_cj)``, the same sum unnormalised,
which favours classes whose descriptions agree (a smaller ``|sum_j v_cj d_cj|`` for diverse ones: on random
embeddings of 50 classes the two picked the same class for 63 % of images). The temperatures, crop scales and the
count are knobs (*ours*: the official configs use ``tau_crop`` about 0.018 and ``tau_text`` about 0.135, and 60
square crops of side 0.1-0.9 resampled from precomputed ones).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from alignlm.config import POSITIVE
from alignlm.models.encoders import device_of


@dataclass(frozen=True)
class WCAConfig:
    crops: int = 16
    scale: tuple[float, float] = (0.4, 0.9)  # crop side as a share of the image side
    tau_crop: float = 0.1
    tau_text: float = 0.1
    normalise: bool = True  # the official code's cosine; False: the paper's unnormalised sum

    def __post_init__(self) -> None:
        """Refused here, before an image is read: no crop scored a made-up result and exited 0, a temperature <= 0 a
        meaningless softmax, a reversed scale range failed inside numpy."""
        if isinstance(self.crops, bool) or not isinstance(self.crops, int) or self.crops < 1:
            raise ValueError(f"WCA crops={self.crops!r} must be a whole number >= 1 (random crops per image)")
        for name in ("tau_crop", "tau_text"):
            tau = getattr(self, name)
            if not POSITIVE.holds(tau):
                raise ValueError(f"WCA {name}={tau!r} must be a finite number > 0 (a softmax temperature)")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(
                f"WCA scale={self.scale!r} must be LOW HIGH with 0 < LOW <= HIGH <= 1 (crop side as a share of the "
                "image side)"
            )


def random_crops(image: Image.Image, n: int, scale: tuple[float, float], rng: np.random.Generator) -> list[Image.Image]:
    """``n`` crops of ``image``, each side a uniform ``scale`` share of the image's, at uniform positions."""
    width, height = image.size
    out = []
    for _ in range(n):
        s = rng.uniform(*scale)
        w, h = max(1, round(s * width)), max(1, round(s * height))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        out.append(image.crop((x, y, x + w, y + h)))
    return out


@dataclass(frozen=True)
class Descriptions:
    """Every class's description embeddings as one matrix, on the encoder's device: one product scores an image
    against all of them (a loop over classes of small CPU products once took longer than the encoder's forward)."""

    embeddings: Tensor  # [C, D], each class's descriptions weighted by their v and summed
    normalised: bool  # the embeddings normalised, and so the crops' weighted sum: cosines

    def score(self, crops: Tensor, w: Tensor) -> Tensor:
        """``[C]``: every class's score at once, from the crops' weighted sum ``sum_i w_i x_i``."""
        image = w @ crops
        return self.embeddings @ (F.normalize(image, dim=-1) if self.normalised else image)


def class_texts(
    encoder: Any, prompts: Sequence[str], descriptions: Sequence[Sequence[str]], tau: float, normalise: bool = True
) -> tuple[Tensor, Descriptions]:
    """Normalised class-prompt embeddings ``[C, D]`` and every class's description embeddings weighted by ``v`` (a
    softmax within each class) and summed, normalised where ``normalise``, both on the encoder's device."""
    device = device_of(encoder)
    p = F.normalize(encoder.encode_texts(list(prompts)).float(), dim=-1).to(device)
    classes = []
    for c, texts in enumerate(descriptions):
        d = F.normalize(encoder.encode_texts(list(texts)).float(), dim=-1).to(device)
        classes.append(torch.softmax(d @ p[c] / tau, dim=0) @ d)
    embeddings = torch.stack(classes)
    return p, Descriptions(F.normalize(embeddings, dim=-1) if normalise else embeddings, normalise)


def scores(
    encoder: Any,
    image: Image.Image,
    prompts: Tensor,
    descriptions: Descriptions,
    config: WCAConfig,
    rng: np.random.Generator,
) -> tuple[Tensor, Tensor]:
    """``(plain, wca)`` scores ``[C]`` of one image (see the module docstring), on the encoder's device."""
    views = encoder.encode_images([image, *random_crops(image, config.crops, config.scale, rng)]).float()
    views = F.normalize(views.to(prompts.device), dim=-1)
    whole, crops = views[0], views[1:]
    w = torch.softmax(crops @ whole / config.tau_crop, dim=0)
    return prompts @ whole, descriptions.score(crops, w)


def crop_rng(seed: int, key: str) -> np.random.Generator:
    """The crop stream of the image named ``key`` under ``seed``: the key hashed (Python's ``hash`` of a string
    changes between processes), so a seed and an image always give the same crops."""
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")])


def zero_shot(
    encoder: Any,
    images: Iterable[Image.Image],
    labels: Sequence[int],
    prompts: Sequence[str],
    descriptions: Sequence[Sequence[str]],
    config: WCAConfig = WCAConfig(),
    seed: int = 0,
    keys: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Zero-shot classification of ``images`` by the plain score and by WCA: accuracies and every image's
    correctness under both (for paired differences). ``images`` may be a generator: each is taken when it is scored,
    so a large set is never decoded at once. ``keys`` (default: the positions) name the images: each image's crops
    come from its own stream (:func:`crop_rng`), so its score does not depend on the images scored before it (one
    stream over the set gave an image other crops when the set was reordered or filtered)."""
    p, texts = class_texts(encoder, prompts, descriptions, config.tau_text, config.normalise)
    keys = [str(i) for i in range(len(labels))] if keys is None else keys
    plain_right, wca_right = [], []
    for image, label, key in zip(images, labels, keys, strict=True):
        plain, wca = scores(encoder, image, p, texts, config, crop_rng(seed, key))
        plain_right.append(float(int(plain.argmax()) == label))
        wca_right.append(float(int(wca.argmax()) == label))
    n = max(len(labels), 1)
    return {
        "n": len(labels),
        "plain": sum(plain_right) / n,
        "wca": sum(wca_right) / n,
        "plain_right": plain_right,
        "wca_right": wca_right,
    }


def descriptions_for(classes: Sequence[str], templates: Sequence[str] | Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Per class, its descriptions: templates with ``{c}`` filled in, or a class -> descriptions mapping."""
    if isinstance(templates, Mapping):
        missing = [c for c in classes if c not in templates]
        if missing:
            raise ValueError(f"descriptions lack classes {missing}")
        return [list(templates[c]) for c in classes]
    return [[t.format(c=c) for t in templates] for c in classes]
