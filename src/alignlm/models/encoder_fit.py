"""Fitting the offline dual encoder's two linear heads: symmetric InfoNCE on precomputed frozen features.

No CLIP weights can be had offline, but methods that score image-text pairs or embed captions need a dual encoder
with a real modality gap. Only the heads ``1280 -> dim`` and ``384 -> dim`` and the temperature train, so fitting
precomputes the frozen features once and fits the heads in seconds. ``alignlm dual-encoder fit`` (and the prepare
steps of the recipes that need an encoder) train on LLaVA caption records and write a folder
(``heads.safetensors`` + ``dual_encoder.json``) that ``load_encoder`` reads. Held-out evaluation reports the modality
gap and image->text / text->image recall@k, where a hit is any gallery item with the same caption text (the offline
sets repeat captions), next to the exact chance level of that protocol.

The manifest also records how the folder was fitted (``provenance``: the knobs that make one variant of the heads and
digests of the training data), so a prepare step that names the folder with ``fit`` knobs tells a current encoder from
one fitted another way or on data regenerated since (``methods/provenance.py: ensure_fitted_encoder``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from alignlm.config import COUNT, POSITIVE, Bounds, check_bounds
from alignlm.data.feature_cache import file_stamp
from alignlm.data.images import load_rgb
from alignlm.data.records import MISSING_IMAGE, DataError, image_paths, iter_records, record_caption
from alignlm.files import file_sha256, replace_text
from alignlm.geometry.metrics import TIE, modality_gap
from alignlm.models.device import default_device
from alignlm.models.encoders import MANIFEST, OfflineDualEncoder

PROVENANCE = "provenance"  # the manifest's record of how the heads were fitted (the key prepare steps' files use too)
TEMPERATURE = Bounds(0, 1, low_open=True)  # a fixed InfoNCE temperature (the flag, the prepare steps' knob)
FIT_KNOBS = ("dim", "image_size", "epochs", "batch_size", "lr", "limit", "name", "seed", "temperature")


def info_nce(img: Tensor, txt: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE (CLIP): cross-entropy of image->text and text->image similarities, averaged."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def fit_heads(
    model: OfflineDualEncoder,
    img_feats: Tensor,
    txt_feats: Tensor,
    *,
    epochs: int = 40,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    temperature: float | None = None,
) -> list[float]:
    """Train the heads (and the temperature, unless ``temperature`` fixes it) on precomputed frozen features.

    Returns the mean loss per epoch. Why fix the temperature: the randomly initialised heads start with a wide
    modality gap (the cone effect, about 1.15 here), and a low fixed temperature keeps it while the heads learn to
    retrieve, as in CLIP (Liang et al. 2022); a learnt one, starting at 0.07, lets training close most of it.
    """
    if batch_size < 2 or len(img_feats) < 2:  # a batch of one pair has nothing to contrast: it is skipped
        raise ValueError(
            f"dual-encoder fit needs batch_size >= 2 and at least 2 pairs, got batch_size={batch_size} and "
            f"{len(img_feats)} pairs (with none trained, the heads stayed random and the loss read 0.0)"
        )
    params = [*model.image_head.parameters(), *model.text_head.parameters()]
    if temperature is None:
        params.append(model.logit_scale)
    else:
        TEMPERATURE.check("dual-encoder temperature", temperature, note=" (or null: learnt)")
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / temperature))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # the batches trained: a last batch of one pair is skipped, and a schedule sized with it ended at a quarter of lr
    steps = epochs * (len(img_feats) // batch_size + (len(img_feats) % batch_size >= 2))
    # a tenth warms up; torch's one-cycle divides by zero where that tenth ends at step 1 exactly (of 10 steps, the
    # only length where it does): there, 1.5 steps
    warmup = 0.15 if steps == 10 else 0.1
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=warmup)
    g = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        order, losses = torch.randperm(len(img_feats), generator=g), []
        for batch, rows in enumerate(order.split(batch_size)):
            if len(rows) < 2:
                continue
            loss = info_nce(model.image_head(img_feats[rows]), model.text_head(txt_feats[rows]), model.logit_scale)
            if not torch.isfinite(loss):  # the heads and report of a diverged fit had been saved, NaN and all
                raise ValueError(
                    f"dual-encoder fit: the loss of epoch {epoch + 1}, batch {batch + 1} is {loss.item()}; nothing "
                    f"was saved: lower lr (it is {lr:g}) or check the features"
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        history.append(sum(losses) / len(losses))  # the first batch has min(batch_size, pairs) >= 2 rows
    return history


# -------------------------------------------------------------------------------------------- evaluation


def grouped_recall(img: Tensor, txt: Tensor, groups: Sequence[Any], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Retrieval recall@k where a hit is any gallery item of the query's group (same caption text).

    Also returns the exact chance level of each score: for a query with ``m`` correct items among ``n``, a
    random ranking hits within ``k`` with probability ``1 - C(n - m, k) / C(n, k)``. Where ``k >= n`` (a held-out set
    of fewer than 5 pairs) the top ``k`` hold the whole gallery: recall and chance are both 1, reported rather than
    left out so every report has the same keys (``C(n, k)`` was 0 there, a ZeroDivisionError).
    """
    ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    label = torch.tensor([ids[g] for g in groups])
    same = label[:, None] == label[None, :]
    sim = F.normalize(img.double(), dim=-1) @ F.normalize(txt.double(), dim=-1).T
    n, m = len(label), same.sum(1)
    out = {}
    for direction, scores in (("i2t", sim), ("t2i", sim.T)):
        best = scores.masked_fill(~same, -math.inf).amax(1)[:, None]
        tied = (scores >= best - TIE) & (scores <= best + TIE)
        above = ((scores > best + TIE) & ~same).sum(1)
        wrong, right = (tied & ~same).sum(1), (tied & same).sum(1)  # right >= 1: the best right item itself
        for k in ks:
            out[f"{direction}_recall@{k}"] = _tied_hit_chance(above, wrong, right, k).mean().item()
    for k in ks:
        if k >= n:
            out[f"chance@{k}"] = 1.0
            continue
        chance = [1 - math.comb(n - int(mi), k) / math.comb(n, k) for mi in m]
        out[f"chance@{k}"] = sum(chance) / n
    return out


