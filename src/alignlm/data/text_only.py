"""ReVision's text-only pretraining data: caption records whose image is the caption's own text embedding.

METHODS.md section 4: the (ReAligned) text embedding of a caption stands in for the image. A record is rendered
exactly as a LLaVA caption record (``plain`` template: one ``<image>``, then the supervised caption), but no image
is opened: the sample carries ``image_embeds`` ``[1, N, D]`` instead of ``pixel_values``, the record's row of the
text-embedding shards (``alignlm embed --texts``, found by record id), L2-normalised, moved by ReAlign when
statistics are given (``data.realign``; without them, the raw normalised embedding: the ablation), multiplied by
the tower's ``scale`` and broadcast to its ``N`` tokens: what ``DualEncoderTower`` gives a real image. Every record's id is
checked against the shards at start-up, so a mismatch fails before step 1.

``data.embed_noise`` (CapDec-style noise injection, off by default): Gaussian noise of that standard deviation per
coordinate is added to the unit (ReAligned) embedding, which is then re-normalised. Why: a set of templated captions
gives few distinct embeddings, and a connector fitted on those points alone maps a real image's embedding, which
lies at some distance from its caption's, to nonsense; noise of that distance teaches it the neighbourhood. One
draw per record, seeded by the run's seed and the record id, so a resumed run sees the same inputs.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from alignlm.data.llava import DataError, LlavaDataset, Source
from alignlm.revision.realign import ReAlignStats
from alignlm.revision.shards import ShardTable

log = logging.getLogger(__name__)


class ReVisionDataset(LlavaDataset):
    """A LLaVA caption dataset whose one image per record is that record's caption embedding."""

    def __init__(self, sources: Sequence[Source], *args: Any, text_embeds: str | Path, realign: str | Path | None = None,
                 num_tokens: int, dim: int, scale: float = 1.0, encoder: str | None = None, embed_noise: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(sources, *args, **kwargs)
        if embed_noise < 0:
            raise DataError(f"data.embed_noise must be >= 0 (a standard deviation per coordinate), got {embed_noise}")
        self.embed_noise, self.noise_seed = float(embed_noise), int(kwargs.get("seed", 0))
        self.table = ShardTable(text_embeds)
        where = f"data.text_embeds={text_embeds}"
        if self.table.dim != dim:
            raise DataError(f"{where} holds {self.table.dim}-d embeddings but model.vision gives {dim}-d features: "
                            "embed the captions with the tower's dual encoder")
        if encoder is not None and self.table.encoders and self.table.encoders != [encoder]:
            log.warning("%s was written by encoder %s, model.vision uses %r: make sure they are the same model",
                        where, self.table.encoders, encoder)
        self.realign = ReAlignStats.load(realign) if realign else None
        if self.realign is not None and self.table.encoders and self.table.encoders != [self.realign.encoder]:
            raise DataError(f"data.realign={realign} was fitted on {self.realign.encoder!r} embeddings but {where} holds "
                            f"{self.table.encoders}: ReAlign only applies in the space it was fitted in")
        self.num_tokens, self.scale = num_tokens, scale
        ids = []
        for src, records in zip(self.sources, self.records):
            for i, rec in enumerate(records):
                if "id" not in rec:
                    raise DataError(f"{src.path} record {i} has no 'id': ReVision finds each caption's embedding by id")
                ids.append(str(rec["id"]))
        missing = self.table.missing(ids)
        if missing:
            raise DataError(f"{where} has no embedding for {len(missing)} of {len(ids)} caption records of "
                            f"{[s.path for s in self.sources]} (first: {missing[:3]}); embed these records' captions "
                            "(`alignlm embed --texts ...`, or add them to revision.texts)")

    def visual_inputs(self, src: Source, rec: dict[str, Any]) -> list[str]:
        """One pseudo-image per record, named by its id; the record's image files are never read."""
        return [str(rec["id"])]

    def load_visuals(self, inputs: list[str]) -> dict[str, torch.Tensor | None]:
        """``image_embeds`` ``[1, N, D]``: the caption's unit (ReAligned) embedding, scaled, on every visual token."""
        rows = torch.from_numpy(self.table[inputs[0]]).to(torch.float64).unsqueeze(0)
        unit = F.normalize(rows, dim=-1) if self.realign is None else self.realign(rows)
        if self.embed_noise:
            g = torch.Generator().manual_seed(zlib.crc32(f"{self.noise_seed}:{inputs[0]}".encode()))
            noise = torch.randn(unit.shape, generator=g, dtype=unit.dtype)
            unit = F.normalize(unit + self.embed_noise * noise, dim=-1)
        embeds = (unit * self.scale).float()
        return {"pixel_values": None, "image_embeds": embeds.unsqueeze(1).expand(-1, self.num_tokens, -1)}
