"""``alignlm v2l-words``: read images as a V2L checkpoint's frozen LLM sees them, the vocabulary word of every visual
token (docs/methods.md, V2L): the image's global words, then one word per patch on the patch grid.

    alignlm v2l-words outputs/v2l/pretrain/final --data data/shapes/test_captions.json --limit 3
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from alignlm.commands._flags import add_trust_flags, device_flag, positive_int
from alignlm.data.images import ImageReading, decoded_batches, prepared
from alignlm.data.records import record_images
from alignlm.methods.v2l.connector import V2LConnector
from alignlm.models.device import default_device
from alignlm.models.io import final_image_reading, load_model


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("v2l-words", help="the vocabulary words a V2L checkpoint turns images into")
    p.add_argument("checkpoint", help="a final/ folder trained with model/connector=v2l")
    p.add_argument("--data", nargs="+", required=True, metavar="JSON", help="LLaVA data files whose images to read")
    p.add_argument("--image-root", default=None, help="image folder (default: each data file's folder)")
    p.add_argument("--limit", type=positive_int, default=4, help="the first N images")
    p.add_argument("--json", default=None, help="also write {record id: {global: [...], patches: [...]}} here")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    p.add_argument(
        "--device",
        type=device_flag,
        default=None,
        help="where the checkpoint runs (default: cuda when present, else cpu; also under accelerate launch --cpu)",
    )
    add_trust_flags(p)
    p.set_defaults(func=cmd_v2l_words)


@torch.no_grad()
def image_words(model: Any, paths: Sequence[Path], reading: ImageReading, batch_size: int) -> list[list[int]]:
    """Per image, the vocabulary id of each of its visual tokens, ``batch_size`` images per forward pass on the
    model's device: all of them in one pass once held every image's pixels and activations at once."""
    device = next(model.parameters()).device
    prepare = functools.partial(prepared, model.image_spec, reading)
    ids: list[list[int]] = []
    for batch in decoded_batches(paths, prepare, batch_size, device, "auto", raise_unreadable=True):
        features = model.vision(batch.items.to(device, non_blocking=True))
        ids += model.connector.words(model.connector_input(features)).tolist()
    return ids


def cmd_v2l_words(args: argparse.Namespace) -> int:
    model = load_model(args.checkpoint, args.allow_code, args.trust_remote_code)
    if not isinstance(model.connector, V2LConnector):
        raise SystemExit(f"{args.checkpoint} has a {type(model.connector).__name__} connector, not v2l")
    model.to(args.device or default_device())  # load_model leaves it on the CPU
    conn, prefix = model.connector, model.vision.num_prefix_tokens
    found = [(rid, paths[0]) for rid, paths in record_images(args.data, args.image_root)][: args.limit]
    if not found:
        raise SystemExit(f"no images in {args.data}")
    reading = final_image_reading(args.checkpoint)  # the pixels its stage trained on
    ids = image_words(model, [p for _, p in found], reading, args.batch_size)
    report = {}
    for (rid, path), row in zip(found, ids):
        words = [w.strip() or repr(w) for w in model.tokenizer.batch_decode([[i] for i in row])]
        glob, patches = words[: conn.global_tokens], words[conn.global_tokens + prefix :]
        report[rid] = {"image": str(path), "global": glob, "patches": patches}
        side = math.isqrt(len(patches))
        print(f"{rid} ({path.name})\n  global: {' '.join(glob) or '-'}")
        rows = [patches[r * side : (r + 1) * side] for r in range(side)] if side * side == len(patches) else [patches]
        width = max(len(w) for w in patches)
        print("\n".join("  " + " ".join(f"{w:<{width}}" for w in row) for row in rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
