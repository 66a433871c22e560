"""ReVision's text-only pretraining data hook: caption records whose image is the caption's own text embedding.

docs/methods.md (ReVision): the (ReAligned) text embedding of a caption stands in for the image. A record is rendered
exactly as a LLaVA caption record (``plain`` template: one ``<image>``, then the supervised caption), but no image
is opened: the sample carries ``image_embeds`` ``[1, N, D]`` instead of ``pixel_values``, the record's row of the
text-embedding shards (``alignlm embed --texts``, found by record id), L2-normalised, moved by ReAlign when
statistics are given (``realign``; without them, the raw normalised embedding: the ablation), multiplied by
the tower's ``scale`` and broadcast to its ``N`` tokens: what ``DualEncoderTower`` gives a real image. Every record's id is
checked against the shards at start-up, so a mismatch fails before step 1. Configured as ``stage.data.hooks.text_embeds``
(``configs/exp/revision.yaml``); it replaces every record's images, so the tower never runs in that stage.

``embed_noise`` (CapDec-style noise injection, off by default): Gaussian noise of that standard deviation per
coordinate is added to the unit (ReAligned) embedding, which is then re-normalised. Why: a set of templated captions
gives few distinct embeddings, and a connector fitted on those points alone maps a real image's embedding, which
lies at some distance from its caption's, to nonsense; noise of that distance teaches it the neighbourhood. One
draw per record, seeded by the run's seed and the record id, so a resumed run sees the same inputs.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from alignlm.config import Bounds
from alignlm.data.hooks import HookedDataset, SampleHook
from alignlm.data.records import DataError, Source
from alignlm.methods.revision.realign import ReAlignStats
from alignlm.methods.revision.shards import ShardTable
from alignlm.models.encoders import known_fingerprints

log = logging.getLogger(__name__)

NOISE = Bounds(0)  # embed_noise: a standard deviation


class TextEmbeddingHook(SampleHook):
    """Each caption record's one image is that record's caption embedding, shaped like ``model.vision``'s output."""

    replaces_visuals = True

    def __init__(
        self,
        text_embeds: str | Path,
        model: Any,
        realign: str | Path | None = None,
        embed_noise: Annotated[float, NOISE] = 0.0,
    ) -> None:
        if problem := NOISE.problem(embed_noise):
            raise DataError(f"embed_noise={embed_noise!r} {problem} (a standard deviation per coordinate)")
        vision = model.vision
        self.embed_noise = float(embed_noise)
        self.table = ShardTable(text_embeds)
        self.where = f"text_embeds={text_embeds}"
        if self.table.dim != vision.hidden_size:
            raise DataError(
                f"{self.where} holds {self.table.dim}-d embeddings but model.vision gives {vision.hidden_size}-d "
                "features: embed the captions with the tower's dual encoder"
            )
        self._check_weights(getattr(vision, "encoder", None))
        encoder = getattr(vision, "encoder_name", None)
        if encoder is not None and self.table.encoders and self.table.encoders != [encoder]:
            log.warning(
                "%s was written by encoder %s, model.vision uses %r: make sure they are the same model",
                self.where,
                self.table.encoders,
                encoder,
            )
        self.realign = ReAlignStats.load(realign) if realign else None
        if self.realign is not None and self.table.encoders and self.table.encoders != [self.realign.encoder]:
            raise DataError(
                f"realign={realign} was fitted on {self.realign.encoder!r} embeddings but {self.where} holds "
                f"{self.table.encoders}: ReAlign only applies in the space it was fitted in"
            )
        self.num_tokens, self.scale = vision.num_patches, float(getattr(vision, "scale", 1.0))
        self.noise_seed = 0

    def _check_weights(self, encoder: Any) -> None:
        """The shards were embedded by the tower's own encoder weights (its fingerprint), not only an encoder of its
        name: every fitted encoder has the default name, and a seed sweep sharing one embeddings folder had pretrained
        one seed on another seed's caption embeddings, without a word."""
        stored = sorted({s.encoder_fingerprint for s in self.table.shards if s.encoder_fingerprint})
        if encoder is None or not hasattr(encoder, "fingerprint") or not stored:
            return  # a tower that is no dual encoder, or shards written before they recorded the weights
        weights = encoder.fingerprint()
        if not set(stored) <= known_fingerprints(encoder, weights):
            raise DataError(
                f"{self.where} was embedded by encoder weights {stored}, but model.vision's encoder has weights "
                f"{weights}: the captions stand in for this tower's image embeddings, so embed them with it (one "
                "revision.embeddings folder per encoder, as configs/exp/revision.yaml gives each seed)"
            )

    def bind(self, dataset: HookedDataset) -> None:
        """Every record needs an ``id`` with a row in the shards; the noise is seeded by the run's seed."""
        self.noise_seed = dataset.seed
        ids = []
        for src, records in zip(dataset.sources, dataset.records):
            for i, rec in enumerate(records):
                if "id" not in rec:
                    raise DataError(f"{src.path} record {i} has no 'id': ReVision finds each caption's embedding by id")
                ids.append(str(rec["id"]))
        missing = self.table.missing(ids)
        if missing:
            raise DataError(
                f"{self.where} has no embedding for {len(missing)} of {len(ids)} caption records of "
                f"{[s.path for s in dataset.sources]} (first: {missing[:3]}); embed these records' captions "
                "(`alignlm embed --texts ...`, or add them to the revision embed step's texts)"
            )

    def visual_inputs(self, source: Source, record: dict[str, Any]) -> list[str]:
        """One pseudo-image per record, named by its id; the record's image files are never read."""
        return [str(record["id"])]

    def load_visuals(self, inputs: list[str]) -> dict[str, torch.Tensor | None]:
        """``image_embeds`` ``[1, N, D]``: the caption's unit (ReAligned) embedding, scaled, on every visual token."""
        rows = torch.from_numpy(self.table[inputs[0]]).to(torch.float64).unsqueeze(0)
        # a table written elsewhere may hold them; a zero row has no direction to normalise
        if not bool(torch.isfinite(rows).all() and rows.any()):
            raise DataError(f"{self.where}: the caption embedding of {inputs[0]!r} is not finite or all zeros")
        unit = F.normalize(rows, dim=-1) if self.realign is None else self.realign(rows)
        if self.embed_noise:
            g = torch.Generator().manual_seed(zlib.crc32(f"{self.noise_seed}:{inputs[0]}".encode()))
            noise = torch.randn(unit.shape, generator=g, dtype=unit.dtype)
            unit = F.normalize(unit + self.embed_noise * noise, dim=-1)
        embeds = (unit * self.scale).float()
        return {"pixel_values": None, "image_embeds": embeds.unsqueeze(1).expand(-1, self.num_tokens, -1)}
