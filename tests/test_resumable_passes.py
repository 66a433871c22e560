"""The long prepare passes resume where they stopped (docs/reliability.md): SEA's dual-encoder labels and AlignGPT's
pair scores keep their rows beside the output while they run (``files.PartialRows``), so a killed pass (a requeued
job, a crash at 90 %) encodes only the images it had not finished, and writes the file an uninterrupted pass writes.
Kept rows serve only the same inputs and knobs; a damaged record of them starts the pass again."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from alignlm import files
from alignlm.methods.aligngpt import levels as aligngpt_levels
from alignlm.methods.sea import labels as sea_labels
from tests.test_aligngpt import ColourEncoder
from tests.test_sea import _PatchEncoder


class Stop(Exception):
    """The interruption an encoder raises at its chosen batch (a crash mid-pass)."""


def every_batch_commits(monkeypatch) -> None:
    """Each batch is committed at once, as if every batch took longer than the commit interval."""
    monkeypatch.setattr(files, "COMMIT_EVERY", 0.0, raising=False)


# ---- the generic kept rows -------------------------------------------------------------------------------------------


def kept(folder: Path, key: dict, rows: int = 10) -> files.PartialRows:
    """A PartialRows opened for a pass of ``rows`` rows into an int32 ``[rows, 2]`` and a float64 ``[rows]`` array."""
    progress = files.PartialRows(folder, key)
    progress.resume(rows, {"ids": np.int32, "scores": np.float64})
    return progress


def saved(folder: Path, key: dict, done: int) -> files.PartialRows:
    """A pass of 10 rows under ``key`` whose first ``done`` rows are written and kept on the disk."""
    progress = kept(folder, key)
    progress.allocate({"ids": ((10, 2), np.int32), "scores": ((10,), np.float64)})
    fill(progress, range(0, done))
    progress.save()
    return progress


def fill(progress: files.PartialRows, rows: range) -> None:
    """Write ``rows`` whole, then count them done."""
    progress.arrays["ids"][rows.start : rows.stop] = np.arange(rows.start, rows.stop)[:, None]
    progress.arrays["scores"][rows.start : rows.stop] = np.arange(rows.start, rows.stop) / 10
    progress.commit(rows.stop)


def test_kept_rows_resume_under_their_key_and_another_key_starts_again(tmp_path, caplog):
    folder = files.partial_folder(tmp_path / "out.bin")
    assert folder == tmp_path / "out.bin.partial"
    progress = kept(folder, {"inputs": "a"})
    assert progress.done == 0 and not progress.arrays and not folder.exists()  # nothing made before the first batch
    progress.allocate({"ids": ((10, 2), np.int32), "scores": ((10,), np.float64)}, {"grid": [1, 2]})
    fill(progress, range(0, 4))
    progress.save()
    again = kept(folder, {"inputs": "a"})
    assert again.done == 4 and again.info == {"grid": [1, 2]}
    assert (again.arrays["ids"][:4, 0] == np.arange(4)).all() and (
        again.arrays["scores"][:4] == np.arange(4) / 10
    ).all()
    with caplog.at_level(logging.WARNING, logger="alignlm.files"):
        other = kept(folder, {"inputs": "b"})
    assert other.done == 0 and not other.arrays and not folder.exists()
    assert "other inputs or knobs; the pass starts again at its first row" in caplog.text


def test_a_commit_syncs_at_most_every_interval_and_flushes_the_rows_before_counting_them(tmp_path, monkeypatch):
    """A batch costs no sync: within the interval a commit only counts the rows in memory, a kill loses them (and no
    more); a save writes the rows to the disk first, then the count that says they are done."""
    folder = tmp_path / "p"
    progress = kept(folder, {"k": 1})
    progress.allocate({"ids": ((10, 2), np.int32), "scores": ((10,), np.float64)})
    events: list[str] = []
    flush, replace = np.memmap.flush, files.replace_text
    monkeypatch.setattr(np.memmap, "flush", lambda self: (events.append("flush"), flush(self))[1])
    monkeypatch.setattr(files, "replace_text", lambda p, t: (events.append("count"), replace(p, t))[1])
    monkeypatch.setattr(files, "COMMIT_EVERY", 3600.0)
    for start in range(0, 6, 2):
        fill(progress, range(start, start + 2))
    assert events == [] and progress.done == 6
    assert kept(folder, {"k": 1}).done == 0  # what a kill now finds: the rows the last count said
    progress.save()
    assert events == ["flush", "flush", "count"]
    assert kept(folder, {"k": 1}).done == 6
    monkeypatch.setattr(files, "COMMIT_EVERY", 0.0)
    fill(progress, range(6, 8))
    assert events[3:] == ["flush", "flush", "count"] and kept(folder, {"k": 1}).done == 8


@pytest.mark.parametrize(
    "damage",
    ["garbage progress", "no progress", "truncated array", "array of another dtype", "count past the rows", "check"],
)
def test_damaged_kept_rows_start_the_pass_again_saying_why(tmp_path, caplog, damage):
    folder = tmp_path / "p"
    saved(folder, {"k": 1}, 4)
    record = folder / files.PROGRESS
    if damage == "garbage progress":
        record.write_bytes(b"\x00{not json")
    elif damage == "no progress":
        record.unlink()
    elif damage == "truncated array":
        data = (folder / "scores.npy").read_bytes()
        (folder / "scores.npy").write_bytes(data[: len(data) // 2])
    elif damage == "array of another dtype":
        np.save(folder / "scores.npy", np.zeros(10, np.float32))
    elif damage == "count past the rows":
        record.write_text(json.dumps({**json.loads(record.read_text()), "done": 11}))
    check = (lambda arrays, info: "the caller says no") if damage == "check" else None
    with caplog.at_level(logging.WARNING, logger="alignlm.files"):
        again = files.PartialRows(folder, {"k": 1})
        assert again.resume(10, {"ids": np.int32, "scores": np.float64}, check) == 0
    assert not again.arrays and not folder.exists()
    assert "the pass starts again at its first row" in caplog.text


def test_kept_arrays_must_be_the_ones_the_pass_asks_for(tmp_path):
    folder = tmp_path / "p"
    saved(folder, {"k": 1}, 4)
    assert files.PartialRows(folder, {"k": 1}).resume(10, {"ids": np.int64, "scores": np.float64}) == 0  # a dtype
    assert not folder.exists()
    saved(folder, {"k": 1}, 4)
    assert files.PartialRows(folder, {"k": 1}).resume(12, {"ids": np.int32, "scores": np.float64}) == 0  # the rows


def test_kept_rows_are_removed_and_a_pass_without_a_folder_keeps_nothing(tmp_path):
    folder = tmp_path / "p"
    progress = saved(folder, {"k": 1}, 10)
    progress.remove()
    assert not folder.exists()
    memory = files.PartialRows(None, {})
    assert memory.resume(3, {"a": np.float32}) == 0
    arrays = memory.allocate({"a": ((3, 2), np.float32)})
    assert type(arrays["a"]) is np.ndarray
    memory.commit(3)
    memory.save()
    memory.remove()
    assert list(tmp_path.iterdir()) == []
    empty = files.PartialRows(folder, {"k": 1})
    assert empty.resume(0, {"a": np.float64}) == 0 and empty.allocate({"a": ((0,), np.float64)})["a"].shape == (0,)
    empty.save()
    assert not folder.exists()  # no rows: nothing to keep


# ---- SEA's dual-encoder labels ---------------------------------------------------------------------------------------


class CountingPatches(_PatchEncoder):
    """``_PatchEncoder`` that counts the images it encodes and raises :class:`Stop` at its ``stop_at``-th batch."""

    def __init__(self, stop_at: int | None = None, grid: int = 3) -> None:
        super().__init__()
        self.stop_at, self.grid, self.batches, self.images = stop_at, grid, 0, 0

    def patch_embeddings(self, pixel_values):
        self.batches += 1
        if self.batches == self.stop_at:
            raise Stop(f"batch {self.batches}")
        self.images += len(pixel_values)
        patches = super().patch_embeddings(pixel_values)
        return patches if self.grid == 3 else patches[:, : self.grid, : self.grid]


def sea(out: Path, shapes_root: Path, encoder, **knobs) -> Path:
    """SEA labels of the 8 shapes images, 3 a batch (batches of 3, 3, 2), as the prepare step writes them."""
    data = [shapes_root / "shapes" / "pretrain.json"]
    knobs = {"model": encoder, "words": ["a", "b", "c"], "batch_size": 3, "num_workers": 0, **knobs}
    return sea_labels.make_labels(out, "dual_encoder", data, 2, **knobs)


@pytest.fixture(scope="module")
def sea_whole(shapes_root, tmp_path_factory) -> bytes:
    """The labels file of an uninterrupted pass (in the folder the tests write theirs: the same image keys)."""
    return sea(tmp_path_factory.mktemp("sea") / "whole.safetensors", shapes_root, CountingPatches()).read_bytes()


def test_an_interrupted_sea_label_pass_encodes_only_the_images_it_had_not_finished(shapes_root, tmp_path, sea_whole):
    """Stopped at its third batch, the pass had labelled 6 of 8 images; the rerun labels the last 2 and writes the
    file an uninterrupted pass writes, then drops the kept rows."""
    out = tmp_path / "whole.safetensors"
    with pytest.raises(Stop):
        sea(out, shapes_root, CountingPatches(stop_at=3))
    assert not out.exists() and files.partial_folder(out).is_dir()
    rest = CountingPatches()
    sea(out, shapes_root, rest)
    assert rest.images == 2 and out.read_bytes() == sea_whole
    assert not files.partial_folder(out).exists()


def test_a_killed_sea_label_pass_resumes_after_its_last_commit(shapes_root, tmp_path, sea_whole, monkeypatch):
    """SIGKILL (no handler, no clean-up) after two batches, each committed: the rerun labels the last batch only."""
    every_batch_commits(monkeypatch)
    out = tmp_path / "whole.safetensors"

    class Killed(CountingPatches):
        def patch_embeddings(self, pixel_values):
            if self.batches == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().patch_embeddings(pixel_values)

    pid = os.fork()
    if pid == 0:  # the job that gets killed
        try:
            sea(out, shapes_root, Killed())
        finally:
            os._exit(3)  # never reached, unless the kill failed
    status = exit_status(pid, timeout=120)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    rest = CountingPatches()
    sea(out, shapes_root, rest)
    assert rest.images == 2 and out.read_bytes() == sea_whole


def exit_status(pid: int, timeout: float) -> int:
    """The wait status of the forked ``pid``; one that hangs is killed, and the test fails rather than the suite."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked pass did not end within {timeout} s")


