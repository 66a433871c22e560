"""Images and captions -> embedding shards with a dual encoder (``alignlm embed``, ReVision's embed step).

The encoder is anything ``models.encoders.load_encoder`` loads: a Hugging Face ``CLIPModel`` / ``SiglipModel`` folder or
hub name, or a folder written by ``alignlm dual-encoder fit``.
Inputs are image folders or LLaVA JSON/JSONL (its images), and text files (one caption a line) or LLaVA
JSON/JSONL (the first assistant turn, the caption in LLaVA pretraining data).

Items are cut into shards of ``shard_size`` in input order; shard ``k`` is
``OUT/<modality>/shard_<k>.safetensors`` (float32 ``embeddings`` with ``ids``, ``encoder``, ``encoder_fingerprint``,
``items`` and ``modality`` metadata, see :mod:`alignlm.methods.revision.shards`). Shards are written whole and
atomically, so a rerun skips the finished ones and resumes at the first missing one. The encoder is known by its
weights' fingerprint (``DualEncoder.fingerprint``), not by how the run names it: a shard of the same weights is kept
under another name (a folder named relatively, or moved with the project), and relabelled with this run's name, so
the folder names one encoder. A shard is embedded again when it is not this list's: other ids in its place (items
added, removed or reordered before it, in any shard: a list narrowed or grown), other weights under the same name (an
encoder refitted into its folder), other captions, or images of another size or modification time under the same ids
(``items``, their digest: an offline set regenerated with other knobs keeps its ids). A shard of another encoder
(another name and other weights) is refused, the folder untouched: its embeddings live in another space. Shards
numbered past the item list's last (left by a longer list) are removed: the folder holds the embeddings of this
list, and ReAlign fits on the whole folder.
Embeddings are stored as the encoder returns them (not normalised); ReAlign normalises.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from alignlm.data.images import decoded_batches
from alignlm.data.records import DataError, image_names, image_paths, iter_records, record_caption
from alignlm.methods.provenance import stamps_digest, strings_digest
from alignlm.methods.revision.shards import open_shard, shard_metadata, write_shard
from alignlm.models.encoders import DualEncoder, device_of, image_steps, known_fingerprints

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
MODALITIES = ("images", "texts")
SHARD_NAME = re.compile(r"shard_(\d+)\.safetensors")


# ------------------------------------------------------------------------------------------------ inputs


def collect_images(source: str | Path, image_root: str | Path | None = None) -> list[tuple[str, Path]]:
    """``(id, path)`` of every image of a folder (recursive) or a LLaVA JSON, each image once, in order."""
    source = Path(source)
    if source.is_dir():
        return [
            (p.relative_to(source).as_posix(), p)
            for p in sorted(source.rglob("*"))
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        ]
    root = Path(image_root) if image_root else source.parent
    seen: dict[str, Path] = {}
    for rec in iter_records(source):
        for name, path in zip(image_names(rec), image_paths(rec, root)):
            seen.setdefault(name, path)
    if not seen:
        raise ValueError(f"{source}: no images (records need an 'image' field, or pass an image folder)")
    return list(seen.items())


def collect_texts(source: str | Path) -> list[tuple[str, str]]:
    """``(id, text)`` of a text file (one a line) or of LLaVA JSON/JSONL records (their captions)."""
    source = Path(source)
    if source.suffix in (".json", ".jsonl"):
        out = []
        for i, rec in enumerate(iter_records(source)):
            rid, caption = str(rec["id"]) if rec.get("id") is not None else str(i), record_caption(rec)
            if caption is None:
                raise DataError(
                    f"{source} record {rid}: no caption text ('caption', 'text' or an assistant turn's text in "
                    "'conversations')"
                )
            out.append((rid, caption))
        return out
    lines = source.read_text(encoding="utf-8").splitlines()
    return [(f"{source.stem}:{i}", line.strip()) for i, line in enumerate(lines) if line.strip()]


# ------------------------------------------------------------------------------------------------- shards


def embed_items(
    encoder: DualEncoder,
    modality: str,
    items: Sequence[tuple[str, object]],
    out_dir: str | Path,
    *,
    shard_size: int = 10_000,
    batch_size: int = 64,
    progress: bool = True,
    num_workers: int | str = "auto",
) -> list[Path]:
    """Encode ``(id, image path or text)`` items into ``out_dir/<modality>/shard_*.safetensors``; resumable.

    ``num_workers`` (``data.images.loader_workers``: auto, by the encoder's device) processes read and preprocess the
    images ahead of the encoder, in order: read one at a time in this process, 5-7 ms an image kept a GPU waiting."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    folder = Path(out_dir) / modality
    prepare, encode_prepared = image_steps(encoder)
    n_shards = (len(items) + shard_size - 1) // shard_size
    paths = [folder / f"shard_{k:05d}.safetensors" for k in range(n_shards)]
    fingerprint = encoder.fingerprint()
    known = known_fingerprints(encoder, fingerprint)
    done = []
    for k, path in enumerate(paths):
        shard = items[k * shard_size : (k + 1) * shard_size]
        ids, digest = [i for i, _ in shard], items_digest(modality, shard)
        done.append(_finished(path, ids, encoder.name, (fingerprint, known), digest))
    _remove_past(folder, n_shards)  # after the checks: a folder of another encoder is refused untouched
    for path in (p for p, d in zip(paths, done) if d):
        _relabel(path, encoder.name, fingerprint)
    bar = tqdm(
        total=len(items),
        initial=sum(min(shard_size, len(items) - k * shard_size) for k, d in enumerate(done) if d),
        desc=f"embed {modality}",
        unit="item",
        disable=not progress,
    )
    for k, path in enumerate(paths):
        if done[k]:
            continue
        shard = items[k * shard_size : (k + 1) * shard_size]
        parts = []
        if modality == "images":
            images = [Path(str(p)) for _, p in shard]  # an unreadable image stops the pass, naming it
            for batch in decoded_batches(
                images, prepare, batch_size, device_of(encoder), num_workers, raise_unreadable=True
            ):
                parts.append(encode_prepared(batch.items))
                bar.update(len(batch.index))
        else:
            for start in range(0, len(shard), batch_size):
                texts = [x for _, x in shard[start : start + batch_size]]
                parts.append(encoder.encode_texts(texts))
                bar.update(len(texts))
        meta = shard_metadata(
            [i for i, _ in shard],
            encoder.name,
            modality,
            encoder_fingerprint=fingerprint,
            items=items_digest(modality, shard),
        )
        write_shard(path, torch.cat(parts).float(), meta)
    bar.close()
    return paths


def items_digest(modality: str, items: Sequence[tuple[str, object]]) -> str:
    """What a shard embeds, hashed: the texts themselves, or each image's size and modification time (a stat, as the
    feature cache stamps them, not a read)."""
    if modality == "images":
        return stamps_digest([Path(str(p)) for _, p in items], [i for i, _ in items])
    return strings_digest(str(text) for _, text in items)


def _remove_past(folder: Path, n_shards: int) -> None:
    """Remove the shards numbered ``n_shards`` and up, left by a longer item list: everything that reads the folder
    (ReAlign's fit, the caption lookup) would take their items for this list's."""
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        match = SHARD_NAME.fullmatch(path.name)
        if match and int(match.group(1)) >= n_shards:
            log.warning(
                "%s holds items past the %d shards of this item list (a longer list's): removed", path, n_shards
            )
            path.unlink()


def _finished(path: Path, ids: list[str], encoder: str, weights: tuple[str, set[str]], items: str) -> bool:
    """Whether a shard already holds exactly these ids from this encoder's weights and the items as they are now.
    ``weights``: the encoder's fingerprint and every one that names it (``models.encoders.known_fingerprints``).

    The weights decide, not the name (a CLIP folder's name is its path as the run spells it). Other weights under
    another name are another encoder, an error, not a redo: its embeddings may be wanted, and ReAlign cannot mix two
    spaces. Other weights under the same name (an encoder refitted into its folder: `alignlm dual-encoder fit` writes
    one default name), other ids (the item list changed before or inside this shard) or other items under the same ids
    (captions edited, images regenerated) are a redo."""
    if not path.exists():
        return False
    shard = open_shard(path)
    fingerprint, known = weights
    if shard.encoder_fingerprint not in known:
        if shard.encoder != encoder:
            raise ValueError(
                f"{path} holds embeddings of another encoder: {shard.encoder!r} (weights "
                f"{shard.encoder_fingerprint}), this run's is {encoder!r} (weights {fingerprint}); embed into another "
                "folder (`alignlm embed --out`, revision.embeddings) or delete this one"
            )
        log.warning(
            "%s was embedded by %s with other weights (fingerprint %s, now %s): the encoder changed, embedding again",
            path,
            encoder,
            shard.encoder_fingerprint,
            fingerprint,
        )
        return False
    if shard.ids != ids:
        log.warning(
            "%s holds other items than this item list puts there (%d ids, now %d; items added, removed or reordered): "
            "embedding again",
            path,
            len(shard.ids),
            len(ids),
        )
        return False
    if shard.metadata.get("items") != items:
        log.warning("%s was embedded from other captions or images under the same ids: embedding again", path)
        return False
    return True


def _relabel(path: Path, encoder: str, fingerprint: str) -> None:
    """Write a kept shard's ``encoder`` as this run names the same weights, so every shard of the folder names one
    encoder (ReAlign refuses shards of two names, and records the one it fitted on), and its ``encoder_fingerprint``
    as this encoder's fingerprint is taken now (a shard written before the fingerprint took the weights at bf16's
    resolution: the bf16 tower that trains on it matches only that one); the embeddings are kept. The fingerprint
    alone is rewritten where the folder lets it: a shared, read-only folder of such shards still serves an fp32 run
    as it did, and a warning says what a bf16 run needs."""
    shard = open_shard(path)
    renamed = shard.encoder != encoder
    if not renamed and shard.encoder_fingerprint == fingerprint:
        return
    if renamed:
        log.info("%s: the same encoder weights, named %r before and %r now: renamed", path, shard.encoder, encoder)
    meta = {**shard.metadata, "encoder": encoder, "encoder_fingerprint": fingerprint}
    try:
        write_shard(path, np.array(shard.matrix()), meta)
    except OSError as e:
        if renamed:
            raise
        log.warning(
            "%s: kept as written, its encoder fingerprint of before (%s): a run under mixed_precision=bf16 will refuse "
            "it; make the folder writable, or embed into another (revision.embeddings)",
            path,
            e,
        )
