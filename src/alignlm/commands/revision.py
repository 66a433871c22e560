"""Dual-encoder and ReVision commands: ``alignlm embed``, ``alignlm realign fit|apply``, ``alignlm dual-encoder fit``.

alignlm dual-encoder fit --train data/shapes/pretrain.json --eval data/shapes/test_captions.json --out runs/de
alignlm embed --encoder runs/de --images data/shapes/pretrain.json --texts data/shapes/pretrain.json --out emb/
alignlm realign fit --images emb/images --texts emb/texts --out emb/realign.safetensors
alignlm realign apply --stats emb/realign.safetensors --texts emb/texts --out emb/texts_realigned
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from alignlm.commands._flags import positive_float, positive_int, whole_number, within
from alignlm.methods.revision.embed import collect_images, collect_texts, embed_items
from alignlm.methods.revision.realign import CHUNK_ROWS, SHRINKAGE, THREADS, ReAlignStats, apply, fit
from alignlm.models.device import default_device
from alignlm.models.encoder_fit import TEMPERATURE, fit_encoder
from alignlm.models.encoders import load_encoder


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``embed``, ``realign`` and ``dual-encoder`` to the ``alignlm`` command line."""
    _register_embed(subparsers)
    _register_realign(subparsers)
    _register_dual_encoder(subparsers)


def _cmd_embed(args: argparse.Namespace) -> int:
    if not (args.images or args.texts):
        raise SystemExit("alignlm embed: give --images and/or --texts")
    device = args.device or default_device()
    encoder = load_encoder(args.encoder, device=device, name=args.encoder_name)
    summary = {"encoder": encoder.name, "device": str(device)}
    for modality, sources in (("images", args.images), ("texts", args.texts)):
        items: list = []
        for source in sources or []:
            items += collect_images(source, args.image_root) if modality == "images" else collect_texts(source)
        if items:
            paths = embed_items(
                encoder, modality, items, args.out, shard_size=args.shard_size, batch_size=args.batch_size
            )
            summary[modality] = {"items": len(items), "shards": len(paths), "folder": str(Path(args.out) / modality)}
    print(json.dumps(summary, indent=2))
    return 0


