"""``alignlm export FINAL OUT``: a ``final/`` checkpoint as a transformers ``LlavaForConditionalGeneration`` folder."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alignlm.commands._flags import add_trust_flags, device_flag
from alignlm.constants import MAX_NEW_TOKENS
from alignlm.evaluation.checkpoints import resolve
from alignlm.evaluation.export_check import compare_with_export, format_check
from alignlm.export.hf_llava import SOURCE_FILE, ExportError, checkpoint_source, export
from alignlm.models.device import default_device
from alignlm.models.io import MODEL_FILES, stamps_change


def not_a_final(path: str) -> str | None:
    """What ``path`` is when it is not a ``final/`` folder, the one kind of checkpoint export takes, and where the
    ``final/`` folders are (None for a final/ folder): a run folder or a step checkpoint was refused with
    "<path>/config.yaml: No such file", which said neither what export expects nor where it is."""
    try:
        found = resolve([path])
    except (FileNotFoundError, ValueError):
        found = []
    itself = [c for c in found if c.path == Path(os.path.abspath(path))]
    if itself and itself[0].kind == "final":
        return None
    if itself:
        final = itself[0].stage_dir / "final"
        return f"{path} is a step checkpoint (its stage's trained weights only); export takes a final/ folder" + (
            f": its stage's is {final}" if (final / "config.yaml").exists() else " (its stage has none yet)"
        )
    finals = [str(c.path) for c in found if c.kind == "final"]
    expects = f"{path} is not a final/ folder (config.yaml + model.safetensors), which export takes"
    return expects + (f"; the final/ folders in it: {finals}" if finals else "")


def export_final(args: argparse.Namespace) -> Path:
    """``export`` of ``args.checkpoint``; where it finds no checkpoint files there, :func:`not_a_final` says why."""
    try:
        return export(args.checkpoint, args.out_dir, args.allow_code, args.trust_remote_code)
    except FileNotFoundError:
        problem = not_a_final(args.checkpoint)
        if problem is None:
            raise
        raise ExportError(problem) from None


def stale_export(checkpoint: str, out_dir: str) -> str | None:
    """Why ``out_dir`` is not an export of ``checkpoint`` as it is now (None when it is): the source its export
    recorded (``SOURCE_FILE``) is another checkpoint, or this one before it was written again. scripts/eval_lmms.sh
    keeps an export folder only while this says nothing: comparing times alone scored the first checkpoint exported
    there for every later one, and took a sharded export (no model.safetensors) for an old one. An export recorded
    before its source held ``model files`` is stale where one of them is newer than its record (compared whole, it
    was called stale whatever they held); the files its record digested are read only where their size or time
    changed (every check had read a 7B LLM's folder whole)."""
    recorded_file = Path(out_dir) / SOURCE_FILE
    try:
        recorded = json.loads(recorded_file.read_text()) if recorded_file.is_file() else None
    except ValueError:  # not JSON, not UTF-8
        recorded = "unreadable"
    known = recorded.get(MODEL_FILES) if isinstance(recorded, dict) else None
    try:
        now = checkpoint_source(checkpoint, known)
    except FileNotFoundError as e:
        raise ExportError(not_a_final(checkpoint) or f"{e.filename}: {e.strerror}") from None
    if recorded is None:
        return f"{out_dir} has no {SOURCE_FILE}: no export, or one made before exports recorded their checkpoint"
    if not isinstance(recorded, dict):
        return f"{recorded_file} is not the JSON object an export writes"
    if recorded.get("checkpoint") != now["checkpoint"]:
        return f"{out_dir} was exported from {recorded.get('checkpoint')}, not from {now['checkpoint']}"
    if recorded.get("files") != now["files"]:
        return f"{now['checkpoint']} was written again since {out_dir} was exported from it"
    loads = f"files {now['checkpoint']}'s model config loads (a frozen LLM's or tower's folder)"
    if MODEL_FILES not in recorded:  # exported before they were recorded: any written since is newer than the export
        since = recorded_file.stat().st_mtime_ns
        newer = [
            stamp[0] for source in now.get(MODEL_FILES, {}).values() for stamp in source["files"] if stamp[2] > since
        ]
        return f"{loads} changed since {out_dir} was exported from it ({newer[0]} is newer)" if newer else None
    change = model_files_change(recorded[MODEL_FILES], now.get(MODEL_FILES, {}))
    if change == "rewritten":
        return (
            f"{loads} were rewritten since {out_dir} was exported from it (same sizes, other modification times; "
            f"its {SOURCE_FILE} holds no digests to compare)"
        )
    return f"{loads} changed since {out_dir} was exported from it" if change else None


def model_files_change(recorded: Any, now: Mapping[str, Any]) -> str | None:
    """How the ``model files`` an export recorded differ from the checkpoint's now (``models.io.stamps_change`` of
    each, the comparison a resume and a finished stage's skip make): a byte-identical copy of a frozen LLM's folder is
    current; a source added, gone or at another path is ``"changed"``."""
    if not isinstance(recorded, Mapping) or recorded.keys() != now.keys():
        return "changed"
    changes = set()
    for key, was in recorded.items():
        if not isinstance(was, Mapping) or was.get("path") != now[key]["path"]:
            return "changed"
        changes.add(stamps_change(was.get("files"), now[key]["files"]))
    return "changed" if "changed" in changes else "rewritten" if "rewritten" in changes else None


def check_args(args: argparse.Namespace) -> None:
    """What ``--check`` needs, before anything is exported (``--limit 0`` checked nothing and passed)."""
    if args.is_current and args.check is not None:
        raise ExportError("--is-current exports and checks nothing: leave out --check")
    if args.check is not None and not Path(args.check).is_file():
        raise ExportError(f"--check {args.check}: no such question set file")
    for flag, value in (("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise ExportError(f"{flag} {value}: must be at least 1")


def cmd_export(args: argparse.Namespace) -> int:
    try:
        check_args(args)
        if args.is_current:
            stale = stale_export(args.checkpoint, args.out_dir)
            print(stale or f"{args.out_dir} is the export of {args.checkpoint} as it is now")
            return 1 if stale else 0
        out = export_final(args)
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
        args.device or default_device(),
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
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=MAX_NEW_TOKENS,
        help=f"--check: greedy answer length limit ({MAX_NEW_TOKENS}, as alignlm eval's)",
    )
    p.add_argument(
        "--device",
        type=device_flag,
        default=None,
        help="--check: where both sides answer (default: cuda when present, else cpu; also under accelerate launch "
        "--cpu)",
    )
    p.add_argument(
        "--is-current",
        action="store_true",
        help=f"export nothing: exit 0 when out_dir is an export of the checkpoint as it is now (its {SOURCE_FILE} "
        "names the checkpoint and the sizes and times of its files), else 1, saying why",
    )
    add_trust_flags(p)
    p.set_defaults(func=cmd_export)
