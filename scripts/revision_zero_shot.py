"""Does a caption-pretrained connector read digits from real images, before any image finetuning?

For each checkpoint (a ReVision pretraining ``final/`` or step checkpoint, whose tower is a dual encoder), two
accuracies from `alignlm.revision.zero_shot`, with the 40 digits captions (4 wordings x 10 digits, the generator's
own templates) as candidates:
- captions: the 40 captions' own embeddings (ReAligned with ``--realign``, as pretraining fed them) as inputs;
- images:   the first ``--n`` digits test images, through the checkpoint's tower (the image embedding).
Chance is 10 % for both.

A second table, with no LLM call (seconds), describes the connector itself: the norm of its output tokens for the
captions and for the images, next to the LLM's own token-embedding norm; the digit of each image's nearest caption
embedding (cosine, no connector: what the dual encoder itself offers a connector to transfer); and how the variance of its inputs and of
its outputs over the 4 x 10 caption grid splits between the digit and the wording (`factor_shares`). ``--geometry``
prints only that table.

    python scripts/revision_zero_shot.py outputs/revision/pretrain/final \\
        --realign outputs/revision_inputs/embeddings/realign.safetensors --n 100
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from alignlm.data.build import build_dataset
from alignlm.data.digits import CAPTIONS, WORDS
from alignlm.evaluation.checkpoints import load, resolve
from alignlm.revision.realign import ReAlignStats
from alignlm.revision.zero_shot import classify, factor_shares


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
            out_c, out_i = model.connector(captions[:, None]).tokens[:, 0], model.connector(images[:, None]).tokens[:, 0]
            vocab_norm = model.llm.get_input_embeddings().weight.float().norm(dim=-1).mean().item()
        grid = (len(CAPTIONS), 10, -1)  # texts are wording-major: CAPTIONS[w] for digits 0..9
        ins, outs = factor_shares(captions.view(grid)), factor_shares(out_c.view(grid))
        nearest = (F.normalize(images, dim=-1) @ F.normalize(captions, dim=-1).T).argmax(-1)
        acc_nn = sum(digits[int(j)] == d for j, d in zip(nearest, gold)) / len(gold)
        geometry.append(f"| {ck.label} | {out_c.norm(dim=-1).mean():.1f} / {out_i.norm(dim=-1).mean():.1f} | "
                        f"{vocab_norm:.2f} | {100 * acc_nn:.1f} | {ins['b']:.2f} / {ins['a']:.2f} | "
                        f"{outs['b']:.2f} / {outs['a']:.2f} |")
        if not args.geometry:
            acc_t = sum(p == d for p, d in zip(classify(model, captions, texts, digits), digits)) / len(texts)
            acc_i = sum(p == d for p, d in zip(classify(model, images, texts, digits), gold)) / len(gold)
            print(f"| {ck.label} | {100 * acc_t:.1f} | {100 * acc_i:.1f} | {len(gold)} |", flush=True)
    print("\n| checkpoint | connector output norm: captions / images | LLM token-embedding norm | "
          "images -> nearest caption's digit % | caption inputs: digit / wording share | "
          "connector outputs on captions: digit / wording share |\n|---|---:|---:|---:|---:|---:|")
    print("\n".join(geometry))


if __name__ == "__main__":
    main()
