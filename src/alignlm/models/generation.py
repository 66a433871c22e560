"""Answers of a model to a LLaVA-format question set: left-padded prompts, ``AlignLM.generate``, decoded text.

Shared by evaluation (accuracy, captions, the export check) and by methods that make their own training data from
the model's answers (SIMA's self-generated responses).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from alignlm.config import ConfigError
from alignlm.data.build import build_dataset, template_of
from alignlm.data.collate import Collator
from alignlm.data.llava import LlavaDataset
from alignlm.data.records import DataError, Source, record_id
from alignlm.data.templates import TemplateError, tokenize, turn_end


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
    return len(ids) + len(dataset.slot_token_ids) + images * (dataset.num_image_tokens - 1)


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
        s, r = dataset.index[i]
        rid = record_id(rec, src.path, int(dataset.file_index[s][r]))
        try:
            length = prompt_length(dataset, src, rec)
        except (DataError, TemplateError) as e:
            raise DataError(f"{where or path}: record id={rid}: {e}") from e
        if length > dataset.max_length:
            raise DataError(
                f"{where or path}: record id={rid} has a prompt of {length} tokens ({visual} visual tokens per image), "
                f"over its stage's data.max_length={dataset.max_length}, which a cut would take the question from; "
                "shorten it or leave the record out of the set"
            )


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
    indices = first(dataset, limit)
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


@torch.no_grad()
def generate_set(
    model: Any,
    path: str,
    data_cfg: Mapping[str, Any],
    batch_size: int = 16,
    max_new_tokens: int = 8,
    limit: int | None = None,
    generation: Mapping[str, Any] | None = None,
    seed: int = 0,
    image_root: str | None = None,
    num_workers: int = 0,
) -> list[tuple[str, str, dict[str, Any]]]:
    """``(id, prediction, record)`` for the first ``limit`` records of a set, in file order (see
    :func:`prompt_batches`; ``num_workers`` build its batches)."""
    check_generation(generation)
    model.eval()
    torch.manual_seed(seed)  # sampled decoding gives the same report twice
    stop = turn_end(template_of(data_cfg), model.tokenizer)
    out = []
    for inputs, records in prompt_batches(model, path, data_cfg, batch_size, limit, image_root, num_workers):
        new_tokens = model.generate(inputs, max_new_tokens=max_new_tokens, stop=stop, **dict(generation or {}))
        for pred_ids, rid, record in zip(new_tokens, inputs["ids"], records):
            text = model.tokenizer.decode(pred_ids, skip_special_tokens=True)
            out.append((rid, (text.split(stop.text)[0] if stop.text else text).strip(), record))
    return out