def _tied_hit_chance(above: Tensor, wrong: Tensor, right: Tensor, k: int) -> Tensor:
    """Each query's chance of a right item within its top ``k`` when ties are broken uniformly at random, as
    ``geometry.metrics.retrieval_recall`` counts them: ``above`` wrong items score clearly higher than its best right
    one, and ``wrong`` + ``right`` items score within ``TIE`` of it. The first ``s = k - above`` places (at most the
    tied group) go to tied items at random, so it misses with probability ``C(wrong, s) / C(wrong + right, s)``.
    Counting a tie as a miss had scored collapsed heads 0 under their chance, and a perfect model 0 where a text's
    image file was repeated (a caption set with several captions per image); breaking it by index had scored them
    1."""
    slots = torch.minimum((k - above).clamp(min=0), wrong + right)
    miss = torch.ones(len(above), dtype=torch.float64)
    for j in range(k):  # C(w, s) / C(w + r, s) as the product of (w - j) / (w + r - j) over j < s
        factor = (wrong - j).clamp(min=0).double() / (wrong + right - j).clamp(min=1).double()
        miss = torch.where(slots > j, miss * factor, miss)
    return 1 - miss


def _pairs(
    paths: Sequence[str | Path], limit: int | None = None, image_root: str | Path | None = None
) -> tuple[list[Path], list[str]]:
    """Image paths and captions of LLaVA caption records, in order; image paths are under ``image_root`` (by default
    each file's folder), as every reader of records takes them. A record with an image and no caption text is
    left out: it had been paired with an empty text, which the contrastive fit then matched to its image."""
    images, texts = [], []
    for path in map(Path, paths):
        root = Path(image_root) if image_root else path.parent
        for rec in iter_records(path):
            try:
                paths_of = image_paths(rec, root)
            except DataError as e:
                raise DataError(f"{path}: {e}", e.cause) from e
            caption = record_caption(rec)
            if paths_of and caption:
                images.append(paths_of[0])
                texts.append(caption)
    return images[:limit], texts[:limit]