def test_a_sea_pass_killed_while_writing_its_file_encodes_nothing_again(shapes_root, tmp_path, sea_whole, monkeypatch):
    """Every row was done, the grid kept with them: the rerun writes the file without the encoder."""
    out = tmp_path / "whole.safetensors"
    write = sea_labels.write_labels
    monkeypatch.setattr(sea_labels, "write_labels", lambda *a, **kw: (_ for _ in ()).throw(Stop("write")))
    with pytest.raises(Stop):
        sea(out, shapes_root, CountingPatches())
    monkeypatch.setattr(sea_labels, "write_labels", write)
    rest = CountingPatches()
    sea(out, shapes_root, rest)
    assert rest.images == 0 and out.read_bytes() == sea_whole


def test_a_second_process_preparing_the_same_labels_waits_and_reuses_the_first_ones(
    shapes_root, tmp_path, sea_whole, caplog
):
    """Seed runs launched together all prepare the SEA labels beside one data set: they wrote one ``.partial`` folder
    at once (the second made the first's arrays again under it). The second now waits for the first (a line names
    it), then finds the labels made and encodes nothing."""
    out = tmp_path / "whole.safetensors"
    taken, go = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the first job: holds the output while it makes it (re-entrant: make_labels takes it again)
        code = 1
        try:
            with files.sole_writer(out, f"labelling {out}"):
                os.write(taken[1], b"1")
                os.read(go[0], 1)
                sea(out, shapes_root, CountingPatches())
            code = 0
        finally:
            os._exit(code)
    assert os.read(taken[0], 1) == b"1"
    threading.Timer(1.0, os.write, (go[1], b"1")).start()  # the first job labels once this one waits
    second = CountingPatches()
    data = [shapes_root / "shapes" / "pretrain.json"]
    with caplog.at_level(logging.WARNING, logger="alignlm"):
        sea_labels.ensure_labels(
            out, "dual_encoder", data, 2, model=second, words=["a", "b", "c"], batch_size=3, num_workers=0
        )
    assert os.WEXITSTATUS(exit_status(pid, timeout=120)) == 0
    assert second.images == 0 and out.read_bytes() == sea_whole
    assert any(
        "waiting for it to let go" in r.getMessage() and f"{os.uname().nodename}:{pid}" in r.getMessage()
        for r in caplog.records
    )


