"""Command line: ``alignlm train | data | eval | export | sea-labels | aligngpt-levels | realign | embed | dual-encoder ...``.

``train`` takes Hydra overrides (``alignlm train +exp=demo stages.pretrain.max_steps=20``) and composes the
config tree in ``configs/`` (or ``$ALIGNLM_CONFIG_DIR``); ``--print-config`` shows the result and exits.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence


def config_dir() -> Path:
    """The config tree: ``$ALIGNLM_CONFIG_DIR``, else ``configs/`` of the source checkout."""
    env = os.environ.get("ALIGNLM_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "configs")
    for c in candidates:
        if (c / "train.yaml").exists():
            return c
    raise FileNotFoundError(f"no configs/train.yaml found in {[str(c) for c in candidates]}; set ALIGNLM_CONFIG_DIR")


def compose(overrides: Sequence[str]):
    """The resolved-on-access training config for these Hydra overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="alignlm"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def cmd_train(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    cfg = compose(args.overrides)  # config errors surface here, before any process is spawned
    if not args.print_config:
        from alignlm.launch import cpu_processes_to_spawn, spawn_cpu_ranks

        n = cpu_processes_to_spawn()
        if n:
            return spawn_cpu_ranks(n, args.overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return 0
    from alignlm.training.pipeline import run

    run(cfg)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from alignlm.data import GENERATORS

    knobs = {}
    for kv in args.set or []:
        k, _, v = kv.partition("=")
        knobs[k] = json.loads(v) if v[:1].isdigit() or v in ("true", "false", "null") else v
    summary = GENERATORS[args.name](Path(args.out) / args.name, seed=args.seed, **knobs)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from alignlm.export.hf_llava import export

    out = export(args.checkpoint, args.out_dir)
    print(f"wrote {out}: LlavaForConditionalGeneration.from_pretrained({str(out)!r}) loads it")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``alignlm`` console script."""
    parser = argparse.ArgumentParser(prog="alignlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run the stages of a config (Hydra overrides follow)")
    p.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +exp=demo model=tiny stages.pretrain.max_steps=10")
    p.set_defaults(func=cmd_train)
    from alignlm.data import GENERATORS

    p = sub.add_parser("data", help="write an offline dataset in LLaVA JSON + PNG")
    p.add_argument("name", choices=sorted(GENERATORS))
    p.add_argument("--out", default="data", help="parent folder; the set goes to OUT/NAME")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KNOB=VALUE", help="generator knob, e.g. --set n_train=500")
    p.set_defaults(func=cmd_data)
    p = sub.add_parser("export", help="write a final/ checkpoint as a transformers LlavaForConditionalGeneration folder")
    p.add_argument("checkpoint", help="a final/ folder")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_export)
    # subcommands that live beside their code: each module has register(subparsers)
    for module in ("alignlm.evaluation.commands", "alignlm.sea_commands", "alignlm.aligngpt_commands", "alignlm.revision.commands"):
        importlib.import_module(module).register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
