"""The V2L connector: every visual token is one of the frozen LLM's own word embeddings.

V2L (Zhu et al. 2024, "Beyond Text: Frozen Large Language Models in Visual Signal Comprehension") quantises an image
onto the LLM's vocabulary, so a frozen LLM reads an image as a sequence of real words and the tokens can be printed.
Here an encoder (``Linear -> GELU -> Linear``, as ``mlp2x_gelu``) maps each patch feature to the LLM's width and the
nearest codebook row by cosine becomes the token; a projection of the mean-pooled feature picks ``global_tokens``
distinct words for the whole image, placed before the local ones (the paper's global and local tokens).

The codebook is the LLM's input embedding table as built (a copy kept out of checkpoints; the table must stay frozen
for the tokens to stay its words: the config check refuses, before any stage trains, a stage that trains it, by this
connector's ``input_embedding_copy``), restricted by ``codebook``: ``words`` keeps the vocabulary entries that decode
to a space and letters (" red", " circle"), which is what makes the tokens readable; ``all`` keeps every non-special
entry. Gradients reach the encoder by the straight-through estimator: the forward value is exactly the chosen word's
embedding, the backward pass treats it as the encoder's output rescaled to that word's norm. Three auxiliary losses
(docs/methods.md, V2L): commitment ``mean(1 - cos(z, e))`` pulls each encoder output towards its word (a cosine, as the
search); reconstruction, a linear read-back of the patch features from the words (of the pooled feature from the
global words), makes the words carry their patch; diversity, ``mean_n H(p_n) - H(mean_n p_n)`` over soft assignments,
keeps many words in use. Without the last two the LM loss drives every token onto one word. Deviations from the paper:
the stage's LM loss trains the encoder too (the paper trains the tokenizer alone, on image reconstruction), and the
global words come from the same codebook instead of an expanded bigram/trigram vocabulary filtered by CLIP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alignlm.models.connectors.base import Connector, ConnectorOutput

CODEBOOKS = ("words", "all")


def check_codebook(codebook: str) -> None:
    if codebook not in CODEBOOKS:
        raise ValueError(f"model.connector.codebook={codebook!r} is not known; choose one of {list(CODEBOOKS)}")


def word_ids(tokenizer: Any, rows: int, codebook: str) -> list[int]:
    """The vocabulary ids the codebook keeps: every non-special id below ``rows`` (``all``), or those that decode to a
    space followed by ASCII letters only (``words``)."""
    check_codebook(codebook)
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(min(rows, len(tokenizer))) if i not in special]
    if codebook == "words":
        texts = tokenizer.batch_decode([[i] for i in ids])
        ids = [i for i, t in zip(ids, texts) if len(t) > 1 and t[0] == " " and t[1:].isascii() and t[1:].isalpha()]
    return ids


class V2LConnector(Connector):
    """Patch features ``[B, N, Dv]`` -> ``global_tokens + N`` word embeddings of the LLM ``[B, G + N, Dl]``."""

    # What of the LLM's input embedding table this part copies once, and why the copy matters: the config check
    # (checks.py) refuses a stage that trains the table, which the copy would not follow (the paper's LLM is frozen;
    # following a trained table would move every token and gather a sharded table at each step).
    input_embedding_copy = (
        "its codebook, a copy of the table's rows taken when the model is built (the visual tokens are to be the "
        "LLM's own words, and would stay the words of the table as built)"
    )

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        global_tokens: int = 4,
        codebook: str = "words",
        commitment_weight: float = 0.25,
        reconstruction_weight: float = 1.0,
        diversity_weight: float = 1.0,
        temperature: float = 0.01,
    ) -> None:
        super().__init__(in_dim, out_dim)
        if isinstance(global_tokens, bool) or not isinstance(global_tokens, int) or global_tokens < 0:
            raise ValueError(f"model.connector.global_tokens must be an integer >= 0, got {global_tokens!r}")
        check_codebook(codebook)
        weights = {
            "commitment": commitment_weight,
            "reconstruction": reconstruction_weight,
            "diversity": diversity_weight,
        }
        for name, w in weights.items():
            if not w >= 0:
                raise ValueError(f"model.connector.{name}_weight must be >= 0, got {w!r}")
        if not temperature > 0:
            raise ValueError(f"model.connector.temperature must be > 0, got {temperature!r}")
        self.global_tokens, self.codebook, self.temperature = global_tokens, codebook, temperature
        self.commitment_weight, self.reconstruction_weight, self.diversity_weight = weights.values()
        # its losses are means over the micro-batch's image tokens (the diversity loss against their mean assignment)
        self.relates_samples = any(weights.values())
        self.num_prefix_tokens = global_tokens
        self.proj = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.global_proj = nn.Linear(in_dim, out_dim) if global_tokens else None
        # reads the patch features back from the words alone: tokens must keep what their patch shows
        self.decoder = nn.Linear(out_dim, in_dim) if reconstruction_weight else None
        # Filled by bind_vocabulary. Plain tensors, not buffers: kept out of checkpoints (rebuilt from the LLM with the
        # model) and out of DDP's per-step buffer broadcast (the table is tens of MB); _apply moves them with the module.
        self.table = torch.empty(0, out_dim)
        self.vocab_ids = torch.empty(0, dtype=torch.long)

    def _apply(self, fn: Any, recurse: bool = True) -> V2LConnector:
        super()._apply(fn, recurse)
        self.table, self.vocab_ids = fn(self.table), fn(self.vocab_ids)
        return self

    @property
    def token_norm(self) -> None:
        return None

    @token_norm.setter
    def token_norm(self, value: float | None) -> None:
        if value is not None:
            raise ValueError(
                "model.visual_token_norm must be null with the v2l connector: its tokens are the LLM's own word "
                "embeddings, rescaling them would make them no word at all"
            )

    def bind_vocabulary(self, table: torch.Tensor, tokenizer: Any) -> None:
        ids = word_ids(tokenizer, table.shape[0], self.codebook)
        if len(ids) < max(2, self.global_tokens):
            raise ValueError(
                f"model.connector.codebook={self.codebook!r} keeps {len(ids)} entries of this tokenizer's vocabulary, "
                f"too few for a codebook (and global_tokens={self.global_tokens}); use codebook=all"
            )
        self.vocab_ids = torch.tensor(ids, dtype=torch.long, device=table.device)
        self.table = table[self.vocab_ids].detach().clone().to(self.proj[0].weight.dtype)

    def num_tokens(self, num_patches: int) -> int:
        return self.global_tokens + num_patches

    def _similarity(self, z: torch.Tensor) -> torch.Tensor:
        """Cosine of each ``z`` to every codebook row, float32 ``[..., V]``, autocast off: under bf16 autocast the
        product ran in bf16, so the word fed to the LLM was not the nearest one by cosine (8 of 256 tokens on a random
        30k-word table, 36 of 256 on an anisotropic one), nor what ``words`` prints, and the diversity softmax at
        temperature 0.01 was off by up to 0.017 in probability."""
        if self.table.numel() == 0:
            raise RuntimeError("the v2l connector has no codebook: build it with the model (models.build_model)")
        with torch.autocast(z.device.type, enabled=False):
            return F.normalize(z.float(), dim=-1) @ F.normalize(self.table.float(), dim=-1).T

    def _search(self, z: torch.Tensor, k: int) -> torch.Tensor:
        """Codebook indices ``[..., k]`` of the ``k`` rows nearest to each ``z`` by cosine (distinct, best first)."""
        return self._similarity(z).topk(k, dim=-1).indices

    def _straight_through(self, z: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen words' embeddings (exactly, in the forward pass) with gradients to ``z``; and 1 - cos(z, word)."""
        words = self.table[codes].to(z.dtype)
        z = z.unsqueeze(-2).expand_as(words)
        shaped = F.normalize(z, dim=-1) * words.norm(dim=-1, keepdim=True)
        return words + (shaped - shaped.detach()), 1 - F.cosine_similarity(z.float(), words.float(), dim=-1)

    def forward(self, features: torch.Tensor) -> ConnectorOutput:
        z = self.proj(features)
        sim = self._similarity(z)
        codes = [sim.argmax(-1, keepdim=True)]
        local, gap = self._straight_through(z, codes[0])
        local = local.squeeze(-2)
        tokens, gaps = [local], [gap.flatten()]
        sims, pooled = [sim.flatten(0, -2)], None
        if self.global_proj is not None:
            g = self.global_proj(features.mean(1))
            sims.append(self._similarity(g))
            codes.append(sims[-1].topk(self.global_tokens, dim=-1).indices)
            glob, gap = self._straight_through(g, codes[-1])
            tokens.insert(0, glob)
            gaps.append(gap.flatten())
            pooled = glob.mean(1, keepdim=True)
        commitment = torch.cat(gaps).mean()
        aux = {"v2l_commitment": self.commitment_weight * commitment} if self.commitment_weight else {}
        metrics = {"v2l_commitment": commitment.detach()}
        if self.decoder is not None:
            target = F.layer_norm(features.detach().float(), features.shape[-1:])
            rec = F.mse_loss(self.decoder(local).float(), target)
            if pooled is not None:  # the image's mean feature from its global words
                whole = F.layer_norm(features.detach().float().mean(1, keepdim=True), features.shape[-1:])
                rec = (rec + F.mse_loss(self.decoder(pooled).float(), whole)) / 2
            aux["v2l_reconstruction"] = self.reconstruction_weight * rec
            metrics["v2l_reconstruction"] = rec.detach()
        if self.diversity_weight:
            diversity = torch.stack([self._diversity(x) for x in sims]).mean()
            aux["v2l_diversity"] = self.diversity_weight * diversity
            metrics["v2l_diversity"] = diversity.detach()
        flat = torch.cat([c.flatten() for c in codes])
        used = torch.zeros(len(self.table), device=flat.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.float)
        )
        share = used / used.sum()
        return ConnectorOutput(
            torch.cat(tokens, dim=1),
            aux_losses=aux,
            metrics=metrics
            | {
                "v2l_code_perplexity": torch.exp(-(share * share.clamp_min(1e-12).log()).sum()),
                "v2l_codes_used": (used > 0).sum().float(),
            },
        )

    def _diversity(self, sim: torch.Tensor) -> torch.Tensor:
        """``mean_n H(p_n) - H(mean_n p_n)`` of soft assignments ``p_n = softmax(sim_n / temperature)``: low when each
        token is sure of its word and the batch's tokens spread over many words (what keeps the codes from collapsing
        onto a few words while the encoder is still far from the vocabulary)."""
        soft = (sim / self.temperature).softmax(-1)
        mean = soft.mean(0)
        return (mean * mean.clamp_min(1e-12).log()).sum() - (soft * soft.clamp_min(1e-12).log()).sum(-1).mean()

    @torch.no_grad()
    def words(self, features: torch.Tensor) -> torch.Tensor:
        """The LLM vocabulary ids ``[B, G + N]`` of an image's tokens: decode them with the tokenizer to read it."""
        z = self.proj(features)
        codes = self._search(z, 1).squeeze(-1)
        if self.global_proj is not None:
            codes = torch.cat([self._search(self.global_proj(features.mean(1)), self.global_tokens), codes], dim=1)
        return self.vocab_ids[codes]
