"""Global contrastive alignment (CLIP-style symmetric InfoNCE): the baseline every alignment paper compares against.

Each image's pooled visual tokens (mean of the connector output) should be closer to its own caption's mean
LLM input embedding than to the other captions of the batch, and each caption closer to its own images:

    logits = scale * norm(v) @ norm(t).T          [P images, C captions], scale = 1 / temperature
    L = 0.5 * (CE(image -> its caption) + CE(caption -> any of its images))

Images pair with their own sample's caption (``objectives/pairs.py``). Captions are the batch's *distinct*
caption texts (samples whose supervised tokens are identical share one), so neither two images of one sample nor
two samples with the same caption act as each other's negatives: image -> text is a plain cross-entropy over the
captions, and text -> image is ``-log`` of the probability mass on *any* of the caption's images (MIL-NCE's
multiple-positive form; with one image per distinct caption both reduce to the usual InfoNCE).

Negatives are global under data parallelism (``gather: true``, the default, as CLIP and OpenCLIP do): every rank's
images against every rank's captions, the loss of the micro-batches the ranks train on at the same time taken
together, as one process would compute ``info_nce`` on the ranks' pairs concatenated in rank order
(``global_info_nce`` says how). With ``gather: false``, or in a single process, it is the local micro-batch's loss.

The temperature is learnable (``log(1 / temperature)`` is the parameter, its value clamped in place to at most
``log(max_scale)``, as CLIP does) or fixed: then it is configuration, not state (no checkpoint holds it, so a resume
trains at the temperature of its own config). The logits are float32 even under autocast: at a scale of 100 a bf16
matmul's cosines (spacing 2^-8 near 1) move a logit by up to 0.4. The objective also logs in-batch retrieval
accuracy both ways.
"""

from __future__ import annotations

import functools
import math
from typing import Annotated, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from alignlm.config import POSITIVE
from alignlm.objectives.base import LossTerm, Objective
from alignlm.objectives.pairs import caption_keys, image_caption_pairs, zero_loss


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


