"""The objective contract: ``forward(batch, out, model) -> LossTerm``, composed by weight in the stage config.

An objective that needs extra batch fields names them in ``requires_batch_keys``; the trainer checks the
first batch against every objective before training, so a missing field fails at start-up, not at step 40k.
An objective that logs metrics names them in ``metric_names``: data-parallel ranks reduce their logged values as one
table, which only works when every rank has the same columns whatever its micro-batches held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from alignlm.config import ConfigError
from alignlm.models.lm_loss import scalar_problem


@dataclass
class LossTerm(ModelOutput):
    """A scalar loss and the metrics worth logging beside it.

    A ``ModelOutput`` (a dict as well as a dataclass), so that DeepSpeed ZeRO-3 finds the loss in an objective's
    output and gathers the objective's own parameters (a learned temperature) for the backward."""

    loss: torch.Tensor
    # what this micro-batch measured, a subset of the objective's ``metric_names`` ({} when not given): a metric left
    # out (no image-caption pair to score) is left out of the step's mean, not averaged in as a zero
    metrics: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self.metrics = {} if self.metrics is None else self.metrics
        super().__post_init__()


class Objective(nn.Module):
    """Base class; subclasses set ``name`` and may declare the batch keys and model outputs they need."""

    name: str = ""
    requires_batch_keys: tuple[str, ...] = ()
    needs_hidden_states: bool = False
    needs_sample_logps: bool = False  # each sample's summed log-probability of its labels (preference objectives)
    # what it copies of the LLM's input embedding table once (None: nothing): a stage that trains the table is refused
    input_embedding_copy: str | None = None
    # True when the loss is already normalised by the global supervised-token count (the LM loss);
    # other losses are per-micro-batch means that the trainer averages over the global step's micro-batches of data
    # (a rank's stand-in for a micro-batch of bad data not counted). Such a mean depends on which samples share a
    # micro-batch: with neither this nor ``global_batch``, several ranks' micro-steps are left unsorted by length
    # (``training/trainer.py: rank_batches_kept``).
    token_normalized: bool = False
    # True when the loss is already this rank's share of the loss over every rank's micro-batch of the same slot (it
    # gathers across ranks): the trainer averages it over the slots in which any rank had data, since a rank's
    # stand-in for bad data leaves the slot's gathered loss whole (counted per rank, it was scaled up by W a / (W a - 1))
    global_batch: bool = False
    # every metric ``forward`` may return; the trainer logs each as its mean over the micro-batches that returned it
    metric_names: tuple[str, ...] = ()
    # the fewest samples a micro-batch needs for the loss to mean anything (a transport or contrast across pairs)
    min_batch_size: int = 1
    # data hooks (classes) the stage must have, one of each, for what the loss reads (per-image labels): the config
    # check refuses a stage without one before anything trains, which ``setup`` found only when that stage began
    needs_hooks: tuple[type, ...] = ()

    def setup(self, model: nn.Module, dataset: Any) -> None:
        """Called once by the trainer after the model and the stage's dataset exist, before the first step.

        For state that depends on them: a word prior counted over the training captions (VLAP), frozen word
        embeddings taken from the LLM. The default does nothing.
        """

    def forward(self, batch: dict[str, Any], out: Any, model: nn.Module) -> LossTerm:  # pragma: no cover
        raise NotImplementedError


def check_min_batch(objective: Any, per_device: Any, key: str) -> None:
    """``objective`` (an Objective class or instance, or anything else: no demand) gets its ``min_batch_size`` of
    samples per device; the config check calls this for every stage before the first trains, the trainer again
    when it builds the objectives."""
    need = int(getattr(objective, "min_batch_size", 1))
    if int(per_device) < need:
        raise ConfigError(
            f"{key} needs per_device_batch_size >= {need}: its loss relates the samples of a micro-batch, "
            f"got {per_device}"
        )


def check_term(who: str, objective: Objective, term: Any) -> None:
    """Fail on an output of ``objective`` that is not the contract's (``who``: its config key): a ``LossTerm``
    whose loss is a 0-dim floating tensor (a loss per sample, a Python float or a dict had failed in the trainer's
    backward or logging, naming no objective), with only the metrics its ``metric_names`` declare (other ranks would
    not log another, and the all-reduce of the logged values needs the same columns on every rank). Host-side
    metadata only: no device wait."""
    name = f"{who} ({type(objective).__name__})"
    if not isinstance(term, LossTerm):
        raise TypeError(f"{name} returned a {type(term).__name__}, not a LossTerm(loss, metrics)")
    problem = scalar_problem(term.loss)
    if problem is not None:
        raise TypeError(
            f"{name} returned a loss of {problem}: a LossTerm's loss is a 0-dim floating tensor (reduce it)"
        )
    undeclared = sorted(set(term.metrics) - set(objective.metric_names))
    if undeclared:
        raise ValueError(
            f"{name} returned metrics {undeclared} that its metric_names "
            f"{list(objective.metric_names)} do not declare: declare every metric it may log"
        )


def check_batch(needs: dict[str, tuple[str, ...]], batch: dict[str, Any]) -> None:
    """Fail early, naming who needs which missing batch keys (``needs``: who -> keys, e.g. an objective's)."""
    for who, keys in needs.items():
        missing = [k for k in keys if batch.get(k) is None]
        if missing:
            raise KeyError(
                f"{who} needs batch fields {missing}, which the configured data does not provide "
                "(a stage.data.hooks entry provides a method's fields)"
            )
