"""Checkpoints -> ``report.json``, ``report.md`` (one comparison table) and PNG plots.

For each checkpoint: generation sets (question accuracy, caption BLEU-4 / CIDEr-D), alignment probes on a held-out
caption set (docs/methods.md, metrics), and Mind the Gap's shift curve. The report is deterministic: fixed seeds,
first-``n`` subsets, rounded floats, sorted keys; timings go to the console, never into the report.

Each set's results and each probe's are kept under ``--out/parts`` as they finish (:class:`Parts`), and a set's answers
batch by batch while it is generated (:class:`PartialSet`), keyed by what they were computed from, so an evaluation
killed part-way (a pre-empted job) loses only the batch or the probe it was in, and the same command again computes
only what is missing.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

import alignlm
from alignlm.config import ConfigError
from alignlm.data import (
    differences_said,
    generator_defaults,
    offline_set_differences,
    offline_sets,
    offline_settings,
    read_info,
    split_neutral_knobs,
)
from alignlm.data.build import image_reading_of
from alignlm.data.images import loader_workers
from alignlm.data.records import DataError, image_paths, read_records
from alignlm.data.templates import TEMPLATES
from alignlm.evaluation import checkpoints as C
from alignlm.evaluation import paired, plots
from alignlm.evaluation.evaluate import answer_accuracy, caption_scores, check_answers, check_set_names, set_kind
from alignlm.files import file_sha256, replace_file, replace_text, sole_writer
from alignlm.geometry.metrics import retrieval_recall
from alignlm.geometry.suite import PAIR_METRICS, flat
from alignlm.models.artifacts import artifact_report
from alignlm.models.generation import check_prompt_lengths
from alignlm.models.io import file_stamps, model_stamps
from alignlm.models.probes import (
    check_probe_size,
    extract,
    gap_shift,
    image_batches,
    load_probe_set,
    needs_tokens,
    probe_metrics,
    resolve_layers,
)
from alignlm.training.checkpoint import resolve_init, stage_place
from alignlm.training.logging import json_values

log = logging.getLogger("alignlm")

# Columns of the comparison table after the per-set scores (flattened probe keys).
HEADLINE = (
    "pooled/modality_gap",
    "pooled/mutual_knn",
    "pooled/cka",
    "pooled/cknna",
    "pooled/i2t_recall@1",
    "pooled/t2i_recall@1",
    "per_token/a_score_visual_to_text",
)
DIGITS = 6
PLOTS = ("pca", "metrics", "gap_shift", "layers", "artifacts")  # what write_plots draws, each to out/<name>.png
Column = tuple[str, Callable[[dict[str, Any]], float | None], int]  # header, the value, its decimals in the table
PARTS = "parts"  # the folder of --out that keeps each finished piece (Parts)
PARTIAL = ".partial.jsonl"  # beside a set's piece, its answers batch by batch until it is written whole (PartialSet)
SYNC_EVERY = 5.0  # seconds between syncs of a PartialSet file to the disk (each batch is flushed to the system at once)
# The eval knobs a set's results are computed with (and its kind's answer length, TOKEN_BUDGET), the knobs the probe's
# are, and those that change no number of the report; every knob of configs/eval/default.yaml is in one of them
# (tested), so a new knob cannot leave a finished piece reused after it changed.
SET_KNOBS = ("template", "batch_size", "limit", "generation", "seed")
TOKEN_BUDGET = {"qa": "max_new_tokens", "caption": "caption_max_new_tokens"}
PROBE_KNOBS = ("probe", "gap_shift")
# the sets are keyed by their files; the device by its type (cpu, cuda), as it was resolved
NO_SCORE_KNOBS = ("sets", "plots", "num_workers", "device", "allow_code", "trust_remote_code")
UNREPORTED_KNOBS = ("plots", "num_workers")  # which files were drawn, how fast: not what was measured


def rounded(x: Any) -> Any:
    """Floats to 6 significant digits, recursively: the last bits of a float sum never reach the report."""
    if isinstance(x, float):
        return float(f"{x:.{DIGITS}g}")
    if isinstance(x, Mapping):
        return {str(k): rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v) for v in x]
    return x


def eval_sets(ecfg: Mapping[str, Any], train_cfg: Any, whose: str = "the checkpoint") -> list[dict[str, Any]]:
    """The configured sets, else the ones the checkpoint's run evaluated (``eval.sets`` of its config), each file
    there: a run's own set missing (a path relative to another folder, a cluster's path) was found at its turn, after
    the checkpoints before it had been evaluated. ``whose``: the checkpoint, as the message names it."""
    sets = list(ecfg.get("sets") or [])
    own = not sets
    if own:
        sets = [dict(s) for s in (train_cfg.get("eval") or {}).get("sets") or []]
    check_set_names(sets)
    missing = [str(s["path"]) for s in sets if not Path(str(s["path"])).is_file()]
    if missing:
        raise ConfigError(
            f"{whose}: the eval.sets of its run's config name files that are not there: {missing} (a relative path "
            "is read from the folder alignlm eval runs in); give the sets with --sets NAME=PATH"
            if own
            else f"{whose}: eval.sets name files that are not there: {missing}"
        )
    if own:
        _refuse_regenerated_sets(sets, train_cfg, whose)
        _say_other_scoring(ecfg, train_cfg, whose)
    return [
        {"name": str(s["name"]), "path": str(s["path"]), "kind": set_kind(str(s["path"]), str(s.get("kind", "auto")))}
        for s in sets
    ]


# what scores a run's own sets other than its final evaluation did, besides the checkpoint; with sampled decoding the
# batches and their seed too (the final evaluation samples under seed 0)
_SCORING = ("max_new_tokens", "generation", "limit")
_SAMPLING = ("batch_size", "seed")


def _say_other_scoring(ecfg: Mapping[str, Any], train_cfg: Any, whose: str) -> None:
    """A warning where the run's own sets are scored with other settings than its final evaluation used (answer
    length, decoding, limit; sampled, the batch size and seed): only the sets had been taken from the run, and its
    0 % sampled at temperature 2 on 20 questions read as 50 % greedy on 36, without a word."""
    run = {"seed": 0, **dict(train_cfg.get("eval") or {})}
    sampled = any(bool((g or {}).get("do_sample")) for g in (run.get("generation"), ecfg.get("generation")))
    keys = _SCORING + (_SAMPLING if sampled else ())
    differ = {k: (run[k], ecfg.get(k)) for k in keys if k in run and k in ecfg and run[k] != ecfg.get(k)}
    if differ:
        log.warning(
            "%s: its run's sets are scored with %s, where its run's final evaluation had %s (--set KEY=VALUE to score "
            "them as it did)",
            whose,
            ", ".join(f"{k}={v[1]!r}" for k, v in differ.items()),
            ", ".join(f"{k}={v[0]!r}" for k, v in differ.items()),
        )


def _refuse_regenerated_sets(sets: Sequence[Mapping[str, Any]], train_cfg: Any, whose: str) -> None:
    """Refuse a run's own eval set inside an offline set's folder (``data_root/digits``) that another config wrote
    again since the run (a seed sweep regenerates the shared folder for each seed), or that holds no info.json (a
    generation under way or killed: what it holds cannot be told): its split is another one, whose questions may be
    images the checkpoint trained on. Evaluating seed 0's checkpoint after the seed-1 run had scored it on a test
    split that held 258 of seed 0's 300 training digits, without a word. A generation under way is waited for. A knob
    that changes none of the split's files (shapes' ``som``) is no other split: the SoM arm and its baseline had each
    been refused after the other wrote the set."""
    for name, (folder, wanted) in offline_sets(offline_settings(train_cfg)).items():
        info, root = folder / "info.json", folder.resolve()
        inside = [s for s in sets if Path(str(s["path"])).resolve().is_relative_to(root)]
        if not inside:
            continue
        with sole_writer(info, f"reading {folder}"):  # the lock a generation holds (pipeline.ensure_offline_datasets)
            written = read_info(info) if info.is_file() else None
        differs = offline_set_differences(written, wanted) if isinstance(written, dict) else None
        if differs is not None:  # +exp=som and +exp=baseline write one split with and without som.json
            differs = {k: v for k, v in differs.items() if k not in split_neutral_knobs(name)}
        if differs == {}:
            continue
        defaults = generator_defaults(name)  # the run's set: every knob it set apart from the defaults
        knobs = "".join(f" --set {k}={json.dumps(v)}" for k, v in wanted.items() if k in defaults and v != defaults[k])
        command = f"alignlm data {name} --out {shlex.quote(str(folder.parent))} --seed {wanted['seed']}{knobs}"
        if isinstance(written, str):
            why = f"whose info.json cannot be read ({written}: what it holds cannot be told)"
        elif differs is None:
            why = "which holds no info.json (a generation under way or killed: what it holds cannot be told)"
        else:
            now, then = differences_said(differs)
            why = f"written again since the run with {now} (the run's: {then}): another split"
        raise ConfigError(
            f"{whose}: its run's eval set {inside[0]['name']} ({inside[0]['path']}) is in {folder}, {why}, whose "
            f"questions may be among what the checkpoint trained on. Write the run's set again ({command}) or give "
            "the sets with --sets NAME=PATH"
        )


def shift_metrics() -> list[str]:
    """What ``gap_shift.metric`` may name: each pooled metric that is one number, and each recall the retrieval
    metric reports at the ``ks`` it measures by default (those gap_shift measures)."""
    ks = inspect.signature(retrieval_recall).parameters["ks"].default
    recalls = [f"{way}_recall@{k}" for way in ("i2t", "t2i") for k in ks]
    return [m for m in PAIR_METRICS if m != "retrieval"] + recalls


def probe_path(ecfg: Mapping[str, Any], sets: list[dict[str, Any]]) -> str | None:
    """``probe.path``, else the ``test_captions.json`` beside the first question set (the offline sets ship one)."""
    probe = ecfg.get("probe") or {}
    if probe.get("path"):
        return str(probe["path"])
    for s in sets:
        candidate = Path(s["path"]).parent / "test_captions.json"
        if candidate.exists():
            return str(candidate)
    return None


def probe_metrics_asked(pcfg: Mapping[str, Any], ecfg: Mapping[str, Any]) -> set[str]:
    """Every metric the probe will measure: its table, its layers' (where layers are asked), the gap-shift curve's."""
    asked = set(pcfg.get("metrics") or []) | (set(pcfg.get("layer_metrics") or []) if pcfg.get("layers") else set())
    shift = dict(ecfg.get("gap_shift") or {})
    return asked | ({shift.get("metric")} if shift.get("deltas") else set())


@dataclass(frozen=True)
class Plan:
    """What one checkpoint is evaluated on, read from the eval config and its run's config without loading it."""

    train_cfg: DictConfig
    sets: list[dict[str, Any]]
    probe: str | None  # the probe's caption file; None: no probe


