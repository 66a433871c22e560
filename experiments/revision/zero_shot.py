"""Does a caption-pretrained connector read digits from real images, before any image finetuning?

For each checkpoint (a ReVision pretraining ``final/`` or step checkpoint, whose tower is a dual encoder), two
accuracies (``classify`` below), with the 40 digits captions (4 wordings x 10 digits, the generator's
own templates) as candidates:
- captions: the 40 captions' own embeddings (ReAligned with ``--realign``, as pretraining fed them) as inputs;
- images:   the first ``--n`` digits test images, through the checkpoint's tower (the image embedding).
Chance is 10 % for both.

A second table, with no LLM call (seconds), describes the connector itself: the norm of its output tokens for the
captions and for the images, next to the LLM's own token-embedding norm; the digit of each image's nearest caption
embedding (cosine, no connector: what the dual encoder itself offers a connector to transfer); and how the variance of its inputs and of
its outputs over the 4 x 10 caption grid splits between the digit and the wording (`factor_shares`). ``--geometry``
prints only that table.

    python experiments/revision/zero_shot.py outputs/revision/pretrain/final \\
        --realign outputs/revision_inputs/embeddings_seed0/realign.safetensors --n 100
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from alignlm.constants import IGNORE_INDEX, IMAGE_TOKEN
from alignlm.data.build import build_dataset
from alignlm.data.collate import Collator
from alignlm.data.digits import CAPTIONS, WORDS
from alignlm.data.hooks import SampleHook
from alignlm.data.llava import LlavaDataset
from alignlm.data.records import Source
from alignlm.data.templates import get_template
from alignlm.evaluation.checkpoints import load, resolve
from alignlm.methods.revision.realign import ReAlignStats


class _ImageSupplied(SampleHook):
    """Caption records whose one image is supplied later, as an embedding: nothing is read from disk."""

    replaces_visuals = True

    def visual_inputs(self, src: Source, rec: dict[str, Any]) -> list[str]:
        return [str(rec["id"])]

    def load_visuals(self, inputs: list[str]) -> dict[str, Tensor | None]:
        return {"pixel_values": None}


def candidate_batch(model: Any, candidates: Sequence[str], template: str = "plain") -> dict[str, Tensor]:
    """The candidates as caption records (one ``<image>``, then the caption), padded like a training batch."""
    if not candidates:
        raise ValueError("no candidate captions to score")
    records = [
        {"id": f"c{i}", "conversations": [{"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": text}]}
        for i, text in enumerate(candidates)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "candidates.json"
        path.write_text(json.dumps(records))
        ds = LlavaDataset(
            [Source(str(path))],
            tokenizer=model.tokenizer,
            template=get_template(template),
            image_spec=model.image_spec,
            num_image_tokens=model.num_image_tokens,
            on_error="raise",
            hooks=[_ImageSupplied()],
        )
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


def classify(
    model: Any, embeds: Tensor, candidates: Sequence[str], labels: Sequence[Any], template: str = "plain"
) -> list[Any]:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--realign", default=None, help="ReAlign statistics the pretraining used (omit for raw captions)")
    ap.add_argument("--test", default="data/digits/test_captions.json", help="digits test records (images + captions)")
    ap.add_argument("--n", type=int, default=100, help="test images")
    ap.add_argument("--geometry", action="store_true", help="only the connector geometry table (fast)")
    args = ap.parse_args()

    texts = [c.format(n=d, w=WORDS[d]) for c in CAPTIONS for d in range(10)]
    digits = [d for _ in CAPTIONS for d in range(10)]
    records = json.loads(open(args.test).read())[: args.n]
    gold = [next(d for d in range(10) if WORDS[d] in r["conversations"][-1]["value"]) for r in records]
    stats = ReAlignStats.load(args.realign) if args.realign else None
    geometry = []
    if not args.geometry:
        print("| checkpoint | captions -> digit % | images -> digit % | n images |\n|---|---:|---:|---:|")
    for ck in resolve(args.checkpoints):
        model = load(ck).eval()
        vision = model.vision
        if not hasattr(vision, "encoder") or not hasattr(vision, "scale"):
            raise SystemExit(f"{ck.label}: model.vision is not a dual-encoder tower (model/vision=dual_encoder)")
        with torch.no_grad():
            raw = vision.encoder.encode_texts(texts).double()  # the tower's own dual encoder, text side
            captions = (F.normalize(raw, dim=-1) if stats is None else stats(raw)).float() * vision.scale
            ds = build_dataset({"sources": [{"path": args.test}], "template": "plain"}, model, seed=0)
            pixels = torch.cat([ds[i]["pixel_values"] for i in range(len(records))])
            images = vision(pixels)[:, 0]
            out_c, out_i = (
                model.connector(captions[:, None]).tokens[:, 0],
                model.connector(images[:, None]).tokens[:, 0],
            )
            vocab_norm = model.llm.get_input_embeddings().weight.float().norm(dim=-1).mean().item()
        grid = (len(CAPTIONS), 10, -1)  # texts are wording-major: CAPTIONS[w] for digits 0..9
        ins, outs = factor_shares(captions.view(grid)), factor_shares(out_c.view(grid))
        nearest = (F.normalize(images, dim=-1) @ F.normalize(captions, dim=-1).T).argmax(-1)
        acc_nn = sum(digits[int(j)] == d for j, d in zip(nearest, gold)) / len(gold)
        geometry.append(
            f"| {ck.label} | {out_c.norm(dim=-1).mean():.1f} / {out_i.norm(dim=-1).mean():.1f} | "
            f"{vocab_norm:.2f} | {100 * acc_nn:.1f} | {ins['b']:.2f} / {ins['a']:.2f} | "
            f"{outs['b']:.2f} / {outs['a']:.2f} |"
        )
        if not args.geometry:
            acc_t = sum(p == d for p, d in zip(classify(model, captions, texts, digits), digits)) / len(texts)
            acc_i = sum(p == d for p, d in zip(classify(model, images, texts, digits), gold)) / len(gold)
            print(f"| {ck.label} | {100 * acc_t:.1f} | {100 * acc_i:.1f} | {len(gold)} |", flush=True)
    print(
        "\n| checkpoint | connector output norm: captions / images | LLM token-embedding norm | "
        "images -> nearest caption's digit % | caption inputs: digit / wording share | "
        "connector outputs on captions: digit / wording share |\n|---|---:|---:|---:|---:|---:|"
    )
    print("\n".join(geometry))


if __name__ == "__main__":
    main()
