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

import functools
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignlm.config import ConfigError
from alignlm.data.images import PADDED, ImageReading, decoded_batches, prepared
from alignlm.data.records import DataError, image_names, image_paths, iter_records, record_id, reference_captions
from alignlm.data.templates import plain_text_ids
from alignlm.geometry import metrics as M
from alignlm.geometry.suite import KNN_METRICS, NORMALISING_METRICS, TOKEN_METRICS, pair_metrics


class ProbeImages:
    """A probe's images preprocessed for a tower's image spec, each decoded when read: held whole, a 10k-item probe
    was 13.5 GB of float32 pixels on the host (336 px). :func:`image_batches` reads them batch by batch through loader
    workers; an index gives one image ``[3, H, W]``, a slice a stack of them (a caller that wants them all at once)."""

    def __init__(self, paths: Sequence[Path], spec: Any, reading: ImageReading) -> None:
        self.paths, self.spec, self.reading = list(paths), spec, reading

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int | slice) -> Tensor:
        if isinstance(index, slice):
            return torch.stack([self[i] for i in range(*index.indices(len(self)))])
        return prepared(self.spec, self.reading, self.paths[index])


@dataclass
class ProbeSet:
    """Images and one caption each, in file order."""

    ids: list[str]
    images: list[Path]
    captions: list[str]

    def pixels(self, spec: Any, reading: ImageReading = PADDED) -> ProbeImages:
        """The images for a tower's image spec, read as the probed checkpoint's stage read its images (``reading``:
        its ``data`` node's, ``data.build.image_reading_of``), decoded as they are read."""
        return ProbeImages(self.images, spec, reading)


def image_batches(images: ProbeImages, batch_size: int, device: torch.device, num_workers: int = 0) -> Iterator[Tensor]:
    """``images`` in order, ``batch_size`` at a time on ``device``: the host holds the batches in flight, not the set.
    ``num_workers`` processes decode them ahead (``data.images.decoded_batches``, into pinned memory on CUDA); the
    caller picks the count (``loader_workers``). An image that cannot be read stops the probe, naming it."""
    cuda = device.type == "cuda"
    prepare = functools.partial(prepared, images.spec, images.reading)
    for batch in decoded_batches(images.paths, prepare, batch_size, device, num_workers, raise_unreadable=True):
        yield batch.items.to(device, non_blocking=cuda)


