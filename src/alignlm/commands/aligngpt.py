"""AlignGPT's command: ``alignlm aligngpt-levels`` scores each image-caption pair of LLaVA data with a dual encoder and
writes the per-sample alignment levels (equal-count bins of the cosine) that pretraining reads.

    alignlm dual-encoder fit --train data/digits/pretrain.json data/shapes/pretrain.json --out runs/dual_encoder
    alignlm aligngpt-levels --data data/digits/pretrain.json data/shapes/pretrain.json --encoder runs/dual_encoder \\
        --levels 8 --out data/aligngpt_levels_L8.json
    alignlm aligngpt-levels --data llava_pretrain/blip_laion_cc_sbu_558k.json --encoder openai/clip-vit-large-patch14
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from alignlm.commands._flags import positive_int, within
from alignlm.methods.aligngpt.levels import LEVELS, LevelLabels, make_levels


def register(subparsers: Any) -> None:
    """Add ``aligngpt-levels`` to the ``alignlm`` command line."""
    p = subparsers.add_parser("aligngpt-levels", help="write AlignGPT per-sample alignment levels beside the data")
    p.add_argument("--data", nargs="+", required=True, metavar="JSON", help="LLaVA caption files whose pairs to score")
    p.add_argument(
        "--encoder", required=True, help="an `alignlm dual-encoder fit` folder, or a CLIP / SigLIP name or folder"
    )
    p.add_argument(
        "--levels",
        type=within(LEVELS, whole=True),
        default=8,
        help="L: equal-count bins of the image-text cosine (model.extras.align_levels.num_levels)",
    )
    p.add_argument(
        "--out", default=None, help="levels file (default: aligngpt_levels_L<levels>.json beside the first data file)"
    )
    p.add_argument("--image-root", default=None, help="image folder (default: each data file's folder)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="pairs encoded at once")
    p.add_argument(
        "--device",
        default=None,
        help="default: cuda when present, else cpu (also under accelerate launch --cpu, ACCELERATE_USE_CPU)",
    )
    p.set_defaults(func=cmd_aligngpt_levels)


def cmd_aligngpt_levels(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(args.data[0]).parent / f"aligngpt_levels_L{args.levels}.json"
    path = make_levels(out, args.data, args.encoder, args.levels, args.batch_size, args.image_root, args.device)
    levels = LevelLabels(path)
    print(
        json.dumps(
            {
                "path": str(path),
                "encoder": levels.encoder,
                "pairs": len(levels.levels),
                "counts": levels.counts,
                "edges": levels.edges,
                "skipped": levels.skipped,
            },
            indent=2,
        )
    )
    return 0
