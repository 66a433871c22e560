"""Files written whole and read back as they were: the one atomic writer and the one file digest of the package
(checkpoints, logs, summaries, evaluation's kept results, a method's prepared outputs), and the rows of a long pass
kept while it runs (:class:`PartialRows`), so a killed pass resumes where it stopped, and the lock that keeps one
process at a time writing a folder (:func:`take_lock`)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike
from safetensors import SafetensorError

log = logging.getLogger(__name__)

COMMIT_EVERY = 5.0  # seconds between a PartialRows pass's commits to the disk (each syncs what changed since the last)
PROGRESS = "progress.json"  # a PartialRows folder's record of its key, its arrays and the rows done


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


_UMASK = os.umask(0o022)  # read once (umask can only be read by setting it), and set back at once
os.umask(_UMASK)


# what torch.save's writer says when the disk refuses a write (its stream's failure, as a RuntimeError)
_WRITE_FAILED = re.compile(r"unexpected pos|iostream error|PytorchStreamWriter failed|failed writing|No space left")


@contextmanager
def writing(path: Path, temporary: Path | None = None) -> Iterator[None]:
    """Inside, a failed write of ``path`` (a file, or a folder whose files are written) is an ``OSError`` naming it,
    which the command line prints as one line: Python's own write errors name no file (``[Errno 28] No space left on
    device``), and ``torch.save`` and safetensors report a full disk as a ``RuntimeError`` or ``SafetensorError``
    (``unexpected pos 18688 vs 18580``, ``iostream error``) that names neither the file nor the disk, with a
    traceback. The error keeps its cause; the free space of the disk is said where the cause does not say it. Any
    other error (a meta tensor, out of memory, a stop signal's ``Terminated``) goes on as it was.
    ``temporary``: the name ``path`` is written under first, named as ``path`` (the file the user knows)."""
    try:
        yield
    except OSError as e:
        if e.errno is None or (e.filename is not None and str(e.filename) != str(temporary)):
            raise  # its own file named already (or no errno to keep)
        raise OSError(e.errno, e.strerror, str(path)) from e
    except (RuntimeError, SafetensorError) as e:
        if not (isinstance(e, SafetensorError) or type(e) is RuntimeError and _WRITE_FAILED.search(str(e))):
            raise  # not the disk's (a meta tensor, out of memory, a stop signal): as it was, with its traceback
        where = next((p for p in (Path(path), *Path(path).parents) if p.exists()), Path("/"))
        free = shutil.disk_usage(where).free / 1e9
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise OSError(
            errno.EIO, f"could not be written ({type(e).__name__}: {cause}; {free:.2f} GB free on its disk)", str(path)
        ) from e


def replace_file(path: Path, write: Callable[[Path], object]) -> Path:
    """Rewrite ``path`` whole or not at all: ``write(tmp)`` writes it beside, under a name of this process's own; it
    is synced, renamed over ``path``, the rename synced; a failure leaves no temporary file. Written in place
    (truncate, then write), a full disk or a kill in between left it empty: a resume's rewrite of ``metrics.jsonl``
    erased the stage's history. Renamed but not synced, a lost node could bring a prepared file (a feature shard, a method's
    labels) back 0 bytes long under its whole name; and a temporary name shared by two processes let one rename the
    other's half-written file."""
    tmp = temporary_path(path)
    try:
        with writing(path, tmp):
            write(tmp)
            as_umask_allows(tmp)
            sync(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync(path.parent)
    return path


def as_umask_allows(path: Path) -> None:
    """Give ``path`` the mode a file this process creates gets (0644 under the usual umask 022): safetensors writes
    owner-only (0600), so a checkpoint or a shared feature cache was unreadable to the rest of a cluster group,
    whatever its umask allowed. A file system that keeps no modes (some network or object-store mounts refuse
    chmod) keeps the file as written: its mode is no reason to fail a checkpoint."""
    with suppress(OSError):
        os.chmod(path, 0o666 & ~_UMASK)


def temporary_path(path: Path, pid: int | str | None = None) -> Path:
    """Where :func:`replace_file` writes ``path`` before renaming it: beside it, under the writing process's own name
    (this process's; ``pid="*"`` gives the glob of every writer's)."""
    return path.with_name(f".{path.name}.tmp{os.getpid() if pid is None else pid}")


def remove_abandoned(folder: Path, pattern: str, idle_s: float = 3600.0) -> tuple[int, int]:
    """Delete :func:`replace_file` temporaries of files matching ``pattern`` in ``folder`` that nothing has written
    for ``idle_s`` seconds: those of processes killed mid-write (SIGKILL, a node lost, a preemption's grace run out),
    which nothing else removes. A writer that still runs writes its file, then syncs and renames it at once, so an hour
    untouched is no live write, on any node sharing the folder. Returns how many files and bytes were removed."""
    files = size = 0
    now = time.time()
    for tmp in folder.glob(temporary_path(Path(pattern), "*").name) if folder.is_dir() else []:
        try:
            info = tmp.stat()
        except FileNotFoundError:  # renamed or removed meanwhile
            continue
        if not tmp.name.rpartition(".tmp")[2].isdigit() or now - info.st_mtime < idle_s:
            continue
        tmp.unlink(missing_ok=True)
        files, size = files + 1, size + info.st_size
    return files, size


def replace_text(path: Path, text: str) -> Path:
    """Rewrite ``path`` with ``text`` (UTF-8) whole or not at all (:func:`replace_file`)."""
    return replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def refuse_special_file(path: str | Path) -> None:
    """Refuse a path that exists but is no regular file (a FIFO, a device) before it is opened: opening a FIFO blocks
    until something writes to it, for ever in a checkpoint copied from elsewhere (tar keeps FIFOs), and a device never
    ends. A missing path is left to the caller's own message."""
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path} is not a regular file (a FIFO or a device): refused")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks (checkpoint manifests, evaluation's kept results)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def partial_folder(path: Path) -> Path:
    """Where :class:`PartialRows` keeps the rows of a pass whose result is ``path`` while it runs: ``<path>.partial/``,
    beside it."""
    return path.with_name(path.name + ".partial")


