"""SEA's commands: ``alignlm sea-labels`` writes per-patch word labels beside the data, ``alignlm sea-eval`` measures
token-word accuracy (docs/methods.md, metrics) of ``final/`` checkpoints side by side.

    alignlm sea-labels annotations --data data/shapes/pretrain.json data/shapes/test_captions.json
    alignlm sea-labels dual_encoder --model path/to/clip --words words.txt --data data/x/pretrain.json --grid 4
    alignlm sea-eval outputs/baseline/pretrain/final outputs/sea/pretrain/final \\
        --labels data/shapes/sea_labels.safetensors --data data/shapes/test_captions.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from alignlm.commands._flags import add_trust_flags, device_flag, pixel_limit, positive_int
from alignlm.data.images import ASPECT_RATIOS, MAX_PIXELS
from alignlm.data.records import DataError, record_images
from alignlm.methods.sea.labels import DEFAULT_NAME, SeaLabels, make_labels
from alignlm.methods.sea.token_words import token_word_report
from alignlm.models.device import default_device
from alignlm.models.io import final_image_reading, load_model


def register(subparsers: Any) -> None:
    """Add ``sea-labels`` and ``sea-eval`` to the ``alignlm`` command line."""
    p = subparsers.add_parser("sea-labels", help="write SEA per-patch top-k word labels beside the data")
    sources = p.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data", nargs="+", required=True, metavar="JSON", help="LLaVA data files whose images to label"
    )
    common.add_argument(
        "--out", default=None, help="labels file (default: sea_labels.safetensors beside the first data file)"
    )
    common.add_argument("--k", type=positive_int, default=5, help="candidate words kept per patch")
    common.add_argument("--image-root", default=None, help="image folder (default: each data file's folder)")
    s = sources.add_parser(
        "annotations", parents=[common], help="convert labels shipped with the data (shapes: patch_labels.json)"
    )
    s.add_argument(
        "--annotations",
        default=None,
        help="{grid, words, images: {record id: [per cell: [[word, score]...]]}} "
        "(default: patch_labels.json beside the first data file)",
    )
    s = sources.add_parser(
        "dual_encoder", parents=[common], help="nearest words of a dual encoder's dense patch features"
    )
    s.add_argument(
        "--model",
        required=True,
        help="Hugging Face CLIPModel / SiglipModel name or local path, or an `alignlm dual-encoder fit` folder",
    )
    s.add_argument("--words", required=True, help="word list: a text file (one per line) or comma-separated words")
    s.add_argument("--prompt", default="a photo of a {w}", help="text template around each word")
    s.add_argument(
        "--grid",
        type=positive_int,
        default=None,
        help="pool the patch features to GRID x GRID (match the training tower; default: the model's own grid)",
    )
    s.add_argument("--batch-size", type=positive_int, default=32, help="images encoded at once")
    s.add_argument(
        "--image-aspect-ratio",
        choices=ASPECT_RATIOS,
        default="crop",
        help="how images are made square, as the stage training on the labels makes them (SEA's pretraining: crop)",
    )
    s.add_argument(
        "--max-image-pixels",
        type=pixel_limit,
        default=MAX_PIXELS,
        help="as that stage's data.max_image_pixels: larger images are refused undecoded (none: no limit)",
    )
    s.add_argument("--trust-remote-code", action="store_true", help="let transformers run code shipped with the model")
    s.add_argument(
        "--device",
        default=None,
        help="where the encoder runs (default: cuda when present, else cpu; also under accelerate launch --cpu)",
    )
    p.set_defaults(func=cmd_sea_labels)

    p = subparsers.add_parser("sea-eval", help="token-word accuracy of final/ checkpoints, side by side")
    p.add_argument("checkpoints", nargs="+", help="final/ folders")
    p.add_argument("--labels", required=True, help="SEA labels file covering the images of --data")
    p.add_argument(
        "--data", nargs="+", required=True, metavar="JSON", help="LLaVA data files whose images to measure on"
    )
    p.add_argument("--image-root", default=None, help="image folder (default: each data file's folder)")
    p.add_argument("--word-prefix", default=" ", help="as objective sea's word_prefix")
    p.add_argument(
        "--limit", type=positive_int, default=None, help="measure on the first N labelled images (default: all)"
    )
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    p.add_argument(
        "--exclude-words",
        nargs="*",
        default=[],
        metavar="WORD",
        help="also report with these words left out (e.g. background, which every shapes cell lists)",
    )
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument(
        "--device",
        type=device_flag,
        default=None,
        help="where the checkpoints run (default: cuda when present, else cpu; also under accelerate launch --cpu)",
    )
    add_trust_flags(p)
    p.set_defaults(func=cmd_sea_eval)


def word_list(value: str) -> str | list[str]:
    """``--words``: an existing file's path, else comma-separated words. A value that reads as a path (a folder
    separator, a file suffix) but names no file is refused: split on commas it would be a one-word list, whose labels
    give SEA nothing to learn."""
    if Path(value).exists():
        return value
    if any(sep in value for sep in ("/", os.sep)) or Path(value).suffix.lower() in (".txt", ".json", ".csv", ".tsv"):
        raise SystemExit(
            f"--words {value}: no such file; give a word list file (one word per line) or comma-separated words"
        )
    return [w.strip() for w in value.split(",") if w.strip()]


def cmd_sea_labels(args: argparse.Namespace) -> int:
    knobs: dict[str, Any] = {"image_root": args.image_root}
    if args.source == "annotations":
        knobs["annotations"] = args.annotations
    else:
        knobs.update(
            model=args.model,
            words=word_list(args.words),
            prompt=args.prompt,
            grid=args.grid,
            batch_size=args.batch_size,
            trust_remote_code=args.trust_remote_code,
            device=args.device,
            image_aspect_ratio=args.image_aspect_ratio,
            max_image_pixels=args.max_image_pixels,
        )
    out = Path(args.out) if args.out else Path(args.data[0]).parent / DEFAULT_NAME
    path = make_labels(out, args.source, args.data, args.k, **knobs)
    labels = SeaLabels(path)
    print(
        json.dumps(
            {
                "path": str(path),
                "source": labels.source,
                "images": len(labels.index),
                "grid": list(labels.grid),
                "k": labels.k,
                "words": labels.words,
            },
            indent=2,
        )
    )
    return 0


def cmd_sea_eval(args: argparse.Namespace) -> int:
    labels = SeaLabels(args.labels)
    images = sorted(
        {p for _, paths in record_images(args.data, args.image_root) for p in paths if labels.key(p) in labels.index}
    )
    if not images:
        raise SystemExit(f"{args.labels} labels none of the images of {args.data}")
    images = images[: args.limit]
    try:
        labels.check_unchanged(images, ", ".join(args.data))
    except DataError as e:
        raise SystemExit(str(e)) from None
    variants = {"all words": ()} | (
        {f"without {' '.join(args.exclude_words)}": args.exclude_words} if args.exclude_words else {}
    )
    report: dict[str, dict[str, Any]] = {ck: {} for ck in args.checkpoints}
    device = torch.device(args.device or default_device())  # load_model leaves the model on the CPU
    for ck in args.checkpoints:
        reading = final_image_reading(ck)
        labels.check_aspect_ratio(reading.aspect_ratio, f"{ck} (its stage's data.image_aspect_ratio)")
        model = load_model(ck, args.allow_code, args.trust_remote_code).to(device)
        for name, exclude in variants.items():
            report[ck][name] = token_word_report(
                model, labels, images, args.word_prefix, args.batch_size, exclude, reading
            )
        del model  # before the next checkpoint is moved to the device: one model there at a time
    names = [str(Path(ck).parent.parent.name + "/" + Path(ck).parent.name) for ck in args.checkpoints]
    width = max(12, *(len(n) for n in names))
    for name in variants:
        first = report[args.checkpoints[0]][name]
        print(
            f"token-word accuracy on {len(images)} images ({int(first['tokens'])} labelled tokens), nearest among the "
            f"label words' LLM embeddings, {name}"
        )
        print(f"{'':16}" + "".join(f"{n:>{width + 2}}" for n in names))
        for key in ("token_word_acc", "top_word_acc", "constant_acc"):
            print(f"{key:16}" + "".join(f"{100 * report[ck][name][key]:>{width + 1}.1f}%" for ck in args.checkpoints))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