def global_info_nce(
    visual: torch.Tensor,
    captions: torch.Tensor,
    caption_of_image: torch.Tensor,
    keys: torch.Tensor,
    scale: torch.Tensor,
    host_group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This rank's share of ``info_nce`` over the pairs of every rank of the default process group: its images against
    every rank's captions, its captions against every rank's images. ``keys`` ``[C]`` name the captions
    (``pairs.caption_keys``): a caption of several ranks is one caption, as within a micro-batch.

    Every rank must call this at the same point, whatever its micro-batch holds: it enters the same collectives
    (a text-only rank with no pair included), or the job hangs.

    - **Sizes**: the ranks' numbers of images and captions are shapes the collator fixed on the CPU; they are
      exchanged on ``host_group`` (gloo, CPU tensors: no device is waited for) and every rank pads its pairs to the
      largest. Padding to a bound known without an exchange was the first choice, but there is none here: a
      micro-batch's images have no bound (a sample may hold several), the objective is not told
      ``per_device_batch_size``, and the trainer's stand-in for a micro-batch of bad data holds one sample where the
      others hold that many. Knowing the sizes on the host, every rank also takes the same branch: a global batch
      without a pair gathers nothing.
    - **Gathers**: the padded visual and caption vectors in one all-gather with autograd (its backward sums each
      rank's gradients onto the rank they came from), their keys and which rows are real in one more.
    - **Duplicates**: a caption is a column once, at its first occurrence in rank order (the rank whose collator would
      have kept it in one concatenated batch); an image's target is that column, a caption's positives are the images
      of its key on every rank, and a later copy's text -> image term is not counted.
    - **Scaling**: ``L_r = W * 0.5 * (i2t_r / P + t2i_r / C)``, ``i2t_r`` summed over this rank's images, ``t2i_r``
      over its first-occurrence captions, ``P``, ``C`` the global numbers of images and distinct captions. Data
      parallelism averages the ranks' gradients, so their mean is the global loss's gradient, and the mean of the
      ``L_r`` is its value.

    Metrics are this rank's queries against the global batch: ``i2t_acc`` over its images, ``t2i_acc`` over its
    captions (later copies included); none for a rank without pairs."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = rank_sizes(visual.shape[0], captions.shape[0], host_group)
    n_images = sum(p for p, _ in sizes)
    if n_images == 0:  # every rank knows it: none gathers
        return 0.0 * scale, {}
    p_max, c_max = (max(column) for column in zip(*sizes))
    with torch.autocast(visual.device.type, enabled=False):
        features = torch.cat([pad_rows(visual.float(), p_max), pad_rows(captions.float(), c_max)])
        gathered = AllGather.apply(features)  # [W, p_max + c_max, D]
        all_visual = F.normalize(gathered[:, :p_max].flatten(0, 1), dim=-1)  # [W * p_max, D]
        all_captions = F.normalize(gathered[:, p_max:].flatten(0, 1), dim=-1)  # [W * c_max, D]
        image_keys = keys[caption_of_image]
        real = torch.cat(
            [
                torch.arange(p_max, device=keys.device) < visual.shape[0],
                torch.arange(c_max, device=keys.device) < captions.shape[0],
            ]
        )
        named = torch.stack([torch.cat([pad_rows(image_keys, p_max), pad_rows(keys, c_max)]), real.long()])
        out = [torch.empty_like(named) for _ in range(world)]
        dist.all_gather(out, named)
        ids = torch.stack(out)  # [W, 2, p_max + c_max]
        image_ids, caption_ids = ids[:, 0, :p_max].flatten(), ids[:, 0, p_max:].flatten()
        image_real, caption_real = ids[:, 1, :p_max].flatten().bool(), ids[:, 1, p_max:].flatten().bool()
        first = first_occurrences(caption_ids, caption_real)  # [W * c_max]
        # image -> text: this rank's images over the distinct captions of all ranks
        i2t_logits = scale.float() * F.normalize(visual.float(), dim=-1) @ all_captions.T  # [P_r, W * c_max]
        target = ((caption_ids[None, :] == image_keys[:, None]) & caption_real[None, :]).long().argmax(1)
        i2t_logits = i2t_logits.masked_fill(~first, -math.inf)
        i2t = (i2t_logits.logsumexp(1) - i2t_logits.gather(1, target[:, None]).squeeze(1)).sum()
        # text -> image: this rank's captions over the images of all ranks, positives by key
        t2i_logits = scale.float() * F.normalize(captions.float(), dim=-1) @ all_visual.T  # [C_r, W * p_max]
        t2i_logits = t2i_logits.masked_fill(~image_real, -math.inf)
        positives = (image_ids[None, :] == keys[:, None]) & image_real[None, :]
        t2i_rows = t2i_logits.logsumexp(1) - t2i_logits.masked_fill(~positives, -math.inf).logsumexp(1)
        mine = first[rank * c_max : rank * c_max + captions.shape[0]]
        t2i = t2i_rows.masked_fill(~mine, 0.0).sum()
    loss = world * 0.5 * (i2t / n_images + t2i / first.sum().clamp(min=1))
    if visual.shape[0] == 0:
        return loss, {}
    with torch.no_grad():
        metrics = {
            "i2t_acc": (i2t_logits.argmax(1) == target).float().mean(),
            "t2i_acc": positives.gather(1, t2i_logits.argmax(1, keepdim=True)).float().mean(),
        }
    return loss, metrics


def rank_sizes(n_images: int, n_captions: int, group: dist.ProcessGroup | None) -> list[list[int]]:
    """Every rank's ``[n_images, n_captions]``, exchanged over ``group`` (gloo) as CPU tensors: numbers the host
    already holds, so no device is waited for and none is written to."""
    mine = torch.stack([torch.full((), n_images), torch.full((), n_captions)])
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out).tolist()


class AllGather(torch.autograd.Function):
    """``[W, *x.shape]``: every rank's ``x``; the backward sums the ranks' gradients of each rank's rows onto that rank
    (an all-reduce, which every backend has; ``torch.distributed.nn``'s gather is deprecated)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.stack(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total[dist.get_rank()]


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows`` (an all-gather takes one shape from every rank)."""
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


def first_occurrences(keys: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Which entries of ``keys`` ``[N]`` are real and the first real one of their key ``[N]`` bool.

    Sorted by key stably, real entries ahead of padding and each kind in its order, the first of each run of equal
    keys is the one wanted: O(N log N) where comparing every pair would take ``[N, N]`` (N = ranks x captions)."""
    reals_first = torch.argsort((~real).long(), stable=True)
    order = reals_first[torch.argsort(keys[reals_first], stable=True)]
    ordered = keys[order]
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=keys.device), ordered[1:] != ordered[:-1]])
    return (starts & real[order])[torch.argsort(order)]


@functools.cache
def host_group(world: dist.ProcessGroup) -> dist.ProcessGroup | None:
    """The group that exchanges host numbers among the ranks of ``world``: ``world`` itself where gloo serves its CPU
    tensors (None: the default group), else one gloo group over the same ranks, made once (every rank makes it at
    its first gathered step, as ``new_group`` needs)."""
    return None if "gloo" in str(dist.get_backend(world)) else dist.new_group(backend="gloo")


def data_parallel() -> bool:
    """Whether this process is one of several ranks of a default process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ContrastiveObjective(Objective):
    """Symmetric image-caption InfoNCE on pooled visual tokens vs mean caption embeddings."""

    name = "contrastive"
    min_batch_size = 2  # with one pair there is no negative: the loss is zero
    metric_names = ("i2t_acc", "t2i_acc", "temperature")  # a micro-batch without pairs measures the temperature only

    def __init__(
        self,
        temperature: Annotated[float, POSITIVE] = 0.07,
        learnable_temperature: bool = True,
        max_scale: Annotated[float, POSITIVE] = 100.0,
        gather: bool = True,
    ) -> None:
        """``gather``: global negatives across data-parallel ranks (see the module docstring). ``temperature`` and
        ``max_scale`` are finite and above 0 (a NaN had passed, and made every step non-finite)."""
        super().__init__()
        POSITIVE.check("contrastive temperature", temperature)
        POSITIVE.check("contrastive max_scale", max_scale)
        if not isinstance(gather, bool):
            raise ValueError(f"contrastive gather must be true or false, got {gather!r}")
        self.gather = gather
        self.max_log_scale = math.log(max_scale)
        # shape [1], not a 0-d tensor: DeepSpeed cannot broadcast 0-d parameters (a 0-d one in an older checkpoint loads)
        log_scale = torch.tensor([math.log(1.0 / temperature)])
        if learnable_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:  # not persistent: a fixed temperature comes from the config, also on resume
            self.register_buffer("log_scale", log_scale, persistent=False)

    @property
    def global_batch(self) -> bool:  # type: ignore[override]
        """Its loss is the ranks' gathered micro-batches' (``Objective.global_batch``) when it gathers."""
        return self.gather and data_parallel()

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
        if self.gather and data_parallel():
            keys = caption_keys(batch, model)
            group = host_group(dist.group.WORLD)
            loss, metrics = global_info_nce(pairs.visual, pairs.captions, pairs.caption_of_image, keys, scale, group)
            if pairs.visual.shape[0] == 0:  # the pairless rule below, for the same reason
                loss = loss + zero_loss(out)
            return LossTerm(loss, {**metrics, "temperature": 1.0 / scale.detach()})
        if pairs.visual.shape[0] == 0:
            return LossTerm(zero_loss(out) + 0.0 * scale, {"temperature": 1.0 / scale.detach()})
        loss, metrics = info_nce(pairs.visual, pairs.captions, pairs.caption_of_image, scale)
        metrics["temperature"] = 1.0 / scale.detach()
        return LossTerm(loss, metrics)
