"""Rank-aware logging: console log, ``metrics.jsonl`` (always), wandb (by config), end-of-stage summary."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from alignlm.config import ConfigError
from alignlm.files import writing

WANDB_MODES = ("disabled", "offline", "online")  # from less to more: the environment may only lower it
_WANDB_ALIASES = {"dryrun": "offline", "run": "online"}  # wandb's older names of its modes


class CurrentStderr(logging.StreamHandler):
    """A handler of ``sys.stderr`` as it is when a record is written, not as it was when the logger was made: a
    notebook, a test's output capture or a program that swaps ``sys.stderr`` afterwards got nothing, and once that
    first stream was closed, a "--- Logging error ---" traceback in place of each line."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        """Nothing to keep: each record goes to the ``sys.stderr`` of its time."""


class OnRankZero(logging.Filter):
    """Leaves out a record that every rank makes alike (``extra=ALIKE_ON_EVERY_RANK``): rank 0 prints it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "alike_on_every_rank", False)


def get_logger(name: str, rank: int) -> logging.Logger:
    """A logger that speaks on rank 0 only (other ranks warn and above, less the warnings every rank makes alike:
    ``constants.ALIKE_ON_EVERY_RANK``), with the rank in each line. A warning of one rank's own (a checkpoint file
    it cannot read, its random state missing) is printed by that rank."""
    log = logging.getLogger(name)
    if not log.handlers:
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank} %(levelname)s] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for handler in log.handlers:  # on the handlers: they also print what the child loggers (``alignlm.*``) pass up
        for f in [f for f in handler.filters if isinstance(f, OnRankZero)]:
            handler.removeFilter(f)
        if rank != 0:
            handler.addFilter(OnRankZero())
    return log


