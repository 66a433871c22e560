"""Token-word accuracy of a model's connector outputs on SEA-labelled images (docs/methods.md, metrics).

Each labelled visual token is matched to its nearest label word among the words' LLM input embeddings; ``alignlm
sea-eval`` prints it for checkpoints side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from alignlm.data.images import load_rgb, preprocess
from alignlm.methods.sea.labels import SeaLabels
from alignlm.methods.sea.objective import word_embeddings

BLOCK_ELEMENTS = 2**24  # float64 elements of one block of token rows (``geometry.metrics``' budget)


def nearest_words(tokens: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Each token's nearest word by cosine (float64, as ``geometry.metrics.token_word_accuracy`` measures it), on the
    tokens' device, -1 for a token with no direction (a non-finite entry, all zeros): both accuracies of
    :func:`token_word_report` are read from this one arg max, which each once computed again in full, on the CPU.
    Rows go in blocks of the metrics' size, so a batch's float64 products stay ~128 MB."""
    if not bool(torch.isfinite(words).all()) or bool((words == 0).all(dim=-1).any()):
        raise ValueError(
            "token-word accuracy: a label word's embedding is non-finite or all zeros: it has no direction"
        )
    unit_words = F.normalize(words.to(torch.float64), dim=-1).T
    step = max(1, BLOCK_ELEMENTS // max(words.shape[0], tokens.shape[1]))
    nearest = []
    for start in range(0, tokens.shape[0], step):
        rows = tokens[start : start + step].to(torch.float64)
        pick = (F.normalize(rows, dim=-1) @ unit_words).argmax(dim=1)
        no_direction = ~torch.isfinite(rows).all(dim=-1) | (rows == 0).all(dim=-1)
        nearest.append(pick.masked_fill(no_direction, -1))
    return torch.cat(nearest)


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
    aspect_ratio: str = "pad",
) -> dict[str, float]:
    """Token-word accuracy of a model's connector outputs on labelled images, among the label word list's embeddings.

    ``token_word_acc``: nearest word is any of the token's candidate words; ``top_word_acc``: it is the top-scoring
    one; ``constant_acc``: the best single word for every token, the level a collapsed connector gets for free.
    ``exclude`` drops words (e.g. "background") from both the candidates and the words searched. ``aspect_ratio``: how
    the checkpoint's stage made its images square (``models/io.py: final_aspect_ratio``). Each batch's tokens meet
    the words on the model's device and only their nearest word ids are kept: the tokens of the whole set never are.
    """
    labels.place_on_model(model)
    device = next(model.parameters()).device
    kept = [i for i, w in enumerate(labels.words) if w not in set(exclude)]
    words = word_embeddings(model, [labels.words[i] for i in kept], word_prefix).to(device)
    nearest, ids = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = torch.stack([preprocess(load_rgb(p), model.image_spec, aspect_ratio) for p in chunk]).to(device)
        nearest.append(nearest_words(model.connector(model.vision(pixels)).tokens.flatten(0, 1), words).cpu())
        ids.append(labels.for_images(chunk)[0].flatten(0, 1))
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
