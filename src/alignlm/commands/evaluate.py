"""``alignlm eval`` (checkpoints -> report), ``alignlm compare`` (paired differences between the checkpoints of
several reports), ``alignlm plot-runs`` (monitor curves of runs side by side), ``alignlm lmms-task`` (a question set as
a local lmms-eval task) and ``alignlm lmms-eval`` (lmms-eval's own command line on an exported model).

Eval knobs come from ``configs/eval/default.yaml``, then ``--config FILE``, then ``--set key=value``, then the flags.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf

from alignlm.checks import EVAL_SET_KEYS, check_generation_keys, check_keys
from alignlm.commands._flags import add_trust_flags, positive_int
from alignlm.config import ConfigError, add_keys, config_dir
from alignlm.constants import MAX_NEW_TOKENS
from alignlm.data.templates import TEMPLATES
from alignlm.evaluation import checkpoints
from alignlm.evaluation.evaluate import check_set_names
from alignlm.evaluation.lmms import run_lmms_eval, write_local_task
from alignlm.evaluation.paired import (
    against_first,
    markdown_lines,
    pairing_notes,
    run_key,
    same_step_pairs,
    too_few_shared,
)
from alignlm.evaluation.plots import plot_accuracy_curves, plot_runs
from alignlm.evaluation.report import (
    PARTS,
    check_checkpoints,
    evaluate_checkpoint,
    json_values,
    probe_metrics_asked,
    shift_metrics,
    write_report,
)
from alignlm.files import LockHeld, release_lock, take_lock
from alignlm.geometry.suite import metric_problems, unknown_metrics_said
from alignlm.models.device import default_device, device_problem
from alignlm.models.probes import check_probe_metrics
from alignlm.training.logging import get_logger


def eval_defaults() -> DictConfig:
    """``configs/eval/default.yaml``: every eval knob with its default."""
    return OmegaConf.load(config_dir() / "eval" / "default.yaml")


def eval_config(args: argparse.Namespace) -> dict[str, Any]:
    """The merged eval config of defaults, ``--config``, ``--set`` and flags."""
    cfg = eval_defaults()
    if args.config:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(args.config))
    apply_set_items(cfg, args.set or [])
    flags = {
        "template": args.template,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "limit": args.limit,
        "device": args.device,
    }
    for key, value in flags.items():
        if value is not None:
            cfg[key] = value
    if args.sets:
        sets = []
        for item in args.sets:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise SystemExit(f"--sets takes NAME=PATH, got {item!r}")
            sets.append({"name": name, "path": path, "kind": "auto"})
        cfg.sets = sets
    if args.probe:
        cfg.probe.path = args.probe
    if args.probe_n is not None:
        cfg.probe.n = args.probe_n
    if args.layers is not None:
        cfg.probe.layers = args.layers
    if args.no_probe:
        cfg.probe.enabled = False
    if args.no_plots:
        cfg.plots = False
    cfg.allow_code, cfg.trust_remote_code = args.allow_code, args.trust_remote_code
    return OmegaConf.to_container(cfg, resolve=True)


def apply_set_items(cfg: DictConfig, items: Sequence[str]) -> None:
    """Apply ``--set`` items to ``cfg``, each read with Hydra's override grammar, as ``alignlm train`` reads its
    overrides. OmegaConf's dotlist read the value as YAML: ``generation={do_sample:true,temperature:0.7}`` became the
    keys ``'do_sample:true'`` and ``'temperature:0.7'`` without values, and the report was greedy. A mapping merges
    into the knob's mapping, as in train; a leading ``+`` or ``++`` changes nothing (every key is checked by name
    after, :func:`check_eval_keys`); a deletion (``~key``), a sweep (``a,b``) or a package (``@``) sets no knob and is
    refused."""
    parser = OverridesParser.create()
    for item in items:
        try:
            (override,) = parser.parse_overrides([item])
        except OverrideParseException as e:
            why = " ".join(str(e).split())
            raise SystemExit(
                f"--set {item!r} is not key=value in the override grammar alignlm train takes: {why}"
            ) from None
        if override.is_delete() or override.is_sweep_override() or override.package is not None:
            raise SystemExit(f"--set {item!r} sets no eval knob: give key=value (no ~key, a,b sweep or @package)")
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)


def layer_list(text: str) -> str | list[int]:
    """argparse ``type=`` of ``--layers``: ``all``, or comma-separated layer indices such as ``0,6,-1``."""
    if text == "all":
        return text
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        layers = []
    if not layers:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'all' nor comma-separated layer indices such as 0,6,-1")
    return layers


# eval knobs whose keys are another library's: transformers' generate() settings (check_generation_keys checks them)
OPEN_KNOBS = ("eval.generation",)


def check_eval_keys(node: Mapping[str, Any], known: Mapping[str, set[str]], where: str = "eval") -> None:
    """Every key of the eval config, at every level, is one ``configs/eval/default.yaml`` sets: ``--set
    probe.top_k=3`` or ``gap_shift.metirc=cka`` was merged in unread, the report measured with the default, and a
    mistyped key is named with the nearest known one (``checks.py``'s check, as for training knobs)."""
    check_keys(where, node, known.get(where, set()))
    for key, value in node.items():
        place = f"{where}.{key}"
        if isinstance(value, Mapping) and place in known and place not in OPEN_KNOBS:
            check_eval_keys(value, known, place)


def check_sets(sets: Sequence[Any]) -> None:
    """Each entry of ``eval.sets`` has a name (one of its own: :func:`check_set_names`) and a path to a file."""
    for i, s in enumerate(sets):
        if not isinstance(s, Mapping) or not s.get("name") or not s.get("path"):
            raise SystemExit(f"eval sets[{i}]={s!r} needs a name and a path ({{name, path, kind}}; --sets NAME=PATH)")
        check_keys(f"eval.sets[{i}]", s, set(EVAL_SET_KEYS))
    check_set_names(sets)
    missing = [s["path"] for s in sets if not Path(s["path"]).exists()]
    if missing:
        raise SystemExit(f"eval sets name files that do not exist: {missing}")


def check_eval_config(ecfg: dict[str, Any]) -> None:
    """Knobs that would otherwise fail after a checkpoint is loaded, or quietly evaluate nothing (``--limit -1``)."""
    known: dict[str, set[str]] = {}
    add_keys(known, "eval", OmegaConf.to_container(eval_defaults()))
    check_eval_keys(ecfg, known)
    probe = ecfg["probe"]
    counts = {k: ecfg.get(k) for k in ("batch_size", "max_new_tokens", "caption_max_new_tokens", "limit")}
    counts |= {f"probe.{k}": probe.get(k) for k in ("n", "topk", "batch_size")}
    for key, value in counts.items():  # limit and probe.n may be null: all
        nullable = key in ("limit", "probe.n")
        if (value is not None or not nullable) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SystemExit(f"eval {key}={value!r} must be a whole number >= 1" + (" (or null: all)" * nullable))
    workers = ecfg.get("num_workers", "auto")
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise SystemExit(f"eval num_workers={workers!r} must be auto or a whole number >= 0")
    if ecfg.get("template") is not None and ecfg["template"] not in TEMPLATES:
        raise SystemExit(f"eval template={ecfg['template']!r} is not known; choose one of {sorted(TEMPLATES)}")
    check_sets(ecfg.get("sets") or [])
    check_generation_settings(ecfg.get("generation"))
    check_generation_keys(ecfg.get("generation"))  # a mistyped one failed in generate(), after the loading
    if probe.get("n") is not None and probe["n"] < probe["topk"] + 2:
        raise SystemExit(f"eval probe.n={probe['n']} must be at least probe.topk + 2 = {probe['topk'] + 2}")
    for key in ("metrics", "layer_metrics"):
        problems = metric_problems(probe.get(key) or [])
        if problems:
            raise SystemExit(unknown_metrics_said(f"eval probe.{key}", problems))
    shift = ecfg.get("gap_shift") or {}
    if shift.get("deltas") and shift.get("metric") not in shift_metrics():
        raise SystemExit(f"eval gap_shift.metric={shift.get('metric')!r} is not known; choose from {shift_metrics()}")
    if probe.get("enabled", True):  # what the probe cannot measure, before a checkpoint is loaded
        check_probe_metrics(probe_metrics_asked(probe, ecfg), probe["topk"], probe.get("n"), "probe")
    check_device(ecfg["device"])


def check_generation_settings(generation: Any) -> None:
    """``eval.generation`` is null or a mapping of named, valued ``generate`` settings: a YAML flow mapping without
    spaces (``{do_sample:true,temperature:0.7}`` in a ``--config`` file, or in ``--set`` before it took the override
    grammar) is the keys ``'do_sample:true'`` and ``'temperature:0.7'`` with null values, which sampled nothing and
    exited 0. Such keys are refused by name."""
    if generation is None:
        return
    example = "e.g. {do_sample: true, temperature: 0.7}, or --set generation.temperature=0.7"
    if not isinstance(generation, Mapping):
        raise SystemExit(
            f"eval generation={generation!r} must be a mapping of transformers generate() settings, {example}"
        )
    unnamed = [k for k in generation if not (isinstance(k, str) and k.isidentifier())]
    unset = [k for k, v in generation.items() if v is None and k not in unnamed]
    said = [f"keys {unnamed} are not setting names"] if unnamed else []
    said += [f"{unset} have no value (null)"] if unset else []
    if said:
        raise SystemExit(f"eval generation: {' and '.join(said)}; write each setting as name: value, {example}")


def check_device(device: str) -> None:
    """``device`` names one this machine has: ``--device cuda`` without CUDA failed after the model was loaded."""
    if device == "auto":
        return
    problem = device_problem(device)
    if problem:
        raise SystemExit(f"eval device={device!r}: {problem}; use auto, cpu, cuda or cuda:N")


def refuse_file_out(out: Path) -> None:
    """``--out`` is not a file, checked first: a file there failed only once every checkpoint had been evaluated."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file; give a folder for report.json, report.md and the plots")


def prepare_out(out: Path) -> None:
    """``--out`` as a folder (:func:`refuse_file_out` checked it first), made once the checkpoints are found and
    before anything is loaded."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot make the folder ({e.strerror or e})") from None


