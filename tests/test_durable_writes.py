"""Durable writes (docs/reliability.md): a rewrite of ``metrics.jsonl`` is whole or not at all, ``final/`` carries a
manifest that a rerun checks, checkpoints are synced to the disk around their rename, and pruning never keeps a
damaged checkpoint in place of a whole one."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from alignlm.training import checkpoint as ckpt
from alignlm.training.logging import MetricsLogger, read_rows


class Parts(nn.Module):
    """The least a checkpoint writer needs of a model: named parts."""

    PARTS = ("connector",)

    def __init__(self) -> None:
        super().__init__()
        self.connector = nn.Linear(3, 2)


def written_step(
    stage_dir: Path, step: int, model: nn.Module | None = None
) -> tuple[Path, nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A small step checkpoint of ``model`` (default :class:`Parts`), written as the trainer writes one; with the
    model, optimizer and schedule it was written from."""
    model = model or Parts()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = stage_dir / "checkpoints" / f"{ckpt.STEP_PREFIX}{step:06d}"
    ckpt.save_training_state(path, model, optimizer.state_dict(), scheduler, {"step": step}, {0: ckpt.rng_state()})
    return path, model, optimizer, scheduler


def save_step(stage_dir: Path, step: int) -> Path:
    """A small step checkpoint, written as the trainer writes one."""
    return written_step(stage_dir, step)[0]


def replace_bytes(path: Path, data: bytes) -> None:
    """Damage ``path`` as a new file renamed over it (a new inode: what it looks like on disk changes for sure)."""
    other = path.with_name(path.name + ".new")
    other.write_bytes(data)
    os.replace(other, path)


def test_a_resume_cuts_metrics_jsonl_in_place_writing_nothing(tmp_path):
    """The resume's rewrite truncated metrics.jsonl, then wrote it: a full disk there left it empty, and the finished
    stage reported 4 steps and a later first loss instead of 6 and its own; then it was written beside the file and
    renamed over it. It is now cut after the checkpoint's row by one truncation, which needs no space: the same file,
    its rows up to the step byte for byte, nothing beside it."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 5)))
    before, inode = path.read_bytes(), path.stat().st_ino
    MetricsLogger(path, None, "t", {}, enabled=True, start_step=2).close()
    assert [r["step"] for r in read_rows(path)] == [1, 2] and before.startswith(path.read_bytes())
    assert path.stat().st_ino == inode and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_final_folder_short_or_empty_is_named_and_one_without_a_manifest_trusted(tmp_path):
    """final/ had no integrity record: a 0-byte or half-length model.safetensors or a 0-byte config.yaml counted as a
    finished stage, and every rerun ended in a traceback naming no file."""
    final = tmp_path / "pretrain" / "final"
    ckpt.save_final(final, Parts(), "model: {}\n", ["connector"], "pretrain", {"seed": 0})
    manifest = json.loads((final / ckpt.MANIFEST).read_text())
    assert sorted(manifest) == ["config.yaml", "model.safetensors", ckpt.TRAINED_FROM]
    assert ckpt.final_intact(final) is None and ckpt.verify(final) is None
    weights = (final / "model.safetensors").read_bytes()
    for name, data in (("model.safetensors", weights[: len(weights) // 2]), ("config.yaml", b"")):
        whole = (final / name).read_bytes()
        replace_bytes(final / name, data)
        assert ckpt.final_intact(final) == (
            f"{final / name} has {len(data)} bytes, the manifest says {len(whole)} (truncated?)"
        )
        replace_bytes(final / name, whole)
        assert ckpt.final_intact(final) is None
    (final / "model.safetensors").write_bytes(b"")
    (final / ckpt.MANIFEST).unlink()  # as an alignlm from before final/ held a manifest wrote it: trusted
    assert ckpt.final_intact(final) is None


def test_checkpoint_files_and_folders_reach_the_disk_around_the_rename(tmp_path, monkeypatch):
    """Nothing was synced: after a lost node, a published final/ or step checkpoint could hold empty or short files
    under names that said they were whole."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name what a file descriptor is")
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("sync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd))
    )
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(b))), replace(a, b)))
    final = tmp_path / "pretrain" / "final"
    ckpt.save_final(final, Parts(), "model: {}\n", ["connector"], "pretrain")
    step = save_step(tmp_path / "pretrain", 2)
    for folder in (final, step):
        tmp = str(ckpt.temporary(folder))
        renamed = events.index(("rename", str(folder)))
        before, after = {p for _, p in events[:renamed]}, {p for _, p in events[renamed + 1 :]}
        assert {f"{tmp}/{p.name}" for p in folder.iterdir()} | {tmp} <= before
        assert str(folder.parent) in after


