"""Embedding shards on disk: the one format ``embed`` writes and ``realign`` streams.

A shard set is a folder (or a list of files) of ``*.safetensors`` or ``*.npy`` files, read in name order.
A safetensors shard holds one ``[n, d]`` tensor ``embeddings``; its metadata holds ``ids`` (a JSON list, one
per row), ``encoder`` and ``modality``, and from ``alignlm embed`` ``encoder_fingerprint`` (the encoder's weights
hashed) and ``items`` (a digest of the captions or images embedded). A ``.npy`` shard is a bare ``[n, d]`` array
(rows are their ids).
Shards are read in row chunks (memory-mapped ``.npy``, sliced safetensors), so a set larger than memory
streams, and written to a temporary name and renamed, so a file that exists is complete. ``ShardTable``
finds rows by id instead (ReVision's text-only data), memory-mapped, so it too works on sets larger than memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from alignlm.files import replace_file

SUFFIXES = (".safetensors", ".npy")
TENSOR = "embeddings"


@dataclass(frozen=True)
class Shard:
    """One file of embeddings: where it is, its shape and, for safetensors, its ids and metadata."""

    path: Path
    rows: int
    dim: int
    metadata: dict[str, str]

    @property
    def ids(self) -> list[str]:
        """Row ids: the stored list, else ``<file stem>:<row>``."""
        if "ids" in self.metadata:
            return json.loads(self.metadata["ids"])
        return [f"{self.path.stem}:{i}" for i in range(self.rows)]

    @property
    def encoder(self) -> str | None:
        return self.metadata.get("encoder")

    @property
    def encoder_fingerprint(self) -> str | None:
        """The weights of the encoder that wrote it, hashed (``DualEncoder.fingerprint``); None when not stored."""
        return self.metadata.get("encoder_fingerprint")

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        """The shard's rows, ``rows`` at a time, read from disk into one reused buffer (copy before the next).

        Plain sequential reads rather than a memory map: no page-fault per 4 KiB, and writable arrays.
        """
        offset, dtype, fortran = _data_layout(self.path)
        if fortran:  # a column-major .npy cannot be read by rows; map it instead
            array = np.load(self.path, mmap_mode="r")
            for start in range(0, self.rows, rows):
                yield np.ascontiguousarray(array[start : start + rows])
            return
        buffer = np.empty((min(rows, self.rows), self.dim), dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(offset)
            for start in range(0, self.rows, rows):
                part = buffer[: min(rows, self.rows - start)]
                if f.readinto(memoryview(part).cast("B")) != part.nbytes:
                    raise ValueError(f"{self.path}: file ends before row {self.rows} (truncated?)")
                yield part

    def matrix(self) -> np.ndarray:
        """The whole ``[rows, dim]`` matrix, memory-mapped read-only: random rows without loading the file."""
        offset, dtype, fortran = _data_layout(self.path)
        return np.memmap(
            self.path, dtype=dtype, mode="r", offset=offset, shape=(self.rows, self.dim), order="F" if fortran else "C"
        )


_SAFETENSORS_DTYPES = {"F16": np.float16, "BF16": None, "F32": np.float32, "F64": np.float64}


def _data_layout(path: Path) -> tuple[int, np.dtype, bool]:
    """Byte offset of the embedding matrix, its dtype, and whether it is column-major (.npy only)."""
    with open(path, "rb") as f:
        if path.suffix == ".npy":
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
            _, fortran, dtype = read(f)
            return f.tell(), np.dtype(dtype), fortran
        header_len = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(header_len))[TENSOR]
    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"{path}: embeddings of dtype {entry['dtype']} are not supported; store F16, F32 or F64")
    return 8 + header_len + entry["data_offsets"][0], np.dtype(dtype).newbyteorder("<"), False


def open_shard(path: str | Path) -> Shard:
    """Read a shard's header (not its data) and check it holds one 2-D embedding matrix."""
    path = Path(path)
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r")
        if array.dtype.kind != "f":  # whole numbers or bytes read as embeddings would train without a word
            raise ValueError(f"{path}: embeddings of dtype {array.dtype} are not supported; store float16/32/64")
        shape, metadata = array.shape, {}
    elif path.suffix == ".safetensors":
        with safe_open(str(path), framework="numpy") as f:
            if TENSOR not in f.keys():
                raise ValueError(f"{path}: no tensor named {TENSOR!r} (found {sorted(f.keys())})")
            shape, metadata = f.get_slice(TENSOR).get_shape(), dict(f.metadata() or {})
    else:
        raise ValueError(f"{path}: an embedding shard must end in one of {SUFFIXES}")
    if len(shape) != 2:
        raise ValueError(f"{path}: embeddings must be [rows, dim], got shape {tuple(shape)}")
    shard = Shard(path, int(shape[0]), int(shape[1]), metadata)
    if "ids" in metadata and len(shard.ids) != shard.rows:
        raise ValueError(f"{path}: {len(shard.ids)} ids for {shard.rows} rows")
    return shard