def checkpoint_plan(ck: C.Checkpoint, ecfg: Mapping[str, Any]) -> Plan:
    """The sets and the probe file of one checkpoint; a checkpoint with neither is refused."""
    train_cfg = C.stage_config(ck)
    sets = eval_sets(ecfg, train_cfg, ck.label)
    path = probe_path(ecfg, sets)
    if not sets and not (path and (ecfg.get("probe") or {}).get("enabled", True)):
        raise ValueError(
            f"nothing to evaluate for {ck.label}: its run had eval.sets=[] and no --sets NAME=PATH was "
            f"given, and the probe is {'off (--no-probe)' if path else 'without a caption set (probe.path)'}"
        )
    return Plan(train_cfg, sets, path if (ecfg.get("probe") or {}).get("enabled", True) else None)


def read_probe(path: str, ecfg: Mapping[str, Any]) -> Any:
    """The probe's image-caption pairs, refused when too few for the metrics asked (a file too small for topk failed
    after every answer had been generated)."""
    pcfg = dict(ecfg.get("probe") or {})
    probe = load_probe_set(path, pcfg.get("n"), pcfg.get("image_root"))
    topk, asked = int(pcfg.get("topk", 10)), probe_metrics_asked(pcfg, ecfg)
    check_probe_size(len(probe.ids), topk, asked, "probe", "eval probe.path", path, pcfg.get("n"))
    return probe


