"""One ``alignlm eval`` at a time in an ``--out`` folder: two evaluations into one folder appended their batches to one
``set-<name>.partial.jsonl`` in turns and overwrote each other's reports. The lock is the one a training run takes on
its folder (``alignlm.files.take_lock``)."""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from alignlm.commands import evaluate as eval_command
from alignlm.commands import main
from alignlm.config import ConfigError
from alignlm.pipeline import run
from tests.conftest import compose, tiny_overrides


@pytest.fixture(scope="module")
def final(colour_set, tmp_path_factory) -> Path:
    """A tiny one-step run's ``final/``."""
    out = tmp_path_factory.mktemp("lockrun")
    run(compose(*tiny_overrides(colour_set, out), "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=1"))
    return out / "t" / "pretrain" / "final"


def eval_argv(final: Path, colour_set: dict[str, Path], out: Path) -> list[str]:
    return ["eval", str(final), "--sets", f"colours={colour_set['test']}", "--no-probe", "--no-plots",
            "--limit", "2", "--max-new-tokens", "1", "--out", str(out)]  # fmt: skip


def is_held(lock: Path) -> bool:
    """Whether some open file holds ``lock``'s flock (a new descriptor of this process conflicts with it too)."""
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextmanager
def held_by_another(lock: Path, holder: bytes) -> Iterator[None]:
    """``lock`` held as another evaluation holds it: flocked, its name written."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, holder)
        yield
    finally:
        os.close(fd)


def test_a_second_eval_into_a_locked_out_is_refused_naming_the_holder(final, colour_set, tmp_path, monkeypatch):
    """While another evaluation holds --out, a second one is refused before it evaluates anything, and the message
    names the holder and the lock."""
    out = tmp_path / "r"
    out.mkdir()
    lock = tmp_path / ".r.eval.lock"  # beside --out, which holds only what the evaluation wrote
    monkeypatch.setattr(eval_command, "evaluate_checkpoint", lambda *a: pytest.fail("evaluated into a locked --out"))
    with held_by_another(lock, b"node7:4242"):
        message = f"--out {out} is in use by another alignlm eval (node7:4242), which holds {lock}"
        with pytest.raises(ConfigError, match=re.escape(message)):
            main(eval_argv(final, colour_set, out))
        # through a link to the folder: the same lock
        (tmp_path / "link").symlink_to(out)
        with pytest.raises(ConfigError, match="node7:4242"):
            main(eval_argv(final, colour_set, tmp_path / "link"))
    assert not any(out.iterdir())


def test_an_eval_holds_its_out_while_it_runs_and_lets_go_when_it_ends_or_fails(
    final, colour_set, tmp_path, monkeypatch
):
    """The lock is held from before the first checkpoint to after the report, and released at the end, whether the
    evaluation finished or raised: the next evaluation into the folder runs."""
    out = tmp_path / "r"
    lock = tmp_path / ".r.eval.lock"
    seen: list[bool] = []
    real = eval_command.evaluate_checkpoint

    def evaluate(*args):
        seen.append(is_held(lock))
        return real(*args)

    monkeypatch.setattr(eval_command, "evaluate_checkpoint", evaluate)
    assert main(eval_argv(final, colour_set, out)) == 0
    assert seen == [True] and (out / "report.json").exists()
    assert not is_held(lock)
    assert re.fullmatch(r".+:\d+, since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\n", lock.read_text())  # host:pid, its start

    def fails(*args):
        raise RuntimeError("the evaluation failed")

    monkeypatch.setattr(eval_command, "evaluate_checkpoint", fails)
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        main(eval_argv(final, colour_set, out))
    assert not is_held(lock)
    monkeypatch.setattr(eval_command, "evaluate_checkpoint", real)
    assert main(eval_argv(final, colour_set, out)) == 0  # the folder is free again