def list_shards(sources: str | Path | Sequence[str | Path]) -> list[Shard]:
    """The shards of folders and files, in name order; all must share one dimension."""
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    paths: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.iterdir() if p.suffix in SUFFIXES and not p.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"{source}: no embedding shards ({', '.join('*' + s for s in SUFFIXES)})")
            paths += found
        elif source.exists():
            paths.append(source)
        else:
            raise FileNotFoundError(f"{source}: no such shard file or folder")
    shards = [open_shard(p) for p in paths]
    dims = {s.dim for s in shards}
    if len(dims) > 1:
        raise ValueError(f"shards of one set must share a dimension, got {sorted(dims)} in {[str(p) for p in paths]}")
    return shards


class ShardTable:
    """Rows of a shard set looked up by id (ReVision's caption embeddings), memory-mapped, each id exactly once."""

    def __init__(self, sources: str | Path | Sequence[str | Path]) -> None:
        self.shards = list_shards(sources)
        self.dim = self.shards[0].dim
        self.encoders = sorted({s.encoder for s in self.shards if s.encoder})
        self.where: dict[str, tuple[int, int]] = {}
        for k, shard in enumerate(self.shards):
            for row, item in enumerate(shard.ids):
                if item in self.where:
                    raise ValueError(
                        f"id {item!r} is in both {self.shards[self.where[item][0]].path} and {shard.path}: "
                        "rows must be found by id unambiguously"
                    )
                self.where[item] = (k, row)
        self.matrices = [s.matrix() for s in self.shards]

    def __len__(self) -> int:
        return len(self.where)

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids that have no row, in the order given."""
        return [i for i in ids if i not in self.where]

    def __getitem__(self, item: str) -> np.ndarray:
        """A copy of the row of ``item`` (a ``KeyError`` names it when absent)."""
        k, row = self.where[item]
        return np.array(self.matrices[k][row])


def write_shard(
    path: str | Path, embeddings: torch.Tensor | np.ndarray, metadata: dict[str, str] | None = None
) -> Path:
    """Write one shard whole or not at all (``files.replace_file``); the suffix picks the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    if not np.isfinite(array).all():
        raise ValueError(
            f"{path}: {int((~np.isfinite(array)).any(axis=-1).sum())} embeddings are not finite: not written"
        )
    if path.suffix == ".npy":

        def save_npy(tmp: Path) -> None:
            with tmp.open("wb") as f:  # a file, not a name: np.save would add ".npy" to the temporary one
                np.save(f, array)

        return replace_file(path, save_npy)
    if path.suffix == ".safetensors":
        return replace_file(
            path, lambda tmp: save_file({TENSOR: np.ascontiguousarray(array)}, str(tmp), metadata=metadata or {})
        )
    raise ValueError(f"{path}: an embedding shard must end in one of {SUFFIXES}")


def shard_metadata(ids: Sequence[str], encoder: str, modality: str, **extra: str) -> dict[str, str]:
    """The string metadata a safetensors shard carries."""
    return {"ids": json.dumps(list(ids)), "encoder": encoder, "modality": modality, **extra}
