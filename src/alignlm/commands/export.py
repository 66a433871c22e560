"""``alignlm export FINAL OUT``: a ``final/`` checkpoint as a transformers ``LlavaForConditionalGeneration`` folder."""

from __future__ import annotations

import argparse

from alignlm.commands._flags import add_trust_flags
from alignlm.export.hf_llava import export


def cmd_export(args: argparse.Namespace) -> int:
    out = export(args.checkpoint, args.out_dir, args.allow_code, args.trust_remote_code)
    print(f"wrote {out}: LlavaForConditionalGeneration.from_pretrained({str(out)!r}) loads it")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` to the ``alignlm`` command line."""
    p = sub.add_parser(
        "export", help="write a final/ checkpoint as a transformers LlavaForConditionalGeneration folder"
    )
    p.add_argument("checkpoint", help="a final/ folder")
    p.add_argument("out_dir")
    add_trust_flags(p)
    p.set_defaults(func=cmd_export)
