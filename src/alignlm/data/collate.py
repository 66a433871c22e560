"""Batch assembly: padded or packed rows, images in reading order, the index of every sample and supervised token.

Two layouts, one batch format:
- *padded* (generation, or ``data.packing: false``): one sample per row, padded to the longest (right for training,
  left for generation); ``attention_mask`` marks the real tokens.
- *packed* (``data.packing``; ``auto`` packs where attention isolates samples for free): the micro-batch's samples laid end to end in rows of at most ``pack_length``
  tokens (first fit, in sample order), each sample's ``position_ids`` starting at 0, so the model isolates samples
  from each other (block-diagonal causal attention) and no compute is spent on padding. A row's unused tail is one
  more isolated run of padding.

Either way the batch carries, computed here on the CPU so the training step never waits on the GPU to learn them:
``sample_ids`` ``[rows, T]`` (which sample each token belongs to, -1 for padding), ``image_sample`` ``[n_images]``
(the sample of each image), ``lm_positions`` / ``lm_targets`` (each supervised next-token prediction: the flat index
``row * T + t`` of the predicting position and the token it must predict), the image-caption pairs
(``pair_images``, ``pair_samples``, ``pair_caption``), ``num_samples``, and ``cu_seq_lens`` / ``max_seq_len`` (each
run of one sample, or of a row's padding, over the rows laid end to end: what flash-attention's varlen kernel takes,
packed or padded). Images, their
stand-ins and every hook's fields follow the order in which the samples' tokens are laid out, which is the order
the model writes visual tokens into ``image_positions`` (the flat index of every image-token slot).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from alignlm.constants import IGNORE_INDEX
from alignlm.data.hooks import SampleHook


@dataclass(frozen=True)
class Skipped:
    """A sample the data policy dropped; carried to the collator so the trainer can count and report it."""

    id: str
    reason: str
    cause: str = "malformed record"


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Samples (by index, in order) into rows of at most ``capacity`` tokens, each into the first row with room.

    A sample longer than ``capacity`` gets a row of its own.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        j = next((r for r, free in enumerate(room) if n <= free), None)
        if j is None:
            rows.append([i])
            room.append(capacity - n)
        else:
            rows[j].append(i)
            room[j] -= n
    return rows


def attended_pairs(lengths: Sequence[int]) -> int:
    """The (query, key) positions causal attention covers over samples of ``lengths`` tokens, each sample by its own
    length (packed or padded): the ``i``-th token of a sample sees ``i`` positions. Attention's share of a step's FLOPs
    (training/throughput.py), counted here on the CPU as the real tokens are."""
    return sum(n * (n + 1) // 2 for n in lengths)


def index_fields(
    labels: torch.Tensor, sample_ids: torch.Tensor, is_image: torch.Tensor, num_image_tokens: int, num_samples: int
) -> dict:
    """The batch's index (on the CPU: free; on a GPU: a host sync): ``lm_positions``, ``lm_targets``,
    ``image_positions`` (the flat index of every image-token slot, in reading order), ``image_sample``, and the
    image-caption pairs of the global alignment objectives (``objectives/pairs.py``): ``pair_images`` (the images
    whose sample supervises a token), ``pair_samples`` (one sample per distinct caption of those images' samples, the
    first to have it) and ``pair_caption`` (each paired image's row in ``pair_samples``). Samples whose supervised
    tokens are identical have one caption: two images captioned alike are positives of one caption, never each
    other's negatives."""
    rows, length = labels.shape
    target = torch.cat([labels[:, 1:], labels.new_full((rows, 1), IGNORE_INDEX)], dim=1)
    same = torch.cat([sample_ids[:, 1:] == sample_ids[:, :-1], sample_ids.new_zeros(rows, 1, dtype=torch.bool)], dim=1)
    predicts = (target != IGNORE_INDEX) & same  # never across a sample boundary of a packed row
    positions = predicts.flatten().nonzero().squeeze(1)
    image_positions = is_image.flatten().nonzero().squeeze(1)
    image_sample = sample_ids.flatten()[image_positions[:: max(num_image_tokens, 1)]]
    supervised = (labels != IGNORE_INDEX) & (sample_ids >= 0)  # unshifted: a sample's caption tokens
    captioned = torch.bincount(sample_ids[supervised], minlength=num_samples)[:num_samples] > 0
    pair_images = captioned[image_sample].nonzero().squeeze(1)
    paired = torch.zeros(num_samples, dtype=torch.bool, device=labels.device)
    paired[image_sample[pair_images]] = True
    caption, firsts = caption_classes(
        labels[supervised], sample_ids[supervised], paired.nonzero().squeeze(1), num_samples
    )
    return {
        "lm_positions": positions,
        "lm_targets": target.flatten()[positions],
        "image_positions": image_positions,
        "image_sample": image_sample,
        "pair_images": pair_images,
        "pair_samples": firsts,
        "pair_caption": caption[image_sample[pair_images]],
    }


def caption_classes(
    tokens: torch.Tensor, owners: torch.Tensor, samples: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The caption class of each of ``samples`` (each owns some of the supervised token ids ``tokens``, laid out in
    reading order), by its token ids: ``[num_samples]`` indexed by sample (-1 for the others), and the first sample of
    each class, classes numbered by it. Read on the host: free in the collator, a sync on a GPU."""
    texts: dict[int, list[int]] = {}
    for token, owner in zip(tokens.tolist(), owners.tolist()):
        texts.setdefault(owner, []).append(token)
    classes: dict[tuple[int, ...], int] = {}
    caption, firsts = [-1] * num_samples, []
    for sample in samples.tolist():
        text = tuple(texts[sample])
        if text not in classes:
            classes[text] = len(firsts)
            firsts.append(sample)
        caption[sample] = classes[text]
    device = samples.device
    return torch.tensor(caption, dtype=torch.long, device=device), torch.tensor(firsts, dtype=torch.long, device=device)


def sample_counts(sample_ids: torch.Tensor, keep: torch.Tensor, num_samples: int) -> torch.Tensor:
    """How many ``keep`` tokens each sample has ``[num_samples]``, on the tokens' device without reading anything back
    (a bincount would size its output by the largest id, and a boolean index by the data, both read on the host):
    every token is added to its sample's row, the ones not kept to one spare row that is dropped."""
    return _counts(_owners(sample_ids, keep, num_samples), num_samples)


def sample_means(values: torch.Tensor, sample_ids: torch.Tensor, keep: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The mean of ``values`` ``[rows, T, D]`` over each sample's ``keep`` tokens ``[num_samples, D]`` (zeros for a
    sample with none), in ``values``' dtype, the same way as ``sample_counts``."""
    owner = _owners(sample_ids, keep, num_samples)
    flat = values.flatten(0, 1)
    sums = flat.new_zeros(num_samples + 1, flat.shape[-1]).index_add_(0, owner, flat)[:num_samples]
    return sums / _counts(owner, num_samples).clamp(min=1).unsqueeze(1).to(sums.dtype)


def _owners(sample_ids: torch.Tensor, keep: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Each token's row: its sample's where kept, else the spare row ``num_samples``."""
    return torch.where(keep, sample_ids, num_samples).flatten()


def _counts(owner: torch.Tensor, num_samples: int) -> torch.Tensor:
    return owner.new_zeros(num_samples + 1).index_add_(0, owner, torch.ones_like(owner))[:num_samples]


@dataclass
class Collator:
    """Pads or packs a micro-batch's samples and assembles images and hook fields (see the module docstring).

    ``pack_length`` (tokens per row) turns packing on; ``image_token_id`` and ``num_image_tokens`` let the collator
    index the images (without them ``image_sample`` is left to the model).
    """

    pad_token_id: int
    padding_side: str = "right"
    hooks: Sequence[SampleHook] = field(default_factory=tuple)
    pack_length: int | None = None
    image_token_id: int | None = None
    num_image_tokens: int = 0

    def __call__(self, samples: Sequence[dict[str, Any] | tuple[dict[str, Any], ...] | Skipped]) -> dict[str, Any]:
        samples = _unpair(samples)
        kept = [s for s in samples if not isinstance(s, Skipped)]
        skipped = [s for s in samples if isinstance(s, Skipped)]
        batch: dict[str, Any] = {"skipped": skipped}
        if not kept:
            batch["ids"] = []
            return batch
        lengths = [len(s["input_ids"]) for s in kept]
        if self.pack_length and self.padding_side == "right":
            rows = pack_rows(lengths, self.pack_length)
            kept = [kept[i] for row in rows for i in row]  # samples in the order their tokens are laid out
            batch.update(self._packed(_renumber(rows), kept))
        else:
            batch.update(self._padded(kept))
        batch["cu_seq_lens"], batch["max_seq_len"] = runs(batch["sample_ids"])
        batch["ids"] = [s["id"] for s in kept]
        batch["num_samples"] = len(kept)
        batch["num_tokens"] = sum(lengths)  # real tokens, counted here so that nobody counts them on the device
        batch["attended_pairs"] = attended_pairs(lengths)
        is_image = batch["input_ids"] == self.image_token_id if self.image_token_id is not None else None
        if is_image is not None:
            batch.update(index_fields(batch["labels"], batch["sample_ids"], is_image, self.num_image_tokens, len(kept)))
        for key in ("pixel_values", "image_embeds"):  # images (or the embeddings standing in for them) in reading order
            images = [s[key] for s in kept if s.get(key) is not None]
            batch[key] = torch.cat(images) if images else None
        batch["image_counts"] = torch.tensor([s["n_images"] for s in kept])
        batch["truncated"] = [s["id"] for s in kept if s.get("truncated")]
        for hook in self.hooks:
            batch.update(hook.collate(kept))
        for key in ("answer", "meta"):
            if key in kept[0]:
                batch[key] = [s.get(key) for s in kept]
        if "pair" in kept[0]:  # preference pairs: which pair each sample answers, and whether it is the chosen answer
            batch["pair"] = torch.tensor([s["pair"] for s in kept])
            batch["chosen"] = torch.tensor([s["chosen"] for s in kept])
        return batch

    def _padded(self, kept: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(s["input_ids"]) for s in kept)
        n = len(kept)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        sample_ids = torch.full((n, length), -1, dtype=torch.long)
        for i, s in enumerate(kept):
            k = len(s["input_ids"])
            sl = slice(length - k, length) if self.padding_side == "left" else slice(0, k)
            input_ids[i, sl] = s["input_ids"]
            labels[i, sl] = s["labels"]
            attention[i, sl] = 1
            sample_ids[i, sl] = i
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "sample_ids": sample_ids}

    def _packed(self, rows: list[list[int]], kept: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(sum(len(kept[i]["input_ids"]) for i in row) for row in rows)
        n = len(rows)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        sample_ids = torch.full((n, length), -1, dtype=torch.long)
        positions = torch.zeros((n, length), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                k = len(kept[i]["input_ids"])
                input_ids[r, at : at + k] = kept[i]["input_ids"]
                labels[r, at : at + k] = kept[i]["labels"]
                attention[r, at : at + k] = 1
                sample_ids[r, at : at + k] = i
                positions[r, at : at + k] = torch.arange(k)
                at += k
            positions[r, at:] = torch.arange(length - at)  # the tail is a run of its own: it attends to nothing real
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention,
            "sample_ids": sample_ids,
            "position_ids": positions,
        }


def runs(sample_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The runs of one sample (or of one row's padding) over the rows laid end to end: cumulative lengths ``[0, ...,
    rows * T]`` (int32) and the longest run, what flash-attention's varlen kernel takes to keep samples apart. On the
    CPU, while collating, so that the kernel's maximum is a number and nobody reads the device for it."""
    rows, length = sample_ids.shape
    ids = sample_ids.numpy()
    starts = np.flatnonzero(np.diff(ids, axis=1, prepend=ids[:, :1] - 1) != 0)  # a row's first token starts a run
    bounds = np.append(starts, rows * length)
    return torch.from_numpy(bounds.astype(np.int32)), int(np.diff(bounds).max())


def _unpair(samples: Sequence[Any]) -> list[Any]:
    """A preference dataset's items, ``(chosen, rejected)`` tuples, as two samples each that know their pair and
    their side; the layout may reorder samples, the pair index survives it. Pairs are numbered 0, 1, ... among the
    kept pairs only (a ``Skipped`` item takes no number): the objective sizes its per-pair buffers by the kept
    samples, ``num_samples // 2``, so a number counting skipped items would index past them."""
    out: list[Any] = []
    pairs = 0
    for item in samples:
        if isinstance(item, tuple):
            out += [{**sample, "pair": pairs, "chosen": side == 0} for side, sample in enumerate(item)]
            pairs += 1
        else:
            out.append(item)
    return out


def _renumber(rows: list[list[int]]) -> list[list[int]]:
    """Rows of original sample indices -> rows of indices into the samples reordered row by row."""
    out, k = [], 0
    for row in rows:
        out.append(list(range(k, k + len(row))))
        k += len(row)
    return out
