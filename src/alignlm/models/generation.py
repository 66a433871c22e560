"""Answers of a model to a LLaVA-format question set: left-padded prompts, ``AlignLM.generate``, decoded text.

Shared by evaluation (accuracy, captions, the export check) and by methods that make their own training data from
the model's answers (SIMA's self-generated responses).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

from alignlm.config import ConfigError
from alignlm.constants import MAX_NEW_TOKENS
from alignlm.data.build import build_dataset, template_of
from alignlm.data.collate import Collator
from alignlm.data.llava import LlavaDataset
from alignlm.data.records import DataError, Source, record_id
from alignlm.data.templates import TemplateError, tokenize, turn_end

log = logging.getLogger("alignlm")


def generation_dataset(
    model: Any, path: str, data_cfg: Mapping[str, Any], image_root: str | None = None
) -> LlavaDataset:
    """A set's records as prompts for ``model`` (images under ``image_root``, by default the set's folder); a record
    that cannot be one is refused by name (``on_error: raise``): a question left out would be a question unscored."""
    # generation datasets use no data hooks: sets are read with their images, whatever side data the stage trained on
    source = {"path": path} if image_root is None else {"path": path, "image_root": image_root}
    return build_dataset(
        {**dict(data_cfg), "sources": [source], "on_error": "raise"}, model, seed=0, for_generation=True
    )


def first(dataset: LlavaDataset, limit: int | None) -> list[int]:
    """The indices of a set's first ``limit`` records (all of them for None), in file order."""
    return list(range(len(dataset) if limit is None else min(limit, len(dataset))))


def prompt_length(dataset: LlavaDataset, src: Source, rec: dict[str, Any]) -> int:
    """Tokens of a record's prompt as the dataset would encode it, its images not decoded: the rendered text's
    tokens, each image slot expanded to the connector's tokens, and the extra parts' slot tokens."""
    turns = dataset.dialog(rec, len(dataset.visual_inputs(src, rec)))
    ids, _ = tokenize(dataset.template.render(turns, dataset.tokenizer, add_generation_prompt=True), dataset.tokenizer)
    images = int((ids == dataset.image_token_id).sum())
    return len(ids) + len(dataset.slots_for(images > 0)) + images * (dataset.num_image_tokens - 1)


def check_prompt_lengths(
    model: Any,
    path: str,
    data_cfg: Mapping[str, Any],
    limit: int | None = None,
    image_root: str | None = None,
    where: str = "",
) -> None:
    """Every prompt of a set's first ``limit`` records fits the stage's ``data.max_length``, checked before any answer
    is generated: the dataset refuses a longer one only when its batch is made ("a cut would leave no answer"), after
    every answer before it (12.6k questions: minutes of generation thrown away). Costs a tokenization per record, no
    image decoded. ``where``: what the message calls the set (its evaluation's name for it)."""
    dataset = generation_dataset(model, path, data_cfg, image_root)
    visual = dataset.num_image_tokens
    for i in first(dataset, limit):
        src, rec = dataset.record(i)
        try:
            length = prompt_length(dataset, src, rec)
        except (DataError, TemplateError) as e:
            raise DataError(f"{where or path}: record id={_record_id(dataset, i)}: {e}") from e
        if length > dataset.max_length:
            raise DataError(
                f"{where or path}: record id={_record_id(dataset, i)} has a prompt of {length} tokens ({visual} visual tokens per image), "
                f"over its stage's data.max_length={dataset.max_length}, which a cut would take the question from; "
                "shorten it or leave the record out of the set"
            )


def _record_id(dataset: LlavaDataset, i: int) -> str:
    """Record ``i``'s id as the dataset gives it to its sample (its ``id``, else ``<file>#<index in the file>``)."""
    src, rec = dataset.record(i)
    s, r = dataset.index[i]
    return record_id(rec, src.path, int(dataset.file_index[s][r]))


def prompt_batches(
    model: Any,
    path: str,
    data_cfg: Mapping[str, Any],
    batch_size: int = 16,
    limit: int | None = None,
    image_root: str | None = None,
    num_workers: int = 0,
) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Left-padded prompt batches of a set's first ``limit`` records, in file order, on the model's device, each with
    its records (images under ``image_root``, by default the set's folder).

    ``num_workers`` processes decode the images and build the batches ahead (in order: the batches are the same), with
    pinned memory on CUDA: on the main thread, a 336-px image cost 5.6 ms a question, serially with generation."""
    dataset = generation_dataset(model, path, data_cfg, image_root)
    return _batches(model, dataset, first(dataset, limit), batch_size, num_workers)


def _batches(
    model: Any, dataset: LlavaDataset, indices: list[int], batch_size: int, num_workers: int
) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """:func:`prompt_batches` of the records ``indices`` of ``dataset``: only theirs are read, their images decoded."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    loader = DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=batch_size,
        collate_fn=Collator(model.tokenizer.pad_token_id, padding_side="left"),
        num_workers=num_workers,
        pin_memory=cuda,
        prefetch_factor=4 if num_workers else None,
    )
    records = iter(dataset.record(i)[1] for i in indices)
    for batch in loader:
        inputs = {k: v.to(device, non_blocking=cuda) if torch.is_tensor(v) else v for k, v in batch.items()}
        yield inputs, [next(records) for _ in batch["ids"]]


# generate() settings alignlm sets itself: the answer length is its own knob, the stops come from the template, one
# answer per question is what the scores pair with the question ids, and the answers are read as plain token ids (a
# dict of outputs failed with a TypeError; scores, logits, attentions or hidden states would be computed for nothing)
RESERVED_GENERATION = ("max_new_tokens", "eos_token_id", "pad_token_id", "stop_strings", "tokenizer",
                       "num_return_sequences", "return_dict_in_generate", "output_scores", "output_logits",
                       "output_attentions", "output_hidden_states")  # fmt: skip