def test_pruning_keeps_whole_checkpoints_over_damaged_newer_ones(tmp_path, alignlm_log):
    """After a resume passed over a damaged newer checkpoint, keep_last=2 kept the damaged one and deleted the older
    whole one, the last the stage could fall back on."""
    stage = tmp_path / "pretrain"
    for step in (2, 4, 5):
        save_step(stage, step)
    cut = stage / "checkpoints" / "step_000004" / "optimizer.pt"
    replace_bytes(cut, cut.read_bytes()[:50])  # a node lost before its write-back
    flipped = stage / "checkpoints" / "step_000005" / "scheduler.pt"
    replace_bytes(flipped, bytes(b ^ 0xFF for b in flipped.read_bytes()))  # damage of the same length
    assert ckpt.verify(flipped.parent) and ckpt.verify(cut.parent)  # what the resume found, passing over them
    ckpt.prune(stage, 2, save_step(stage, 3))  # the resume from step 2 wrote step 3
    assert [p.name for p in ckpt.step_dirs(stage)] == ["step_000002", "step_000003"]
    assert f"checkpoint {stage / 'checkpoints' / 'step_000004'} is damaged ({cut} has 50 bytes" in alignlm_log.text
    assert f"({flipped} does not match its SHA-256 in the manifest (damaged)): deleted" in alignlm_log.text


def test_pruning_hashes_no_checkpoint_this_process_knows(tmp_path, monkeypatch):
    """Pruning checks the checkpoints it keeps; hashing the one before at every save, or every older one after a
    requeue while the other ranks wait, would take minutes for a 7B run's (~100 GB with its optimizer state): it reads
    their sizes, and hashes only the new files, for their manifest."""
    stage = tmp_path / "pretrain"
    for step in (1, 2):
        save_step(stage, step)
    hashed: list[Path] = []
    sha256 = ckpt.file_sha256
    monkeypatch.setattr(ckpt, "file_sha256", lambda path: (hashed.append(path), sha256(path))[1])
    for step in (3, 4):
        ckpt.prune(stage, 2, save_step(stage, step))
    assert [p.name for p in ckpt.step_dirs(stage)] == ["step_000003", "step_000004"]
    assert hashed and all(p.parent.name.endswith(".tmp") for p in hashed)  # the new files alone, for their manifest
    hashed.clear()  # as a requeued job resuming from step 4 would
    for step in (5, 6):
        ckpt.prune(stage, 3, save_step(stage, step))
    assert all(p.parent.name.endswith(".tmp") for p in hashed)  # the older checkpoints by their sizes alone
    assert [p.name for p in ckpt.step_dirs(stage)] == ["step_000004", "step_000005", "step_000006"]


def test_a_final_folder_cut_short_is_named_by_every_command_that_reads_it(tmp_path):
    """``alignlm eval``, ``export``, ``sea`` and ``v2l`` read a ``final/`` through ``load_model``: a cut-short weights
    file ended them with safetensors' own "header too small", naming no file."""
    from alignlm.models.build import build_model
    from alignlm.models.io import config_yaml, final_stage, load_model
    from tests.conftest import compose

    cfg, final = compose(), tmp_path / "final"
    ckpt.save_final(final, build_model(cfg.model), config_yaml(cfg), ["connector"], "pretrain")
    weights = final / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:8])
    for read in (load_model, final_stage):  # eval reads the stage first
        with pytest.raises(ValueError, match=f"{weights}.*cut short"):
            read(final)


