"""SIMA's commands: ``alignlm sima generate`` writes self-generated, self-judged preference records from a finetuned
checkpoint; ``alignlm sima check`` scores the judge against the reference answers (docs/methods.md, SIMA).

    alignlm sima generate outputs/demo/finetune/final --set digits=data/digits/instruct.json --out outputs/sima/prefs \\
        --keep-inconsistent   # the demo's judge answers "A" in both orders: without it, no pair is kept
    alignlm sima check outputs/sima/prefs
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from alignlm.checks import prompt_of, prompt_overrides
from alignlm.commands._flags import add_trust_flags, positive_float, positive_int, within
from alignlm.config import SHARE, compose
from alignlm.evaluation.checkpoints import data_config, resolve, stage_config
from alignlm.evaluation.preferences import judge_agreement
from alignlm.files import replace_text
from alignlm.methods.sima.generate import generate_preferences
from alignlm.models.io import checkpoint_stage, load_model


def register(subparsers: Any) -> None:
    """Add ``sima generate`` and ``sima check`` to the ``alignlm`` command line."""
    p = subparsers.add_parser("sima", help="SIMA self-improvement: self-generated, self-judged preference pairs")
    sub = p.add_subparsers(dest="sima_command", required=True)
    g = sub.add_parser("generate", help="answer, judge and write preference records from a final/ checkpoint")
    g.add_argument("checkpoint", help="a final/ folder (its config gives the template)")
    g.add_argument("--set", action="append", required=True, metavar="NAME=JSON", help="question set (repeatable)")
    g.add_argument(
        "--out",
        required=True,
        help="folder for <name>.json (records), <name>.critic.json and each generation pass's "
        "<name>.run<k>.json (reused by a rerun)",
    )
    g.add_argument(
        "--samples", type=positive_int, default=2, help="sampled answers per question besides the greedy one"
    )
    g.add_argument("--temperature", type=positive_float, default=0.8, help="sampling temperature of those answers")
    g.add_argument("--top-p", type=within(SHARE), default=0.9, help="nucleus of those answers' sampling, in (0, 1]")
    g.add_argument("--max-new-tokens", type=positive_int, default=8, help="answer length limit in tokens")
    g.add_argument("--limit", type=positive_int, default=None, help="first N records of each set (default: all)")
    g.add_argument("--keep-inconsistent", action="store_true", help="keep pairs whose two orders disagree")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampled answers")
    add_trust_flags(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("check", help="agreement of the judged pairs with the reference answers")
    c.add_argument("out", help="a `sima generate` folder")
    c.set_defaults(func=cmd_check)


def cmd_generate(args: argparse.Namespace) -> int:
    sets = []
    for item in args.set:
        name, _, path = item.partition("=")
        if not name or not path:
            raise SystemExit(f"alignlm sima generate: --set takes NAME=JSON, got {item!r}")
        sets.append({"name": name, "path": path})
    checkpoint = resolve([args.checkpoint])[0]
    cfg = stage_config(checkpoint)
    data = data_config(checkpoint, cfg)  # the template the checkpoint was trained with
    generate_preferences(
        args.checkpoint,
        sets,
        args.out,
        data,
        partial(load_model, args.checkpoint, args.allow_code, args.trust_remote_code),
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        drop_inconsistent=not args.keep_inconsistent,
        seed=args.seed,
    )
    overrides = " ".join(
        filter(None, (dpo_prompt(cfg, checkpoint_stage(cfg, checkpoint.stage)), dpo_sources(sets, args.out)))
    )
    print(f"alignlm sima generate: a dpo stage trains on these pairs with {overrides}", file=sys.stderr)
    return cmd_check(argparse.Namespace(out=args.out))


def dpo_sources(sets: list[dict[str, str]], out: str) -> str:
    """The override that trains a dpo stage on the written records, each with its set's folder as ``image_root``:
    the records name their images as the set does, relative to its folder, so a source reads them only with that
    folder as its root; the records file's own folder (the default root) is not it."""
    entries = ",".join(
        f"{{path:{Path(out) / (s['name'] + '.json')},image_root:{Path(s['path']).parent}}}" for s in sets
    )
    return f"'stages.dpo.data.sources=[{entries}]'"


def dpo_prompt(cfg: DictConfig, stage: str) -> str:
    """The overrides, in README's form (:func:`~alignlm.checks.prompt_overrides`), that make a dpo stage added with
    ``+stage@stages.dpo=dpo`` render its prompts as stage ``stage`` of the checkpoint's config ``cfg`` did, for the
    template and its arguments where ``stage/dpo.yaml`` renders them otherwise ("" where it does not): the pairs were
    answered and judged under that stage's prompts, and the dpo stage starts from it (its ``init_from``). The demo's
    finetune stage has a system prompt that ``stage/dpo.yaml`` lacks, and the sources override alone trained DPO on the
    pairs under another prompt than they were made with (``configs/exp/sima.yaml`` sets the demo's for its dpo stage).
    A checkpoint of a stage named dpo gets none: its own stage is no stage to take the prompt from."""
    if stage == "dpo":
        return ""
    added = prompt_of(compose(["+stage@stages.dpo=dpo"]).stages.dpo.data)
    made = prompt_of(cfg.stages[stage].data)
    return prompt_overrides("dpo", stage, [knob for knob in added if added[knob] != made[knob]])


def cmd_check(args: argparse.Namespace) -> int:
    critics = sorted(Path(args.out).glob("*.critic.json"))
    if not critics:  # an empty report, exit 0, read as a judge with nothing to disagree about
        raise SystemExit(
            f"alignlm sima check: no <name>.critic.json in {args.out}; name a folder `alignlm sima generate` wrote"
        )
    report = {f.name.removesuffix(".critic.json"): judge_agreement(json.loads(f.read_text())) for f in critics}
    print(json.dumps(report, indent=2))
    replace_text(Path(args.out) / "critic_check.json", json.dumps(report, indent=2))
    return 0