def json_values(x: Any) -> Any:
    """``x`` for a JSON file (metrics.jsonl, summary.json, report.json, a checkpoint's records): a value that is not
    finite (CKA of a probe set whose items are all alike, a diverged loss) is null there, where strict JSON readers
    (jq, pandas, JavaScript) refuse a bare ``NaN``; the tables show it as ``nan``."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {k: json_values(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_values(v) for v in x]
    return x


def wandb_mode(configured: str) -> str:
    """The wandb mode a run logs in: ``logging.wandb.mode``, or ``WANDB_MODE`` from the environment where that asks
    for less (a cluster's compute nodes set ``offline``, or ``disabled``). The config's mode had been passed to wandb
    over the variable, so ``online`` on a node without a network ended the run, and ``disabled`` still wrote a wandb
    folder. The variable never turns on what the config leaves off: one exported for other work would upload this."""
    if configured not in WANDB_MODES:
        raise ValueError(f"logging.wandb.mode={configured!r} is not known; choose one of {list(WANDB_MODES)}")
    env = _WANDB_ALIASES.get(os.environ.get("WANDB_MODE", ""), os.environ.get("WANDB_MODE", ""))
    if env in WANDB_MODES and WANDB_MODES.index(env) < WANDB_MODES.index(configured):
        logging.getLogger("alignlm").info("wandb: WANDB_MODE=%s overrides logging.wandb.mode=%s", env, configured)
        return env
    return configured


class MetricsLogger:
    """Writes every scalar to ``metrics.jsonl`` and, when enabled, to wandb (offline mode needs no network).

    A stage's wandb run keeps one id (``wandb_id`` beside ``metrics.jsonl``): a resumed segment continues it, where
    each segment had started a run of its own. Steps a resume repeats (killed after logging a step the newest
    checkpoint had not reached) are dropped from ``metrics.jsonl`` and written again; wandb keeps its first record of
    them and ignores the repeat (its steps only increase), the same values on an exact resume."""

    def __init__(
        self,
        path: Path,
        wandb_cfg: Mapping[str, Any] | None,
        run_name: str,
        config: dict[str, Any],
        enabled: bool,
        start_step: int = 0,
    ) -> None:
        self.enabled = enabled
        self.path = path
        self.wandb = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_rows_after(path, start_step)
        self.file = path.open("a", encoding="utf-8")
        cfg = dict(wandb_cfg or {})
        mode = wandb_mode(cfg.get("mode", "disabled"))
        if mode != "disabled":
            import wandb  # noqa: PLC0415 - heavy (seconds to import), needed only when logging to it

            os.environ.setdefault("WANDB_SILENT", "true")
            id_file = path.parent / "wandb_id"
            resumed = start_step > 0 and id_file.exists()
            run_id = id_file.read_text().strip() if resumed else secrets.token_hex(8)
            id_file.write_text(run_id)
            try:
                self.wandb = wandb.init(
                    project=cfg.get("project", "alignlm"),
                    entity=cfg.get("entity"),
                    name=run_name,
                    id=run_id,
                    resume="allow",
                    mode=mode,
                    dir=str(path.parent),
                    config=config,
                    reinit="finish_previous",
                )
            except wandb.errors.UsageError as e:  # no API key for online: had ended the run with a traceback
                self.file.close()
                raise ConfigError(
                    f"logging.wandb.mode={mode}: {e} (or log offline: logging.wandb.mode=offline or WANDB_MODE=offline, "
                    "then wandb sync the stage's wandb/ folder)"
                ) from None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        row = json_values(dict(metrics))
        with writing(self.path):  # Python's write errors name no file
            self.file.write(json.dumps({"step": step, **row}, allow_nan=False) + "\n")
            self.file.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def close(self, failed: bool = False) -> None:
        """``failed``: the stage raised (diverged, bad data, out of memory, Ctrl-C): its wandb run finishes with exit
        code 1. Left open, it was finished by the next ``wandb.init`` in the process (a sweep's next config) and
        recorded as a success."""
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else None)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (none if it does not exist). A row that is not a JSON object is left out with a
    warning naming the file and line: a last row was cut short (disk full, a node lost mid-write); any other is damage
    this writer never makes, which a resume, reading only the file's tail, no longer stops at, so its readers after
    training (a stage's end, eval, plots) go on without it rather than end a stage that trained."""
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    rows = []
    for n, line in lines:
        row = _row(line)
        if row is not None:
            rows.append(row)
        else:
            _left_out(path, n, line, "the last row was cut short" if n == lines[-1][0] else "not a JSON object")
    return rows


def _row(line: str | bytes) -> dict[str, Any] | None:
    """A line of ``metrics.jsonl`` as its row, or None where it is not a JSON object (cut short, damaged, not UTF-8)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _left_out(path: Path, number: int, line: str | bytes, why: str) -> None:
    """Warn of a row left out, naming the file, the line and why."""
    text = line.decode(errors="replace") if isinstance(line, bytes) else line
    logging.getLogger("alignlm").warning("%s:%d: %s (%r); left out", path, number, why, text[:80])


def _drop_rows_after(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: forget their first, unfinished record (and a row cut
    short, which the next row would otherwise continue on its line). The rows are in step order, so only the file's
    tail is read, from its end back to the last row at or before ``step``, and the file is cut there: one truncation,
    done or not (the file is the stage's only record of its earlier segments' losses). Parsing and rewriting the whole
    file had cost every resume about 10 s and 1 GB of the main process's memory at 500k logged steps."""
    if not path.exists():
        if step:  # the stage folder removed or replaced since its checkpoint: its earlier segments' losses are gone
            logging.getLogger("alignlm").warning(
                "resuming at step %d, but %s is gone (the stage's folder removed or replaced since?): the losses of the "
                "steps before are lost, and the stage's summary covers the steps from here only",
                step,
                path,
            )
        return
    with path.open("r+b") as f:
        end = keep = f.seek(0, os.SEEK_END)
        last = True  # the file's last row: one cut short there is left out
        for offset, line in _lines_backwards(f, end):
            if not line.strip():
                continue
            row = _row(line)
            if row is None:
                number = _line_number(f, offset)
                if not last or b"\r" in line.rstrip(b"\r"):  # damage, or rows that carriage returns alone separate
                    raise ValueError(f"{path}:{number}: not a JSON object ({line[:80]!r}); mend or delete that line")
                _left_out(path, number, line, "the last row was cut short")
            elif row.get("step", 0) <= step:
                keep = offset + len(line) + 1  # through its line break
                break
            last, keep = False, offset
        if keep > end:  # the row kept last ends the file without its line break: the next row goes on a line of its own
            f.seek(end)
            f.write(b"\n")
        elif keep < end:
            f.truncate(keep)


def _lines_backwards(f: Any, end: int, block: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """``(offset, line)`` of a binary file's lines up to ``end``, the last first, without their line breaks."""
    head, position = b"", end
    while position > 0:
        size = min(block, position)
        position -= size
        f.seek(position)
        lines = (f.read(size) + head).split(b"\n")
        head = lines[0]  # may begin in the block before
        offset = position + len(head) + 1
        found = []
        for line in lines[1:]:
            found.append((offset, line))
            offset += len(line) + 1
        yield from reversed(found)
    yield 0, head


def _line_number(f: Any, offset: int) -> int:
    """The number (from 1) of the line starting at ``offset``: for a message, read only when one is needed."""
    f.seek(0)
    return f.read(offset).count(b"\n") + 1


def summary_table(title: str, rows: Mapping[str, Any]) -> str:
    """A two-column text table for the end of a stage or the pipeline."""
    width = max((len(k) for k in rows), default=0)
    lines = [f"== {title} ==", *(f"  {k:<{width}}  {_fmt(v)}" for k, v in rows.items())]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
