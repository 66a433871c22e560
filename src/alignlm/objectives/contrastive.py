"""Global contrastive alignment (CLIP-style symmetric InfoNCE): the baseline every alignment paper compares against.

Each image's pooled visual tokens (mean of the connector output) should be closer to its own caption's mean
LLM input embedding than to the other captions of the batch, and each caption closer to its own images:

    logits = scale * norm(v) @ norm(t).T          [P images, C captions], scale = 1 / temperature
    L = 0.5 * (CE(image -> its caption) + CE(caption -> any of its images))

Images pair with their own sample's caption (``objectives/pairs.py``). Captions are the batch's *distinct*
caption texts (samples whose supervised tokens are identical share one), so neither two images of one sample nor
two samples with the same caption act as each other's negatives: image -> text is a plain cross-entropy over the
captions, and text -> image is ``-log`` of the probability mass on *any* of the caption's images (MIL-NCE's
multiple-positive form; with one image per distinct caption both reduce to the usual InfoNCE). Negatives are those
of the local micro-batch.

The temperature is learnable (``log(1 / temperature)`` is the parameter, its value clamped in place to at most
``log(max_scale)``, as CLIP does) or fixed: then it is configuration, not state (no checkpoint holds it, so a resume
trains at the temperature of its own config). The logits are float32 even under autocast: at a scale of 100 a bf16
matmul's cosines (spacing 2^-8 near 1) move a logit by up to 0.4. The objective also logs in-batch retrieval
accuracy both ways.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alignlm.objectives.base import LossTerm, Objective
from alignlm.objectives.pairs import image_caption_pairs, zero_loss


def info_nce(
    visual: torch.Tensor, captions: torch.Tensor, caption_of_image: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric InfoNCE between ``visual`` ``[P, D]`` and ``captions`` ``[C, D]``; image ``i`` matches caption ``caption_of_image[i]``.

    The logits are computed in float32 with autocast off (the trainer runs objectives under autocast)."""
    with torch.autocast(visual.device.type, enabled=False):
        logits = scale.float() * F.normalize(visual.float(), dim=-1) @ F.normalize(captions.float(), dim=-1).T  # [P, C]
    i2t = F.cross_entropy(logits, caption_of_image)
    # [C, P], by comparison: F.one_hot would do on a GPU (device asserts there), but on a CPU it reads the index range,
    # which the CPU no-wait test (tests/test_training.py) cannot tell from a GPU wait
    positives = torch.arange(captions.shape[0], device=logits.device)[:, None] == caption_of_image[None, :]
    t2i = (logits.T.logsumexp(1) - logits.T.masked_fill(~positives, -math.inf).logsumexp(1)).mean()
    with torch.no_grad():
        metrics = {
            "i2t_acc": (logits.argmax(1) == caption_of_image).float().mean(),
            "t2i_acc": positives.gather(1, logits.T.argmax(1, keepdim=True)).float().mean(),
        }
    return 0.5 * (i2t + t2i), metrics


class ContrastiveObjective(Objective):
    """Symmetric image-caption InfoNCE on pooled visual tokens vs mean caption embeddings."""

    name = "contrastive"
    min_batch_size = 2  # with one pair there is no negative: the loss is zero
    metric_names = ("i2t_acc", "t2i_acc", "temperature")  # a micro-batch without pairs measures the temperature only

    def __init__(self, temperature: float = 0.07, learnable_temperature: bool = True, max_scale: float = 100.0) -> None:
        super().__init__()
        if temperature <= 0 or max_scale <= 0:
            raise ValueError(f"contrastive needs temperature > 0 and max_scale > 0, got {temperature} and {max_scale}")
        self.max_log_scale = math.log(max_scale)
        # shape [1], not a 0-d tensor: DeepSpeed cannot broadcast 0-d parameters (a 0-d one in an older checkpoint loads)
        log_scale = torch.tensor([math.log(1.0 / temperature)])
        if learnable_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:  # not persistent: a fixed temperature comes from the config, also on resume
            self.register_buffer("log_scale", log_scale, persistent=False)

    @property
    def scale(self) -> torch.Tensor:
        """``1 / temperature``, at most ``max_scale`` so a learnable temperature cannot collapse (CLIP clamps at 100).

        The stored value is clamped in place, and the clamped parameter used as it is: a clamp inside the graph
        would give a parameter past the bound a gradient of exactly 0, so it could never come back (OpenCLIP
        clamps the value after each step, which is the same thing one step earlier)."""
        with torch.no_grad():
            self.log_scale.clamp_(max=self.max_log_scale)
        return self.log_scale.exp().reshape(())

    def forward(self, batch: dict[str, Any], out: Any, model: nn.Module) -> LossTerm:
        pairs = image_caption_pairs(batch, out, model)
        scale = self.scale
        if pairs.visual.shape[0] == 0:
            return LossTerm(zero_loss(out) + 0.0 * scale, {"temperature": 1.0 / scale.detach()})
        loss, metrics = info_nce(pairs.visual, pairs.captions, pairs.caption_of_image, scale)
        metrics["temperature"] = 1.0 / scale.detach()
        return LossTerm(loss, metrics)
