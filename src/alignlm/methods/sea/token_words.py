"""Token-word accuracy of a model's connector outputs on SEA-labelled images (docs/methods.md, metrics).

Each labelled visual token is matched to its nearest label word among the words' LLM input embeddings; ``alignlm
sea-eval`` prints it for checkpoints side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from alignlm.data.images import load_rgb, preprocess
from alignlm.geometry.metrics import token_word_accuracy
from alignlm.methods.sea.labels import SeaLabels
from alignlm.methods.sea.objective import word_embeddings


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
    the checkpoint's stage made its images square (``models/io.py: final_aspect_ratio``).
    """
    labels.place_on_model(model)
    device = next(model.parameters()).device
    tokens, ids = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = torch.stack([preprocess(load_rgb(p), model.image_spec, aspect_ratio) for p in chunk]).to(device)
        tokens.append(model.connector(model.vision(pixels)).tokens.flatten(0, 1).float().cpu())
        ids.append(labels.for_images(chunk)[0].flatten(0, 1))
    tokens_t, ids_t = torch.cat(tokens), torch.cat(ids)
    kept = [i for i, w in enumerate(labels.words) if w not in set(exclude)]
    remap = torch.full((len(labels.words) + 1,), -1, dtype=torch.long)  # last slot: id -1 stays -1
    remap[kept] = torch.arange(len(kept))
    ids_t = remap[ids_t]
    ids_t = ids_t.gather(-1, torch.sort((ids_t < 0).to(torch.int8), dim=-1, stable=True).indices)  # keep score order
    labelled = (ids_t >= 0).any(-1)
    tokens_t, ids_t = tokens_t[labelled], ids_t[labelled]
    words = word_embeddings(model, [labels.words[i] for i in kept], word_prefix).cpu()
    any_ids = [[w for w in row if w >= 0] for row in ids_t.tolist()]
    # empty slots (-1) mark a spare last column, dropped after: clamped to 0 they would erase a real word 0
    slots = torch.where(ids_t >= 0, ids_t, len(kept))
    has_word = torch.zeros(len(ids_t), len(kept) + 1, dtype=torch.bool).scatter_(1, slots, True)[:, :-1]
    return {
        "token_word_acc": token_word_accuracy(tokens_t, words, any_ids),
        "top_word_acc": token_word_accuracy(tokens_t, words, [row[:1] for row in any_ids]),
        "constant_acc": has_word.float().mean(0).max().item(),
        "tokens": float(len(any_ids)),
    }