def _check_pairs(what: str, images: list[Path], least: int) -> None:
    """At least ``least`` pairs, every image a file, checked before the towers load (a missing image failed after
    them, mid-way through the frozen features)."""
    if len(images) < least:
        raise DataError(
            f"dual-encoder {what} gives {len(images)} caption pairs with an image; it needs at least {least}"
        )
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise DataError(
            f"dual-encoder {what}: {len(missing)} images are not files, the first {str(missing[0])!r} "
            "(name the folder the paths are relative to with image_root / --image-root)",
            MISSING_IMAGE,
        )


def _features(
    model: OfflineDualEncoder, images: list[Path], texts: list[str], batch_size: int = 64
) -> tuple[Tensor, Tensor]:
    img, txt = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="frozen features", unit="batch"):
        img.append(model.image_features([load_rgb(p) for p in images[start : start + batch_size]]))
        txt.append(model.text_features(texts[start : start + batch_size]))
    return torch.cat(img), torch.cat(txt)  # ordinary tensors (made outside inference mode): heads train on them


@torch.no_grad()
def evaluate(model: OfflineDualEncoder, img_feats: Tensor, txt_feats: Tensor, captions: list[str]) -> dict[str, float]:
    """Modality gap and grouped recall of held-out pairs."""
    img, txt = model.image_head(img_feats).cpu(), model.text_head(txt_feats).cpu()
    return {"n": len(captions), "modality_gap": modality_gap(img, txt), **grouped_recall(img, txt, captions)}


# -------------------------------------------------------------------------------------------- provenance


def fit_knobs(fit: Mapping[str, Any]) -> dict[str, Any]:
    """The knobs of ``fit`` (``fit_encoder``'s keyword arguments, ``train`` among them) that make one variant of the
    heads, with ``fit_encoder``'s defaults where ``fit`` leaves one out, so a knob spelled out at its default is the
    same variant. A key ``fit_encoder`` does not take is a TypeError naming it. Not knobs: the training data (an input,
    :func:`fit_inputs`), the held-out sets (they only measure), the device and the image root (where, not what)."""
    bound = inspect.signature(fit_encoder).bind(out=None, **fit)
    bound.apply_defaults()
    return {knob: bound.arguments[knob] for knob in FIT_KNOBS}


def _digest(parts: list[Any]) -> str:
    """One digest of a JSON list (unambiguous: no two lists encode alike)."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _inputs(train: Sequence[str | Path], images: Sequence[Path]) -> dict[str, str]:
    """:func:`fit_inputs` of training files whose pairs' images are already read."""
    return {
        "train": _digest([file_sha256(Path(p)) for p in train]),
        "images": _digest([file_stamp(p) for p in images]),
    }


def fit_inputs(
    train: Sequence[str | Path], limit: int | None = None, image_root: str | Path | None = None
) -> dict[str, str]:
    """Digests of what a fit reads: the training files' bytes (not their paths: a moved data folder still matches)
    and the size and modification time of each trained pair's image (a stat, as the feature cache stamps them), so
    data regenerated in place under the same names (another generator seed) is another input."""
    return _inputs(train, _pairs(train, limit, image_root)[0])


def fitted_provenance(folder: str | Path) -> dict[str, Any] | None:
    """How the encoder in ``folder`` was fitted, as its manifest records it: ``{"knobs": ..., "inputs": ...}``;
    None for a folder fitted before manifests recorded it."""
    return json.loads((Path(folder) / MANIFEST).read_text()).get(PROVENANCE)


