"""The connector contract: visual features ``[B, N, Dv]`` in, LLM-width tokens ``[B, M, Dl]`` out.

A connector may also report auxiliary losses (MoE balancing) and metrics (expert load); the model
passes them on in ``AlignOutput.aux_losses`` so objectives and logs see them without special cases. A connector
reports the same metric keys in every training forward: data-parallel ranks reduce the logged values as one table.

``token_norm`` (``model.visual_token_norm``, set by the model builder) fixes the L2 norm of every output token,
for every connector and every caller (the model, probes, scripts): a connector trained against a frozen LLM
can otherwise lower its loss by inflating its outputs far beyond the LLM's own token embeddings (caption
pretraining on text embeddings reached ~100x in the study of docs/experiments/), a start that later training cannot undo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from alignlm.models.lm_loss import scalar_problem


@dataclass
class ConnectorOutput(ModelOutput):
    """Visual tokens plus whatever side losses and metrics the connector wants trained and logged.

    A ``ModelOutput`` (a dict as well as a dataclass), so that wrappers which look for the tensors in a module's
    output find them: DeepSpeed ZeRO-3 re-gathers the connector's weights for its backward only if it does."""

    tokens: torch.Tensor
    aux_losses: dict[str, torch.Tensor] | None = None  # {} when not given (a ModelOutput's fields default to None)
    metrics: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        # ModelOutput first: it tells a copy made from a dict (accelerate's fp32 conversion of a mixed-precision
        # forward's output does that) by every field but the first being None, which the defaults below would spoil
        super().__post_init__()
        self.aux_losses = {} if self.aux_losses is None else self.aux_losses
        self.metrics = {} if self.metrics is None else self.metrics


class Connector(nn.Module):
    """Base class. Subclasses take ``in_dim`` and ``out_dim`` (filled in by the model) plus their own knobs."""

    # what it copies of the LLM's input embedding table once (None: nothing): a stage that trains the table is refused
    input_embedding_copy: str | None = None
    # True when its output or losses relate the samples of a micro-batch (routing, a balance loss over its tokens): the
    # trainer then never sorts samples across ranks, which would change them (trainer.py: ``rank_batches_kept``)
    relates_samples: bool = False

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.token_norm: float | None = None  # None: the subclass's outputs as they are
        # tokens the connector puts before its per-patch ones, describing the whole image (V2L's global words)
        self.num_prefix_tokens = 0
        self.register_forward_hook(_fix_token_norm)

    def bind_vocabulary(self, table: torch.Tensor, tokenizer: Any) -> None:
        """Called once by the model builder with the LLM's input embedding table ``[V, Dl]`` (before any new token
        rows are added) and its tokenizer; connectors that map onto the LLM's own words use it, the rest ignore it."""

    def num_tokens(self, num_patches: int) -> int:
        """How many visual tokens ``M`` one image becomes; token-preserving connectors return ``N``."""
        return num_patches

    def forward(self, features: torch.Tensor) -> ConnectorOutput:  # pragma: no cover - interface
        raise NotImplementedError


def _fix_token_norm(module: Connector, args: tuple, output: ConnectorOutput) -> ConnectorOutput:
    """Rescale each visual token to ``module.token_norm`` (a hook, so subclasses need not remember to), once the
    output is checked to be the contract's: a connector returning a bare tensor, or an auxiliary loss that is no
    scalar, had failed deep in the model or the trainer (``'Tensor' object has no attribute 'tokens'``, ``grad can
    be implicitly created only for scalar outputs``), naming neither. Host-side metadata only: no device wait."""
    who = f"model.connector ({type(module).__name__})"
    if not isinstance(output, ConnectorOutput):
        raise TypeError(f"{who} returned a {type(output).__name__}, not a ConnectorOutput(tokens, aux_losses, metrics)")
    for key, aux in output.aux_losses.items():
        problem = scalar_problem(aux)
        if problem is not None:
            raise TypeError(f"{who} returned aux_losses[{key!r}] of {problem}: each is a 0-dim floating tensor")
    if module.token_norm is not None:
        output.tokens = F.normalize(output.tokens, dim=-1) * module.token_norm
    return output