def out_lock_file(out: Path) -> Path:
    """The lock of the evaluation writing into ``out``: beside the folder (where ``--out`` names it through a link,
    beside the folder it links to), not in it, as a training run's is beside its folder, so --out holds only what the
    evaluation wrote."""
    folder = out.resolve()
    return folder.parent / f".{folder.name}.eval.lock"


@contextlib.contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """``--out`` is this evaluation's from here to its end (:func:`~alignlm.files.take_lock` on
    :func:`out_lock_file`, the lock a training run takes on its folder): two evaluations into one folder appended
    their batches to one ``set-<name>.partial.jsonl`` in turns and overwrote each other's reports. A second is
    refused, naming the holder, before it loads anything. ``alignlm eval`` is one process (it starts no ranks), so
    that process holds it."""
    try:
        fd = take_lock(out_lock_file(out), "a second alignlm eval into this --out")
    except LockHeld as e:
        raise ConfigError(
            f"--out {out} is in use by another alignlm eval ({e.holder}), which holds {e.path}: two evaluations into "
            "one folder mix their answers in its partial files and overwrite each other's reports. Wait for it to "
            "end, or give another --out"
        ) from None
    try:
        yield
    finally:
        if fd is not None:
            release_lock(fd)


def cmd_eval(args: argparse.Namespace) -> int:
    log = get_logger("alignlm", 0)
    t0 = time.perf_counter()
    ecfg = eval_config(args)
    check_eval_config(ecfg)
    refuse_file_out(Path(args.out))
    # the checkpoints before --out is made: a mistyped one left an empty eval_report/ and its lock behind
    cks = checkpoints.resolve(args.checkpoints)
    check_checkpoints(cks, ecfg)
    prepare_out(Path(args.out))
    with out_lock(Path(args.out)):
        device = torch.device(default_device() if ecfg["device"] == "auto" else ecfg["device"])
        log.info("evaluating %d checkpoints: %s", len(cks), ", ".join(c.label for c in cks))
        results, features = [], []
        for ck in cks:
            try:
                r, f = evaluate_checkpoint(ck, ecfg, device, Path(args.out))
            except Exception:
                log.warning(
                    "stopped at %s; what was finished is kept in %s, and the same command into --out %s reuses it",
                    ck.label,
                    Path(args.out) / PARTS,
                    args.out,
                )
                raise
            results.append(r)
            features.append(f)
        files = write_report(results, features, ecfg, Path(args.out))
        if args.json:
            print(files["json"].read_text())
        else:
            print(files["md"].read_text())
        log.info("wrote %s in %.1f s", ", ".join(str(p) for p in files.values()), time.perf_counter() - t0)
        return 0


