"""``alignlm data NAME``: write an offline dataset (LLaVA JSON + PNG) with its generator's knobs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alignlm.commands._flags import whole_number
from alignlm.data import GENERATORS, generator_knobs


def cmd_data(args: argparse.Namespace) -> int:
    knobs = {}
    for kv in args.set or []:
        k, sep, v = kv.partition("=")
        if not sep:
            print(f"alignlm data {args.name}: --set takes KNOB=VALUE, got {kv!r}", file=sys.stderr)
            return 2
        if k not in generator_knobs(args.name):
            print(f"alignlm data {args.name}: no knob {k!r}; its knobs: {generator_knobs(args.name)}", file=sys.stderr)
            return 2
        try:
            knobs[k] = json.loads(v)  # numbers (negative ones too), true / false / null
        except json.JSONDecodeError:
            knobs[k] = v
    summary = GENERATORS[args.name](Path(args.out) / args.name, seed=args.seed, **knobs)
    print(json.dumps(summary, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``data`` to the ``alignlm`` command line."""
    p = sub.add_parser("data", help="write an offline dataset in LLaVA JSON + PNG")
    p.add_argument("name", choices=sorted(GENERATORS), help="the generator")
    p.add_argument("--out", default="data", help="parent folder; the set goes to OUT/NAME")
    p.add_argument("--seed", type=whole_number(0), default=0, help="seed of the generator")
    p.add_argument(
        "--set",
        action="append",
        metavar="KNOB=VALUE",
        help="generator knob, e.g. --set n_test=100 (an unknown one lists the knobs)",
    )
    p.set_defaults(func=cmd_data)