def test_sea_rows_kept_under_other_knobs_a_damaged_record_or_another_grid_are_labelled_again(
    shapes_root, tmp_path, tmp_path_factory, sea_whole, caplog
):
    out = tmp_path / "whole.safetensors"
    with pytest.raises(Stop):
        sea(out, shapes_root, CountingPatches(stop_at=3), prompt="an image of {w}")
    again = CountingPatches()
    with caplog.at_level(logging.WARNING, logger="alignlm.files"):
        sea(out, shapes_root, again)  # the default prompt: another key
    assert again.images == 8 and out.read_bytes() == sea_whole and "other inputs or knobs" in caplog.text

    out.unlink()
    with pytest.raises(Stop):
        sea(out, shapes_root, CountingPatches(stop_at=3))
    (files.partial_folder(out) / files.PROGRESS).write_text("{")
    again = CountingPatches()
    sea(out, shapes_root, again)
    assert again.images == 8 and out.read_bytes() == sea_whole

    out.unlink()
    with pytest.raises(Stop):
        sea(out, shapes_root, CountingPatches(stop_at=3))
    two = CountingPatches(grid=2)  # the same name, another grid: its rows must not meet the 3x3 ones
    with caplog.at_level(logging.WARNING, logger="alignlm.files"):
        sea(out, shapes_root, two)
    assert two.images == 2 + 8 and "grid" in caplog.text
    fresh = sea(tmp_path_factory.mktemp("fresh") / "whole.safetensors", shapes_root, CountingPatches(grid=2))
    assert sea_labels.SeaLabels(out).grid == (2, 2) and out.read_bytes() == fresh.read_bytes()


