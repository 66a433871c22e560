"""Zero-shot check of ReVision's premise: does a connector pretrained on caption embeddings read real images?

ReVision trains the connector on (ReAligned) text embeddings and relies on it transferring to the image embeddings
of the same dual encoder. This measures that transfer before any image finetuning. An input embedding (a caption's,
or an image's from the model's tower) is put on every visual token, each candidate caption is scored by the model's
summed LM loss under the stage's template (rendered and masked by the training data code, so the scores are the
training loss), and the input gets the label of its cheapest candidate. The same candidates for caption inputs and
for image inputs give one accuracy on each side of the modality gap: the first says the pretraining fitted its
captions, the second whether that fit reaches images.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from alignlm.constants import IGNORE_INDEX, IMAGE_TOKEN
from alignlm.data.collate import Collator
from alignlm.data.llava import LlavaDataset, Source
from alignlm.data.templates import get_template


class _Captions(LlavaDataset):
    """Caption records whose one image is supplied later, as an embedding: nothing is read from disk."""

    def visual_inputs(self, src: Source, rec: dict[str, Any]) -> list[str]:
        return [str(rec["id"])]

    def load_visuals(self, inputs: list[str]) -> dict[str, Tensor | None]:
        return {"pixel_values": None}


def candidate_batch(model: Any, candidates: Sequence[str], template: str = "plain") -> dict[str, Tensor]:
    """The candidates as caption records (one ``<image>``, then the caption), padded like a training batch."""
    if not candidates:
        raise ValueError("no candidate captions to score")
    records = [{"id": f"c{i}", "conversations": [{"from": "human", "value": IMAGE_TOKEN},
                                                 {"from": "gpt", "value": text}]} for i, text in enumerate(candidates)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "candidates.json"
        path.write_text(json.dumps(records))
        ds = _Captions([Source(str(path))], tokenizer=model.tokenizer, template=get_template(template),
                       image_spec=model.image_spec, num_image_tokens=model.num_image_tokens, on_error="raise")
        samples = [ds[i] for i in range(len(ds))]
    assert [s["id"] for s in samples] == [r["id"] for r in records], "candidates must keep their order"
    batch = Collator(model.tokenizer.pad_token_id)(samples)
    return {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}


@torch.no_grad()
def candidate_losses(model: Any, embeds: Tensor, candidates: Sequence[str], template: str = "plain") -> Tensor:
    """``[M, C]``: the summed LM loss of each candidate caption given each input embedding ``[M, D]`` on the visual tokens.

    ``embeds`` must be what the connector sees (for a ``DualEncoderTower``: unit embeddings times its ``scale``).
    One forward per input, over all candidates at once.
    """
    if embeds.ndim != 2:
        raise ValueError(f"embeds must be [M, D], got {tuple(embeds.shape)}")
    batch = candidate_batch(model, candidates, template)
    labels = batch["labels"][:, 1:]
    n_cand, n_tok = len(candidates), model.num_image_tokens
    rows = []
    for e in embeds:
        b = {**batch, "image_embeds": e[None, None].expand(n_cand, n_tok, -1)}
        inputs, _ = model.embed(b)
        hidden = model.llm.get_decoder()(inputs_embeds=inputs, attention_mask=b["attention_mask"], use_cache=False)
        logits = model.lm_logits(hidden.last_hidden_state[:, :-1]).float()
        ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=IGNORE_INDEX)
        rows.append(ce.sum(1))
    return torch.stack(rows)


def classify(model: Any, embeds: Tensor, candidates: Sequence[str], labels: Sequence[Any],
             template: str = "plain") -> list[Any]:
    """The label of each input's cheapest candidate caption (``labels[c]`` labels ``candidates[c]``)."""
    if len(labels) != len(candidates):
        raise ValueError(f"{len(labels)} labels for {len(candidates)} candidates")
    best = candidate_losses(model, embeds, candidates, template).argmin(dim=1)
    return [labels[int(c)] for c in best]


def factor_shares(grid: Tensor) -> dict[str, float]:
    """How the variance of vectors on a two-factor grid ``[A, B, D]`` splits: A's main effect, B's, and the rest.

    For the digits captions (A = wording, B = digit) this says what a connector's outputs mostly encode: an image
    carries the digit but no wording, so a connector whose outputs vary mainly with the wording has little for an
    image to address. Shares of the total squared deviation from the grand mean; they sum to 1 (balanced grid).
    """
    if grid.dim() != 3 or min(grid.shape[:2]) < 2:
        raise ValueError(f"factor_shares needs an [A, B, D] grid with A, B >= 2, got {tuple(grid.shape)}")
    x = grid.double() - grid.double().mean((0, 1))
    total = x.pow(2).sum(-1).mean()
    a, b = x.mean(1).pow(2).sum(-1).mean() / total, x.mean(0).pow(2).sum(-1).mean() / total
    return {"a": a.item(), "b": b.item(), "interaction": (1 - a - b).item()}