def read_reports(paths: Sequence[str]) -> list[dict[str, Any]]:
    """The checkpoints of ``report.json`` files, each told apart from another of the same label (:func:`tell_apart`);
    a file that is no report, and fewer than two checkpoints, are refused by name."""
    results, origins = [], []
    for path in paths:
        try:
            report = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not JSON ({e})") from None
        cks = report.get("checkpoints") if isinstance(report, dict) else None
        if not isinstance(cks, list) or not all(isinstance(c, dict) and "label" in c and "sets" in c for c in cks):
            raise SystemExit(f"{path} is not a report.json of alignlm eval (no list of 'checkpoints' with labels)")
        results += cks
        origins += [Path(path)] * len(cks)
    if len(results) < 2:
        raise SystemExit(
            f"{list(paths)} hold {len(results)} checkpoint{'s' * (len(results) != 1)}; compare needs two or more"
        )
    return tell_apart(results, origins)


def tell_apart(results: list[dict[str, Any]], reports: Sequence[Path]) -> list[dict[str, Any]]:
    """Checkpoints of one label from separate reports (``raw/finetune/final`` of seeds ``s1/raw`` and ``s2/raw``,
    each evaluated alone) prefixed, as ``alignlm eval`` does for runs of one name evaluated together, with the
    fewest folders above their runs (from their paths; where a report has none, its own path) that tell them apart,
    and said so on stderr; the same checkpoint twice is refused."""
    labels = [c["label"] for c in results]
    if len(set(labels)) == len(labels):
        return results
    folders = [_run_parent(c, report) for c, report in zip(results, reports)]
    named = checkpoints.unique_labels(labels, folders)
    if len(set(named)) != len(named):
        raise SystemExit(repeated(labels, named, reports))
    out = []
    for c, label in zip(results, named):
        own = c["label"].removeprefix(f"{c['above']}/") if c.get("above") else c["label"]
        out.append(c | {"label": label, "above": label.removesuffix(own).rstrip("/")})
    renamed = [f"{old} -> {new}" for old, new in zip(labels, named) if old != new]
    print(
        f"alignlm compare: checkpoint labels repeat across the reports; named by their folders: {renamed}",
        file=sys.stderr,
    )
    return out


