"""Token-word accuracy of a model's connector outputs on SEA-labelled images (docs/methods.md, metrics).

Each labelled visual token is matched to its nearest label word among the words' LLM input embeddings; ``alignlm
sea-eval`` prints it for checkpoints side by side.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from alignlm.data.images import PADDED, ImageReading, decoded_batches, prepared
from alignlm.geometry.metrics import nearest_words
from alignlm.methods.sea.labels import SeaLabels
from alignlm.methods.sea.objective import word_embeddings


def hit_rate(nearest: torch.Tensor, label_ids: torch.Tensor) -> float:
    """The share of tokens whose ``nearest`` word is one of their ``label_ids`` (``[T, k]``, -1 = empty slot)."""
    return (label_ids == nearest[:, None]).any(-1).to(torch.float64).mean().item()


@torch.no_grad()
def token_word_report(
    model: Any,
    labels: SeaLabels,
    images: Sequence[Path],
    word_prefix: str = " ",
    batch_size: int = 32,
    exclude: Sequence[str] = (),
    reading: ImageReading = PADDED,
) -> dict[str, float]:
    """Token-word accuracy of a model's connector outputs on labelled images, among the label word list's embeddings.

    ``token_word_acc``: nearest word is any of the token's candidate words; ``top_word_acc``: it is the top-scoring
    one; ``constant_acc``: the best single word for every token, the level a collapsed connector gets for free.
    ``exclude`` drops words (e.g. "background") from both the candidates and the words searched. ``reading``: how the
    checkpoint's stage read its images (``models/io.py: final_image_reading``). Each batch's tokens meet
    the words on the model's device and only their nearest word ids are kept: the tokens of the whole set never are.
    """
    labels.place_on_model(model)
    device = next(model.parameters()).device
    kept = [i for i, w in enumerate(labels.words) if w not in set(exclude)]
    words = word_embeddings(model, [labels.words[i] for i in kept], word_prefix).to(device)
    nearest, ids = [], []
    prepare = functools.partial(prepared, model.image_spec, reading)
    batches = decoded_batches(images, prepare, batch_size, device, "auto", raise_unreadable=True)
    for start, batch in zip(range(0, len(images), batch_size), batches):
        pixels = batch.items.to(device, non_blocking=True)
        nearest.append(nearest_words(model.connect(model.vision(pixels)).tokens.flatten(0, 1), words).cpu())
        ids.append(labels.for_images(images[start : start + batch_size])[0].flatten(0, 1))
    nearest_t, ids_t = torch.cat(nearest), torch.cat(ids)
    remap = torch.full((len(labels.words) + 1,), -1, dtype=torch.long)  # last slot: id -1 stays -1
    remap[kept] = torch.arange(len(kept))
    ids_t = remap[ids_t]
    ids_t = ids_t.gather(-1, torch.sort((ids_t < 0).to(torch.int8), dim=-1, stable=True).indices)  # keep score order
    labelled = (ids_t >= 0).any(-1)
    if not bool(labelled.any()):
        raise ValueError("token-word accuracy: no visual token of these images keeps a label word to measure")
    nearest_t, ids_t = nearest_t[labelled], ids_t[labelled]
    if bool((nearest_t < 0).any()):
        raise ValueError(
            f"token-word accuracy: {int((nearest_t < 0).sum())} labelled visual tokens are non-finite or all zeros"
        )
    # empty slots (-1) mark a spare last column, dropped after: clamped to 0 they would erase a real word 0
    slots = torch.where(ids_t >= 0, ids_t, len(kept))
    has_word = torch.zeros(len(ids_t), len(kept) + 1, dtype=torch.bool).scatter_(1, slots, True)[:, :-1]
    return {
        "token_word_acc": hit_rate(nearest_t, ids_t),
        "top_word_acc": hit_rate(nearest_t, ids_t[:, :1]),  # sorted: the first slot holds the top-scoring word
        "constant_acc": has_word.float().mean(0).max().item(),
        "tokens": float(len(ids_t)),
    }
