"""What a method's prepare step made its file from, recorded in the file, so a later run tells a current file from a
stale one instead of serving it (SEA labels, AlignGPT levels, ReAlign statistics).

Every run of the pipeline calls each prepare step again; a step's file is derived from data and knobs, and both can
change under it while its path stays (the pipeline regenerates an offline set written with other generator knobs:
same record ids and image paths, other scenes). So each file records two things:

- ``knobs``: the choices that make one variant of the file (SEA's ``k`` and word list, AlignGPT's number of levels,
  ReAlign's covariance). A file made with other knobs is refused, naming the file and the knob: two variants may be
  wanted side by side, each in its own file, and rewriting would destroy the other one.
- ``inputs``: digests of what the file was computed from, by part (the data files' bytes, the images' size and
  modification time, as the feature cache stamps them, the encoder). When one differs, the step writes the file again
  with a warning naming the parts, as it would if the file were missing: the file is the step's own derived output.

A file that records neither (written before files recorded them) is written again, as one whose inputs changed. The
offline dual encoder a prepare step fits (``fit``: AlignGPT's levels, ReVision's encoder) follows the same rule, its
knobs and inputs in its folder's manifest (``ensure_fitted_encoder``), but for a folder that records neither: that
is a user's encoder, not a step's by-product, so it is compared with ``fit`` where its manifest allows and used as it
is or refused, never fitted again in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from alignlm.config import ConfigError
from alignlm.data.feature_cache import Stamp, file_stamp
from alignlm.files import sole_writer
from alignlm.models.encoder_fit import PROVENANCE, fit_encoder, fit_inputs, fit_knobs, fitted_provenance
from alignlm.models.encoders import MANIFEST

log = logging.getLogger(__name__)

KEY = PROVENANCE  # where a file's metadata holds {"knobs": {...}, "inputs": {...}}


def strings_digest(parts: Iterable[str]) -> str:
    """One digest of strings, each length-prefixed, so no two lists of strings hash alike by concatenation."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(f"{len(part)}:{part}".encode())
    return digest.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """The bytes of a file hashed (data files are read once per run: a LLaVA JSON of 200 MB takes about a second)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def files_digest(paths: Iterable[str | Path]) -> str:
    """The bytes of several files, in order, hashed; their paths are left out, so a moved data folder still matches."""
    return strings_digest(file_digest(p) for p in paths)


def stamps_digest(
    paths: Iterable[str | Path], keys: Iterable[str] | None = None, stamps: Iterable[Stamp | None] | None = None
) -> str:
    """Each file's size and modification time (a stat, not a read), with ``keys`` (what the file is known by in the
    output) when given: an image edited or regenerated in place has another stamp. ``stamps``: the files' stamps
    taken already, in ``paths``' order (a caller that keeps them), so each file is stat'ed once."""
    paths = list(paths)
    names = [""] * len(paths) if keys is None else list(keys)
    taken = [file_stamp(p) for p in paths] if stamps is None else list(stamps)
    return strings_digest(f"{name}={stamp}" for name, stamp in zip(names, taken, strict=True))


def encoder_identity(encoder: Any) -> str:
    """What an encoder knob stands for: a local folder's files' stamps (a refit into the same folder is another
    encoder), an object's ``fingerprint()`` (its name when it has none: a stand-in), or the hub name itself."""
    if not isinstance(encoder, (str, Path)):
        fingerprint = getattr(encoder, "fingerprint", None)
        return f"weights:{fingerprint()}" if fingerprint else f"object:{getattr(encoder, 'name', type(encoder))}"
    folder = Path(encoder)
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return "folder:" + stamps_digest(files, [p.relative_to(folder).as_posix() for p in files])
    return f"name:{encoder}"


def as_json(values: Mapping[str, Any]) -> dict[str, Any]:
    """Values as they read back from a file's JSON metadata (tuples become lists), so a comparison is like for like."""
    return json.loads(json.dumps(dict(values)))


def check_knobs(path: Path, stored: Mapping[str, Any], wanted: Mapping[str, Any], step: str, prefix: str = "") -> None:
    """Refuse a file made with other knobs than the step's, naming the file and the first knob that differs (in the
    step's order: the source before its own knobs), as the config names it (``prefix``: where the knobs sit)."""
    for knob in [*wanted, *(k for k in stored if k not in wanted)]:
        if stored.get(knob) != wanted.get(knob):
            raise ValueError(
                f"{path} was written with {prefix}{knob}={stored.get(knob)!r}, but the {step} step asks for "
                f"{prefix}{knob}={wanted.get(knob)!r}: point the step at another file, or delete this one so it is "
                "written again"
            )


def changed_inputs(stored: Mapping[str, Any] | None, inputs: Mapping[str, str]) -> list[str]:
    """The parts of ``inputs`` whose digest differs from the file's (all of them for a file that records none)."""
    if not stored:
        return sorted(inputs)
    return sorted(k for k in set(stored) | set(inputs) if stored.get(k) != inputs.get(k))


def why_again(stored: Mapping[str, Any] | None, changed: Sequence[str]) -> str:
    """Why a prepared file (labels, levels, records) is made again, for its log line: a file written before it
    recorded its inputs had been told as one whose inputs all changed."""
    if not stored:
        return "they record nothing of what they were made from (written before they did)"
    return f"what they were made from changed ({', '.join(changed)})"