def check_checkpoints(cks: Sequence[C.Checkpoint], ecfg: Mapping[str, Any]) -> None:
    """What would otherwise fail part-way, for every checkpoint before any is loaded: each has something to evaluate,
    its sets are there (a run's own ``eval.sets`` too), every question's reference answer can be scored, and its probe
    file has enough pairs. A prompt too long for a checkpoint's ``data.max_length`` needs its tokenizer: that is
    checked once it is loaded, before its first answer (:func:`evaluate_checkpoint`)."""
    answers: set[tuple[str, str]] = set()
    probes: set[str] = set()
    for ck in cks:
        plan = checkpoint_plan(ck, ecfg)
        check_template(ck.label, eval_data_config(ck, plan.train_cfg, ecfg))
        for s in plan.sets:
            if s["kind"] == "qa" and (s["name"], s["path"]) not in answers:
                check_answers(s["name"], s["path"], ecfg.get("limit"))
                answers.add((s["name"], s["path"]))
        if plan.probe is not None and plan.probe not in probes:
            read_probe(plan.probe, ecfg)
            probes.add(plan.probe)


def eval_data_config(ck: C.Checkpoint, train_cfg: DictConfig, ecfg: Mapping[str, Any]) -> dict[str, Any]:
    """The data node a checkpoint is evaluated with: its stage's, with eval's ``template`` (``--template``) in place
    of the stage's. Another template than the stage's is built without the stage's ``template_args``: they are
    arguments of the stage's template (``vicuna_v1``'s system prompt), and ``plain`` takes none (a ``TypeError``
    after the model had loaded)."""
    data_cfg = C.data_config(ck, train_cfg)
    template = ecfg.get("template")
    if template and template != data_cfg.get("template", "plain"):
        data_cfg["template"] = template
        data_cfg.pop("template_args", None)
    return data_cfg


def check_template(label: str, data_cfg: Mapping[str, Any]) -> None:
    """The template of ``data_cfg`` is known and takes its ``template_args`` (a checkpoint's config written before
    the training checks refused args its template lacks), refused before any model is loaded."""
    name = str(data_cfg.get("template", "plain"))
    args = dict(data_cfg.get("template_args") or {})
    if name not in TEMPLATES:
        raise ConfigError(
            f"{label}: its stage's data.template={name!r} is not known; give --template, one of {sorted(TEMPLATES)}"
        )
    try:
        inspect.signature(TEMPLATES[name]).bind(**args)
    except TypeError as e:
        raise ConfigError(
            f"{label}: its stage's data.template_args={args} do not fit template {name!r} ({e}); evaluate it with "
            "--template of another template, which is built without them"
        ) from None


def checkpoint_identity(ck: C.Checkpoint, train_cfg: DictConfig) -> list[list[Any]]:
    """What a checkpoint's weights are, as ``file_stamps`` sees its files; a step checkpoint's model is also its
    stage's ``config.yaml`` and the ``init_from`` weights it was rebuilt on (as ``checkpoints.load`` finds them). The
    local files its model config loads too (:func:`_model_files`: a frozen LLM or tower rebuilt from a folder; a
    ``final/`` holds only the parts it trained, so new weights at that path had been served the old results)."""
    own = file_stamps(ck.path) + _model_files(train_cfg)
    if ck.kind == "final":
        return own
    run_dir, aside = stage_place(ck.stage_dir)
    init = resolve_init(train_cfg.stages[ck.stage].get("init_from"), run_dir, train_cfg.stages, aside)
    return own + file_stamps(ck.stage_dir / "config.yaml") + (file_stamps(init) if init else [])


def _model_files(train_cfg: DictConfig) -> list[list[Any]]:
    """``[name, bytes, sha256]`` of every file of each local file or folder the run's ``model`` config loads
    (``model_stamps``, the list export and a finished stage's skip compare too), one list: without modification times,
    as ``models.io.stamps_change`` compares two records holding digests, so a byte-identical copy of a frozen LLM's
    folder (``cp -r`` to node-local disk) finds the results kept for it. Results kept before digests are computed
    again."""
    sources = model_stamps(train_cfg.get("model")).values()
    return [[name, size, digest] for source in sources for name, size, _, digest in source["files"]]


