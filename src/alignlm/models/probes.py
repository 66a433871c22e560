"""Alignment probes: how close a model puts an image's visual tokens to its caption's LLM embeddings.

A probe set is LLaVA-format caption records (image + caption; the offline sets' ``test_captions.json``). For each
item the probe extracts, with no generation:
- ``visual``: the connector's visual tokens ``[M, D]`` (pooled: their mean), the LLM's input side for the image;
- ``text``: the caption's input embeddings ``[T, D]`` (pooled: their mean), the LLM's input side for the words,
  its tokens as training's (a ``</s>`` or ``<image>`` written in it is plain characters, never a control token);
- ``encoder``: the vision tower's features pooled, to see what the connector adds over the raw encoder;
- per LLM layer (where asked): the mean hidden state of the image tokens alone and of the caption alone.
Then every metric of ``alignlm.geometry.suite`` between the two sides (docs/methods.md, metrics).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignlm.config import ConfigError
from alignlm.data.images import load_rgb, preprocess
from alignlm.data.records import DataError, image_names, image_paths, read_records, record_id, reference_captions
from alignlm.data.templates import plain_text_ids
from alignlm.geometry import metrics as M
from alignlm.geometry.suite import KNN_METRICS, pair_metrics


@dataclass
class ProbeSet:
    """Images and one caption each, in file order."""

    ids: list[str]
    images: list[Path]
    captions: list[str]
    _pixels: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    def pixels(self, spec: Any, aspect_ratio: str = "pad") -> Tensor:
        """Preprocessed images ``[n, 3, H, W]`` for a tower's image spec, made square as the probed checkpoint's stage
        made its images (``aspect_ratio``: its ``data.image_aspect_ratio``), decoded once (the monitor reuses them)."""
        key = (spec, aspect_ratio)
        if key not in self._pixels:
            self._pixels[key] = torch.stack([preprocess(load_rgb(p), spec, aspect_ratio) for p in self.images])
        return self._pixels[key]


def load_probe_set(path: str | Path, n: int | None = None, image_root: str | None = None) -> ProbeSet:
    """The first ``n`` records of a caption file that have one image."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    probe = ProbeSet([], [], [])
    for i, rec in enumerate(read_records(path)):
        if n is not None and len(probe.ids) >= n:
            break
        if not isinstance(rec, dict):
            raise DataError(
                f"probe set {path}: record {record_id(rec, path, i)} is a {type(rec).__name__}, not an object"
            )
        if len(image_names(rec)) != 1:  # one path, or a list of one
            continue
        probe.ids.append(record_id(rec, path, i))
        probe.images.append(image_paths(rec, root)[0])
        probe.captions.append(reference_captions(rec)[0])
    if len(probe.ids) < 3:
        raise ValueError(
            f"probe set {path} has {len(probe.ids)} usable image+caption records; the metrics need at least 3"
        )
    return probe


def check_probe_size(pairs: int, topk: int, asked: set[str], key: str, file: str, path: str, n: Any) -> None:
    """The kNN metrics among ``asked`` need ``topk + 2`` probe pairs, counted on the pairs the probe file gave
    (``n`` only caps them): a smaller file failed once its features were measured, naming no setting. ``key``: the
    config node of ``n`` and ``topk`` (``monitor``, ``probe``); ``file``: the key naming the probe file ``path``."""
    knn = sorted(asked & KNN_METRICS)
    if knn and pairs < topk + 2:
        raise ConfigError(
            f"{file}={path} gives {pairs} usable image+caption records ({key}.n={n}), fewer than the {key}.topk + 2 = "
            f"{topk + 2} that the kNN metrics {knn} need: probe a larger file, lower {key}.topk, or leave them out of "
            f"{key}.metrics"
        )


@dataclass
class ProbeFeatures:
    """Both modalities of every probe item, on the CPU in float32."""

    visual_tokens: Tensor  # [n, M, D]
    text_tokens: Tensor  # [n, T, D], short captions padded by repeating their own last token
    text_lengths: Tensor  # [n] each caption's real token count (the A-score averages over those only)
    text_mean: Tensor  # [n, D] mean input embedding of the caption
    encoder: Tensor  # [n, Dv] pooled vision-tower features
    layers: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # layer -> (visual [n, D], text [n, D])

    @property
    def visual_mean(self) -> Tensor:
        return self.visual_tokens.mean(dim=1)


def _pad_by_repeat(rows: list[Tensor]) -> Tensor:
    """Stack ragged ``[t, D]`` rows; repeating a row's last token leaves every max-cosine (A-score) unchanged."""
    length = max(r.shape[0] for r in rows)
    return torch.stack([torch.cat([r, r[-1:].expand(length - r.shape[0], -1)]) for r in rows])


def _layer_means(llm: Any, embeds: Tensor, mask: Tensor, layers: Sequence[int]) -> list[Tensor]:
    """Masked mean of the chosen hidden states (0 = input embeddings) of one LLM pass."""
    hidden = llm.get_decoder()(
        inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True, use_cache=False
    ).hidden_states
    w = mask.unsqueeze(-1).to(embeds.dtype)
    return [((hidden[i] * w).sum(1) / w.sum(1)).float().cpu() for i in layers]