def _save(model: OfflineDualEncoder, out: str | Path, report: dict[str, Any], record: dict[str, Any]) -> None:
    """The folder with ``record`` (knobs and inputs) added to its manifest after the heads are written: a fit killed
    in between leaves whole heads in a folder that records nothing of its fit, which a prepare step uses as it is once
    the knobs its manifest gives match (as a folder fitted before folders recorded their fit)."""
    model.save(out, report)
    manifest = Path(out) / MANIFEST
    replace_text(manifest, json.dumps({**json.loads(manifest.read_text()), PROVENANCE: record}, indent=2))


# -------------------------------------------------------------------------------------------- fit


def fit_encoder(
    train: Sequence[str | Path],
    out: str | Path,
    *,
    held_out: Sequence[str | Path] = (),
    dim: Annotated[int, COUNT] = 256,
    image_size: Annotated[int, COUNT] = 224,
    epochs: Annotated[int, COUNT] = 40,
    batch_size: Annotated[int, Bounds(2)] = 256,
    lr: Annotated[float, POSITIVE] = 1e-3,
    limit: Annotated[int | None, COUNT] = None,
    name: str = "alignlm-lit-effnet-minilm",
    seed: int = 0,
    device: str | None = None,
    temperature: Annotated[float | None, TEMPERATURE] = None,
    image_root: str | Path | None = None,
) -> dict[str, Any]:
    """Fit the heads on caption records, report held-out gap and recall, and write the folder; returns the report.

    The one entry point of ``alignlm dual-encoder fit`` and of the prepare steps that fit an encoder when missing or
    stale.
    ``image_root``: the folder every file's image paths are relative to (by default each file's own folder). The
    records are read and their images checked before the towers load; the fitted heads are written before the
    held-out evaluation, which then writes the folder again with its figures (a failing evaluation lost the fit).
    The manifest records the knobs and the digests of the training data (:func:`fit_knobs`, :func:`fit_inputs`),
    taken before the fit reads them.
    """
    knobs = {"dim": dim, "image_size": image_size, "epochs": epochs, "batch_size": batch_size, "lr": lr}
    knobs |= {"limit": limit, "name": name, "seed": seed, "temperature": temperature}
    # before the towers load: dim=0 fitted a chance-level encoder and exited 0, epochs=0 failed after the frozen
    # features were computed, batch_size=1 (InfoNCE contrasts a pair with the rest of its batch) skipped every batch
    check_bounds(fit_encoder, knobs, "dual-encoder ")
    images, texts = _pairs(train, limit, image_root)
    _check_pairs(f"train={[str(p) for p in train]}" + f" (limit={limit})" * (limit is not None), images, 2)
    record = {"knobs": knobs, "inputs": _inputs(train, images)}
    pairs = {str(p): _pairs([p], image_root=image_root) for p in held_out}
    for path, (held_images, _) in pairs.items():
        _check_pairs(f"held_out file {path}", held_images, 1)
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = OfflineDualEncoder(dim, image_size, name, device=device or default_device())
    train_feats = _features(model, images, texts)
    pair_feats = {p: _features(model, *pairs[p]) for p in pairs}
    history = fit_heads(
        model, *train_feats, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, temperature=temperature
    )
    report: dict[str, Any] = {
        "train_pairs": len(images),
        "loss_first_epoch": history[0],
        "loss_last_epoch": history[-1],
        "temperature": 1 / min(model.logit_scale.exp().item(), 100.0),
        "temperature_learnt": temperature is None,
    }
    _save(model, out, {**report, "seconds": round(time.perf_counter() - start, 1)}, record)
    for path, feats in pair_feats.items():
        report[path] = evaluate(model, *feats, pairs[path][1])
    report["seconds"] = round(time.perf_counter() - start, 1)
    _save(model, out, report, record)
    return report
