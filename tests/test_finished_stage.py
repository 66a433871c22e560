"""A finished stage is skipped only when it was trained from this run's settings and files (docs/reliability.md).

With resume=auto a stage whose final/ existed was skipped whatever had changed since it trained: a new learning rate,
a data file or a prepare step's file rewritten at the same path. The old weights went on to the next stages and the
evaluation with one info line. Now final/ records what the stage was trained from (trained_from.json), a rerun that
differs is refused before anything trains, naming each change, and a step checkpoint's recipe holds the files'
digests too.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from alignlm.config import ConfigError
from alignlm.pipeline import run
from alignlm.training import checkpoint as ckpt
from alignlm.training.trainer import StopTraining
from tests.conftest import compose, tiny_overrides


@pytest.fixture
def alignlm_log(caplog) -> Iterator[pytest.LogCaptureFixture]:
    """The run's warnings: the ``alignlm`` logger writes to its own handler and does not propagate."""
    log = logging.getLogger("alignlm")
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="alignlm"):
            yield caplog
    finally:
        log.removeHandler(caplog.handler)


def own_data(colour_set: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the pretraining captions that the test may rewrite (the colour set is shared by the session)."""
    data = tmp_path / "data" / "pretrain.json"
    data.parent.mkdir()
    shutil.copy(colour_set["pretrain"], data)
    return data


def pretrain_only(colour_set: dict[str, Path], tmp_path: Path, data: Path, *extra: str) -> list[str]:
    """A 2-step pretraining stage alone, on ``data`` with the colour set's images, no evaluation."""
    images = colour_set["pretrain"].parent
    return tiny_overrides(
        colour_set,
        tmp_path,
        "run=[pretrain]",
        "eval.sets=[]",
        "stages.pretrain.max_steps=2",
        f"stages.pretrain.data.sources=[{{path:{data},image_root:{images}}}]",
        *extra,
    )


def weights_stamp(final: Path) -> tuple[int, int]:
    """The inode and modification time of a final/'s weights: a retrained stage writes a new file."""
    stat = (final / "model.safetensors").stat()
    return stat.st_ino, stat.st_mtime_ns


def test_a_finished_stage_with_a_changed_setting_is_refused_or_kept_on_request_and_an_unchanged_one_skipped(
    colour_set, tmp_path, alignlm_log
):
    data = own_data(colour_set, tmp_path)
    base = pretrain_only(colour_set, tmp_path, data)
    final = tmp_path / "t" / "pretrain" / "final"
    run(compose(*base))
    stamp = weights_stamp(final)

    summary = run(compose(*base))  # (c) the same settings and files: skipped, not retrained
    assert weights_stamp(final) == stamp and summary["stages"]["pretrain"]["steps"] == 2
    assert "trained from other" not in alignlm_log.text

    new_lr = "stages.pretrain.lr.connector=5e-2"
    with pytest.raises(ConfigError) as refused:
        run(compose(*base, new_lr))
    message = str(refused.value)
    assert "stage pretrain" in message and "stages.pretrain.lr.connector: 0.001 -> 0.05" in message
    assert "resume=never" in message and "resume_allow_changes=true" in message
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.max_steps: 2 -> 3"):  # not a re-counted total
        run(compose(*base, "stages.pretrain.max_steps=3"))
    assert weights_stamp(final) == stamp
    record = json.loads((final / ckpt.TRAINED_FROM).read_text())  # the data file by its bytes, the image root not
    assert record["stages.pretrain.data.sources[0].path contents"]["path"] == str(data)
    assert [key for key in record if key.endswith(ckpt.CONTENTS)] == ["stages.pretrain.data.sources[0].path contents"]

    alignlm_log.clear()
    run(compose(*base, new_lr, "resume_allow_changes=true"))  # kept as it is, the changes named
    assert weights_stamp(final) == stamp
    assert "keeping" in alignlm_log.text and "stages.pretrain.lr.connector: 0.001 -> 0.05" in alignlm_log.text

    alignlm_log.clear()
    (final / ckpt.TRAINED_FROM).unlink()  # a final/ written before the record existed: skipped, with a warning
    run(compose(*base, new_lr))
    assert weights_stamp(final) == stamp and "cannot be compared" in alignlm_log.text


def test_a_finished_stage_whose_data_file_was_rewritten_in_place_is_refused_naming_it(colour_set, tmp_path):
    data = own_data(colour_set, tmp_path)
    base = pretrain_only(colour_set, tmp_path, data)
    run(compose(*base))
    records = json.loads(data.read_text())
    data.write_text(json.dumps(records[::-1]))  # same path, same keys, other contents
    with pytest.raises(ConfigError, match=rf"stages\.pretrain\.data\.sources\[0\]\.path \({data}\): contents changed"):
        run(compose(*base))
    data.write_text(json.dumps(records))  # back as it was trained: skipped again
    run(compose(*base))


def test_a_step_checkpoint_resume_after_a_named_file_changed_is_refused_naming_it(colour_set, tmp_path):
    data = own_data(colour_set, tmp_path)
    base = pretrain_only(colour_set, tmp_path, data, "stages.pretrain.max_steps=4")
    with pytest.raises(StopTraining):
        run(compose(*base, "stop_after_steps=2"))
    records = json.loads(data.read_text())
    data.write_text(json.dumps(records[::-1]))
    with pytest.raises(ValueError, match=r"written from other files: stages\.pretrain\.data\.sources\[0\]\.path"):
        run(compose(*base))
    run(compose(*base, "resume_allow_changes=true"))  # continues from the checkpoint on this run's file
    assert (tmp_path / "t" / "pretrain" / "final" / "model.safetensors").exists()