def resolve_layers(model: Any, layers: Any, key: str = "layers") -> list[int]:
    """``layers`` (the config key ``key``) as hidden-state indices: ``all``, a list (negative counts from the top), or
    none.

    An index outside the ``n + 1`` hidden states is refused: wrapped around, layer 99 of a 2-layer LLM was reported as
    layer 0 (``eval --layers``, ``monitor.layers``). So is a bare index, which is not a list (``monitor.layers=-1``
    was a TypeError naming no key): the docs and configs give a list, ``[-1]``."""
    n = int(model.llm.config.num_hidden_layers)
    if layers in (None, "none", [], ()):
        return []
    if layers == "all":
        return list(range(n + 1))
    if (
        isinstance(layers, str)
        or not isinstance(layers, Sequence)
        or any(isinstance(i, bool) or not isinstance(i, int) or not -(n + 1) <= i <= n for i in layers)
    ):
        raise ConfigError(
            f"{key}={layers!r}: this LLM has {n} layers; give 'all' or whole numbers in {-(n + 1)}..{n} as a list "
            "such as [0, -1] (0: the input embeddings, -1: the last layer)"
        )
    return sorted({i % (n + 1) for i in layers})


@torch.no_grad()
def extract(
    model: Any,
    probe: ProbeSet,
    batch_size: int = 32,
    layers: Sequence[int] = (),
    vision_features: Tensor | None = None,
    aspect_ratio: str = "pad",
) -> ProbeFeatures:
    """Run the probe set through vision tower, connector and (for ``layers``) the LLM, in eval mode, its images made
    square as the model's stage made its own (``aspect_ratio``: that stage's ``data.image_aspect_ratio``).

    ``vision_features`` (the tower's output for the whole probe set) skips the tower: the monitor reuses them while
    the tower is frozen, since they cannot change then."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tok, embed = model.tokenizer, model.llm.get_input_embeddings()
    images = probe.pixels(model.image_spec, aspect_ratio)
    visual: list[Tensor] = []
    encoder: list[Tensor] = []
    text_rows: list[Tensor] = []
    text_mean: list[Tensor] = []
    per_layer: dict[int, tuple[list[Tensor], list[Tensor]]] = {i: ([], []) for i in layers}
    for start in range(0, len(probe.ids), batch_size):
        sl = slice(start, start + batch_size)
        feats = model.vision(images[sl].to(device)) if vision_features is None else vision_features[sl].to(device)
        tokens = model.connector(feats).tokens
        encoder.append(feats.float().mean(dim=1).cpu())
        visual.append(tokens.float().cpu())
        ids = [i or [tok.eos_token_id] for i in plain_text_ids(probe.captions[sl], tok)]  # as training reads them
        length = max(len(i) for i in ids)
        id_tensor = torch.tensor([i + [tok.pad_token_id] * (length - len(i)) for i in ids], device=device)
        mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids], device=device)
        words = embed(id_tensor)
        for row, k in zip(words, mask.sum(1).tolist()):
            text_rows.append(row[:k].float().cpu())
        text_mean.append(((words * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)).float().cpu())
        if layers:
            image_mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=device)
            for i, v, t in zip(
                layers,
                _layer_means(model.llm, tokens.to(words.dtype), image_mask, layers),
                _layer_means(model.llm, words, mask, layers),
            ):
                per_layer[i][0].append(v)
                per_layer[i][1].append(t)
    model.train(was_training)
    return ProbeFeatures(
        torch.cat(visual),
        _pad_by_repeat(text_rows),
        torch.tensor([r.shape[0] for r in text_rows]),
        torch.cat(text_mean),
        torch.cat(encoder),
        {i: (torch.cat(v), torch.cat(t)) for i, (v, t) in per_layer.items()},
    )


def probe_metrics(
    feats: ProbeFeatures,
    names: Sequence[str],
    topk: int = 10,
    layer_names: Sequence[str] | None = None,
    encoder: bool = True,
) -> dict[str, Any]:
    """``pooled`` (visual vs caption), ``per_token`` (A-score both ways), ``encoder`` (the vision tower's pooled
    features vs caption, a reference for what the connector adds) and ``layers`` groups."""
    out: dict[str, Any] = {
        "n": int(feats.visual_tokens.shape[0]),
        "pooled": pair_metrics(feats.visual_mean, feats.text_mean, names, topk),
    }
    if "a_score" in names:
        out["per_token"] = {
            "a_score_visual_to_text": M.a_score(feats.visual_tokens, feats.text_tokens),
            "a_score_text_to_visual": M.a_score(feats.text_tokens, feats.visual_tokens, feats.text_lengths),
        }
    if encoder:
        out["encoder"] = pair_metrics(feats.encoder, feats.text_mean, names, topk)
    if feats.layers:
        names_l = list(layer_names or names)
        out["layers"] = {str(i): pair_metrics(v, t, names_l, topk) for i, (v, t) in sorted(feats.layers.items())}
    return out


def gap_shift(
    feats: ProbeFeatures, deltas: Sequence[float], metric: str = "i2t_recall@1", topk: int = 10
) -> list[tuple[float, float]]:
    """Mind the Gap's shift curve on the pooled features, for one metric of ``pair_metrics`` (``topk`` as the
    probe table's)."""

    def measure(a: Tensor, b: Tensor) -> float:
        values = M.retrieval_recall(a, b) if "recall@" in metric else pair_metrics(a, b, [metric], topk)
        if metric not in values:
            raise ValueError(f"gap_shift.metric={metric!r} is not a pooled metric; e.g. i2t_recall@1, mutual_knn, cka")
        return values[metric]

    return M.gap_shift_curve(feats.visual_mean, feats.text_mean, deltas, measure)