def repeated(labels: Sequence[str], named: Sequence[str], reports: Sequence[Path]) -> str:
    """Why the reports cannot be compared: a checkpoint they hold twice (``named``: the labels that no folder above
    the runs told apart), by its label as the reports write it, and each report file that holds it (``reports``: each
    label's file). A glob such as ``reports/*/report.json`` takes in a report of a combined evaluation beside the
    reports of its parts; a list of every label did not say which files to leave out."""
    twice = next(i for i, name in enumerate(named) if named.count(name) > 1)
    files = [str(report) for name, report in zip(named, reports) if name == named[twice]]
    distinct = list(dict.fromkeys(files))
    where = f"{files[0]}, given {len(files)} times" if len(distinct) == 1 else f"each of {', '.join(distinct)}"
    return (
        f"the reports repeat a checkpoint label: {labels[twice]} is in {where}; compare each checkpoint once (leave "
        "out one of these files)"
    )


def _run_parent(result: Mapping[str, Any], report: Path) -> Path:
    """The folder above a checkpoint's run (and the folders ``above`` it its report named), from its path; for a
    report without one, the report's own path."""
    if not result.get("path"):
        return Path(os.path.abspath(report))
    path = Path(os.path.abspath(result["path"]))
    stage_dir = path.parent if result.get("kind") == "final" else path.parent.parent
    folder = stage_dir.parent.parent
    for _ in Path(result.get("above") or "").parts:
        folder = folder.parent
    return folder