def check_generation(generation: Mapping[str, Any] | None, key: str = "eval.generation") -> None:
    """``generation`` (transformers ``generate`` settings) sets none of :data:`RESERVED_GENERATION`: a second
    ``max_new_tokens`` was a duplicate-keyword TypeError, and several sequences per question were paired with the
    wrong ids."""
    taken = [k for k in generation or {} if k in RESERVED_GENERATION]
    if taken:
        raise ConfigError(
            f"{key} sets {taken}, which alignlm sets itself (the answer length is max_new_tokens; answers are "
            "read as token ids, one per question)"
        )


class AnswerKeeper(Protocol):
    """Where :func:`generate_set` keeps each batch's answers as it finishes, so that a run stopped part-way (a
    pre-empted evaluation at 80 % of a 12.6k-question set) resumes at its first unanswered batch instead of its first
    question; evaluation's is ``set-<name>.partial.jsonl`` (``evaluation/report.py: PartialSet``)."""

    def answered(self, batches: Sequence[Sequence[str]]) -> list[list[str]]:
        """The predictions of the leading batches answered before, batch by batch, given every batch's record ids in
        order: what was kept for other records is not an answer to these."""
        ...

    def add(self, answers: Sequence[tuple[str, str]]) -> None:
        """Keep one more batch's ``(id, prediction)`` pairs, durably, before the next batch is generated."""
        ...


def batch_seed(seed: int, start: int) -> int:
    """The seed of the batch whose first record is the set's ``start``-th: sampled decoding gives each batch a stream
    of its own (the training sampler's rule, ``seed * 1_000_003 + epoch``), so a batch samples the same answers
    whether its set was generated from its first question or resumed there."""
    return seed * 1_000_003 + start


@torch.no_grad()
def generate_set(
    model: Any,
    path: str,
    data_cfg: Mapping[str, Any],
    batch_size: int = 16,
    max_new_tokens: int = MAX_NEW_TOKENS,
    limit: int | None = None,
    generation: Mapping[str, Any] | None = None,
    seed: int = 0,
    image_root: str | None = None,
    num_workers: int = 0,
    keep: AnswerKeeper | None = None,
) -> list[tuple[str, str, dict[str, Any]]]:
    """``(id, prediction, record)`` for the first ``limit`` records of a set, in file order (see
    :func:`prompt_batches`; ``num_workers`` build its batches).

    The batches are the set's records ``batch_size`` at a time from its first, and each is decoded under its own seed,
    :func:`batch_seed` (``seed`` and its first record's place), set just before it: sampled decoding gives the same
    answers twice, and the same resumed or not. (Before, one stream seeded once for the whole set made a batch's
    samples depend on every batch before it: a sampled report differs from one of those versions.)

    With ``keep``, the leading batches it has answered are not generated again (no prompt built, no image decoded):
    generation starts at its first unanswered batch, and each batch's answers go to ``keep`` as it finishes.

    Answers that reach ``max_new_tokens`` before the turn's end are counted and said in a warning: they are scored as
    they stand, cut (a sentence-answering model read 0 % at 8 tokens and 67 % at 16, without a word)."""
    check_generation(generation)
    model.eval()
    stop = turn_end(template_of(data_cfg), model.tokenizer)
    dataset = generation_dataset(model, path, data_cfg, image_root)
    indices = first(dataset, limit)
    starts = range(0, len(indices), batch_size) if keep else range(0)  # the ids are read only to resume
    ids = [[_record_id(dataset, i) for i in indices[s : s + batch_size]] for s in starts]
    kept = keep.answered(ids) if keep else []
    if len(kept) > len(ids) or any(len(preds) != len(batch) for preds, batch in zip(kept, ids)):
        raise ValueError(f"{keep} holds answers to other batches than those of {path}")  # else zip would drop some
    done = indices[: len(kept) * batch_size]
    answers = [pred for batch in kept for pred in batch]
    done_ids = [rid for batch in ids[: len(kept)] for rid in batch]
    out = [(rid, pred, dataset.record(i)[1]) for rid, pred, i in zip(done_ids, answers, done)]
    batches = _batches(model, dataset, indices[len(done) :], batch_size, num_workers)
    ends = {model.tokenizer.eos_token_id, *stop.ids} - {None}
    cut = 0
    for k, (inputs, records) in enumerate(batches):
        torch.manual_seed(batch_seed(seed, len(done) + k * batch_size))  # on every device
        new_tokens = model.generate(inputs, max_new_tokens=max_new_tokens, stop=stop, **dict(generation or {}))
        rows = new_tokens.tolist()
        texts = [model.tokenizer.decode(row, skip_special_tokens=True) for row in rows]
        preds = [(text.split(stop.text)[0] if stop.text else text).strip() for text in texts]
        cut += sum(
            len(row) >= max_new_tokens and ends.isdisjoint(row) and not (stop.text and stop.text in text)
            for row, text in zip(rows, texts)
        )
        if keep:
            keep.add(list(zip(inputs["ids"], preds)))
        out += zip(inputs["ids"], preds, records)
    if cut:
        log.warning(
            "%s: %d of %d answers reached max_new_tokens=%d before the end of their turn and are scored cut, as they "
            "stand (a longer limit: eval.max_new_tokens, --max-new-tokens, or generation's own)",
            path,
            cut,
            len(out) - len(done),
            max_new_tokens,
        )
    return out
