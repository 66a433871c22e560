"""``alignlm wca``: zero-shot classification of a question set's images with a dual encoder, the plain score against
WCA's crop-description score (docs/methods.md, WCA), over several crop seeds with paired differences.

    alignlm wca --encoder runs/dual_encoder --set data/digits/test.json --prompt "The digit {c}." \\
        --descriptions "The digit {c}, written by hand in dark ink." "A handwritten {c}." --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from alignlm.commands._flags import device_flag, positive_int
from alignlm.data.images import load_rgb
from alignlm.data.records import MISSING_IMAGE, DataError, image_paths, read_records
from alignlm.evaluation.paired import mean_se, paired_difference
from alignlm.methods.wca.score import WCAConfig, descriptions_for, zero_shot
from alignlm.models.device import default_device
from alignlm.models.encoders import load_encoder


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("wca", help="zero-shot classification: plain cosine vs WCA (crops x descriptions)")
    p.add_argument("--encoder", required=True, help="an `alignlm dual-encoder fit` folder or a CLIP / SigLIP name")
    p.add_argument("--set", required=True, help="question set whose records carry `answer` and `meta.choices`")
    p.add_argument("--qtype", default=None, help="only records whose meta.qtype is this")
    p.add_argument("--prompt", default="a photo of {c}", help="class prompt, {c} the class")
    p.add_argument("--descriptions", nargs="+", required=True, help="description templates ({c}) or a JSON file")
    p.add_argument("--crops", type=int, default=WCAConfig.crops, help="random crops per image (>= 1)")
    p.add_argument(
        "--scale",
        type=float,
        nargs=2,
        default=WCAConfig.scale,
        metavar=("LOW", "HIGH"),
        help="crop side as a share of the image side, drawn uniformly from LOW..HIGH (0 < LOW <= HIGH <= 1)",
    )
    p.add_argument("--tau-crop", type=float, default=WCAConfig.tau_crop, help="temperature of the crop weights (> 0)")
    p.add_argument(
        "--tau-text", type=float, default=WCAConfig.tau_text, help="temperature of the description weights (> 0)"
    )
    p.add_argument(
        "--normalise",
        action=argparse.BooleanOptionalAction,
        default=WCAConfig.normalise,
        help="score the cosine of the weighted crop and description embeddings, as the official code does (default); "
        "--no-normalise: the paper's unnormalised sum of weighted cosines",
    )
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N records (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="crop seeds")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument(
        "--device",
        type=device_flag,
        default=None,
        help="where the encoder runs (default: cuda when present, else cpu; also under accelerate launch --cpu)",
    )
    p.set_defaults(func=cmd_wca)


def lazy_images(paths: Sequence[Path]) -> Iterator[Image.Image]:
    """Each image decoded when it is scored: decoding the whole set first held ~1.2 MB per 640x480 image (57 GB for
    50k) before the first score."""
    return (load_rgb(p) for p in paths)


def check_images(paths: Sequence[Path], where: str) -> None:
    """Every image a file, checked before the encoder loads (images are read one by one, while scoring)."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"alignlm wca: {len(missing)} images of {where} are not files, the first {str(missing[0])!r}", MISSING_IMAGE
        )


def cmd_wca(args: argparse.Namespace) -> int:
    try:  # before the set and the encoder are read
        config = WCAConfig(args.crops, tuple(args.scale), args.tau_crop, args.tau_text, args.normalise)
    except ValueError as e:
        raise SystemExit(f"alignlm wca: {e}") from None
    records = [
        r for r in read_records(args.set) if args.qtype is None or (r.get("meta") or {}).get("qtype") == args.qtype
    ]
    records = records[: args.limit]
    classes = class_list(records, args.set, args.qtype)
    paths = [image_paths(r, Path(args.set).parent)[0] for r in records]
    check_images(paths, args.set)
    labels = [classes.index(str(r["answer"])) for r in records]
    keys = [str(r.get("id", p)) for r, p in zip(records, paths)]  # an image's crops follow it, not its position
    given = args.descriptions
    templates = json.loads(Path(given[0]).read_text()) if len(given) == 1 and given[0].endswith(".json") else given
    descriptions = descriptions_for(classes, templates)
    encoder = load_encoder(args.encoder, device=args.device or default_device())
    prompts = [args.prompt.format(c=c) for c in classes]
    runs = []
    for seed in args.seeds:
        r = zero_shot(encoder, lazy_images(paths), labels, prompts, descriptions, config, seed, keys)
        ids = [str(i) for i in range(len(labels))]
        d = paired_difference(dict(zip(ids, r["plain_right"])), dict(zip(ids, r["wca_right"])))
        runs.append({"seed": seed, "plain": r["plain"], "wca": r["wca"], "diff": d["diff"], "se": d["se"]})
        print(
            f"seed {seed}: plain {100 * r['plain']:.1f} %  WCA {100 * r['wca']:.1f} %  "
            f"WCA - plain {100 * d['diff']:+.1f} (paired SE {100 * d['se']:.1f}), n={r['n']}"
        )
    m, se = mean_se([r["diff"] for r in runs])
    spread = f" (SE {100 * se:.2f})" if len(runs) > 1 else ""  # one seed has no spread to report
    summary = {
        "set": args.set,
        "qtype": args.qtype,
        "classes": classes,
        "n": len(labels),
        "chance": 1 / len(classes),
        "config": dataclasses.asdict(config),
        "runs": runs,
        "mean_diff": m,
        "se_over_seeds": se if len(runs) > 1 else None,
    }
    print(
        f"over {len(runs)} seed{'s' * (len(runs) > 1)}: WCA - plain {100 * m:+.2f} points{spread}; "
        f"chance {100 / len(classes):.1f} %"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


def class_list(records: list[dict[str, Any]], path: str, qtype: str | None) -> list[str]:
    """The one class list every record shares: a set mixing question types has several, and their answers index none."""
    if not records or any("answer" not in r or not (r.get("meta") or {}).get("choices") for r in records):
        where = f"{path} (qtype {qtype})" if qtype else path
        raise SystemExit(f"alignlm wca: {where} needs records, each with `answer` and `meta.choices`")
    lists = {tuple(str(c) for c in r["meta"]["choices"]) for r in records}
    if len(lists) > 1:
        qtypes = sorted({str(r["meta"].get("qtype")) for r in records})
        raise SystemExit(
            f"alignlm wca: {path} has {len(lists)} different choice lists among its records; WCA classifies over one "
            f"class list, so pick one question type with --qtype (question types present: {', '.join(qtypes)})"
        )
    classes = list(lists.pop())
    stray = next((r for r in records if str(r["answer"]) not in classes), None)
    if stray is not None:
        raise SystemExit(
            f"alignlm wca: {path} record {stray.get('id')!r} answers {stray['answer']!r}, not one of its choices {classes}"
        )
    return classes