def cmd_compare(args: argparse.Namespace) -> int:
    """Paired differences over reports written separately (e.g. one eval job per run): against one checkpoint,
    or with ``--same-step`` every run against the reference run at equal training steps."""
    results = read_reports(args.reports)
    labels = [c["label"] for c in results]
    if args.same_step:
        runs = list(dict.fromkeys(run_key(c) for c in results))
        ref = runs[0] if args.reference is None else args.reference
        if ref not in runs:
            raise SystemExit(f"--reference {ref!r} is none of the reports' runs: {runs}")
        pairs = same_step_pairs(results, ref)
        if not pairs:
            at = sorted({(str(c.get("stage")), c.get("step")) for c in results if run_key(c) == ref}, key=str)
            raise SystemExit(f"nothing to compare: no other run has a checkpoint at a stage and step of {ref!r}: {at}")
    else:
        ref = labels[0] if args.reference is None else args.reference
        if ref not in labels:
            raise SystemExit(f"--reference {ref!r} is none of the reports' checkpoints: {labels}")
        base = next(c for c in results if c["label"] == ref)
        pairs = [(base, c) for c in results if c["label"] != ref]
    rows = [row for a, b in pairs for row in against_first([a, b])]
    notes = [note for a, b in pairs for note in pairing_notes(a, b)]
    unshared = [f"{name} ({a['label']} vs {b['label']})" for a, b in pairs for name in too_few_shared(a, b)]
    few = (
        f"the question sets {unshared} share fewer than 2 question ids: different questions, or a report written "
        "before alignlm keyed a record without an id by its place in the set (it keyed it by the file's path as "
        "typed; evaluate that checkpoint again)"
    )
    if not rows:
        raise SystemExit(
            f"nothing to compare: {few}"
            if unshared
            else f"nothing to compare: {'; '.join(notes)}"
            if notes
            else "nothing to compare: the checkpoints share no question set with per-question scores "
            "(reports written before alignlm recorded them lack 'scores'; evaluate again)"
        )
    if unshared:
        print(f"alignlm compare: left out: {few}", file=sys.stderr)
    for note in notes:
        print(f"alignlm compare: {note}", file=sys.stderr)
    if args.json:  # as in report.json, a z that is not finite (every shared question moved one way) is null
        print(json.dumps(json_values(rows), indent=2, allow_nan=False))
    else:
        print("\n".join(markdown_lines(rows)).strip())
    if args.plot:
        print(f"wrote {plot_accuracy_curves(results, Path(args.plot))}")
    return 0


def cmd_plot_runs(args: argparse.Namespace) -> int:
    out = plot_runs([Path(r) for r in args.runs], Path(args.out), args.metrics)
    print(f"wrote {out}")
    return 0


def cmd_lmms_task(args: argparse.Namespace) -> int:
    task = write_local_task(Path(args.questions), Path(args.out), args.name, args.max_new_tokens)
    print(f"wrote {task}; run lmms-eval with --include_path {task.parent} --tasks {args.name}")
    return 0


def lmms_eval(argv: list[str]) -> int:
    run_lmms_eval(argv)
    return 0


