"""``alignlm embed``: images and captions -> embedding shards, with a dual encoder.

The encoder is a Hugging Face ``CLIPModel`` / ``SiglipModel`` folder or hub name (``get_image_features`` /
``get_text_features``; ``trust_remote_code`` stays off), or a folder written by ``alignlm dual-encoder fit``.
Inputs are image folders or LLaVA JSON/JSONL (its images), and text files (one caption a line) or LLaVA
JSON/JSONL (the first assistant turn, the caption in LLaVA pretraining data).

Items are cut into shards of ``shard_size`` in input order; shard ``k`` is
``OUT/<modality>/shard_<k>.safetensors`` (float32 ``embeddings`` with ``ids``, ``encoder`` and ``modality``
metadata, see :mod:`alignlm.revision.shards`). Shards are written whole and atomically, so a rerun skips
the finished ones (after checking they hold the expected ids) and resumes at the first missing one.
Embeddings are stored as the encoder returns them (not normalised); ReAlign normalises.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from alignlm.models.dual_encoder import HFDualEncoder
from alignlm.revision.shards import open_shard, shard_metadata, write_shard

MANIFEST = "dual_encoder.json"  # marks a folder written by `alignlm dual-encoder fit`
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
MODALITIES = ("images", "texts")


class DualEncoder(Protocol):
    """Anything that maps images and texts into one embedding space."""

    name: str

    def encode_images(self, images: list) -> Tensor: ...

    def encode_texts(self, texts: list[str]) -> Tensor: ...


def load_encoder(spec: str, device: str | torch.device = "cpu", name: str | None = None) -> DualEncoder:
    """A dual encoder from a folder or hub name: ``alignlm dual-encoder fit`` output, else CLIP / SigLIP."""
    if (Path(spec) / MANIFEST).exists():
        from alignlm.revision.dual_encoder import OfflineDualEncoder

        return OfflineDualEncoder.load(spec, device=device, name=name)
    return HFDualEncoder(spec, device=device, name=name)


# ------------------------------------------------------------------------------------------------ inputs


def _records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA records, got {type(data).__name__}")
    return data


def collect_images(source: str | Path, image_root: str | Path | None = None) -> list[tuple[str, Path]]:
    """``(id, path)`` of every image of a folder (recursive) or a LLaVA JSON, each image once, in order."""
    source = Path(source)
    if source.is_dir():
        return [(p.relative_to(source).as_posix(), p) for p in sorted(source.rglob("*"))
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    root = Path(image_root) if image_root else source.parent
    seen: dict[str, Path] = {}
    for i, rec in enumerate(_records(source)):
        images = rec.get("image") or rec.get("images") or []
        for rel in [images] if isinstance(images, str) else images:
            seen.setdefault(rel, root / rel)
    if not seen:
        raise ValueError(f"{source}: no images (records need an 'image' field, or pass an image folder)")
    return list(seen.items())


def _caption(rec: dict, where: str) -> str:
    for key in ("caption", "text"):
        if isinstance(rec.get(key), str):
            return rec[key]
    for turn in rec.get("conversations", []):
        if turn.get("from") in ("gpt", "assistant"):
            return turn["value"].replace("<image>", "").strip()
    raise ValueError(f"{where}: no caption ('caption', 'text' or an assistant turn in 'conversations')")


def collect_texts(source: str | Path) -> list[tuple[str, str]]:
    """``(id, text)`` of a text file (one a line) or of LLaVA JSON/JSONL records (their captions)."""
    source = Path(source)
    if source.suffix in (".json", ".jsonl"):
        return [(str(rec.get("id", i)), _caption(rec, f"{source} record {rec.get('id', i)}"))
                for i, rec in enumerate(_records(source))]
    lines = source.read_text(encoding="utf-8").splitlines()
    return [(f"{source.stem}:{i}", line.strip()) for i, line in enumerate(lines) if line.strip()]


# ------------------------------------------------------------------------------------------------- shards


def embed_items(encoder: DualEncoder, modality: str, items: Sequence[tuple[str, object]], out_dir: str | Path, *,
                shard_size: int = 10_000, batch_size: int = 64, progress: bool = True) -> list[Path]:
    """Encode ``(id, image path or text)`` items into ``out_dir/<modality>/shard_*.safetensors``; resumable."""
    from tqdm.auto import tqdm

    from alignlm.data.images import load_rgb

    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    folder = Path(out_dir) / modality
    encode = encoder.encode_images if modality == "images" else encoder.encode_texts
    n_shards = (len(items) + shard_size - 1) // shard_size
    paths = [folder / f"shard_{k:05d}.safetensors" for k in range(n_shards)]
    done = [_finished(p, [i for i, _ in items[k * shard_size : (k + 1) * shard_size]], encoder.name)
            for k, p in enumerate(paths)]
    bar = tqdm(total=len(items), initial=sum(min(shard_size, len(items) - k * shard_size) for k, d in enumerate(done) if d),
               desc=f"embed {modality}", unit="item", disable=not progress)
    for k, path in enumerate(paths):
        if done[k]:
            continue
        shard = items[k * shard_size : (k + 1) * shard_size]
        parts = []
        for start in range(0, len(shard), batch_size):
            batch = [x for _, x in shard[start : start + batch_size]]
            parts.append(encode([load_rgb(p) for p in batch] if modality == "images" else batch))
            bar.update(len(batch))
        write_shard(path, torch.cat(parts).float(), shard_metadata([i for i, _ in shard], encoder.name, modality))
    bar.close()
    return paths


def _finished(path: Path, ids: list[str], encoder: str) -> bool:
    """Whether a shard already holds exactly these ids from this encoder; a mismatch is an error, not a redo."""
    if not path.exists():
        return False
    shard = open_shard(path)
    if shard.ids != ids or shard.encoder != encoder:
        raise ValueError(f"{path} exists but holds other items or another encoder ({shard.encoder!r}, want {encoder!r}): "
                         "the input changed since it was written; use a new --out folder or delete it")
    return True


def _cmd_embed(args: argparse.Namespace) -> int:
    if not (args.images or args.texts):
        raise SystemExit("alignlm embed: give --images and/or --texts")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_encoder(args.encoder, device=device, name=args.encoder_name)
    summary = {"encoder": encoder.name, "device": str(device)}
    for modality, sources in (("images", args.images), ("texts", args.texts)):
        items: list = []
        for source in sources or []:
            items += collect_images(source, args.image_root) if modality == "images" else collect_texts(source)
        if items:
            paths = embed_items(encoder, modality, items, args.out, shard_size=args.shard_size, batch_size=args.batch_size)
            summary[modality] = {"items": len(items), "shards": len(paths), "folder": str(Path(args.out) / modality)}
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``alignlm embed``."""
    p = subparsers.add_parser("embed", help="images and captions -> embedding shards with a dual encoder")
    p.add_argument("--encoder", required=True, help="CLIP/SigLIP folder or hub name, or an `alignlm dual-encoder fit` folder")
    p.add_argument("--encoder-name", default=None, help="name recorded in the shards (default: --encoder)")
    p.add_argument("--images", nargs="*", help="image folders or LLaVA JSON/JSONL files")
    p.add_argument("--image-root", default=None, help="folder LLaVA image paths are relative to (default: the JSON's)")
    p.add_argument("--texts", nargs="*", help="text files (one caption a line) or LLaVA JSON/JSONL files")
    p.add_argument("--out", required=True, help="output folder; shards go to OUT/images and OUT/texts")
    p.add_argument("--shard-size", type=int, default=10_000, help="items per shard (the unit of resumption)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.set_defaults(func=_cmd_embed)
