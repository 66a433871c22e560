"""High-norm artifact tokens of vision towers: a per-layer probe, and a filter that masks or replaces them.

Large ViTs trained long enough (DINOv2, CLIP, DeiT-III; Darcet et al. 2024, "Vision Transformers Need Registers")
repurpose a few low-information patch tokens as global scratch space: their norm is ~10x that of the other patches
and their features no longer describe their patch. Towers trained with register tokens move that computation to the
registers, which ``select_feature`` drops before the connector. For towers without registers, ``model.
vision_artifacts`` filters the tower's output: a patch token whose norm exceeds ``factor`` times the median patch
norm of its image is an outlier, and ``mask`` zeroes it, ``replace`` puts the mean of its non-outlier 3x3
neighbours in its place (the image's mean non-outlier token where the patches form no square grid or every
neighbour is an outlier too). Prefix tokens (CLS, registers, a pooled token) are never touched.

The probe (:func:`artifact_report`, ``alignlm eval``'s ``probe.artifacts``) reports, per tower layer, the share of
outlier patch tokens, the mean over images of the largest norm ratio, and the prefix tokens' norm ratio.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("mask", "replace")


def norm_ratios(tokens: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's L2 norm over the median patch-token norm of its image, in float32: ``([B, P], [B, prefix])``."""
    norms = tokens.float().norm(dim=-1)
    patches = norms[:, prefix:]
    # torch.median's lower middle value, taken from a sort: median with indices has no deterministic CUDA kernel, so
    # it would stop a `deterministic: true` run
    median = patches.sort(dim=1).values[:, (patches.shape[1] - 1) // 2, None].clamp_min(torch.finfo(torch.float32).tiny)
    return patches / median, norms[:, :prefix] / median


@torch.no_grad()
def artifact_report(vision: Any, batches: Iterable[torch.Tensor], factor: float) -> dict[str, dict[str, Any]]:
    """Per tower layer (``vision.layer_tokens``) and for the tower's ``output`` (after ``model.vision_artifacts`` when
    set), over the images of ``batches`` (pixels ``[B, 3, H, W]``; eval's come decoded ahead by loader workers):
    ``outlier_share`` (patch tokens over ``factor`` x their image's median norm), ``max_ratio`` (mean over images of
    the largest patch ratio), ``prefix_ratio`` (mean norm ratio of the prefix tokens; None without any). The sums stay
    on the tower's device until the end: a read per layer and batch waited for the device each time."""
    sums: dict[str, torch.Tensor] = {}  # name -> [outliers, sum of max ratios, prefix ratio sum], float64
    counts: dict[str, list[int]] = {}  # name -> [patches, images, prefix tokens]
    device = next(vision.parameters()).device
    for batch in batches:
        batch = batch.to(device)
        layers = [*vision.layer_tokens(batch), ("output", vision(batch), vision.num_prefix_tokens)]
        for name, tokens, prefix in layers:
            patches, pre = norm_ratios(tokens, prefix)
            found = torch.stack([(patches > factor).sum(), patches.max(dim=1).values.sum(), pre.sum()]).double()
            sums[name] = sums[name] + found if name in sums else found
            n = counts.setdefault(name, [0, 0, 0])
            n[0], n[1], n[2] = n[0] + patches.numel(), n[1] + len(patches), n[2] + pre.numel()
    report = {}
    for name, total in sums.items():
        outliers, max_ratios, prefix_ratios = total.tolist()
        patches, images, prefixes = counts[name]
        report[name] = {
            "outlier_share": outliers / patches,
            "max_ratio": max_ratios / images,
            "prefix_ratio": prefix_ratios / prefixes if prefixes else None,
        }
    return report


class ArtifactFilter(nn.Module):
    """Masks or replaces outlier patch tokens of a tower's output ``[B, prefix + P, D]`` (see the module docstring).

    Registered by the model builder as a forward hook of the tower, so every caller (training, probes, the monitor,
    generation) sees the filtered features. Holds no parameters."""

    def __init__(self, mode: str, factor: float, prefix: int) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"model.vision_artifacts.mode={mode!r} is not known; choose one of {list(MODES)}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
            raise ValueError(
                f"model.vision_artifacts.factor={factor!r} must be a number > 1 (times the median patch-token norm)"
            )
        self.mode, self.factor, self.prefix = mode, float(factor), prefix

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        head, patches = features[:, : self.prefix], features[:, self.prefix :]
        ratio, _ = norm_ratios(features, self.prefix)
        outlier = (ratio > self.factor).unsqueeze(-1)
        if self.mode == "mask":
            cleaned = patches.masked_fill(outlier, 0)
        else:
            cleaned = torch.where(outlier, self._neighbour_mean(patches, ~outlier), patches)
        return torch.cat([head, cleaned], dim=1)

    @staticmethod
    def _neighbour_mean(patches: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Per token, the mean of the kept tokens among its 3x3 neighbours, else of all kept tokens of its image."""
        b, p, d = patches.shape
        keep = keep.to(patches.dtype)
        whole = (patches * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
        side = math.isqrt(p)
        if side * side != p:
            return whole.expand_as(patches)
        grid = lambda x: x.transpose(1, 2).reshape(b, -1, side, side)  # noqa: E731
        sums = F.avg_pool2d(grid(patches * keep), 3, stride=1, padding=1, divisor_override=1)
        counts = F.avg_pool2d(grid(keep), 3, stride=1, padding=1, divisor_override=1)
        local = (sums / counts.clamp_min(1)).flatten(2).transpose(1, 2)
        return torch.where(counts.flatten(2).transpose(1, 2) > 0, local, whole)


def attach_filter(vision: nn.Module, node: Mapping[str, Any] | None) -> ArtifactFilter | None:
    """Build ``model.vision_artifacts`` (null: off) and hook it onto the tower's output."""
    if node is None:
        return None
    unknown = set(node) - {"mode", "factor"}
    if unknown:
        raise ValueError(f"model.vision_artifacts has unknown keys {sorted(unknown)}; it takes mode and factor")
    filt = ArtifactFilter(str(node.get("mode", "replace")), node.get("factor", 4.0), vision.num_prefix_tokens)
    vision.artifact_filter = filt  # a submodule without state: visible in the model tree, nothing in checkpoints
    vision.register_forward_hook(lambda module, args, output: module.artifact_filter(output))
    return filt
