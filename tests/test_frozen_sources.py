"""A frozen part is rebuilt from the local folder its model config names: a ``final/`` holds only the parts its run
trained. New weights at that folder had been seen by evaluation's kept results alone: ``alignlm export --is-current``
called an export of the old ones current (lmms-eval scored the old model) and ``resume=auto`` skipped a finished stage
whose connector was fitted to the old LLM. ``models.io.model_sources`` is now the one list of those files, and all
three compare it. Evaluation's kept results are also named from the checkpoint alone: the same checkpoint evaluated
alone and beside another run of the same name had found none of its pieces.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from alignlm.commands.export import stale_export
from alignlm.config import ConfigError
from alignlm.evaluation import checkpoints as C
from alignlm.evaluation import report
from alignlm.evaluation.report import Parts
from alignlm.export.hf_llava import SOURCE_FILE, checkpoint_source, export
from alignlm.models import io
from alignlm.models.build import build_model
from alignlm.models.io import config_yaml
from alignlm.models.llm import tiny
from alignlm.pipeline import run
from alignlm.training import checkpoint as ckpt
from tests.conftest import compose, tiny_overrides


def save_llm(folder: Path, seed: int) -> None:
    """The tiny LLM with weights of ``seed``, saved as a transformers folder (a download, a conversion)."""
    torch.manual_seed(seed)
    model, tokenizer = tiny()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def local_llm(llm: Path) -> list[str]:
    """Overrides that load the LLM from the folder ``llm``."""
    return ["model/llm=qwen2_5_0_5b", f"model.llm.name_or_path={llm}", "model.llm.dtype=float32"]


def copy_again(folder: Path) -> None:
    """Copy ``folder`` away and back, as a cluster job's ``cp -r`` to node-local disk at each requeue does: the same
    bytes, in new files (other inodes and modification times)."""
    away = folder.with_name(f"{folder.name}.away")
    shutil.copytree(folder, away, copy_function=shutil.copyfile)  # copyfile keeps no modification time
    shutil.rmtree(folder)
    away.rename(folder)


def test_model_sources_are_the_local_paths_a_model_config_names_by_key(tmp_path, monkeypatch):
    llm = tmp_path / "llm"
    llm.mkdir()
    monkeypatch.chdir(tmp_path)
    model = {"llm": {"name_or_path": "./llm", "attn": "auto"}, "vision": {"name": "hub/model"}, "extras": [".", "llm"]}
    assert io.model_sources(model) == {"model.llm.name_or_path": str(llm)}  # a word, "." or a hub id is no local folder


def test_export_is_current_is_stale_after_new_weights_at_a_frozen_llm_folder(colour_set, tmp_path):
    llm = tmp_path / "llm"
    save_llm(llm, 0)
    cfg = compose(*tiny_overrides(colour_set, tmp_path), *local_llm(llm))
    final = tmp_path / "t" / "pretrain" / "final"
    ckpt.save_final(final, build_model(cfg.model), config_yaml(cfg), ["connector"], "pretrain")  # the LLM: frozen
    export(final, tmp_path / "hf")
    assert stale_export(str(final), str(tmp_path / "hf")) is None
    save_llm(llm, 1)  # new weights where the frozen LLM is rebuilt from
    assert stale_export(str(final), str(tmp_path / "hf")) is not None
    export(final, tmp_path / "hf")
    assert stale_export(str(final), str(tmp_path / "hf")) is None
    tiny_cfg = compose(*tiny_overrides(colour_set, tmp_path / "tiny"))  # names no local file: recorded as before
    other = tmp_path / "tiny" / "t" / "pretrain" / "final"
    ckpt.save_final(other, build_model(tiny_cfg.model), config_yaml(tiny_cfg), ["connector"], "pretrain")
    assert sorted(checkpoint_source(other)) == ["checkpoint", "files"]


def test_a_finished_stage_whose_frozen_llm_folder_changed_is_refused_or_kept_on_request(
    colour_set, tmp_path, alignlm_log
):
    llm = tmp_path / "llm"
    save_llm(llm, 0)
    base = tiny_overrides(
        colour_set, tmp_path, "run=[pretrain]", "eval.sets=[]", "stages.pretrain.max_steps=2", *local_llm(llm)
    )
    final = tmp_path / "t" / "pretrain" / "final" / "model.safetensors"
    run(compose(*base))
    stamp = final.stat().st_mtime_ns
    run(compose(*base))  # the same files: skipped
    copy_again(llm)  # the same bytes under new times: skipped too (stamps of size and time alone refused it)
    run(compose(*base))
    assert final.stat().st_mtime_ns == stamp and "trained from other" not in alignlm_log.text

    save_llm(llm, 1)  # new weights in the frozen LLM's folder
    with pytest.raises(ConfigError) as refused:
        run(compose(*base))
    message = str(refused.value)
    assert f"model.llm.name_or_path ({llm}): its files changed since this stage trained with them" in message
    assert "resume=never" in message and "resume_allow_changes=true" in message and final.stat().st_mtime_ns == stamp

    alignlm_log.clear()
    run(compose(*base, "resume_allow_changes=true"))  # kept as it is, the change named
    assert final.stat().st_mtime_ns == stamp
    assert "keeping" in alignlm_log.text and "model.llm.name_or_path" in alignlm_log.text

    run(compose(*base, "resume=never"))  # retrained on the new weights, which it records
    assert final.stat().st_mtime_ns != stamp
    run(compose(*base))  # and skipped again


def test_a_checkpoints_kept_results_folder_is_the_same_alone_and_beside_a_run_of_the_same_name(colour_set, tmp_path):
    finals = []
    for sweep in ("s1", "s2"):  # two sweep points, one run_name
        cfg = compose(*tiny_overrides(colour_set, tmp_path / sweep))
        finals.append(tmp_path / sweep / "t" / "pretrain" / "final")
        ckpt.save_final(finals[-1], build_model(cfg.model), config_yaml(cfg), ["connector"], "pretrain")
    alone = C.resolve([str(finals[0])])[0]
    beside, other = C.resolve([str(f) for f in finals])
    assert beside.label == "s1/t/pretrain/final" and alone.label == "t/pretrain/final"

    def folder(ck: C.Checkpoint) -> Path:
        return Parts.of(tmp_path / "rep", ck, C.stage_config(ck), torch.device("cpu")).folder

    assert folder(alone) == folder(beside) != folder(other)


# ---------------------------------------------- a byte-identical copy of a frozen folder is the same files (requeues)


def test_model_stamps_compare_digests_where_both_sides_hold_them_else_modification_times():
    """A record written before model stamps held digests is compared as before (times), and says so."""
    was = [["/m/w", 4, 1, "aa"]]
    assert io.stamps_change(was, [["/m/w", 4, 2, "aa"]]) is None  # copied: other time, same bytes
    assert io.stamps_change(was, [["/m/w", 4, 1, "bb"]]) == "changed"
    assert io.stamps_change(was, [["/m/w", 5, 2, "aa"]]) == "changed"
    assert io.stamps_change(was, [["/m/w", 4, 1, "aa"], ["/m/x", 1, 1, "cc"]]) == "changed"
    assert io.stamps_change([["/m/w", 4, 1]], [["/m/w", 4, 1, "aa"]]) is None
    assert io.stamps_change([["/m/w", 4, 1]], [["/m/w", 4, 2, "aa"]]) == "rewritten"
    assert io.stamps_change("edited", [["/m/w", 4, 1, "aa"]]) == "changed"


def test_a_check_of_unchanged_model_files_reads_none_of_them(tmp_path, monkeypatch):
    """A resume's and a finished stage's check compare this run's stamps with the record's: files of the recorded
    name, size and time keep the recorded digest, unread (every rank checks; a 7B folder is 14 GB); another time
    reads the file."""
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"abcd")
    record = io.model_file_stamps(tmp_path)
    monkeypatch.setattr(io, "file_sha256", lambda path: pytest.fail(f"{path} was read"))
    assert io.model_file_stamps(tmp_path, record) == record
    os.utime(weights, ns=(1, 1))
    monkeypatch.setattr(io, "file_sha256", lambda path: "read")
    assert io.model_file_stamps(tmp_path, record)[0][3] == "read"


def test_export_is_current_after_a_copy_of_the_frozen_llm_folder_or_when_recorded_without_model_files(
    colour_set, tmp_path, monkeypatch
):
    """An export recorded before its source held ``model files`` was called stale ("files ...'s model config loads
    ... changed"), and scripts/eval_lmms.sh exported every checkpoint again; it is stale where one of them is newer
    than its record. A check of unchanged files reads none of them (each read the whole folder)."""
    llm = tmp_path / "llm"
    save_llm(llm, 0)
    cfg = compose(*tiny_overrides(colour_set, tmp_path), *local_llm(llm))
    final, out = tmp_path / "t" / "pretrain" / "final", tmp_path / "hf"
    ckpt.save_final(final, build_model(cfg.model), config_yaml(cfg), ["connector"], "pretrain")
    export(final, out)
    source = json.loads((out / SOURCE_FILE).read_text())
    del source["model files"]
    (out / SOURCE_FILE).write_text(json.dumps(source))
    assert stale_export(str(final), str(out)) is None
    save_llm(llm, 1)  # new weights since that export
    assert "is newer" in (stale_export(str(final), str(out)) or "")
    save_llm(llm, 0)
    export(final, out)
    copy_again(llm)
    assert stale_export(str(final), str(out)) is None
    save_llm(llm, 1)  # new weights: the record's model files say so
    export(final, out)
    save_llm(llm, 0)
    assert "model config loads" in (stale_export(str(final), str(out)) or "")
    export(final, out)
    monkeypatch.setattr(io, "_DIGESTS", {})  # a new process: eval_lmms.sh runs one check each
    monkeypatch.setattr(io, "file_sha256", lambda path: pytest.fail(f"{path} was read"))
    assert stale_export(str(final), str(out)) is None


def test_evaluations_kept_results_are_found_after_a_copy_of_the_frozen_llm_folder(tmp_path):
    """Their key held the folder's modification times: a requeue's copy computed every result again."""
    llm = tmp_path / "llm"
    save_llm(llm, 0)
    cfg = compose(*local_llm(llm))
    before = report._model_files(cfg)
    copy_again(llm)
    assert report._model_files(cfg) == before
    save_llm(llm, 1)
    assert report._model_files(cfg) != before