def test_a_resume_reads_optimizer_state_saved_on_a_gpu_onto_the_cpu_mapped_from_the_disk(tmp_path):
    """Rank 0 of a GPU run saves its optimizer state from cuda:0, and every rank read the whole file back onto cuda:0
    (a CUDA context and the state on GPU 0 per rank), into private memory (AdamW's state of a 7B finetune: 56 GB a
    rank). No GPU here: the file records cuda:0 as a GPU run's does, and the resume reads it onto the CPU, mapped."""
    from unittest import mock

    stage = tmp_path / "pretrain"
    path = save_step(stage, 1)
    model = Parts()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    tag = torch.serialization.location_tag
    with mock.patch.object(torch.serialization, "location_tag", lambda s: "cuda:0" if tag(s) == "cpu" else tag(s)):
        torch.save(optimizer.state_dict(), path / "optimizer.pt")
    (path / ckpt.MANIFEST).unlink()  # the file was replaced after the manifest was written
    loads = []
    load = torch.load
    with mock.patch.object(torch, "load", lambda *a, **k: (loads.append(k), load(*a, **k))[1]):
        fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 1.0)
        ckpt.apply_training_state(ckpt.read_training_state(path, 3), model, fresh, scheduler, rank=3)
    assert fresh.state_dict()["state"][0]["exp_avg"].device.type == "cpu"
    assert {"mmap": True, "map_location": "cpu"}.items() <= loads[0].items()


def test_a_gathered_state_is_saved_without_a_second_copy_and_a_live_part_is_copied():
    """Under FSDP2 rank 0 saves the weights it gathered, a fresh CPU copy: copied once more, it held the trained
    weights four times over at a step checkpoint (112 GB for a 7B finetune). A part's own tensors, which go on
    training, are still copied."""
    from alignlm.models.io import part_state

    model = Parts()
    gathered = {k: v.clone() for k, v in model.connector.state_dict().items()}
    saved = part_state(model, ["connector"], state={f"connector.{k}": v for k, v in gathered.items()})
    assert all(saved[f"connector.{k}"].data_ptr() == v.data_ptr() for k, v in gathered.items())
    own = part_state(model, ["connector"])
    assert all(own[f"connector.{k}"].data_ptr() != v.data_ptr() for k, v in model.connector.state_dict().items())


def test_a_file_replaced_whole_is_synced_before_its_rename_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """``files.replace_file``, the one writer of whole files: the temporary file is synced before the rename and the
    folder after it, and a write that fails leaves the old file and no temporary one."""
    from alignlm import files

    synced: list[str] = []
    monkeypatch.setattr(files, "sync", lambda p: synced.append(p.name))
    path = tmp_path / "kept.bin"
    path.write_bytes(b"old")
    files.replace_file(path, lambda tmp: tmp.write_bytes(b"new"))
    assert path.read_bytes() == b"new" and synced == [f".kept.bin.tmp{os.getpid()}", tmp_path.name]

    def cut(tmp: Path) -> None:
        tmp.write_bytes(b"ha")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        files.replace_file(path, cut)
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["kept.bin"]


def test_a_replaced_safetensors_file_is_readable_as_the_umask_allows(tmp_path):
    """safetensors writes owner-only (0600): a checkpoint or a shared feature cache was unreadable to the rest of a
    cluster group, whatever its umask allowed. A file replaced whole and a checkpoint folder published whole get the
    mode the umask gives."""
    from safetensors.torch import save_file

    from alignlm import files

    path = files.replace_file(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))
    assert path.stat().st_mode & 0o777 == 0o666 & ~files._UMASK  # 0o644 under the usual umask 022
    folder = tmp_path / "step"  # a checkpoint folder, published whole
    tmp = ckpt.atomic_dir(folder)
    save_file({"a": torch.zeros(2)}, str(tmp / "trainable.safetensors"))
    ckpt.publish(tmp, folder)
    assert (folder / "trainable.safetensors").stat().st_mode & 0o777 == 0o666 & ~files._UMASK


