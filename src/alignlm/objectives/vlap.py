"""VLAP: assignment prediction against the LLM vocabulary (docs/methods.md, VLAP; Park et al., ICLR 2024).

Both modalities are softly assigned to the LLM's (frozen, normalised) word embeddings by optimal transport,
and each modality must predict the other's assignment, so image and caption come to "mean" the same words:

    z_v = norm(mean of an image's visual tokens)         z_t = norm(mean input embedding of its caption)
    S_v = z_v @ W.T,  S_t = z_t @ W.T                    W = norm(LLM input embeddings)  [V, Dl]
    Q_v = sinkhorn(S_v), Q_t = sinkhorn(S_t)             no gradient; rows sum to 1, columns toward mu
    L_map = 0.5 * (H(Q_t, softmax(S_v / tau)) + H(Q_v, softmax(S_t / tau)))

``mu`` is a word-frequency prior over the whole vocabulary, counted in ``setup`` from the stage's training
captions (the assistant turns, tokenised with the LLM tokenizer as training tokenises them) and smoothed as
``softmax(log(count + 1) / prior_temperature)``: the ``+ 1`` gives words that never occur a small, finite
share (one part in ``sum (count + 1) ** (1 / prior_temperature)``), so the transport problem stays feasible and
``log(mu)`` finite. Images pair with their own sample's caption (``objectives/pairs.py``); the Sinkhorn runs over
the pairs of the micro-batch on this rank.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from alignlm.config import COUNT, POSITIVE
from alignlm.data.records import assistant_text
from alignlm.data.templates import plain_text_ids
from alignlm.geometry.sinkhorn import sinkhorn
from alignlm.objectives.base import LossTerm, Objective
from alignlm.objectives.pairs import image_caption_pairs, zero_loss

log = logging.getLogger(__name__)


def caption_texts(dataset: Any) -> Iterable[str]:
    """The supervised (assistant) text of every sample of an epoch, in the dataset's mixture proportions (of a
    fractional weight's pool, the first ``take`` records stand for the share an epoch draws)."""
    if not hasattr(dataset, "record"):
        raise TypeError(
            f"VLAP counts its word prior over LLaVA-format records; {type(dataset).__name__} has no record(i)"
        )
    unused = {i for start, stop, take in getattr(dataset, "pools", ()) for i in range(start + take, stop)}
    for i in range(len(dataset)):
        if i in unused:
            continue
        _, rec = dataset.record(i)
        yield assistant_text(rec)


def token_counts(texts: Iterable[str], tokenizer: Any, vocab_size: int, chunk: int = 4096) -> torch.Tensor:
    """How often each vocabulary id occurs in ``texts`` ``[vocab_size]``, tokenised as training tokenises a caption
    (``templates.plain_text_ids``: a ``</s>`` or ``<image>`` written in it is plain characters, not a control token
    that training never supervises)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    texts = list(texts)
    for start in range(0, len(texts), chunk):
        ids = plain_text_ids(texts[start : start + chunk], tokenizer)
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)
        counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
    return torch.from_numpy(counts)


def log_word_prior(counts: torch.Tensor, temperature: float = 0.25) -> torch.Tensor:
    """``log(mu)`` with ``mu = softmax(log(count + 1) / temperature)``, in float64 (some shares are ~1e-20)."""
    if temperature <= 0:
        raise ValueError(f"prior_temperature must be > 0, got {temperature}")
    return torch.log_softmax(torch.log1p(counts.double()) / temperature, dim=0)


def table_rows(weight: torch.Tensor) -> int:
    """The rows of the whole table ``weight``, also where this rank holds a part of it: under DeepSpeed ZeRO-3 a
    partitioned parameter is an empty placeholder outside its module's forward (``ds_shape`` is its shape); a DTensor
    (FSDP2) gives the whole shape as its own."""
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def is_sharded(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is held in parts over the ranks (ZeRO-3's partitioned parameter, FSDP2's DTensor)."""
    return hasattr(weight, "ds_id") or isinstance(weight, DTensor)


@contextlib.contextmanager
def whole(weight: torch.Tensor) -> Iterator[torch.Tensor]:
    """``weight``'s values whole on this rank for the block, detached (read, never written nor differentiated).

    Outside its module's forward a sharded parameter holds this rank's part only: under ZeRO-3 an empty placeholder,
    under FSDP2 a DTensor shard (with ``reshard_after_forward``). Both are gathered here, which is a collective:
    every rank must enter the block together. DeepSpeed is imported only for a parameter it partitioned."""
    if hasattr(weight, "ds_id"):
        import deepspeed  # noqa: PLC0415 - optional dependency, present wherever a parameter carries a ds_id

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            yield weight.detach()
    elif isinstance(weight, DTensor):
        yield weight.detach().full_tensor()
    else:
        yield weight.detach()