# ---- AlignGPT's pair scores ------------------------------------------------------------------------------------------


class CountingColours(ColourEncoder):
    """``ColourEncoder`` that counts the images it encodes and raises :class:`Stop` at its ``stop_at``-th batch."""

    def __init__(self, stop_at: int | None = None, name: str = "colour-stub") -> None:
        self.stop_at, self.name, self.batches, self.images = stop_at, name, 0, 0

    def encode_images(self, images: list) -> torch.Tensor:
        self.batches += 1
        if self.batches == self.stop_at:
            raise Stop(f"batch {self.batches}")
        self.images += len(images)
        return super().encode_images(images)


@pytest.fixture(scope="module")
def pairs(colour_set, tmp_path_factory) -> Path:
    """13 caption records, the third one's image missing (an unreadable image: no score, no level), in a folder that
    links the colour images in."""
    records = json.loads(colour_set["pretrain"].read_text())[:12]
    records.insert(2, {**records[0], "id": "broken", "image": "images/missing.png"})
    folder = tmp_path_factory.mktemp("pairs")
    (folder / "images").symlink_to(colour_set["pretrain"].parent / "images", target_is_directory=True)
    path = folder / "pretrain.json"
    path.write_text(json.dumps(records))
    return path


def levels(out: Path, data: Path, encoder) -> Path:
    """AlignGPT levels of the 13 pairs, 4 a batch (batches of 4, 4, 4, 1)."""
    return aligngpt_levels.make_levels(out, [data], encoder, num_levels=3, batch_size=4)


def test_an_interrupted_pair_score_pass_scores_only_the_rest_and_keeps_the_unreadable_image_skipped(pairs, tmp_path):
    """Stopped at its third batch, the pass had scored 8 pairs, the unreadable one among them (NaN: no level); the
    rerun scores the last 5 and writes the file an uninterrupted pass writes."""
    whole = levels(tmp_path / "whole" / "levels.json", pairs, CountingColours())
    out = tmp_path / "levels.json"
    with pytest.raises(Stop):
        levels(out, pairs, CountingColours(stop_at=3))
    assert not out.exists() and files.partial_folder(out).is_dir()
    rest = CountingColours()
    levels(out, pairs, rest)
    assert rest.images == 5 and out.read_bytes() == whole.read_bytes()
    assert json.loads(out.read_text())["skipped"] == {"unreadable image": 1} and "broken" not in out.read_text()
    assert not files.partial_folder(out).exists()


def test_pair_scores_kept_from_another_encoder_or_a_damaged_record_are_scored_again(pairs, tmp_path, caplog):
    whole = levels(tmp_path / "whole" / "levels.json", pairs, CountingColours())
    out = tmp_path / "levels.json"
    with pytest.raises(Stop):
        levels(out, pairs, CountingColours(stop_at=3, name="another-encoder"))
    again = CountingColours()
    with caplog.at_level(logging.WARNING, logger="alignlm.files"):
        levels(out, pairs, again)
    assert again.images == 12 and out.read_bytes() == whole.read_bytes() and "other inputs or knobs" in caplog.text

    out.unlink()
    with pytest.raises(Stop):
        levels(out, pairs, CountingColours(stop_at=3))
    (files.partial_folder(out) / "scores.npy").write_bytes(b"\x93NUMPY")  # cut short
    again = CountingColours()
    levels(out, pairs, again)
    assert again.images == 12 and out.read_bytes() == whole.read_bytes()


def test_a_writer_on_a_filesystem_without_locks_goes_on_saying_what_is_unguarded(tmp_path, monkeypatch, caplog):
    """Where ``flock`` is refused (Lustre without -o flock, a read-only shared data folder) the file is still made;
    the warning had said a second one "would not be refused", of a lock that only makes it wait."""

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="alignlm"), files.sole_writer(tmp_path / "x", "labelling x"):
        (tmp_path / "x").write_text("made")
    assert "a second process labelling x while this one runs would not wait" in caplog.text