def register(sub: Any) -> None:
    """Add ``eval``, ``compare``, ``plot-runs``, ``lmms-task`` and ``lmms-eval`` to the ``alignlm`` command line."""
    p = sub.add_parser(
        "eval", help="evaluate checkpoints: question/caption sets and alignment probes -> report + plots"
    )
    p.add_argument(
        "checkpoints",
        nargs="+",
        help="final/ folders, step checkpoints, stage folders (every step, then final) or run folders",
    )
    p.add_argument(
        "--sets",
        nargs="+",
        metavar="NAME=PATH",
        help="LLaVA-format sets (default: the checkpoint's eval.sets); "
        "records with 'answer' are scored as questions, others as captions",
    )
    p.add_argument("--out", default="eval_report", help="folder for report.json, report.md and the plots")
    p.add_argument("--config", help="YAML merged over configs/eval/default.yaml")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="eval knob, written as alignlm train's overrides: e.g. --set generation.do_sample=true or "
        "--set 'generation={do_sample: true, temperature: 0.7}' (a mapping merges into the knob's)",
    )
    p.add_argument(
        "--template",
        default=None,
        help="override the template the checkpoint was trained with; another template than its stage's is built "
        "without the stage's data.template_args (e.g. its system prompt)",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="questions per generation batch (default: the config's)"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="answer length limit in tokens (default: the config's)"
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N records of each set")
    p.add_argument(
        "--probe",
        default=None,
        help="caption records for the alignment probes (default: test_captions.json beside the first set)",
    )
    p.add_argument("--probe-n", type=int, default=None, help="image-caption pairs to probe")
    p.add_argument(
        "--layers",
        type=layer_list,
        default=None,
        help="LLM hidden states to probe: all, or e.g. 0,6,-1 (0: the input embeddings, -1: the last layer)",
    )
    p.add_argument("--no-probe", action="store_true", help="generation sets only")
    p.add_argument("--no-plots", action="store_true", help="write report.json and report.md only")
    p.add_argument("--device", default=None, help="auto | cpu | cuda:0")
    p.add_argument("--json", action="store_true", help="print report.json instead of report.md")
    add_trust_flags(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("compare", help="paired per-question differences between checkpoints of report.json files")
    p.add_argument("reports", nargs="+", help="report.json files written by alignlm eval")
    p.add_argument(
        "--reference",
        default=None,
        help="checkpoint label to compare against (default: the first); with --same-step, a run name",
    )
    p.add_argument(
        "--same-step",
        action="store_true",
        help="pair each run's checkpoints with the reference run's checkpoint at the same training step",
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument(
        "--plot", default=None, metavar="PNG", help="also draw accuracy against training step, one line per run"
    )
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser(
        "plot-runs", help="plot the alignment monitor's curves (monitor/* in metrics.jsonl) of runs side by side"
    )
    p.add_argument("runs", nargs="+", help="run folders (stages chained) or stage folders")
    p.add_argument("--out", default="runs.png", help="image file to write")
    p.add_argument(
        "--metrics",
        nargs="*",
        default=None,
        help="only these metrics (whole /-parts of a name), e.g. pooled/modality_gap mutual_knn retrieval",
    )
    p.set_defaults(func=cmd_plot_runs)
    p = sub.add_parser("lmms-task", help="write a LLaVA-format question set as a local lmms-eval task (no Hub needed)")
    p.add_argument("questions", help="LLaVA JSON whose records carry 'answer', e.g. data/digits/test.json")
    p.add_argument("out", help="task folder parent, given to lmms-eval as --include_path")
    p.add_argument("--name", default="alignlm_local", help="task name (and sub-folder)")
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=MAX_NEW_TOKENS,
        help=f"answer length limit the task sets ({MAX_NEW_TOKENS}, as alignlm eval's)",
    )
    p.set_defaults(func=cmd_lmms_task)
    p = sub.add_parser(
        "lmms-eval",
        help="lmms-eval's own command line (e.g. --model llava_hf) on an exported model, "
        "with its one transformers-5 incompatibility removed; every argument goes to lmms-eval",
    )
    p.pass_through = lmms_eval
