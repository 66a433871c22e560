"""Files written whole and read back as they were: the one atomic writer and the one file digest of the package
(checkpoints, logs, summaries, evaluation's kept results, a method's prepared outputs)."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def sync(path: Path) -> None:
    """Flush ``path`` (a file's bytes, a folder's entries) to the disk. A file system that cannot sync a folder
    (EINVAL: some network and FUSE mounts) keeps its entries as well as it can; any other error is raised."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not (path.is_dir() and e.errno == errno.EINVAL):
            raise
    finally:
        os.close(fd)


def replace_file(path: Path, write: Callable[[Path], object]) -> Path:
    """Rewrite ``path`` whole or not at all: ``write(tmp)`` writes it beside, under a name of this process's own; it
    is synced, renamed over ``path``, the rename synced; a failure leaves no temporary file. Written in place
    (truncate, then write), a full disk or a kill in between left it empty: a resume's rewrite of ``metrics.jsonl``
    erased the stage's history. Renamed but not synced, a lost node could bring a prepared file (a feature shard, a method's
    labels) back 0 bytes long under its whole name; and a temporary name shared by two processes let one rename the
    other's half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        sync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync(path.parent)
    return path


def replace_text(path: Path, text: str) -> Path:
    """Rewrite ``path`` with ``text`` (UTF-8) whole or not at all (:func:`replace_file`)."""
    return replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks (checkpoint manifests, evaluation's kept results)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()