def load_probe_set(path: str | Path, n: int | None = None, image_root: str | None = None) -> ProbeSet:
    """The first ``n`` records of a caption file that have one image."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    probe = ProbeSet([], [], [])
    for i, rec in enumerate(iter_records(path)):
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


# Song et al.'s unbiased HSIC, which these compute, divides by n - 3: it needs 4 items
UNBIASED_HSIC_METRICS = {"unbiased_cka", "cknna"}
UNBIASED_HSIC_ITEMS = 4


def needs_tokens(names: Collection[str]) -> bool:
    """Whether a metric among ``names`` reads every item's tokens (the A-score), not only their means: ``extract``
    measures it batch by batch only then, from tokens it never keeps (LLaVA-1.5-7B: 640 x 4096 an item)."""
    return any(name in TOKEN_METRICS for name in names)


def check_probe_metrics(asked: Collection[str], topk: int, n: int | None, key: str) -> None:
    """Settings the ``asked`` metrics cannot measure with, refused from the config alone, before a model is built:
    cknna needs ``topk >= 2``, and the unbiased HSIC (unbiased_cka, cknna) ``n >= 4`` (``n`` null: the whole file,
    which ``check_probe_size`` counts). The metrics raised either only once measured: after every answer was
    generated (eval), at the monitor's first measurement (a training run stopped at step 1). ``key``: the config node
    of ``n`` and ``topk`` (``monitor``, ``probe``)."""
    if "cknna" in asked and topk < 2:
        raise ConfigError(
            f"{key}.topk={topk}: cknna needs {key}.topk >= 2; raise it, or leave cknna out of {key}.metrics and "
            f"{key}.layer_metrics"
        )
    hsic = sorted(set(asked) & UNBIASED_HSIC_METRICS)
    if hsic and n is not None and n < UNBIASED_HSIC_ITEMS:
        raise ConfigError(
            f"{key}.n={n} is fewer than the {UNBIASED_HSIC_ITEMS} probe pairs that {hsic} need (their unbiased HSIC "
            f"divides by n - 3): raise {key}.n, or leave them out of {key}.metrics and {key}.layer_metrics"
        )


def check_probe_size(pairs: int, topk: int, asked: set[str], key: str, file: str, path: str, n: Any) -> None:
    """The kNN metrics among ``asked`` need ``topk + 2`` probe pairs, the unbiased HSIC ones 4, counted on the pairs
    the probe file gave (``n`` only caps them): a smaller file failed once its features were measured, naming no
    setting. ``key``: the config node of ``n`` and ``topk`` (``monitor``, ``probe``); ``file``: the key naming the
    probe file ``path``. The settings themselves are checked too (``check_probe_metrics``): the monitor is also built
    from a config no check has seen."""
    check_probe_metrics(asked, topk, None, key)
    knn = sorted(asked & KNN_METRICS)
    if knn and pairs < topk + 2:
        raise ConfigError(
            f"{file}={path} gives {pairs} usable image+caption records ({key}.n={n}), fewer than the {key}.topk + 2 = "
            f"{topk + 2} that the kNN metrics {knn} need: probe a larger file, lower {key}.topk, or leave them out of "
            f"{key}.metrics"
        )
    hsic = sorted(asked & UNBIASED_HSIC_METRICS)
    if hsic and pairs < UNBIASED_HSIC_ITEMS:
        raise ConfigError(
            f"{file}={path} gives {pairs} usable image+caption records ({key}.n={n}), fewer than the "
            f"{UNBIASED_HSIC_ITEMS} that {hsic} need (their unbiased HSIC divides by n - 3): probe a larger file, or "
            f"leave them out of {key}.metrics"
        )


@dataclass
class ProbeFeatures:
    """Both modalities of every probe item, on the model's device, where the metrics run: only their numbers go to the
    host (``.cpu()`` what is kept, as the report's features). The pooled features in float32; where asked
    (``extract(tokens=True)``), each item's A-score both ways in float64, measured batch by batch as the tokens
    came, so the tokens themselves are never kept (a bfloat16 7B model's were 5 MiB an item, copied to the host)."""

    visual_mean: Tensor  # [n, D] mean visual token
    text_mean: Tensor  # [n, D] mean input embedding of the caption
    text_lengths: Tensor  # [n] each caption's real token count (the A-score averages over those only), on the CPU
    encoder: Tensor  # [n, Dv] pooled vision-tower features
    a_scores: tuple[Tensor, Tensor] | None = None  # ([n] visual -> text, [n] text -> visual); None unless asked
    layers: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # layer -> (visual [n, D], text [n, D])


def _repeat_last(words: Tensor, lengths: Tensor, length: int) -> Tensor:
    """``words [b, t, D]`` as ``[b, length, D]``, each row past its ``lengths`` filled with its own last real token:
    that leaves every max-cosine (A-score) unchanged."""
    positions = torch.minimum(torch.arange(length, device=words.device), (lengths - 1)[:, None])
    return words.gather(1, positions[..., None].expand(-1, -1, words.shape[-1]))


def _layer_means(llm: Any, embeds: Tensor, mask: Tensor, layers: Sequence[int]) -> list[Tensor]:
    """Masked mean of the chosen hidden states (0 = input embeddings) of one LLM pass."""
    hidden = llm.get_decoder()(
        inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True, use_cache=False
    ).hidden_states
    w = mask.unsqueeze(-1).to(embeds.dtype)
    return [((hidden[i] * w).sum(1) / w.sum(1)).float() for i in layers]


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
    reading: ImageReading = PADDED,
    tokens: bool = False,
    num_workers: int = 0,
) -> ProbeFeatures:
    """Run the probe set through vision tower, connector and (for ``layers``) the LLM, in eval mode, its images read as
    the model's stage read its own (``reading``: that stage's ``data`` node's), decoded batch by batch
    (``image_batches``, ``num_workers`` processes ahead).

    ``vision_features`` (the tower's output for the whole probe set) skips the tower and the images: the monitor
    reuses them while the tower is frozen, since they cannot change then. ``tokens``: measure each item's A-score
    from its visual and caption tokens (``needs_tokens``) on the device, batch by batch. Everything stays on the
    model's device: features sent to the host per batch left the metrics to the CPU in float64 while the GPU
    waited."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tok, embed = model.tokenizer, model.llm.get_input_embeddings()
    n = len(probe.ids)
    all_ids = [i or [tok.eos_token_id] for i in plain_text_ids(probe.captions, tok)]  # as training reads them
    text_lengths = torch.tensor([len(i) for i in all_ids])
    if vision_features is None:
        towers = (
            model.vision(pixels)
            for pixels in image_batches(probe.pixels(model.image_spec, reading), batch_size, device, num_workers)
        )
    else:
        towers = (vision_features[i : i + batch_size].to(device) for i in range(0, n, batch_size))
    visual_mean: list[Tensor] = []
    encoder: list[Tensor] = []
    text_mean: list[Tensor] = []
    scores: tuple[list[Tensor], list[Tensor]] = ([], [])
    per_layer: dict[int, tuple[list[Tensor], list[Tensor]]] = {i: ([], []) for i in layers}
    for start, feats in zip(range(0, n, batch_size), towers):
        sl = slice(start, start + batch_size)
        visual = model.connect(feats).tokens
        encoder.append(feats.float().mean(dim=1))
        visual_mean.append(visual.float().mean(dim=1))
        ids = all_ids[sl]
        length = max(len(i) for i in ids)
        id_tensor = torch.tensor([i + [tok.pad_token_id] * (length - len(i)) for i in ids], device=device)
        mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids], device=device)
        words = embed(id_tensor)
        # summed in fp32, as the visual tokens are: in a bf16 LLM's dtype the mean was 2e-3 off, moving metrics by 3e-5
        text_mean.append((words.float() * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True))
        if tokens:
            captions = _repeat_last(words, text_lengths[sl].to(device), length)
            scores[0].append(_a_scores(visual, captions))
            scores[1].append(_a_scores(captions, visual, text_lengths[sl]))
        if layers:
            image_mask = torch.ones(visual.shape[:2], dtype=torch.long, device=device)
            for i, v, t in zip(
                layers,
                _layer_means(model.llm, visual.to(words.dtype), image_mask, layers),
                _layer_means(model.llm, words, mask, layers),
            ):
                per_layer[i][0].append(v)
                per_layer[i][1].append(t)
    model.train(was_training)
    return ProbeFeatures(
        torch.cat(visual_mean),
        torch.cat(text_mean),
        text_lengths,
        torch.cat(encoder),
        (torch.cat(scores[0]), torch.cat(scores[1])) if tokens else None,
        {i: (torch.cat(v), torch.cat(t)) for i, (v, t) in per_layer.items()},
    )


# elements of one side's tokens the A-score takes at a time: it measures its inputs whole in float64
_A_SCORE_ELEMENTS = 2**25


def _a_scores(query: Tensor, reference: Tensor, lengths: Tensor | None = None) -> Tensor:
    """``M.a_scores`` of one batch's items ``[b]``, by groups of items, on the tokens' device: taken whole, it held
    float64 copies of all their tokens at once. Tokens that are not finite give nan, for the items of their group:
    the metrics refuse those items' pooled features too, and the monitor skips such a measurement (a connector's
    fp16 overflow must not end a training run)."""
    n = query.shape[0]
    rows = max(1, _A_SCORE_ELEMENTS // (max(query.shape[1], reference.shape[1]) * query.shape[2]))
    parts = []
    for start in range(0, n, rows):
        q, r = query[start : start + rows], reference[start : start + rows]
        if bool(torch.isfinite(q).all() & torch.isfinite(r).all()):
            parts.append(M.a_scores(q, r, None if lengths is None else lengths[start : start + rows]))
        else:
            parts.append(torch.full((len(q),), float("nan"), dtype=torch.float64, device=q.device))
    return torch.cat(parts)


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
        "n": int(feats.visual_mean.shape[0]),
        "pooled": pair_metrics(feats.visual_mean, feats.text_mean, names, topk),
    }
    if "a_score" in names:
        if feats.a_scores is None:
            raise ValueError(
                "a_score reads every item's tokens, which these features did not measure: extract them with "
                "tokens=needs_tokens(metrics)"
            )
        bad = int(sum((~torch.isfinite(s)).sum() for s in feats.a_scores))
        if bad:
            raise ValueError(f"a_score: {bad} of the probe items' A-scores are nan, from tokens that are not finite")
        out["per_token"] = {
            "a_score_visual_to_text": feats.a_scores[0].mean().item(),
            "a_score_text_to_visual": feats.a_scores[1].mean().item(),
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
    probe table's). A metric that clamps outliers before normalising (``metrics.prepare_features``: the kNN
    metrics, CKA, SVCCA) has the features clamped and normalised once, then shifted on the sphere and measured as
    they are, so the curve at delta 0 is the table's value: shifted from the rows merely normalised and clamped
    after, it was not (mutual kNN 0.1273 against the table's 0.1328, CKNNA 0.117 against 0.100)."""
    retrieval = "recall@" in metric

    def measure(a: Tensor, b: Tensor) -> float:
        values = M.retrieval_recall(a, b) if retrieval else pair_metrics(a, b, [metric], topk, preprocess=False)
        if metric not in values:
            raise ValueError(f"gap_shift.metric={metric!r} is not a pooled metric; e.g. i2t_recall@1, mutual_knn, cka")
        return values[metric]

    image, text = feats.visual_mean, feats.text_mean
    if not retrieval and metric not in NORMALISING_METRICS:
        image, text = M.prepare_features(image), M.prepare_features(text)
    return M.gap_shift_curve(image, text, deltas, measure)
