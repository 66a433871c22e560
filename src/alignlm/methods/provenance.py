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
knobs and inputs in its folder's manifest (``ensure_fitted_encoder``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from alignlm.data.feature_cache import file_stamp
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


def stamps_digest(paths: Iterable[str | Path], keys: Iterable[str] | None = None) -> str:
    """Each file's size and modification time (a stat, not a read), with ``keys`` (what the file is known by in the
    output) when given: an image edited or regenerated in place has another stamp."""
    paths = list(paths)
    names = [""] * len(paths) if keys is None else list(keys)
    return strings_digest(f"{name}={file_stamp(p)}" for name, p in zip(names, paths, strict=True))


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


def ensure_fitted_encoder(encoder: str | Path, fit: Mapping[str, Any] | None, step: str, key: str) -> None:
    """Fit the offline dual encoder into the folder ``encoder`` (``fit``: ``fit_encoder``'s knobs, set at the config
    key ``key``) when it holds none, or when the data it was fitted on changed or it records nothing of its fit (a
    folder fitted before folders recorded it), with a warning; a folder fitted with other knobs is refused, naming the
    knob. Whatever was derived from the encoder (levels, embeddings) records its files' stamps and follows a refit.
    ``fit`` null never fits: ``encoder`` is then a CLIP / SigLIP name or a folder used as it is."""
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
    if not (folder / MANIFEST).exists():
        log.info("%s: fitting the offline dual encoder into %s", step, folder)
        fit_encoder(out=folder, **fit)
        return
    stored = fitted_provenance(folder)
    if stored is not None:
        check_knobs(folder, stored.get("knobs", {}), wanted, step, f"{key}.")
    inputs = fit_inputs(fit["train"], wanted["limit"], fit.get("image_root"))
    changed = changed_inputs(None if stored is None else stored.get("inputs"), inputs)
    if not changed:
        return
    log.warning(
        "%s: the dual encoder in %s %s: fitting it again",
        step,
        folder,
        "records nothing of how it was fitted (fitted before folders recorded it)"
        if stored is None
        else f"was fitted on other {' and '.join(changed)} ({key}.train regenerated or edited since)",
    )
    fit_encoder(out=folder, **fit)
