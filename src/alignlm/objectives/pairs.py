"""Image-caption pairs of a batch, for the global alignment objectives (VLAP, contrastive).

Pairing rule: every image is paired with the caption of the sample it belongs to, where the caption is the
sample's supervised tokens (the text the LM loss trains on; with the ``plain`` pretraining template, the
caption and its newline). So a sample with two images gives two pairs that share one caption, a text-only
sample gives none (its caption has no image to align with), and an image whose sample supervises no token is
left out. Samples whose supervised tokens are identical share one caption too: the colour of a square, a stock
caption repeated over a web-scale set, is one caption with several images, not several captions that would be
each other's negatives. Both sides are read from what the model's forward already computed: the visual tokens as the
connector output them, and the captions' token embeddings in what the LLM decoded from (``AlignOutput.inputs_embeds``);
no extra batch field is needed, and no second lookup in the embedding table, which a sharded model (FSDP2) has put
back in shards after its forward. ``caption_keys`` names each caption by its token ids on the device, so that
data-parallel ranks find their shared captions without asking the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alignlm.constants import IGNORE_INDEX
from alignlm.data.collate import sample_counts, sample_means

# splitmix64's finaliser constants as signed 64-bit integers (torch has no uint64 arithmetic)
_MIX = (-4658895280553007687, -7723592293110705685)


@dataclass
class Pairs:
    """Pooled visual vectors per image and mean caption embeddings per captioned sample, and who goes with whom."""

    visual: torch.Tensor  # [P, Dl] mean of each paired image's visual tokens (connector output), float32
    captions: torch.Tensor  # [C, Dl] mean input embedding of each distinct caption with at least one paired image
    caption_of_image: torch.Tensor  # [P] index into ``captions`` for each row of ``visual``

    @property
    def text(self) -> torch.Tensor:
        """The caption of each image, row-aligned with ``visual`` ``[P, Dl]``."""
        return self.captions[self.caption_of_image]


def image_caption_pairs(batch: dict[str, Any], out: Any, model: nn.Module) -> Pairs:
    """Pair every image of the batch with its own sample's caption (vectorised, no loop over samples or tokens).

    Samples are found through the model's batch index, so padded rows and packed rows pair alike. Who pairs with
    whom comes from the index (``pair_images``, ``pair_samples``, ``pair_caption``), which the collator computes
    on the CPU: selecting the pairs on the device would size tensors by data there, a wait for the host.
    """
    index = model.index(batch)
    n_samples = int(index["num_samples"])
    supervised = (batch["labels"] != IGNORE_INDEX) & (index["sample_ids"] >= 0)  # unshifted: the caption tokens
    tok_embeds = caption_token_embeddings(out).float()
    caption_mean = sample_means(tok_embeds, index["sample_ids"], supervised, n_samples)
    visual = out.visual_tokens[index["pair_images"]].float().mean(1)  # [n_images, M, Dl] holds a zero image if none
    return Pairs(visual, caption_mean[index["pair_samples"]], index["pair_caption"])


def caption_token_embeddings(out: Any) -> torch.Tensor:
    """The LLM's input embeddings of the forward that made ``out`` ``[rows, T, Dl]``, the captions' tokens among them.

    Read from the output, not looked up again: the table's gradient then flows through the one lookup the LLM's input
    came from (the same numbers as a second lookup), and the lookup ran where the weights were whole."""
    embeds = getattr(out, "inputs_embeds", None)
    if embeds is None:
        raise ValueError(
            f"the image-caption pairs read the captions' token embeddings from the model's output (inputs_embeds, "
            f"set by AlignLM.forward); this {type(out).__name__} has none"
        )
    return embeds


def caption_keys(batch: dict[str, Any], model: nn.Module) -> torch.Tensor:
    """A 64-bit key per row of ``image_caption_pairs(...).captions`` ``[C]`` int64, equal for captions whose supervised
    token ids are equal: the collator's rule for one caption (``pair_caption``), computed on the device.

    Why not compare the caption vectors themselves: a mean embedding forgets the order, so "dog bites man" and "man
    bites dog" would be one caption where the collator keeps two, and a GPU's atomic sums can give one caption two
    vectors a bit apart. So every supervised token is hashed with its place in its caption (splitmix64 of
    ``token << 32 | ordinal``, integer arithmetic wrapping modulo 2^64), a caption's hashes are summed (integer sums are
    exact in any order) and mixed with its length. Two different captions share a key with probability about 2^-64.
    A token's ordinal is its count of earlier supervised tokens of its sample; samples are laid out in the order of
    their ids, padded or packed (``data/collate.py``), so that is the count before it in the batch less the count of
    the earlier samples'. Fixed shapes throughout, nothing read back."""
    index = model.index(batch)
    n_samples = int(index["num_samples"])
    sample_ids = index["sample_ids"]
    supervised = (batch["labels"] != IGNORE_INDEX) & (sample_ids >= 0)
    flat = supervised.flatten().long()
    counts = sample_counts(sample_ids, supervised, n_samples)  # [n_samples]
    starts = counts.cumsum(0) - counts  # supervised tokens of the samples before each one
    ordinal = flat.cumsum(0) - flat - starts[sample_ids.flatten().clamp(min=0)]
    token_hash = _mix((batch["labels"].flatten().clamp(min=0) << 32) | ordinal)
    owner = torch.where(supervised.flatten(), sample_ids.flatten(), n_samples)
    sums = token_hash.new_zeros(n_samples + 1).index_add_(0, owner, token_hash)[:n_samples]
    return _mix(sums ^ _mix(counts))[index["pair_samples"]]


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64: a bijection that spreads every input bit over the output (shifts logical)."""
    z = (z ^ _shift_right(z, 30)) * _MIX[0]
    z = (z ^ _shift_right(z, 27)) * _MIX[1]
    return z ^ _shift_right(z, 31)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """A logical right shift of int64 (torch's is arithmetic: it copies the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def zero_loss(out: Any) -> torch.Tensor:
    """A zero that still touches the visual tokens: a batch without pairs keeps data-parallel ranks in step."""
    return 0.0 * out.visual_tokens.float().sum()