@pytest.mark.parametrize("writer", ["embedding_shard_npy", "embedding_shard_safetensors", "realign", "sea", "cache"])
def test_prepared_files_reach_the_disk_before_their_name_says_they_are_whole(tmp_path, monkeypatch, writer):
    """A method's prepared files (ReVision's embedding shards and ReAlign statistics, SEA's labels, a feature-cache
    shard) were renamed into place unsynced: after a lost node one could come back 0 bytes long under its whole name.
    Each now goes through ``files.replace_file``: its bytes are synced before the rename."""
    import numpy as np

    from alignlm import files

    synced: list[Path] = []
    real = files.sync
    monkeypatch.setattr(files, "sync", lambda p: (synced.append(Path(p)), real(p)))
    if writer.startswith("embedding_shard"):
        from alignlm.methods.revision.shards import write_shard

        path = write_shard(tmp_path / ("e.npy" if writer.endswith("npy") else "e.safetensors"), np.ones((3, 4)))
    elif writer == "realign":
        from alignlm.methods.revision.realign import fit
        from alignlm.methods.revision.shards import write_shard

        write_shard(tmp_path / "img" / "shard_000.npy", np.random.default_rng(0).normal(size=(16, 4)))
        write_shard(tmp_path / "txt" / "shard_000.npy", np.random.default_rng(1).normal(size=(16, 4)))
        synced.clear()
        path = fit(tmp_path / "img", tmp_path / "txt").save(tmp_path / "stats.safetensors")
    elif writer == "sea":
        from alignlm.methods.sea.labels import LabelSet, write_labels

        image = tmp_path / "a.png"
        image.write_bytes(b"")
        labels = LabelSet(
            ["cat", "dog"], (1, 1), [image], np.zeros((1, 1, 1), np.int32), np.ones((1, 1, 1), np.float32), "test"
        )
        path = write_labels(tmp_path / "labels.safetensors", labels)
    else:
        from alignlm.data.feature_cache import FeatureCache

        FeatureCache(tmp_path / "cache").write("shard_00000", [tmp_path / "a.png"], [None], torch.ones(1, 2, 3))
        path = tmp_path / "cache" / "shard_00000.safetensors"
    assert path.exists() and path.stat().st_size > 0
    temporary = [p for p in synced if p.parent == path.parent and p.name.startswith(f".{path.name}.tmp")]
    assert temporary and synced[-1] == path.parent, synced
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]


def test_a_full_disk_is_one_error_naming_the_file_and_what_is_left_on_its_disk(tmp_path, monkeypatch, capsys):
    """A disk that fills under a checkpoint: torch.save reported it as a RuntimeError ("unexpected pos 18688 vs
    18580") naming no file, and the command line printed its traceback; Python's own write errors name no file
    (metrics.jsonl: "[Errno 28] No space left on device"), and a file replaced whole was named by its temporary."""
    from alignlm.commands import console
    from alignlm.files import replace_text

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 18688 vs 18580")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as e:
        save_step(tmp_path / "pretrain", 2)
    step = tmp_path / "pretrain" / "checkpoints" / "step_000002"
    assert e.value.filename == str(step) and e.value.strerror.startswith(
        "could not be written (RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 18688 vs "
    )
    assert "GB free on its disk)" in e.value.strerror and not step.exists()
    monkeypatch.setattr("alignlm.commands.main", lambda argv: save_step(tmp_path / "pretrain", 2))
    assert console(["train"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"alignlm train: {step}: could not be written (RuntimeError: ") and err.count("\n") == 1

    log = MetricsLogger(tmp_path / "metrics.jsonl", None, "r", {}, True)
    monkeypatch.setattr(log, "file", type("Full", (), {"write": full_disk, "flush": lambda self: None})())
    with pytest.raises(OSError) as e:
        log.log({"loss/total": 1.0}, 1)
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / "metrics.jsonl"))

    # what is not the disk's goes on as it was, traceback and all: no "could not be written" pointing at the disk
    from alignlm.files import writing
    from alignlm.training.trainer import Terminated

    for other in (
        NotImplementedError("Cannot copy out of meta tensor"),
        RuntimeError("can't allocate memory"),
        Terminated("SIGTERM"),
    ):
        with pytest.raises(type(other)), writing(tmp_path / "x"):
            raise other

    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: full_disk(None, filename=str(self)))
    with pytest.raises(OSError) as e:
        replace_text(tmp_path / "summary.json", "{}")
    assert e.value.filename == str(tmp_path / "summary.json")  # not its temporary's name
    assert not list(tmp_path.glob(".summary.json*"))


def full_disk(self, *args, filename=None, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
