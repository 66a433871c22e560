"""SEA, supervised embedding alignment at token level (docs/methods.md, SEA): pull each visual token, as the
connector outputs it, toward the LLM input embedding of a word that describes its patch.

Per step, one label per token is sampled from its top-k candidates with ``softmax(score / t_sample)``; the
classes are the *distinct* sampled labels of the batch, so the same word twice is never its own negative;
``L_sea = CE(norm(V) @ norm(T_U).T / tau)``. Word embeddings ``T_w`` are the mean of the LLM's input-embedding
rows of the word's sub-tokens, taken once in ``setup`` and frozen, so the loss trains the connector only (SEA aligns
during pretraining, the LLM frozen); a stage that trains the table, which they would not follow, is refused by the
config check before any stage trains (``input_embedding_copy``).
The batch carries ``sea_words`` / ``sea_scores`` ``[n_images, M, k]`` (word id -1 = no candidate), laid out on
the visual tokens by SEA's data hook (``data.hooks.sea``, ``methods/sea/hook.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from alignlm.config import COUNT, POSITIVE
from alignlm.methods.sea.hook import SeaLabelHook
from alignlm.objectives.base import LossTerm, Objective


def word_embeddings(model: nn.Module, words: Sequence[str], prefix: str = " ") -> torch.Tensor:
    """``[W, Dl]`` float32: per word, the mean input-embedding row of the sub-tokens of ``prefix + word``.

    ``prefix`` " " embeds the word as it appears inside running text (" red", not "red", for BPE vocabularies).
    """
    table = model.llm.get_input_embeddings().weight.detach().float()
    rows = []
    for word in words:
        ids = model.tokenizer(prefix + word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"SEA word {word!r} tokenizes to nothing with prefix {prefix!r}")
        rows.append(table[torch.tensor(ids, device=table.device)].mean(0))
    return torch.stack(rows)


def sample_labels(words: torch.Tensor, scores: torch.Tensor, t_sample: float) -> torch.Tensor:
    """One word id per row of candidates ``[T, k]`` drawn with ``softmax(score / t_sample)``; -1 for rows with none."""
    valid = words >= 0
    has = valid.any(-1)
    scores = scores.float().masked_fill(~valid, float("-inf"))
    top = scores.amax(-1, keepdim=True).masked_fill(~has[:, None], 0.0)
    logits = (scores - top) / t_sample  # the best candidate at 0 first: a large score over t_sample overflowed to inf
    probs = torch.softmax(logits.masked_fill(~has[:, None], 0.0), dim=-1)  # unlabelled rows: any pick, dropped below
    pick = torch.multinomial(probs, 1)
    return torch.where(has, words.gather(-1, pick).squeeze(-1), -1)


def sea_logits(visual: torch.Tensor, labels: torch.Tensor, word_emb: torch.Tensor, tau: float) -> torch.Tensor:
    """Logits ``[T, W]`` of every token over the label words, where only the batch's distinct labels are classes.

    ``visual [T, D]``, ``labels [T]`` (-1 = ignored), ``word_emb [W, D]``. A word no token of the batch drew gets the
    lowest float instead of a logit, so it weighs nothing in the softmax; a word drawn twice is one class, never its
    own negative. Keeping every token and every word (rather than selecting the labelled tokens and the distinct
    labels) gives shapes that do not depend on the data, which a GPU can run without a wait for the host; the price
    is ``[T, W]`` logits over the whole word list (W in the tens for annotations, thousands for a dual encoder's).
    Float32 even under autocast: at ``tau`` 0.07 the logits span +-14, where bf16 keeps two decimals.
    """
    # the last entry catches the ignored tokens; a fill by index (``drawn[i] = True`` would make a tensor of the value)
    drawn = torch.zeros(word_emb.shape[0] + 1, dtype=torch.bool, device=labels.device)
    drawn.index_fill_(0, torch.where(labels >= 0, labels, word_emb.shape[0]), True)
    with torch.autocast(visual.device.type, enabled=False):
        logits = F.normalize(visual.float(), dim=-1) @ F.normalize(word_emb.float(), dim=-1).T / tau
    return logits.masked_fill(~drawn[:-1], torch.finfo(logits.dtype).min)


def sea_loss(
    visual: torch.Tensor, labels: torch.Tensor, word_emb: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_sea``, the mean cross-entropy over the labelled tokens (0 when none is), and their accuracy."""
    logits = sea_logits(visual, labels, word_emb, tau)
    keep = labels >= 0
    count = keep.sum().clamp(min=1)
    loss = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") / count
    acc = ((logits.argmax(-1) == labels) & keep).sum() / count
    return loss, acc


class SEAObjective(Objective):
    """Token-level contrastive alignment of connector outputs to label-word embeddings; logs in-batch accuracy."""

    name = "sea"
    requires_batch_keys = ("sea_words", "sea_scores")
    needs_hooks = (SeaLabelHook,)  # the labels: a labels file from alignlm sea-labels or the sea_labels prepare step
    metric_names = ("acc",)
    # what of the LLM's input embedding table it copies once: the config check (checks.py) refuses a stage of this
    # objective that trains the table, which the copy would not follow
    input_embedding_copy = (
        "its label words' embeddings, the table's rows taken when the stage starts (the targets it pulls the visual "
        "tokens to, which would stay the table's as it was)"
    )

    def __init__(
        self,
        k: Annotated[int, COUNT] = 5,
        t_sample: Annotated[float, POSITIVE] = 0.1,
        tau: Annotated[float, POSITIVE] = 0.07,
        word_prefix: str = " ",
    ) -> None:
        super().__init__()
        COUNT.check("objective sea: k", k, whole=True)
        for key, value in (("t_sample", t_sample), ("tau", tau)):
            POSITIVE.check(f"objective sea: {key}", value)
        self.k, self.t_sample, self.tau, self.word_prefix = int(k), float(t_sample), float(tau), word_prefix
        self.words: list[str] = []
        self.register_buffer("word_emb", torch.empty(0), persistent=False)

    def setup(self, model: nn.Module, dataset: Any) -> None:
        hook = next((h for h in getattr(dataset, "hooks", ()) if isinstance(h, SeaLabelHook)), None)
        if hook is None:
            raise ValueError(
                "objective sea needs per-patch word labels: add the data hook stage.data.hooks.sea "
                "(a labels file from alignlm sea-labels, or the sea_labels prepare step; see configs/exp/sea.yaml)"
            )
        self.set_words(model, hook.labels.words)

    def set_words(self, model: nn.Module, words: Sequence[str]) -> None:
        """Freeze the word embeddings of the label vocabulary (label ids index this list)."""
        self.words = list(words)
        self.word_emb = word_embeddings(model, self.words, self.word_prefix)

    def forward(self, batch: dict[str, Any], out: Any, model: nn.Module) -> LossTerm:
        if not self.words:
            raise RuntimeError("objective sea: setup(model, dataset) must run before the first step")
        visual = out.visual_tokens
        words, scores = batch["sea_words"][..., : self.k], batch["sea_scores"][..., : self.k]
        zero = 0.0 * visual.sum()  # keeps the graph (and data-parallel ranks) in step when nothing is labelled
        if words.shape[0] == 0 or batch.get("sea_labelled") == 0:  # the hook's host-side count: no image labelled
            return LossTerm(zero)  # no label word measured: left out of the step's mean, not counted as 0 (it was)
        if words.shape[:2] != visual.shape[:2]:
            raise ValueError(
                f"sea_words cover {tuple(words.shape[:2])} (images, tokens) but the connector gave "
                f"{tuple(visual.shape[:2])}"
            )
        labels = sample_labels(words.flatten(0, 1), scores.flatten(0, 1), self.t_sample)
        loss, acc = sea_loss(visual.flatten(0, 1), labels, self.word_emb, self.tau)
        return LossTerm(loss + zero, {"acc": acc.detach().float()})
