"""ReVision's inputs, made before training by ``alignlm train +exp=revision`` (the ``revision`` config node).

Three steps, each skipped when its output exists, so a rerun goes straight to training:
(a) fit the offline dual encoder into ``revision.encoder`` when that folder is missing and ``revision.fit`` says
how; (b) embed the images and captions (``alignlm embed``: resumable shards in ``revision.embeddings``);
(c) fit ReAlign's statistics into ``revision.realign``. The text-only dataset applies them to each caption
embedding as it reads it (the same float64 map as ``alignlm realign apply``), so switching ReAlign off for the
ablation (``revision.realign=null``) changes one knob and no files. (b) and (c) run only for a run whose stages
read caption embeddings; a finetune-only run needs just the encoder (its vision tower).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

KEYS = ("encoder", "fit", "embeddings", "images", "texts", "realign", "covariance", "shard_size", "batch_size", "device")


def prepare(node: Mapping[str, Any], embeddings: bool) -> None:
    """Make what the ``revision`` node names and is missing; ``embeddings``: whether any stage reads them."""
    unknown = set(node) - set(KEYS)
    if unknown:
        raise ValueError(f"revision has unknown keys {sorted(unknown)}; known: {list(KEYS)}")
    ensure_encoder(str(node["encoder"]), node.get("fit"))
    if embeddings:
        ensure_embeddings(node)
        if node.get("realign"):
            ensure_realign(node)


def ensure_encoder(encoder: str, fit: Mapping[str, Any] | None) -> None:
    """(a) Fit the offline dual encoder into ``encoder`` when it is not a dual encoder folder yet and ``fit`` is set."""
    from alignlm.revision.embed import MANIFEST

    if (Path(encoder) / MANIFEST).exists() or not fit:
        return  # an existing folder, or a CLIP / SigLIP name that load_encoder resolves
    from alignlm.revision.dual_encoder import fit_encoder

    log.info("revision: fitting the offline dual encoder into %s", encoder)
    try:
        fit_encoder(out=encoder, **dict(fit))
    except TypeError as e:
        raise ValueError(f"revision.fit has a knob `alignlm dual-encoder fit` does not take: {e}") from e


def ensure_embeddings(node: Mapping[str, Any]) -> None:
    """(b) Image and caption embedding shards in ``revision.embeddings``; finished shards are checked and kept."""
    import torch

    from alignlm.revision.embed import collect_images, collect_texts, embed_items, load_encoder

    for key in ("images", "texts"):
        if not node.get(key):
            raise ValueError(f"revision.{key} is empty; list the LLaVA JSON files (or folders) to embed")
    encoder = load_encoder(str(node["encoder"]), device=node.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    knobs = {"shard_size": int(node.get("shard_size", 10_000)), "batch_size": int(node.get("batch_size", 64))}
    images = [item for source in node["images"] for item in collect_images(source)]
    texts = [item for source in node["texts"] for item in collect_texts(source)]
    embed_items(encoder, "images", images, node["embeddings"], **knobs)
    embed_items(encoder, "texts", texts, node["embeddings"], **knobs)


def ensure_realign(node: Mapping[str, Any]) -> None:
    """(c) ReAlign's statistics of the image and caption shards, written to ``revision.realign`` when missing.

    ``revision.covariance`` (null: METHODS.md's trace step; a shrinkage: Anchor + Covariance) must agree with
    an existing file, so changing the knob never silently reuses statistics fitted the other way.
    """
    from alignlm.revision.realign import ReAlignStats, fit

    path = Path(node["realign"])
    covariance = node.get("covariance")
    covariance = None if covariance is None else float(covariance)
    if path.exists():
        stored = ReAlignStats.load(path).covariance
        if stored != covariance:
            raise ValueError(f"revision.realign={path} was fitted with covariance={stored}, but revision.covariance="
                             f"{covariance}: point revision.realign at another file, or delete this one to refit")
        return
    folder = Path(node["embeddings"])
    stats = fit(folder / "images", folder / "texts", covariance=covariance)
    stats.save(path)
    log.info("revision: ReAlign statistics in %s (s=%.3f, covariance %s, gap before %.3f)", path, stats.s,
             covariance, stats.summary()["gap_before"])