def _image_files(file: Path, root: Path) -> list[list[Any]]:
    """``file_stamps`` of the images the records of ``file`` name under ``root``: a set or probe file unchanged whose
    images were replaced had been served the old results. A record whose images cannot be listed is left to the
    reading, which names it."""
    found: set[Path] = set()
    for record in read_records(file):
        try:
            found.update(image_paths(record, root) if isinstance(record, dict) else [])
        except (DataError, ValueError):
            continue
    return [stat for path in sorted(found) for stat in file_stamps(path)]


@functools.cache
def code_digest() -> str:
    """A digest of alignlm's own source: a piece kept by another version (a scoring fix, a metric changed) is
    computed again, not served into the new version's report."""
    root = Path(alignlm.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(f"{path.relative_to(root)}\0".encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _file_name(text: str) -> str:
    """``text`` as a file name: other characters than letters, digits, ``.``, ``_`` and ``-`` become ``_``, and then a
    digest of ``text`` keeps two names apart that became one."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".")
    return safe if safe == text else f"{safe}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Parts:
    """One checkpoint's finished pieces under ``--out/parts/<run>--<stage>--<checkpoint>-<digest of its path>/``
    (:meth:`of`): ``set-<name>.json`` per set, ``probe.json`` (with ``probe.safetensors``, the pooled features the PCA
    plot draws). Each is written whole (``replace_text``) once computed, with its key: the checkpoint's files
    (:func:`checkpoint_identity`), the device type, the input file's digest and the eval knobs it was computed with. A
    piece is reused only under the same key; the report is built from the pieces, reused or not, exactly as from
    results just computed. While a set is generated, its answers are kept batch by batch beside it (:meth:`partial`),
    under the same key, until its piece is written."""

    folder: Path
    checkpoint: list[list[Any]]
    device: str

    @classmethod
    def of(cls, out: Path, ck: C.Checkpoint, train_cfg: DictConfig, device: torch.device) -> Parts:
        """The pieces of ``ck``, in a folder named from the checkpoint alone: its label without the folders that tell
        it from another evaluated run of the same name (``above``: they depend on the other checkpoints of the
        command, so the same checkpoint evaluated alone and beside another found none of its pieces), and the digest
        of its path, which tells apart two checkpoints of one label. A folder named by the older rule is left as it is
        (its pieces were keyed by the older code, so they would be computed again anyway)."""
        where = hashlib.sha256(str(ck.path).encode()).hexdigest()[:8]
        folder = out / PARTS / f"{_file_name(replace(ck, above='').label.replace('/', '--'))}-{where}"
        return cls(folder, checkpoint_identity(ck, train_cfg), device.type)

    def key(self, file: str, knobs: Mapping[str, Any], image_root: str | None = None) -> dict[str, Any]:
        """What a piece computed from ``file`` (its images under ``image_root``, by default its folder) with ``knobs``
        is keyed by, as JSON reads it back."""
        path = Path(os.path.abspath(file))
        key = {
            "alignlm": code_digest(),
            "checkpoint": self.checkpoint,
            "device": self.device,
            "file": [str(path), file_sha256(path)],
            "images": _image_files(path, Path(image_root) if image_root else path.parent),
            "knobs": knobs,
        }
        return json.loads(json.dumps(key))

    def read(self, name: str, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The piece ``name`` when it was computed under ``key``, else None (none yet, or another key: computed
        again)."""
        path = self.folder / f"{name}.json"
        if not path.exists():
            return None
        try:
            kept = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("%s cannot be read (%s): computed again", path, e)
            return None
        if not isinstance(kept, dict) or kept.get("key") != key or "result" not in kept:
            log.info("%s was computed from other weights, files or settings: computed again", path)
            return None
        features = kept.get("features")
        if features is None:
            return kept["result"]
        file = self.folder / features["file"]
        if not file.exists() or file_sha256(file) != features["sha256"]:
            return None
        return kept["result"] | {"features": load_file(str(file))}

    def write(self, name: str, key: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        """Keep the piece ``name``; its ``features`` (tensors) in a safetensors file beside it, named with its digest
        in the JSON, which is written last: a piece whose features were cut is computed again."""
        self.folder.mkdir(parents=True, exist_ok=True)
        kept: dict[str, Any] = {"key": key, "result": {k: v for k, v in result.items() if k != "features"}}
        if result.get("features"):
            file, digest = self.folder / f"{name}.safetensors", []

            def save(tmp: Path) -> None:
                save_file({k: v.detach().cpu().contiguous() for k, v in result["features"].items()}, str(tmp))
                digest.append(file_sha256(tmp))  # before the rename: another run may replace the file right after it

            replace_file(file, save)
            kept["features"] = {"file": file.name, "sha256": digest[0]}
        replace_text(self.folder / f"{name}.json", json.dumps(kept, sort_keys=True) + "\n")
        (self.folder / f"{name}{PARTIAL}").unlink(missing_ok=True)  # the piece holds every answer now

    def partial(self, name: str, key: Mapping[str, Any]) -> PartialSet:
        """Where the set piece ``name`` keeps its answers under ``key`` batch by batch until it is written whole."""
        return PartialSet(self.folder / f"{name}{PARTIAL}", key)


@dataclass
class PartialSet:
    """A set's answers batch by batch while it is generated (:class:`~alignlm.models.generation.AnswerKeeper`):
    ``set-<name>.partial.jsonl`` beside its piece, the piece's key on the first line, then a line per finished batch,
    ``[[id, prediction], ...]``. A job killed at 80 % of a 12.6k-question set had to generate it again from its first
    question; now the same command resumes at its first unanswered batch. A last line the kill cut is ignored and cut
    off before the next batch is appended; a file under another key (other weights, files, knobs or code) is started
    again.

    Each line is flushed to the system before the next batch is generated, so a killed process loses no finished
    batch; it is synced to the disk at most every :data:`SYNC_EVERY` seconds, so a machine that goes down loses at
    most those seconds of batches (a sync took 0.2 to 2.9 ms on a local disk, up to 6 % of the tiny model's 45 ms CPU
    batch, and a network file system's can take longer)."""

    path: Path
    key: Mapping[str, Any]
    synced: float = field(default=-math.inf, init=False)  # time.monotonic() of the last sync

    def __str__(self) -> str:
        return str(self.path)

    def answered(self, batches: Sequence[Sequence[str]]) -> list[list[str]]:
        """The predictions of the leading lines that answer ``batches`` (their record ids, in order), batch by batch.
        What follows them (a line the kill cut, a line of other records) is cut off; a file under another key, or
        none, is started with this key."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        lines = data.split(b"\n")[:-1]  # each whole line: what follows the last newline is a line the kill cut
        if not lines or _json_line(lines[0]) != self.key:
            if lines:
                log.info("%s was answered from other weights, files or settings: generated again", self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            replace_text(self.path, json.dumps(self.key, sort_keys=True) + "\n")
            return []
        kept: list[list[str]] = []
        for line, ids in zip(lines[1:], batches):
            preds = _predictions(_json_line(line), ids)
            if preds is None:
                break
            kept.append(preds)
        end = sum(len(line) + 1 for line in lines[: len(kept) + 1])
        if end < len(data):
            log.info("%s: %d bytes after its last whole batch of this set cut off", self.path, len(data) - end)
            with self.path.open("r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        if kept:
            log.info("%s: %d answers kept from before; generation resumes after them", self.path, sum(map(len, kept)))
        return kept

    def add(self, answers: Sequence[tuple[str, str]]) -> None:
        """Append one batch's ``(id, prediction)`` pairs as a line, flushed (a kill after it keeps them) and synced
        when the last sync is :data:`SYNC_EVERY` seconds old."""
        with self.path.open("ab") as f:
            f.write((json.dumps([list(pair) for pair in answers]) + "\n").encode())
            f.flush()
            if time.monotonic() - self.synced >= SYNC_EVERY:
                os.fsync(f.fileno())
                self.synced = time.monotonic()


def _json_line(line: bytes) -> Any:
    """A line of a :class:`PartialSet` file read as JSON, or None where it is none."""
    try:
        return json.loads(line)
    except ValueError:
        return None


def _predictions(pairs: Any, ids: Sequence[str]) -> list[str] | None:
    """The predictions of a batch's line ``pairs`` when it holds ``[id, prediction]`` for exactly ``ids``, else None."""
    if not isinstance(pairs, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair) for pair in pairs
    ):
        return None
    return [pred for _, pred in pairs] if [rid for rid, _ in pairs] == list(ids) else None


def set_knobs(ecfg: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The eval knobs a set of ``kind`` is answered and scored with."""
    return {k: ecfg.get(k) for k in (*SET_KNOBS, TOKEN_BUDGET[kind])}


def evaluate_checkpoint(
    ck: C.Checkpoint, ecfg: Mapping[str, Any], device: torch.device, out: Path | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One checkpoint's results, and the pooled features the plots draw. With ``out``, each set's and the probe's are
    kept under ``out/parts`` as they finish, and those kept there under the same key are reused (:class:`Parts`); the
    model is loaded only when something is left to compute."""
    plan = checkpoint_plan(ck, ecfg)
    data_cfg = eval_data_config(ck, plan.train_cfg, ecfg)
    pieces = {f"set-{_file_name(s['name'])}": s for s in plan.sets} | ({"probe": None} if plan.probe else {})
    parts = Parts.of(out, ck, plan.train_cfg, device) if out is not None else None
    keys = {name: piece_key(parts, s, plan, ecfg) for name, s in pieces.items()} if parts else {}
    done = {n: found for n, key in keys.items() if parts and (found := parts.read(n, key)) is not None}
    if parts and done:
        reused = ", ".join(pieces[n]["name"] if pieces[n] else n for n in done)
        log.info("%s: reused %s from %s (the same weights, files and settings)", ck.label, reused, parts.folder)
    todo = [n for n in pieces if n not in done]
    kept = done | _compute(ck, ecfg, device, plan, data_cfg, {n: pieces[n] for n in todo}, parts, keys)
    result: dict[str, Any] = {
        "label": ck.label,
        "above": ck.above,
        "path": str(ck.path),
        "kind": ck.kind,
        "run": ck.run,
        "stage": ck.stage,
        "step": ck.step,
        "template": data_cfg.get("template"),
        # which file each set's questions came from and how they were scored: paired differences pair only sets of
        # one file, and name the settings that differ (``paired.pairing_notes``)
        "sets": {
            s["name"]: {
                **kept[name],
                "file": _set_file(s["path"], keys.get(name)),
                "scored_with": {**set_knobs(ecfg, s["kind"]), "template": data_cfg.get("template")},
            }
            for name, s in pieces.items()
            if s
        },
    }
    probe = dict(kept.get("probe") or {})
    features = probe.pop("features", {})
    return result | probe, features


def _set_file(path: str, key: Mapping[str, Any] | None) -> dict[str, str]:
    """A set's file as its result records it: its absolute path and SHA-256, read off the set's piece key where the
    pieces are kept (:meth:`Parts.key` hashed it already), else hashed here."""
    at, digest = key["file"] if key else (os.path.abspath(path), file_sha256(Path(path)))
    return {"path": at, "sha256": digest}


def piece_key(parts: Parts, s: Mapping[str, Any] | None, plan: Plan, ecfg: Mapping[str, Any]) -> dict[str, Any]:
    """The key of a set's piece (``s``), or with None the probe's."""
    if s is None:
        image_root = (ecfg.get("probe") or {}).get("image_root")
        return parts.key(str(plan.probe), {k: ecfg.get(k) for k in PROBE_KNOBS}, image_root)
    return parts.key(s["path"], set_knobs(ecfg, s["kind"]))


def _compute(
    ck: C.Checkpoint,
    ecfg: Mapping[str, Any],
    device: torch.device,
    plan: Plan,
    data_cfg: dict[str, Any],
    pieces: Mapping[str, Mapping[str, Any] | None],
    parts: Parts | None,
    keys: Mapping[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """The ``pieces`` of one checkpoint not kept yet (a set's, or None: the probe's), each kept in ``parts`` under its
    key as it finishes. The model is loaded only for them, and every prompt of their sets is checked against the
    stage's ``data.max_length`` before the first answer is generated."""
    if not pieces:
        return {}
    t0 = time.perf_counter()
    sets = {name: s for name, s in pieces.items() if s}
    probe_set = read_probe(str(plan.probe), ecfg) if "probe" in pieces else None  # before loading, as the check did
    model = C.load(ck, bool(ecfg.get("allow_code")), bool(ecfg.get("trust_remote_code"))).to(device)
    limit = ecfg.get("limit")
    for s in sets.values():
        where = f"{ck.label}: eval set {s['name']!r} ({s['path']})"
        check_prompt_lengths(model, s["path"], data_cfg, limit, where=where)
    common = {
        "batch_size": int(ecfg["batch_size"]),
        "limit": limit,
        "generation": dict(ecfg.get("generation") or {}),
        "seed": int(ecfg.get("seed", 0)),
        "num_workers": loader_workers(ecfg.get("num_workers", "auto"), device),
    }
    computed: dict[str, dict[str, Any]] = {}
    for name, s in sets.items():
        score = answer_accuracy if s["kind"] == "qa" else caption_scores
        budget = int(ecfg[TOKEN_BUDGET[s["kind"]]])
        keep = parts.partial(name, keys[name]) if parts else None
        computed[name] = score(model, s["name"], s["path"], data_cfg, max_new_tokens=budget, keep=keep, **common)
        if parts:
            parts.write(name, keys[name], computed[name])
    t_gen = time.perf_counter()
    if probe_set is not None:
        computed["probe"] = probe_result(model, probe_set, str(plan.probe), ecfg, data_cfg)
        if parts:
            parts.write("probe", keys["probe"], computed["probe"])
    log.info("%s: generation %.1f s, probes %.1f s", ck.label, t_gen - t0, time.perf_counter() - t_gen)
    del model
    return computed


def probe_result(
    model: Any, probe: Any, path: str, ecfg: Mapping[str, Any], data_cfg: Mapping[str, Any]
) -> dict[str, Any]:
    """The probe's metrics, the gap-shift curve and the tower's artifact tokens, with the pooled ``features``."""
    pcfg = dict(ecfg.get("probe") or {})
    layers = resolve_layers(model, pcfg.get("layers"), "probe.layers")
    reading = image_reading_of(data_cfg)  # the probe images read as the checkpoint's stage read its own
    device = next(model.parameters()).device
    workers = loader_workers(ecfg.get("num_workers", "auto"), device)
    feats = extract(
        model,
        probe,
        int(pcfg.get("batch_size", 32)),
        layers,
        reading=reading,
        tokens=needs_tokens(pcfg["metrics"]),
        num_workers=workers,
    )
    topk = int(pcfg.get("topk", 10))
    result: dict[str, Any] = {
        "probe": {"path": path, **probe_metrics(feats, list(pcfg["metrics"]), topk, pcfg.get("layer_metrics"))}
    }
    shift = dict(ecfg.get("gap_shift") or {})
    if shift.get("deltas"):  # the probe's k: the curve at delta 0 is the table's value
        curve = gap_shift(feats, [float(d) for d in shift["deltas"]], shift["metric"], topk)
        result["gap_shift"] = {"metric": shift["metric"], "curve": curve}
    # the metrics above ran where the features are, the model's device; the report keeps them, the plots draw them
    result["features"] = {"image": feats.visual_mean.cpu(), "text": feats.text_mean.cpu()}
    artifacts = dict(pcfg.get("artifacts") or {})
    if artifacts.get("enabled", True):
        factor = float(artifacts.get("factor", 4.0))
        try:
            images = probe.pixels(model.image_spec, reading)  # decoded again, a batch at a time, ahead
            batches = image_batches(images, int(pcfg.get("batch_size", 32)), device, workers)
            tower = artifact_report(model.vision, batches, factor)
            result["artifacts"] = {"factor": factor, "layers": tower}
        except NotImplementedError as e:
            result["artifacts"] = {"unavailable": str(e)}
    return result


def write_report(
    results: list[dict[str, Any]], features: list[dict[str, Any]], ecfg: Mapping[str, Any], out: Path
) -> dict[str, Path]:
    """``report.json``, ``report.md`` and the plots for evaluated checkpoints, in the order given. A plot of
    :data:`PLOTS` this report does not draw is removed from ``out``: an earlier report's ``pca.png`` beside this one
    would show checkpoints it never measured."""
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in ecfg.items() if k not in UNREPORTED_KNOBS}
    plot = bool(ecfg.get("plots", True))
    report = rounded({"config": config, "checkpoints": results, "paired": paired.against_first(results)})
    files = {"json": out / "report.json", "md": out / "report.md"}
    write_whole(files["json"], json.dumps(json_values(report), indent=2, sort_keys=True, allow_nan=False) + "\n")
    notes = [n for res in report["checkpoints"][1:] for n in paired.pairing_notes(report["checkpoints"][0], res)]
    for note in notes:
        log.warning("paired differences: %s", note)
    write_whole(files["md"], markdown(report["checkpoints"], report["paired"], notes))  # last: a whole report
    if plot:
        try:
            files.update(write_plots(report["checkpoints"], features, out))
        except OSError as e:  # a full disk: the report is written whole, and says so, not an error after it
            log.warning(
                "plots not written (%s: %s); %s and %s are whole", e.filename, e.strerror, files["json"], files["md"]
            )
    for name in PLOTS:
        if name not in files:
            (out / f"{name}.png").unlink(missing_ok=True)
    return files


def write_whole(path: Path, text: str) -> None:
    """``path`` rewritten whole or not at all (``replace_text``), an error naming it: written in place, a full disk
    left ``report.json`` cut and unparseable beside the last report's ``report.md``, which looked whole."""
    try:
        replace_text(path, text)
    except OSError as e:
        raise OSError(
            e.errno, f"cannot write it ({e.strerror or e}); the report there before is unchanged", str(path)
        ) from e


def table_columns(results: list[dict[str, Any]]) -> list[Column]:
    """``(header, value, decimals)`` for every set score and headline probe metric any checkpoint has: the table
    writes each value with its decimals, the plots draw the value itself (percentages as percent)."""
    cols: list[Column] = []
    names = sorted({(n, r["kind"]) for res in results for n, r in res["sets"].items()})
    for name, kind in names:
        if kind == "qa":
            cols.append((f"{name} acc %", lambda res, n=name: _percent(res["sets"].get(n, {}).get("accuracy")), 1))
            if any("choice_accuracy" in res["sets"].get(name, {}) for res in results):
                cols.append(
                    (
                        f"{name} names-choice %",
                        lambda res, n=name: _percent(res["sets"].get(n, {}).get("choice_accuracy")),
                        1,
                    )
                )
        else:
            cols.append((f"{name} BLEU-4", lambda res, n=name: res["sets"].get(n, {}).get("bleu4"), 4))
            cols.append((f"{name} CIDEr", lambda res, n=name: res["sets"].get(n, {}).get("cider"), 4))
    flats = [flat(res.get("probe", {})) for res in results]
    for key in (*HEADLINE, *own_pooled_metrics(flats)):
        if any(key in f for f in flats):
            cols.append((key.split("/", 1)[1], lambda res, k=key: flat(res.get("probe", {})).get(k), 4))
    return cols


def own_pooled_metrics(flats: Sequence[Mapping[str, float]]) -> list[str]:
    """The pooled figures of researchers' own metrics (``pooled/pkg.module.fn``, ``.../<name>`` for a mapping), in
    order: a metric one names in ``probe.metrics`` is one to compare, so it joins the headline (it had shown only in
    the list of every probe metric). The suite's names hold no dot; a dotted path always does."""
    keys = {k for f in flats for k in f if k.startswith("pooled/") and "." in k.split("/")[1]}
    return sorted(keys)


def markdown(
    results: list[dict[str, Any]], paired_rows: Sequence[Mapping[str, Any]] = (), notes: Sequence[str] = ()
) -> str:
    """The comparison table, chance levels, paired differences, every probe metric, and a few predictions per set."""
    cols = table_columns(results)
    lines = [
        "# alignlm evaluation",
        "",
        "| checkpoint | " + " | ".join(h for h, _, _ in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    lines += [f"| {res['label']} | " + " | ".join(_text(get(res), d) for _, get, d in cols) + " |" for res in results]
    chance = {n: r["chance"] for res in results for n, r in res["sets"].items() if r.get("chance")}
    if chance:
        lines += ["", "Chance level: " + ", ".join(f"{n} {100 * c:.1f} %" for n, c in sorted(chance.items()))]
    fewer = {  # the lenient column beside the strict one, over fewer questions: said, not left to be guessed
        (n, r["choice_n"], r["n"])
        for res in results
        for n, r in res["sets"].items()
        if r.get("choice_n", r.get("n")) != r.get("n")
    }
    if fewer:
        lines += [
            "",
            "Names-choice % over the questions with choices (meta.choices) only: "
            + ", ".join(f"{n} {k} of {total}" for n, k, total in sorted(fewer)),
        ]
    lines += paired.markdown_lines(paired_rows, notes)
    probes = [flat(res.get("probe", {})) for res in results]
    keys = sorted({k for p in probes for k in p if k != "n" and not k.startswith("layers/")})
    if keys:
        n = next(res["probe"]["n"] for res in results if "probe" in res)
        lines += [
            "",
            f"## Alignment probes ({n} image-caption pairs, visual tokens vs caption embeddings)",
            "",
            "| metric | " + " | ".join(r["label"] for r in results) + " |",
            "|---|" + "---:|" * len(results),
        ]
        lines += [f"| {k} | " + " | ".join(_num(p.get(k)) for p in probes) + " |" for k in keys]
    layer_keys = sorted({k for p in probes for k in p if k.startswith("layers/")}, key=_layer_key)
    if layer_keys:
        lines += [
            "",
            "## Per LLM layer (mean image-token vs mean caption hidden state)",
            "",
            "| layer / metric | " + " | ".join(r["label"] for r in results) + " |",
            "|---|" + "---:|" * len(results),
        ]
        lines += [f"| {k[len('layers/') :]} | " + " | ".join(_num(p.get(k)) for p in probes) + " |" for k in layer_keys]
    lines += artifact_lines(results)
    lines += ["", "## Examples", ""]
    for res in results:
        for name, r in sorted(res["sets"].items()):
            for ex in r["examples"][:3]:
                ref = ex.get("answer", ex.get("reference"))
                lines.append(f"- `{res['label']}` {name} {ex['id']}: {ex['prediction']!r} (reference {ref!r})")
    return "\n".join(lines) + "\n"


def artifact_lines(results: list[dict[str, Any]]) -> list[str]:
    """Per checkpoint, the tower's outlier tokens layer by layer (the probe of models/artifacts.py)."""
    lines = []
    for res in results:
        art = res.get("artifacts")
        if not art:
            continue
        lines += ["", f"## Vision-tower artifact tokens: {res['label']}", ""]
        if "unavailable" in art:
            lines.append(f"Not measured: {art['unavailable']}.")
            continue
        lines += [
            f"Patch tokens over {art['factor']:g}x their image's median norm, per tower layer (output: what the "
            "connector gets).",
            "",
            "| layer | outlier share % | max / median norm | prefix / median norm |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {name} | {_pct(v['outlier_share'])} | {_num(v['max_ratio'])} | {_num(v['prefix_ratio'])} |"
            for name, v in tower_layers(art["layers"])
        ]
    return lines


def tower_layers(layers: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """A tower's layers from input to output (``layer 0`` ... ``layer 24``; EfficientNet's ``block 0`` ... ``block 15``,
    ``head``), then its ``output``, however they were read: a kept probe (``parts/probe.json``, written with its keys
    sorted as text) gave ``layer 10`` before ``layer 2``, so a reused evaluation's table and plot differed from a fresh
    one's. The numbers in a name are compared as numbers."""

    def key(item: tuple[str, Any]) -> tuple[bool, list[Any]]:
        parts = re.split(r"(\d+)", item[0])  # text, number, text, ...: lists of one pattern compare part by part
        return item[0] == "output", [int(p) if i % 2 else p for i, p in enumerate(parts)]

    return sorted(layers.items(), key=key)


def write_plots(results: list[dict[str, Any]], features: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    """The PCA picture, the metric-per-checkpoint panels, the gap-shift and per-layer curves."""
    files: dict[str, Path] = {}
    labels = [r["label"] for r in results]
    panels = [
        (r["label"], f["image"], f["text"], r["probe"]["pooled"].get("modality_gap", float("nan")))
        for r, f in zip(results, features)
        if f
    ]
    if panels:
        files["pca"] = plots.plot_pca(panels, out / "pca.png")
    series = {
        header: [math.nan if v is None else float(v) for v in map(get, results)]
        for header, get, _ in table_columns(results)
    }
    if series:
        runs = [paired.run_key(res) for res in results] if all("run" in res for res in results) else None
        files["metrics"] = plots.plot_series(series, labels, out / "metrics.png", "checkpoint", runs)
    curves = {r["label"]: r["gap_shift"]["curve"] for r in results if "gap_shift" in r}
    if curves:
        metric = next(r["gap_shift"]["metric"] for r in results if "gap_shift" in r)
        files["gap_shift"] = plots.plot_panels(
            {f"Mind the Gap shift: {metric}": curves}, out / "gap_shift.png", "delta (> 0 closes the gap)"
        )
    per_layer: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in results:
        layers = (r.get("probe") or {}).get("layers") or {}
        for i, values in sorted(layers.items(), key=lambda kv: int(kv[0])):
            for name, v in values.items():
                per_layer.setdefault(name, {}).setdefault(r["label"], []).append((int(i), v))
    if per_layer:
        files["layers"] = plots.plot_panels(
            dict(sorted(per_layer.items())), out / "layers.png", "LLM layer (0 = input embeddings)"
        )
    towers: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in results:
        layers = (r.get("artifacts") or {}).get("layers") or {}
        for key, title in (("outlier_share", "outlier token share"), ("max_ratio", "max / median token norm")):
            pts = [(float(i), v[key]) for i, (_, v) in enumerate(tower_layers(layers))]
            if pts:
                towers.setdefault(title, {})[r["label"]] = pts
    if towers:
        files["artifacts"] = plots.plot_panels(towers, out / "artifacts.png", "vision-tower layer (last: output)")
    return files


def _layer_key(k: str) -> tuple[int, str]:
    layer, _, metric = k[len("layers/") :].partition("/")
    return int(layer), metric


def _percent(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _text(x: float | None, decimals: int) -> str:
    return "-" if x is None else f"{x:.{decimals}f}"


def _pct(x: float | None) -> str:
    return _text(_percent(x), 1)


def _num(x: float | None) -> str:
    return _text(x, 4)