class PartialRows:
    """The result arrays of a long pass over rows in a fixed order (one image a row), kept on the disk while it runs:
    a pass killed at 90 % (a preempted, requeued job; a crash) resumes at its first uncommitted row, not at row 0.

    ``folder`` (:func:`partial_folder` of the pass's result) holds one ``<name>.npy`` per array, memory-mapped (row
    ``i`` of every array is the result of input ``i``), and ``progress.json``: a digest of ``key`` (what the rows are
    computed from and with: the inputs and knobs the caller records in its result), the row count, the rows done, each
    array's shape and dtype, and the caller's ``info``. A pass calls :meth:`resume`, :meth:`allocate` at its first
    batch when nothing was kept (a shape may depend on what that batch returned), writes each batch's rows whole, then
    :meth:`commit`; :meth:`save` once it ends or stops on an error, and :meth:`remove` once its result is written.
    Kept rows serve only the same key: another key, a missing or unreadable ``progress.json``, an array that is not
    what it records or not what the caller asks for start the pass again at row 0, with a log line saying why, so the
    rows of two inputs never meet in one result.

    A commit flushes the arrays to the disk before ``progress.json`` counts their rows, and happens at most every
    :data:`COMMIT_EVERY` seconds: a machine lost loses at most those seconds of rows, and a batch costs no sync. With
    ``folder`` None the arrays live in memory and nothing is kept (a pass called on its own, outside a prepare step)."""

    def __init__(self, folder: Path | None, key: Mapping[str, Any]) -> None:
        self.folder = folder
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.rows = 0
        self.done = 0  # rows [0, done) are written whole
        self.arrays: dict[str, np.ndarray] = {}
        self.info: dict[str, Any] = {}
        self._written = 0  # the rows progress.json counts
        self._committed = -math.inf  # time.monotonic() of the last write of progress.json

    def resume(
        self,
        rows: int,
        dtypes: Mapping[str, DTypeLike],
        check: Callable[[Mapping[str, np.ndarray], Mapping[str, Any]], str | None] | None = None,
    ) -> int:
        """Open what was kept under this key for a pass over ``rows`` rows into arrays of these names and ``dtypes``;
        returns the rows done (0: the pass starts at its first row). ``check`` (the kept arrays and info -> a reason
        they cannot serve, or None) adds the caller's own conditions, such as a trailing shape that must agree with
        the info."""
        self.rows, self.done, self.arrays, self.info, self._written = rows, 0, {}, {}, 0
        if self.folder is None or not self.folder.exists():
            return 0
        problem = self._load(rows, {name: np.dtype(d) for name, d in dtypes.items()})
        if problem is None and check is not None:
            problem = check(self.arrays, self.info)
        if problem is not None:
            self.restart(problem)
        elif self.done:
            log.info("%s: %d of %d rows kept from before; the pass resumes after them", self.folder, self.done, rows)
        return self.done

    def _load(self, rows: int, dtypes: Mapping[str, np.dtype]) -> str | None:
        """Read ``progress.json`` and map its arrays; a reason they cannot serve this pass, or None."""
        assert self.folder is not None
        try:
            state = json.loads((self.folder / PROGRESS).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return f"no {PROGRESS} (the pass stopped before its first commit)"
        except (OSError, ValueError) as e:
            return f"{PROGRESS} cannot be read ({e})"
        if not isinstance(state, dict) or state.get("key") != self.key:
            return "its rows were computed from other inputs or knobs"
        done, specs, info = state.get("done"), state.get("arrays"), state.get("info")
        if (
            state.get("rows") != rows
            or type(done) is not int
            or not 0 <= done <= rows
            or not isinstance(info, dict)
            or not isinstance(specs, dict)
            or set(specs) != set(dtypes)
        ):
            return f"{PROGRESS} does not describe a pass over {rows} rows into arrays {sorted(dtypes)}"
        arrays = {}
        for name, dtype in dtypes.items():
            try:
                array = np.load(self.folder / f"{name}.npy", mmap_mode="r+")
                recorded = (tuple(specs[name]["shape"]), np.dtype(specs[name]["dtype"]))
            except (OSError, ValueError, KeyError, TypeError) as e:
                return f"array {name} cannot be read ({e})"
            if (array.shape, array.dtype) != recorded or recorded[1] != dtype or array.shape[:1] != (rows,):
                return (
                    f"array {name} is {array.dtype} {list(array.shape)}, recorded as {recorded[1]} "
                    f"{list(recorded[0])}, wanted {dtype} of {rows} rows"
                )
            arrays[name] = array
        self.done, self.arrays, self.info, self._written = done, arrays, info, done
        return None

    def allocate(
        self, shapes: Mapping[str, tuple[tuple[int, ...], DTypeLike]], info: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """Make the pass's arrays, ``{name: (shape, dtype)}`` with ``shape[0]`` its rows, when :meth:`resume` kept
        none; ``info`` (JSON) is whatever else a resumed pass needs to finish (a grid its first batch returned). Their
        rows hold anything until the pass writes them: each is written whole (a fill of the whole array up front
        would write it to the disk once more)."""
        if self.arrays:
            raise RuntimeError(f"{self.folder}: the arrays are made already")
        for name, (shape, _) in shapes.items():
            if not name.isidentifier() or tuple(shape)[:1] != (self.rows,):
                raise ValueError(f"array {name!r} of shape {shape}: a name and {self.rows} rows first (resume first)")
        self.info = json.loads(json.dumps(dict(info or {})))
        if self.folder is None or self.rows == 0:  # nothing to keep (a file cannot map 0 bytes)
            self.arrays = {name: np.empty(shape, dtype) for name, (shape, dtype) in shapes.items()}
            return self.arrays
        self.folder.mkdir(parents=True, exist_ok=True)
        self.arrays = {
            name: np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=dtype, shape=tuple(shape))
            for name, (shape, dtype) in shapes.items()
        }
        self._write()
        return self.arrays

    def commit(self, done: int) -> None:
        """Rows ``[0, done)`` are written whole: kept on the disk now when the last commit is :data:`COMMIT_EVERY`
        seconds old."""
        self.done = done
        if time.monotonic() - self._committed >= COMMIT_EVERY:
            self.save()

    def save(self) -> None:
        """Keep the rows done on the disk now, whatever the time: once the pass ends (a kill while its result is
        written then redoes none) or stops on an error (those since the last commit are not lost)."""
        if self.folder is None or not self.arrays or self.rows == 0 or self.done == self._written:
            return
        for array in self.arrays.values():
            array.flush()  # the rows on the disk before the count that says they are done
        self._write()

    def _write(self) -> None:
        """Rewrite ``progress.json`` (whole or not at all) with the rows done now."""
        assert self.folder is not None
        state = {
            "key": self.key,
            "rows": self.rows,
            "done": self.done,
            "arrays": {name: {"shape": list(a.shape), "dtype": a.dtype.str} for name, a in self.arrays.items()},
            "info": self.info,
        }
        replace_text(self.folder / PROGRESS, json.dumps(state))
        self._written, self._committed = self.done, time.monotonic()

    def restart(self, reason: str) -> None:
        """Drop every kept row, saying why: the pass starts again at row 0."""
        if self.folder is not None and self.folder.exists():
            log.warning("%s: %s; the pass starts again at its first row", self.folder, reason)
            shutil.rmtree(self.folder)
        self.done, self.arrays, self.info, self._written = 0, {}, {}, 0

    def remove(self) -> None:
        """Delete the kept rows once the pass's result is written: they are in it now."""
        self.arrays = {}
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder)