def unrecorded_fit_knobs(folder: Path) -> dict[str, Any]:
    """The fit knobs the manifest of a folder fitted before folders recorded their fit gives all the same: the heads'
    ``name``, ``dim`` and ``image_size``, and ``temperature`` from its report (None: learnt), where it has one."""
    manifest = json.loads((folder / MANIFEST).read_text())
    knobs = {knob: manifest[knob] for knob in ("name", "dim", "image_size") if knob in manifest}
    report = manifest.get("report") or {}
    if "temperature_learnt" in report:
        knobs["temperature"] = None if report["temperature_learnt"] else report["temperature"]
    return knobs


def same_fit_knob(knob: str, stored: Any, wanted: Any) -> bool:
    """Whether a manifest's knob is ``fit``'s. A fixed temperature is read back from the report, which gives
    ``1 / exp(logit_scale)`` in float32 and at most 100 as the loss clamps it: ``fit``'s value is compared as the
    report would give it, to float32 precision (compared exactly, the folder's own temperature would read as another)."""
    if knob == "temperature" and isinstance(stored, float) and isinstance(wanted, (int, float)) and wanted > 0:
        return math.isclose(stored, 1 / min(1 / wanted, 100.0), rel_tol=1e-4)
    return stored == wanted


def use_unrecorded_encoder(folder: Path, wanted: Mapping[str, Any], step: str, key: str) -> None:
    """Use as it is, with a warning, a folder fitted before folders recorded their fit, or refuse it where its manifest
    gives a knob other than ``fit``'s, naming the knob, both values and the way out. Fitting it again replaced a user's
    encoder (an ``alignlm dual-encoder fit`` folder a config pointed the step at, ``fit`` set as the recipes set it)
    with one of other knobs, without a word: what it was fitted on cannot be checked, and a refit is irreversible."""
    recorded = unrecorded_fit_knobs(folder)
    encoder_key = f"{key.rpartition('.')[0]}.encoder"
    for knob, stored in recorded.items():
        if not same_fit_knob(knob, stored, wanted[knob]):
            raise ConfigError(
                f"{folder} holds a dual encoder fitted with {key}.{knob}={stored!r} (its {MANIFEST} records nothing "
                f"else of how it was fitted), but the {step} step asks for {key}.{knob}={wanted[knob]!r}; it is not "
                f"fitted again in place, which would overwrite it: point {encoder_key} at another folder to fit a new "
                f"one there, or set {key}: null to use this one as it is"
            )
    log.warning(
        "%s: the dual encoder in %s records nothing of how it was fitted (fitted before folders recorded it): used as "
        "it is, not fitted again; its provenance is unknown: its %s match %s, but what it was fitted on (%s.train) "
        "and its %s cannot be checked (set %s: null to use it as it is, or point %s at another folder to fit one "
        "that records them)",
        step,
        folder,
        ", ".join(recorded),
        key,
        key,
        ", ".join(knob for knob in wanted if knob not in recorded),
        key,
        encoder_key,
    )


def ensure_fitted_encoder(encoder: str | Path, fit: Mapping[str, Any] | None, step: str, key: str) -> None:
    """Fit the offline dual encoder into the folder ``encoder`` (``fit``: ``fit_encoder``'s knobs, set at the config
    key ``key``) when it holds none, or when the data it was fitted on changed, with a warning; a folder fitted with
    other knobs is refused, naming the knob. A folder that records nothing of its fit (fitted before folders recorded
    it) is never fitted again: ``use_unrecorded_encoder``. Whatever was derived from the encoder (levels,
    embeddings) records its files' stamps and follows a refit. ``fit`` null never fits: ``encoder`` is then a CLIP /
    SigLIP name or a folder used as it is."""
    if not fit:
        return
    fit = dict(fit)
    try:
        wanted = as_json(fit_knobs(fit))
    except TypeError as e:
        raise ValueError(
            f"{key} has a knob `alignlm dual-encoder fit` does not take, or lacks one it needs: {e}"
        ) from e
    folder = Path(encoder)
    # runs started together fit one folder once: they had fitted it at once, each writing over the other's files
    with sole_writer(folder, f"fitting the dual encoder into {folder}"):
        _ensure_fitted(folder, fit, wanted, step, key)


def _ensure_fitted(folder: Path, fit: dict[str, Any], wanted: dict[str, Any], step: str, key: str) -> None:
    """:func:`ensure_fitted_encoder` under the folder's lock."""
    if not (folder / MANIFEST).exists():
        log.info("%s: fitting the offline dual encoder into %s", step, folder)
        fit_encoder(out=folder, **fit)
        return
    stored = fitted_provenance(folder)
    if stored is None:
        use_unrecorded_encoder(folder, wanted, step, key)
        return
    check_knobs(folder, stored.get("knobs", {}), wanted, step, f"{key}.")
    changed = changed_inputs(stored.get("inputs"), fit_inputs(fit["train"], wanted["limit"], fit.get("image_root")))
    if not changed:
        return
    log.warning(
        "%s: the dual encoder in %s was fitted on other %s (%s.train regenerated or edited since): fitting it again",
        step,
        folder,
        " and ".join(changed),
        key,
    )
    fit_encoder(out=folder, **fit)
