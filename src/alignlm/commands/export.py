"""``alignlm export FINAL OUT``: a ``final/`` checkpoint as a transformers ``LlavaForConditionalGeneration`` folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alignlm.commands._flags import add_trust_flags
from alignlm.evaluation.export_check import compare_with_export, format_check
from alignlm.export.hf_llava import ExportError, export


def check_args(args: argparse.Namespace) -> None:
    """What ``--check`` needs, before anything is exported (``--limit 0`` checked nothing and passed)."""
    if args.check is not None and not Path(args.check).is_file():
        raise ExportError(f"--check {args.check}: no such question set file")
    for flag, value in (("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise ExportError(f"{flag} {value}: must be at least 1")


def cmd_export(args: argparse.Namespace) -> int:
    try:
        check_args(args)
        out = export(args.checkpoint, args.out_dir, args.allow_code, args.trust_remote_code)
    except ExportError as e:  # a model with no Llava counterpart, a bad flag: the reason, no traceback, nothing written
        print(f"alignlm export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: LlavaForConditionalGeneration.from_pretrained({str(out)!r}) loads it")
    if not args.check:
        return 0
    result = compare_with_export(
        args.checkpoint,
        out,
        args.check,
        args.limit,
        args.max_new_tokens,
        args.allow_code,
        args.trust_remote_code,
    )
    print(format_check(result))
    (out / "export_check.json").write_text(json.dumps(result, indent=2))
    return 0 if result["same_answers"] == result["n"] else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` to the ``alignlm`` command line."""
    p = sub.add_parser(
        "export", help="write a final/ checkpoint as a transformers LlavaForConditionalGeneration folder"
    )
    p.add_argument("checkpoint", help="a final/ folder; its stage's template becomes the chat template")
    p.add_argument(
        "out_dir", help="the folder to write (new, empty, or an earlier export, which it replaces; not a symbolic link)"
    )
    p.add_argument(
        "--check",
        metavar="SET",
        help="then answer this question set with the checkpoint (alignlm) and the exported folder (transformers "
        "generate, as lmms-eval's llava_hf) and compare; exit 1 when an answer differs (export_check.json)",
    )
    p.add_argument("--limit", type=int, default=None, help="--check: the first N questions")
    p.add_argument("--max-new-tokens", type=int, default=16, help="--check: greedy answer length limit")
    add_trust_flags(p)
    p.set_defaults(func=cmd_export)