def vlap_loss(
    z_v: torch.Tensor,
    z_t: torch.Tensor,
    prototypes: torch.Tensor,
    log_mu: torch.Tensor | None,
    tau: float = 0.01,
    epsilon: float = 0.01,
    iterations: int = 3,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Swapped assignment prediction between two row-aligned, unit-norm batches ``[P, D]`` over ``prototypes`` ``[V, D]``.

    The scores are float32 with autocast off (the trainer runs objectives under autocast): divided by ``tau`` and
    ``epsilon`` of 0.01, a bf16 cosine's rounding (2^-8 near 1) would move a logit and a Sinkhorn exponent by ~0.4."""
    with torch.autocast(z_v.device.type, enabled=False):  # [P, V] cosines each; one pass over the table
        s_v, s_t = (torch.cat([z_v, z_t]).float() @ prototypes.float().T).chunk(2)
    q_v = sinkhorn(s_v.detach(), log_mu, epsilon, iterations)
    q_t = sinkhorn(s_t.detach(), log_mu, epsilon, iterations)
    log_p_v = F.log_softmax(s_v / tau, dim=-1)
    log_p_t = F.log_softmax(s_t / tau, dim=-1)
    loss = -0.5 * ((q_t * log_p_v).sum(-1).mean() + (q_v * log_p_t).sum(-1).mean())
    with torch.no_grad():
        metrics = {
            "assign_agree": (q_v.argmax(-1) == q_t.argmax(-1)).float().mean(),  # same top word for image and caption
            "pred_agree": (log_p_v.argmax(-1) == q_t.argmax(-1)).float().mean(),
        }
    return loss, metrics


class VLAPObjective(Objective):
    """VLAP's assignment-prediction loss; pair it with the LM captioning loss (weights 0.1 and 1)."""

    name = "vlap"
    min_batch_size = 2  # with one pair the transport plan is the prior whatever the scores
    metric_names = ("assign_agree", "pred_agree")  # a micro-batch without pairs measures neither

    def __init__(
        self,
        tau: Annotated[float, POSITIVE] = 0.01,
        epsilon: Annotated[float, POSITIVE] = 0.01,
        iterations: Annotated[int, COUNT] = 3,
        prior_temperature: Annotated[float, POSITIVE] = 0.25,
    ) -> None:
        """Each knob is checked here, at start-up (a negative ``tau`` had trained the loss's opposite, and a NaN or a
        zero made every step non-finite, the run stopping with advice about the learning rate)."""
        super().__init__()
        for key, value in (("tau", tau), ("epsilon", epsilon), ("prior_temperature", prior_temperature)):
            POSITIVE.check(f"vlap {key}", value)
        COUNT.check("vlap iterations", iterations, whole=True)
        self.tau, self.epsilon, self.iterations, self.prior_temperature = tau, epsilon, iterations, prior_temperature
        self.register_buffer("log_mu", None, persistent=False)
        self._prototypes: torch.Tensor | None = None
        self._prototype_key: tuple | None = None

    def setup(self, model: nn.Module, dataset: Any) -> None:
        """Count the word prior over the stage's training captions, with the model's tokenizer and vocabulary."""
        start = time.perf_counter()
        vocab = model.llm.get_input_embeddings().num_embeddings
        counts = token_counts(caption_texts(dataset), model.tokenizer, vocab)
        self.set_prior(counts)
        log.info(
            "VLAP word prior: %d caption tokens, %d distinct of %d, from %d samples in %.1fs",
            int(counts.sum()),
            int((counts > 0).sum()),
            vocab,
            len(dataset),
            time.perf_counter() - start,
        )

    def set_prior(self, counts: torch.Tensor) -> None:
        """Use this per-token count vector (length = the LLM's embedding rows) for ``mu``."""
        self.log_mu = log_word_prior(counts, self.prior_temperature).float()

    def prototypes(self, weight: torch.Tensor) -> torch.Tensor:
        """``norm(W)`` ``[V, Dl]`` of the whole table: a trained table's at every call, a frozen one's (pretraining)
        once, recomputed only when it was replaced or written in place (its version moved: a checkpoint loaded).

        A trained table is never keyed on its version: fused AdamW (the default on CUDA) and DeepSpeed write the
        updated weights in place without moving it, so the prototypes stayed step 1's for the whole stage. A sharded
        table (ZeRO-3, FSDP2) is gathered (``whole``), a collective, so whether to gather is the same on every rank:
        it follows ``requires_grad``, which every rank shares."""
        if weight.requires_grad:
            key = None
        elif is_sharded(weight):
            key = (id(weight), weight.device)
        else:
            key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.device)
        if key is None or self._prototype_key != key:
            with whole(weight) as table:
                self._prototypes = F.normalize(table.float(), dim=-1)
            self._prototype_key = key
        return self._prototypes

    def forward(self, batch: dict[str, Any], out: Any, model: nn.Module) -> LossTerm:
        if self.log_mu is None:
            raise RuntimeError(
                "VLAPObjective needs its word prior: the trainer calls setup(model, dataset) before step 1"
            )
        weight = model.llm.get_input_embeddings().weight
        if table_rows(weight) != self.log_mu.shape[0]:
            raise ValueError(
                f"VLAP prior covers {self.log_mu.shape[0]} words but the LLM has {table_rows(weight)} embedding rows"
            )
        prototypes = self.prototypes(weight)  # before the early return: every rank gathers a sharded table alike
        pairs = image_caption_pairs(batch, out, model)
        if pairs.visual.shape[0] == 0:
            return LossTerm(zero_loss(out))
        loss, metrics = vlap_loss(
            F.normalize(pairs.visual, dim=-1),
            F.normalize(pairs.text, dim=-1),
            prototypes,
            self.log_mu,
            self.tau,
            self.epsilon,
            self.iterations,
        )
        return LossTerm(loss, metrics)
