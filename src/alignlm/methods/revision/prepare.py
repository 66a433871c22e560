"""ReVision's prepare steps, run by ``alignlm train`` before training (``stage.prepare`` in ``configs/exp/revision.yaml``).

Three steps, each skipped when its output exists and is current, so a rerun goes straight to training:
``ensure_encoder`` fits the offline dual encoder into the encoder folder when ``fit`` says how and the folder holds
none, or one fitted on other data (one fitted with other ``revision.fit`` knobs is refused);
``ensure_embeddings`` embeds the images and captions (``alignlm embed``: resumable shards, kept for the same encoder
weights however the encoder is named, embedded again when the weights changed, a refitted encoder keeps its folder
and name, when the item list put other ids in a shard, or when the captions or images changed under the same ids;
shards of a longer, earlier item list are removed); ``ensure_realign`` fits ReAlign's statistics (again when the
shards are not the ones they were fitted on: other items, other captions or images, another encoder or name).
The text-embedding data hook applies them to each caption embedding as it reads it (the same float64 map as
``alignlm realign apply``), so switching ReAlign off for the ablation (``revision.realign=null``) changes one knob and
no files. The pretraining stage (which reads caption embeddings) names all three; the finetuning stage only the
encoder (its vision tower), so a finetune-only run fits nothing else.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from alignlm.config import COUNT, KnobsOf
from alignlm.files import sole_writer
from alignlm.methods.provenance import KEY, changed_inputs, ensure_fitted_encoder, strings_digest
from alignlm.methods.revision.embed import collect_images, collect_texts, embed_items
from alignlm.methods.revision.realign import SHRINKAGE, ReAlignStats, fit
from alignlm.methods.revision.shards import list_shards
from alignlm.models.device import default_device
from alignlm.models.encoder_fit import fit_encoder
from alignlm.models.encoders import load_encoder

log = logging.getLogger(__name__)


def ensure_encoder(
    encoder: str, fit: Annotated[Mapping[str, Any] | None, KnobsOf(fit_encoder, ("out",))] = None
) -> None:
    """Fit the offline dual encoder into ``encoder`` when ``fit`` is set and the folder holds none, or one fitted on
    other data (a folder fitted with other ``revision.fit`` knobs is refused: ``provenance.ensure_fitted_encoder``)."""
    ensure_fitted_encoder(encoder, fit, "revision_encoder", "revision.fit")


def ensure_embeddings(
    encoder: str,
    embeddings: str,
    images: Sequence[str],
    texts: Sequence[str],
    shard_size: Annotated[int, COUNT] = 10_000,
    batch_size: Annotated[int, COUNT] = 64,
    device: str | None = None,
) -> None:
    """Image and caption embedding shards in ``embeddings``/images and /texts; finished shards are checked and kept.
    One process at a time (``files.sole_writer``): two runs started together had embedded into one folder at once,
    each over the other's shards."""
    for key, value in (("images", images), ("texts", texts)):
        if not value:
            raise ValueError(f"revision.{key} is empty; list the LLaVA JSON files (or folders) to embed")
    with sole_writer(Path(embeddings), f"embedding into {embeddings}"):
        model = load_encoder(str(encoder), device=device or default_device())
        knobs = {"shard_size": int(shard_size), "batch_size": int(batch_size)}
        for modality, sources, collect in (("images", images, collect_images), ("texts", texts, collect_texts)):
            embed_items(model, modality, [item for source in sources for item in collect(source)], embeddings, **knobs)


def shards_inputs(embeddings: str | Path) -> dict[str, str]:
    """Digests of the image and caption shards ReAlign reads: each shard's name, rows and metadata (ids, encoder and
    its weights' fingerprint, the digest of the captions or images it embedded)."""
    folder = Path(embeddings)
    return {
        modality: strings_digest(
            json.dumps({"name": s.path.name, "rows": s.rows, **s.metadata}, sort_keys=True)
            for s in list_shards(folder / modality)
        )
        for modality in ("images", "texts")
    }


def ensure_realign(embeddings: str, realign: str | None, covariance: Annotated[float | None, SHRINKAGE] = None) -> None:
    """ReAlign's statistics of the image and caption shards, written to ``realign`` when missing or fitted on other
    shards (other items, captions, images, encoder weights or encoder name; null: no ReAlign).

    ``covariance`` (null: the paper's trace step; a shrinkage: Anchor + Covariance) must agree with an existing file,
    so changing the knob never silently reuses statistics fitted the other way.
    """
    if not realign:
        return
    with sole_writer(Path(embeddings), f"fitting ReAlign in {embeddings}"):  # not while a run embeds into it
        _fit_realign(embeddings, realign, covariance)


def _fit_realign(embeddings: str, realign: str, covariance: float | None) -> None:
    """:func:`ensure_realign` under the folder's lock."""
    path = Path(realign)
    covariance = None if covariance is None else float(covariance)
    inputs = shards_inputs(embeddings)
    if path.exists():
        stored = ReAlignStats.load(path)
        if stored.covariance != covariance:
            raise ValueError(
                f"revision.realign={path} was fitted with covariance={stored.covariance}, but revision.covariance="
                f"{covariance}: point revision.realign at another file, or delete this one to refit"
            )
        changed = changed_inputs((stored.extra.get(KEY) or {}).get("inputs"), inputs)
        if not changed:
            return
        log.warning(
            "revision: %s was fitted on other %s shards than %s now holds (other items, captions, images, encoder "
            "weights or encoder name): fitting it again",
            path,
            " and ".join(changed),
            embeddings,
        )
    folder = Path(embeddings)
    stats = fit(folder / "images", folder / "texts", covariance=covariance)
    stats.extra[KEY] = {"knobs": {"covariance": covariance}, "inputs": inputs}
    stats.save(path)
    log.info(
        "revision: ReAlign statistics in %s (s=%.3f, covariance %s, gap before %.3f)",
        path,
        stats.s,
        covariance,
        stats.summary()["gap_before"],
    )