# ----------------------------------------------------------------------------------- locks: one process at a time

# flock's errors on a filesystem that does not lock (Lustre mounted without -o flock, some NFS set-ups)
_NO_LOCKING = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL)
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)  # the lock file cannot be created or opened for writing


class LockHeld(Exception):
    """Another process holds the lock :func:`take_lock` was asked for; ``holder`` is what it wrote there (``host:pid,
    since <start>``). The caller says what the lock guards, in its own words."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


def take_lock(path: Path, what: str, wait: bool = False) -> int | None:
    """Lock ``path`` for this process (``flock``; the file records ``host:pid`` and the start, for the message of a
    process refused) and return its descriptor, to give to :func:`release_lock` at the end. The kernel drops the lock
    when its process dies, however it ends: a crash leaves no stale lock. Raises :class:`LockHeld` while another
    process holds it, or with ``wait`` waits for it, saying so. On a filesystem that cannot lock, or in a folder where no lock file can be made, returns None
    with a warning that ``what`` (e.g. "a second run of this run_name") would not be refused. A lock file this user
    cannot write (another user's, in a shared folder) is locked read-only: ``flock`` needs no write access."""
    fd, writable, why = _open_lock(path)
    if fd is None:
        return _unlocked(path, why, what, wait)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = path.read_text().strip() or "a process that has not written its name yet"
        if not wait:
            os.close(fd)
            raise LockHeld(path, holder) from None
        log.warning("%s is held by %s: waiting for it to let go before %s", path, holder, what)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:
        os.close(fd)
        if e.errno not in _NO_LOCKING:
            raise
        return _unlocked(path, e.strerror, what, wait)
    if writable:
        try:
            with writing(path):
                os.ftruncate(fd, 0)
                os.write(
                    fd, f"{socket.gethostname()}:{os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode()
                )
        except OSError:  # a full disk: the lock goes with its descriptor (kept, it refused this process's next try)
            os.close(fd)
            raise
    _HELD_LOCKS.add(fd)
    return fd


def _open_lock(path: Path) -> tuple[int | None, bool, str]:
    """A lock file's descriptor and whether it is writable, or None and why none can be had: a lock file this user
    cannot write (another user's, in a shared folder) is opened read-only, since ``flock`` needs no write access, and
    a folder where none can be made (another user's) has none."""
    try:  # the umask decides who else may write it, as for every other file there (a team's shared folder)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666), True, ""
    except OSError as e:
        if e.errno not in _READ_ONLY:
            raise
        if not path.exists():  # nowhere to put a lock: a folder another user made
            return None, False, e.strerror
        return os.open(path, os.O_RDONLY), False, ""


def take_shared_lock(path: Path, what: str) -> int | None:
    """Hold ``path`` shared (``flock``'s shared lock) for this process, beside any other holder, and return its
    descriptor for :func:`release_lock`; waits while a process holds it alone. :func:`held_by_others` then tells a
    writer to keep off. None where no lock can be taken (that filesystem, a folder another user made), with a warning
    that ``what`` (e.g. "a run writing <set> again") would not be refused."""
    fd, _, why = _open_lock(path)
    if fd is None:
        return _unlocked(path, why, what, wait=False)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError as e:
        os.close(fd)
        if e.errno not in _NO_LOCKING:
            raise
        return _unlocked(path, e.strerror, what, wait=False)
    _HELD_LOCKS.add(fd)
    return fd


def held_by_others(path: Path) -> bool:
    """Whether a process holds a lock on ``path`` (:func:`take_shared_lock`, :func:`take_lock`): taking it alone, on a
    descriptor of its own, is refused. False where there is no such file or it cannot be locked."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as e:
        if e.errno not in _NO_LOCKING:
            raise
        return False
    finally:
        os.close(fd)  # closing lets go of the lock taken just now
    return False


def release_lock(fd: int) -> None:
    """Let go of a lock (:func:`take_lock`'s descriptor)."""
    _HELD_LOCKS.discard(fd)
    os.close(fd)


@contextmanager
def sole_writer(path: Path, what: str) -> Iterator[None]:
    """Inside, no other process that writes ``path`` this way does: :func:`take_lock` on ``.<name>.lock`` beside it,
    waiting while another holds it, so the one that comes second finds what the first wrote (a prepare step then
    reuses it). Seed sweeps launched together all prepared one data folder's files: each pass kept its rows in one
    ``<path>.partial/`` folder (:class:`PartialRows`), whose arrays the second process made again under the first.
    ``what`` names the work for the log (e.g. "labelling <path>"). Re-entrant within a thread: a step that checks a
    file and then makes it holds the lock across both."""
    lock = path.with_name(f".{path.name}.lock")
    key = (os.path.abspath(lock), threading.get_ident())  # re-entrant per thread: another thread waits
    if key in _WRITING:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = take_lock(lock, what, wait=True)
    _WRITING.add(key)
    try:
        yield
    finally:
        _WRITING.discard(key)
        if fd is not None:
            release_lock(fd)


def _unlocked(path: Path, why: str, what: str, wait: bool) -> None:
    """Say that ``path`` cannot be locked, and what goes unguarded: a refusal, or with ``wait`` a wait."""
    unguarded = (
        f"a second process {what} while this one runs would not wait"
        if wait
        else (f"{what} started while this one runs would not be refused")
    )
    log.warning("%s cannot be locked (%s): %s", path, why, unguarded)
    return None


def _forget_locks_in_child() -> None:
    """A forked process (a data-loader worker) drops its copies of the locks: it shared them, so a worker kept alive
    after its run (by a traceback a notebook keeps) held the lock, and the rerun in that notebook was refused, naming
    its own process. The parent's lock is untouched."""
    for fd in _HELD_LOCKS:
        os.close(fd)
    _HELD_LOCKS.clear()
    _WRITING.clear()


_HELD_LOCKS: set[int] = set()  # the locks this process holds (take_lock), closed in forked children
_WRITING: set[tuple[str, int]] = set()  # (lock file, thread) of the sole_writer blocks this process is in
os.register_at_fork(after_in_child=_forget_locks_in_child)