def _register_embed(subparsers: argparse._SubParsersAction) -> None:
    """``alignlm embed``."""
    p = subparsers.add_parser("embed", help="images and captions -> embedding shards with a dual encoder")
    p.add_argument(
        "--encoder", required=True, help="CLIP/SigLIP folder or hub name, or an `alignlm dual-encoder fit` folder"
    )
    p.add_argument("--encoder-name", default=None, help="name recorded in the shards (default: --encoder)")
    p.add_argument("--images", nargs="*", help="image folders or LLaVA JSON/JSONL files")
    p.add_argument("--image-root", default=None, help="folder LLaVA image paths are relative to (default: the JSON's)")
    p.add_argument("--texts", nargs="*", help="text files (one caption a line) or LLaVA JSON/JSONL files")
    p.add_argument("--out", required=True, help="output folder; shards go to OUT/images and OUT/texts")
    p.add_argument("--shard-size", type=positive_int, default=10_000, help="items per shard (the unit of resumption)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="items encoded at once")
    p.add_argument(
        "--device",
        default=None,
        help="default: cuda when present, else cpu (also under accelerate launch --cpu, ACCELERATE_USE_CPU)",
    )
    p.set_defaults(func=_cmd_embed)


def _one_process(command: str) -> None:
    """Refuse a launch of several processes (torchrun, accelerate launch): each would read every shard and all write
    the same file. ReAlign's passes are memory-bound; more cores are ``--threads``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise SystemExit(
            f"alignlm realign {command} runs in one process, but it was launched as {world} (WORLD_SIZE): each would "
            "read every shard and all would write the same output; run it without torchrun (more cores: --threads)"
        )


def _cmd_realign_fit(args: argparse.Namespace) -> int:
    _one_process("fit")
    start = time.perf_counter()
    stats = fit(
        args.images,
        args.texts,
        encoder=args.encoder,
        rows=args.chunk_rows,
        threads=args.threads,
        covariance=args.covariance,
    )
    stats.save(args.out)
    print(
        json.dumps(
            {"out": str(args.out), "seconds": round(time.perf_counter() - start, 2), **stats.summary()}, indent=2
        )
    )
    return 0


def _cmd_realign_apply(args: argparse.Namespace) -> int:
    _one_process("apply")
    start = time.perf_counter()
    stats = ReAlignStats.load(args.stats)
    paths = apply(
        stats, args.texts, args.out, rows=args.chunk_rows, dtype=getattr(torch, args.dtype), threads=args.threads
    )
    print(json.dumps({"out": str(args.out), "shards": len(paths), "seconds": round(time.perf_counter() - start, 2)}))
    return 0


def _register_realign(subparsers: argparse._SubParsersAction) -> None:
    """``alignlm realign fit | apply``."""
    p = subparsers.add_parser("realign", help="ReAlign text embeddings into the image-embedding distribution")
    sub = p.add_subparsers(dest="realign_command", required=True)
    f = sub.add_parser("fit", help="float64 statistics of unpaired image and text embedding shards")
    f.add_argument("--images", nargs="+", required=True, help="image embedding shard folders or files")
    f.add_argument("--texts", nargs="+", required=True, help="text embedding shard folders or files")
    f.add_argument("--out", required=True, help="statistics file to write (.safetensors)")
    f.add_argument("--encoder", default=None, help="encoder name to record (default: from the shards' metadata)")
    f.add_argument("--chunk-rows", type=positive_int, default=CHUNK_ROWS, help="rows widened to float64 at once")
    f.add_argument("--threads", type=positive_int, default=THREADS, help="intra-op threads of the streaming passes")
    f.add_argument(
        "--covariance",
        type=within(SHRINKAGE),
        default=None,
        metavar="SHRINKAGE",
        help="match the images' covariance, not only their trace (an extension of the paper; "
        "shrinkage >= 0 of the text covariance, e.g. 1.0); default: the trace step",
    )
    f.set_defaults(func=_cmd_realign_fit)
    a = sub.add_parser("apply", help="write ReAligned text embeddings, shard by shard")
    a.add_argument("--stats", required=True, help="file written by `alignlm realign fit`")
    a.add_argument("--texts", nargs="+", required=True, help="text embedding shard folders or files")
    a.add_argument("--out", required=True, help="output folder; shards keep their names")
    a.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "float16"], help="dtype of the written shards"
    )
    a.add_argument("--chunk-rows", type=positive_int, default=CHUNK_ROWS, help="rows widened to float64 at once")
    a.add_argument("--threads", type=positive_int, default=THREADS, help="intra-op threads of the streaming passes")
    a.set_defaults(func=_cmd_realign_apply)


def _cmd_dual_encoder_fit(args: argparse.Namespace) -> int:
    report = fit_encoder(
        args.train,
        args.out,
        held_out=args.eval or (),
        dim=args.dim,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        limit=args.limit,
        name=args.name,
        seed=args.seed,
        device=args.device,
        temperature=args.temperature,
        image_root=args.image_root,
    )
    print(json.dumps({"out": str(args.out), **report}, indent=2))
    return 0


def _register_dual_encoder(subparsers: argparse._SubParsersAction) -> None:
    """``alignlm dual-encoder fit``."""
    p = subparsers.add_parser("dual-encoder", help="the offline LiT-style dual encoder (EfficientNet-Lite0 + MiniLM)")
    sub = p.add_subparsers(dest="dual_encoder_command", required=True)
    f = sub.add_parser("fit", help="train the two linear heads with symmetric InfoNCE on caption records")
    f.add_argument(
        "--train", nargs="+", required=True, help="LLaVA caption JSON files (e.g. data/shapes/pretrain.json)"
    )
    f.add_argument("--eval", nargs="*", help="held-out caption JSON files (e.g. data/shapes/test_captions.json)")
    f.add_argument("--out", required=True, help="folder to write; `alignlm embed --encoder OUT` loads it")
    f.add_argument(
        "--image-root",
        default=None,
        help="folder the image paths of --train and --eval are relative to (default: each file's folder)",
    )
    f.add_argument("--dim", type=positive_int, default=256, help="shared embedding width")
    f.add_argument("--image-size", type=positive_int, default=224, help="EfficientNet input side (a multiple of 32)")
    f.add_argument("--epochs", type=positive_int, default=40, help="passes over the training pairs")
    f.add_argument("--batch-size", type=whole_number(2), default=256, help="pairs per InfoNCE batch")
    f.add_argument(
        "--lr", type=positive_float, default=1e-3, help="peak learning rate of the heads (AdamW, one-cycle schedule)"
    )
    f.add_argument("--limit", type=positive_int, default=None, help="use at most this many training pairs")
    f.add_argument("--name", default="alignlm-lit-effnet-minilm", help="encoder name recorded in shards")
    f.add_argument("--seed", type=int, default=0, help="seed of the heads' initialisation and the batch order")
    f.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    f.add_argument(
        "--temperature",
        type=within(TEMPERATURE),
        default=None,
        help="fix the InfoNCE temperature (e.g. 0.01, CLIP's final value, keeps a modality gap); "
        "default: learnt from 0.07",
    )
    f.set_defaults(func=_cmd_dual_encoder_fit)
