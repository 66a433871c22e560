"""SIMA's data step: response self-generation and in-context self-critic, written as preference records.

For each prompt (an image and a question, with its reference answer) of a question set:

1. *Self-generation*: one greedy answer and ``samples`` sampled ones (``temperature`` 0.8, nucleus ``top_p`` 0.9, as
   the official code samples them), all from the model itself.
2. *Self-critic*: every sampled answer that differs from the greedy one is paired with it, and the same model judges
   the pair in context: the image, the question, the reference answer, the two answers as "A" and "B", and SIMA's
   three visual criteria (the objects named, their relationships, their attributes); an ``<image>`` written in
   those texts is copied as text, never as an image placeholder (:func:`as_text`). The judgement is read off the
   probabilities of the two replies as the template writes them, ``p(A) / (p(A) + p(B))`` (the next-token
   distribution when each reply is one token), asked in both orders to cancel position bias:
   ``prefer(a over b) = (p_A(a, b) + p_B(b, a)) / 2``. A pair whose two orders disagree is dropped
   (``drop_inconsistent``). A pair with an empty answer (nothing but whitespace) is never judged: a dpo stage refuses
   an empty ``chosen`` or ``rejected``, so its record would be left out there as malformed; such pairs are counted
   and named in a warning (:func:`answer_pairs`).
3. The preferred answer becomes ``chosen``, the other ``rejected``: records for ``data.preference: true``.

Written per set, into ``out``: ``<name>.json`` (the preference records; images stay where the set has them, named as
the set names them, relative to its folder, so a stage reads them with ``image_root`` set to the set's folder:
``alignlm sima generate`` prints that override, and those that render a dpo stage's prompts as the checkpoint's stage
rendered the pairs' (its template and ``template_args``, where ``stage/dpo.yaml``'s differ); a source that reads them under another folder stops at start-up,
naming the path and the folder) and ``<name>.critic.json`` (every judged pair with both
orders' probabilities and the reference answer, for the critic check of ``alignlm eval``), and last
``<name>.provenance.json``: what the records were made from (``methods/provenance.py``). The knobs (the sampling, the
limit, the seed, and the data config that renders the prompts: the template and its arguments, how the images are made
square; :func:`rendering`) make one variant: a file of other knobs is refused, naming the knob; a file that records
not every knob (written before it was recorded) is generated again with a warning. The inputs (the
checkpoint's ``config.yaml`` and ``model.safetensors``, the run's own model config when the step builds the model from
it, the set's records and the prompts' images, by size and modification time) are the model's own: when one changed (the model retrained, ``sima.from`` moved to another, the set
regenerated), the set is generated again with a warning, as it is when either file is missing. A set whose records
are current is not generated again.

Each generation pass over a set (the greedy one, then each sampled one) is kept as it finishes, in
``<name>.run<k>.json``, with what its answers were made from (:func:`run_key`): the model's inputs above, the prompts'
digest, the data config that renders them (:func:`rendering`), the pass's generation settings and seed, the batch size
and the device type. A step stopped later (killed while sampling or judging) keeps the passes it finished, and its
rerun reuses those made under the same key and generates the others: each pass seeds itself (``seed + k``), so its
answers, and the records judged from them, are the ones an uninterrupted step makes. Every file is written whole
(beside it, then renamed over it): a kill never leaves half of one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import torch

from alignlm.config import COUNT, POSITIVE, SHARE
from alignlm.constants import IGNORE_INDEX, IMAGE_TOKEN
from alignlm.data.build import aspect_ratio_of, template_of
from alignlm.data.records import image_names, read_records
from alignlm.data.templates import reply
from alignlm.files import replace_text
from alignlm.methods.provenance import (
    KEY,
    as_json,
    changed_inputs,
    check_knobs,
    files_digest,
    stamps_digest,
    strings_digest,
    why_again,
)
from alignlm.models.build import build_model
from alignlm.models.device import default_device
from alignlm.models.generation import generate_set, prompt_batches
from alignlm.models.io import FINAL_FILES, UnsafeConfigError, load_final_weights, load_model
from alignlm.models.mllm import AlignLM

log = logging.getLogger(__name__)


CRITERIA = (
    "objects: does it name only objects that are in the image?",
    "relationships: are positions and counts right?",
    "attributes: are colours, shapes and sizes right?",
)


# What an ``<image>`` copied into the critic's question becomes: the same characters with a word joiner (U+2060,
# invisible, no width) after the "<", text that no longer matches the placeholder. It holds no "<" but its first
# character, so no ``<image>`` forms across it and its neighbours.
_IMAGE_AS_TEXT = IMAGE_TOKEN[0] + "\u2060" + IMAGE_TOKEN[1:]


def as_text(text: str) -> str:
    """``text`` (an answer, a question) made safe to copy into a user turn, read there as the text it is. In a user
    turn ``<image>`` is an image placeholder, and only it: control tokens written by the data are plain text in any
    turn (``templates.tokenize``). So each ``<image>`` becomes :data:`_IMAGE_AS_TEXT`; an answer "Type <image> here"
    otherwise lost those characters to the record's image slot, and two of them refused the record (2 placeholders,
    1 image), stopping the step."""
    return text.replace(IMAGE_TOKEN, _IMAGE_AS_TEXT)


def critic_question(question: str, reference: str, first: str, second: str) -> str:
    """The in-context critic's question (ours; SIMA's criteria, the reference answer and both answers). Every text
    copied in is :func:`as_text`, so it holds no image placeholder: the record's own image is placed before the
    question as the data layer places a record's images that have none (as LLaVA's evaluation scripts do)."""
    criteria = "\n".join(f"- {c}" for c in CRITERIA)
    question, reference, first, second = (as_text(t) for t in (question, reference, first, second))
    return (
        f"Two answers to a question about this image.\nQuestion: {question}\nReference answer: {reference}\n"
        f"Answer A: {first}\nAnswer B: {second}\nJudge them by:\n{criteria}\nWhich answer is better? Reply A or B."
    )


def single_turn_prompts(path: str | Path, limit: int | None) -> list[dict[str, Any]]:
    """Each record's first question with its first answer as the reference (multi-turn training records give one
    prompt each)."""
    prompts = []
    for i, rec in enumerate(read_records(path)[:limit]):
        turns = rec["conversations"]
        if len(turns) < 2:
            continue
        question = str(turns[0]["value"])
        prompts.append(
            {
                "id": str(rec.get("id", i)),
                "image": rec.get("image"),
                "conversations": [{"from": "human", "value": question}],
                "answer": str(turns[1]["value"]),
            }
        )
    return prompts


def answer_tokens(tokenizer: Any, data_cfg: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """The tokens of the replies "A" and "B" as the stage's template writes an answer after its prompt, less the
    end of turn they share: after vicuna_v1's ``ASSISTANT:`` a reply starts with a space (" A", which a tokenizer may
    split into " " and "A"); after a chat template's newline it does not. The bare "A" is the wrong token there."""
    template = template_of(data_cfg)
    a, b = (reply(template, tokenizer, letter)[1] for letter in "AB")
    while a and b and a[-1] == b[-1]:
        a, b = a[:-1], b[:-1]
    if not a or not b:
        raise ValueError(f"template {template.name!r} writes the replies A and B as the same tokens")
    return a, b


@torch.no_grad()
def judge(
    model: Any, pairs: Sequence[dict[str, Any]], data_cfg: Mapping[str, Any], image_root: str, work: Path, batch: int
) -> list[float]:
    """``p(A) / (p(A) + p(B))`` for each critic record (image + critic question): the probabilities of the two replies
    as the template writes them after the prompt, from the logits of one pass per reply (one pass in all when each
    reply is one token, the usual case: then it is the next-token distribution)."""
    path = work / "critic_prompts.json"
    replace_text(path, json.dumps(list(pairs)))
    replies = answer_tokens(model.tokenizer, data_cfg)
    out = []
    for inputs, _ in prompt_batches(model, str(path), data_cfg, batch, image_root=image_root):
        if all(len(r) == 1 for r in replies):
            logps = _reply_logps(model, inputs, [])[:, -1].log_softmax(-1)
            scores = torch.stack([logps[:, r[0]] for r in replies], dim=1)
        else:
            scores = torch.stack([_reply_logps(model, inputs, r) for r in replies], dim=1)
        out += torch.softmax(scores, dim=-1)[:, 0].tolist()
    return out


def _reply_logps(model: Any, inputs: dict[str, Any], reply: list[int]) -> torch.Tensor:
    """With ``reply`` empty, the fp32 logits after each (left-padded) prompt ``[rows, 1, V]``; else the summed
    log-probability of ``reply`` appended to every prompt ``[rows]``."""
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    if reply:
        tail = torch.tensor(reply, device=ids.device).expand(ids.shape[0], -1)
        ids, mask = torch.cat([ids, tail], dim=1), torch.cat([mask, torch.ones_like(tail)], dim=1)
        labels = torch.cat([labels, torch.full_like(tail, IGNORE_INDEX)], dim=1)
    kept = {k: v for k, v in inputs.items() if k not in ("sample_ids", "cu_seq_lens", "max_seq_len")}
    embeds, _ = model.embed({**kept, "input_ids": ids, "attention_mask": mask, "labels": labels})
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions as generation numbers them
    logits = model.llm(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=len(reply) + 1
    ).logits.float()
    if not reply:
        return logits
    logps = logits[:, :-1].log_softmax(-1)  # position -k-1 predicts the reply's token -k
    return logps.gather(2, tail[:, :, None]).squeeze(2).sum(1)


def answer_pairs(prompts: list[dict[str, Any]], answers: list[list[str]]) -> list[dict[str, Any]]:
    """Every (greedy, sampled) pair of distinct answers of each prompt, but those with an empty answer (nothing but
    whitespace): they are left out, counted and named in a warning. As ``chosen`` or ``rejected`` a dpo stage refuses
    an empty answer (``records.preference_problem``), and a model that answers nothing (one trained too briefly) made
    every record a "malformed record" there, with no reason given."""
    pairs, empty = [], []
    for prompt, options in zip(prompts, answers):
        greedy = options[0]
        for other in dict.fromkeys(a for a in options[1:] if a != greedy):
            (pairs if greedy.strip() and other.strip() else empty).append({"prompt": prompt, "a": greedy, "b": other})
    if empty:
        log.warning(
            "SIMA left out %d of %d answer pairs with an empty answer (e.g. prompt %s: greedy %r, sampled %r): a dpo "
            "stage refuses an empty 'chosen' or 'rejected'",
            len(empty),
            len(pairs) + len(empty),
            empty[0]["prompt"]["id"],
            empty[0]["a"],
            empty[0]["b"],
        )
    return pairs


def self_critic_pairs(
    model: Any,
    prompts: list[dict[str, Any]],
    answers: list[list[str]],
    data_cfg: Mapping[str, Any],
    image_root: str,
    work: Path,
    batch: int,
) -> list[dict[str, Any]]:
    """Every (greedy, sampled) pair of distinct, non-empty answers (:func:`answer_pairs`), judged in both orders."""
    pairs = answer_pairs(prompts, answers)
    critic = []
    for p in pairs:
        question = p["prompt"]["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip()
        for first, second in ((p["a"], p["b"]), (p["b"], p["a"])):
            text = critic_question(question, p["prompt"]["answer"], first, second)
            critic.append(
                {
                    "id": p["prompt"]["id"],
                    "image": p["prompt"]["image"],
                    "conversations": [{"from": "human", "value": text}],
                }
            )
    probs = judge(model, critic, data_cfg, image_root, work, batch) if critic else []
    for i, p in enumerate(pairs):
        p["p_a_first"], p["p_a_second"] = probs[2 * i], 1.0 - probs[2 * i + 1]  # both: p(a is better)
    return pairs


def checkpoint_identity(checkpoint: Path) -> str:
    """The checkpoint's files as ``load_model`` reads them, by size and modification time (a stat each, like an
    image's stamp): a model retrained into the same ``final/`` is another model. A path that holds no ``final/``
    checkpoint is refused here, before records another model made are kept for it."""
    missing = [f for f in FINAL_FILES if not (checkpoint / f).is_file()]
    if missing:
        why = "is not a final/ folder (no " + " or ".join(missing) + ")" if checkpoint.exists() else "does not exist"
        raise FileNotFoundError(
            f"SIMA's checkpoint {checkpoint} {why}: name the finetuned model's final/ (sima.from in +exp=sima, "
            "CHECKPOINT of `alignlm sima generate`)"
        )
    return stamps_digest([checkpoint / f for f in FINAL_FILES], FINAL_FILES)


# The keys of a data config that never change an answer: answering replaces the sources (the set's own file) and
# on_error (raise), and uses no hooks; a prompt over max_length, an image over max_image_pixels or too few usable
# records (min_usable_fraction) stop the step rather than change a prompt; the rest is how a stage trains and loads
# (preference pairs, packing, batching by length, loader workers, the feature cache), which generation does not read.
_NOT_RENDERING = frozenset(
    {
        "sources",
        "hooks",
        "on_error",
        "max_length",
        "max_image_pixels",
        "min_usable_fraction",
        "preference",
        "packing",
        "pack_length",
        "group_by_length",
        "num_workers",
        "feature_cache",
    }
)


def rendering(data: Mapping[str, Any]) -> dict[str, Any]:
    """The data config that decides what the model is shown of each prompt, and so its answers and judgements: the
    template and its arguments, how the images are made square (``image_aspect_ratio``: crop shows the model another
    image than pad) and any key not listed as leaving the answers alone (:data:`_NOT_RENDERING`: a new data knob counts
    until it is listed), as JSON reads it back, defaults filled in (a config that leaves a key out means its default).
    The records' knobs and each generation pass's key (:func:`run_key`) both hold it: the records kept the template
    alone, so records made from padded images were kept for a step that crops them."""
    kept = {name: v for name, v in data.items() if name not in _NOT_RENDERING}
    template = {"template": str(data.get("template", "plain")), "template_args": dict(data.get("template_args") or {})}
    return as_json({**kept, **template, "image_aspect_ratio": aspect_ratio_of(data)})


def preference_knobs(
    data: Mapping[str, Any],
    samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    limit: int | None,
    drop_inconsistent: bool,
    seed: int,
) -> dict[str, Any]:
    """The choices that make one variant of a set's records: the sampling, the prompts (how many, and how the data
    config renders them: :func:`rendering`) and the seed. The batch size is left out: it changes how the answers are
    computed, not which."""
    sampling = {"samples": samples, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    return as_json(
        {**sampling, "limit": limit, "drop_inconsistent": drop_inconsistent, "seed": seed, **rendering(data)}
    )


def preference_inputs(
    checkpoint: str, path: str | Path, prompts: Sequence[Mapping[str, Any]], model: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """Digests of what a set's records are made from: the model (``checkpoint``, its identity, and the run's own
    ``model`` config when that builds it: another config is another model on the same weights), the set's records'
    bytes and the prompts' images (their names, sizes and modification times)."""
    root = Path(path).parent
    names = [name for prompt in prompts for name in image_names(dict(prompt))]
    config = {} if model is None else {"model": strings_digest([json.dumps(as_json(model), sort_keys=True)])}
    return {
        "checkpoint": checkpoint,
        **config,
        "data": files_digest([path]),
        "images": stamps_digest([root / n for n in names], names),
    }


def records_current(out_dir: Path, name: str, provenance: Mapping[str, Any]) -> bool:
    """Whether ``<name>.json`` was made from ``provenance``; a file of other knobs is refused (naming the knob), one
    whose inputs changed, or that records none of them or not every knob (written before they were recorded: what it
    was made with is not known), is announced stale."""
    records, made_from = out_dir / f"{name}.json", out_dir / f"{name}.provenance.json"
    if not records.exists():
        return False
    stored = json.loads(made_from.read_text()).get(KEY) if made_from.exists() else None
    unrecorded: list[str] = []
    if stored is not None:
        knobs = stored.get("knobs", {})
        check_knobs(records, knobs, {k: v for k, v in provenance["knobs"].items() if k in knobs}, "sima")
        unrecorded = [k for k in provenance["knobs"] if k not in knobs]
    recorded = None if stored is None else stored.get("inputs")
    changed = changed_inputs(recorded, provenance["inputs"])
    if changed:
        log.warning("SIMA records %s: %s; generating them again", records, why_again(recorded, changed))
    elif unrecorded:
        log.warning(
            "SIMA records %s do not record the %s they were made with (written before it was): generating them again",
            records,
            ", ".join(unrecorded),
        )
    return not changed and not unrecorded


def prepare_preferences(
    checkpoint: str,
    sets: Sequence[Mapping[str, Any]],
    out: str,
    data: Mapping[str, Any],
    samples: Annotated[int, COUNT] = 2,
    temperature: Annotated[float, POSITIVE] = 0.8,
    top_p: Annotated[float, SHARE] = 0.9,
    max_new_tokens: Annotated[int, COUNT] = 8,
    limit: Annotated[int | None, COUNT] = None,
    batch_size: Annotated[int, COUNT] = 16,
    drop_inconsistent: bool = True,
    seed: int = 0,
    model: Mapping[str, Any] | None = None,
    allow_code: bool = False,
    trust_remote_code: bool = False,
) -> None:
    """The stage ``prepare`` step (``+exp=sima``): preference records from ``checkpoint`` for each of ``sets``
    (``{name, path}``), into ``out``, for the sets whose records are missing or stale (see the module docstring).

    The model that answers and judges is built as the pipeline builds every model of a run: from ``model``, the run's
    own model config (``model: ${model}``, with ``_recursive_: false`` on the step so that Hydra passes the config
    rather than building its parts), with the checkpoint's weights, as the stage that starts from the checkpoint
    builds it; the run's config is the user's, so a part it names outside alignlm needs no permission (no load of a
    run's own config asks for one). Without ``model``, the checkpoint's ``config.yaml`` builds it, and a checkpoint is
    data: a part it names outside alignlm is built only with ``allow_code: true`` (``models/io.py``)."""
    generate_preferences(
        checkpoint,
        sets,
        out,
        data,
        partial(step_generator, Path(checkpoint), model, allow_code, trust_remote_code),
        samples=samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        limit=limit,
        batch_size=batch_size,
        drop_inconsistent=drop_inconsistent,
        seed=seed,
        run_model=model,
    )


# How the prepare step lets a checkpoint's config build code, in place of the command-line flag that models/io.py's
# refusal names: an ``alignlm train`` has no --allow-code.
_FLAG_ALLOWS = "allow_code=True (--allow-code)"
_STEP_ALLOWS = "allow_code: true on this prepare step (stages.<stage>.prepare.<name>.allow_code=true)"
_STEP_BUILDS_OWN = (
    "; or give the step model: ${model} (this run's own model config) and _recursive_: false (Hydra would build "
    "its parts), to build the model as the stage that starts from the checkpoint builds it"
)


def step_generator(
    checkpoint: Path, model: Mapping[str, Any] | None, allow_code: bool, trust_remote_code: bool
) -> AlignLM:
    """The prepare step's model (see :func:`prepare_preferences`), its refusal of a checkpoint's code naming the
    step's knobs, not a flag of a command that was not run."""
    if model is not None:
        built = build_model(model)
        load_final_weights(built, checkpoint)
        return built.eval()
    try:
        return load_model(checkpoint, allow_code, trust_remote_code)
    except UnsafeConfigError as e:
        reason = str(e).replace(_FLAG_ALLOWS, _STEP_ALLOWS)
        raise UnsafeConfigError(f"SIMA's checkpoint {checkpoint}: {reason}{_STEP_BUILDS_OWN}") from None


def generate_preferences(
    checkpoint: str,
    sets: Sequence[Mapping[str, Any]],
    out: str,
    data: Mapping[str, Any],
    load: Callable[[], AlignLM],
    samples: int = 2,
    temperature: float = 0.8,
    top_p: float = 0.9,
    max_new_tokens: int = 8,
    limit: int | None = None,
    batch_size: int = 16,
    drop_inconsistent: bool = True,
    seed: int = 0,
    run_model: Mapping[str, Any] | None = None,
) -> None:
    """:func:`prepare_preferences` with the model from ``load`` (the step's, or ``alignlm sima generate``'s with its
    flags): every set's records are checked before the model is loaded, so a refused one stops the step before any
    work. ``run_model``, the run's own model config when ``load`` builds it, is one of what the records are made from."""
    out_dir = Path(out)
    identity = checkpoint_identity(Path(checkpoint))
    knobs = preference_knobs(data, samples, temperature, top_p, max_new_tokens, limit, drop_inconsistent, seed)
    todo = []
    for s in sets:
        prompts = single_turn_prompts(s["path"], limit)
        provenance = {"knobs": knobs, "inputs": preference_inputs(identity, s["path"], prompts, run_model)}
        if not records_current(out_dir, s["name"], provenance):
            todo.append((s, prompts, provenance))
    if not todo:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    device = default_device()
    model = load().to(device)
    for s, prompts, provenance in todo:
        settings = GenerationSettings(
            samples, temperature, top_p, max_new_tokens, batch_size, seed, torch.device(device).type
        )
        write_preferences(model, s, prompts, out_dir, data, settings, provenance["inputs"], drop_inconsistent)
        # last: records interrupted or refused before this keep the provenance of the records they replace
        replace_text(out_dir / f"{s['name']}.provenance.json", json.dumps({KEY: provenance}, indent=1))


@dataclass(frozen=True)
class GenerationSettings:
    """How a set's answers are generated: ``samples`` sampled passes at ``temperature`` (from the nucleus ``top_p``)
    besides the greedy one, each
    pass ``k`` seeded with ``seed + k``, on a device of type ``device`` (``cpu``, ``cuda``): the batch size and the
    device change which numbers a sampled pass draws, so both are part of what a kept pass was made from."""

    samples: int
    temperature: float
    top_p: float
    max_new_tokens: int
    batch_size: int
    seed: int
    device: str

    def passes(self) -> list[dict[str, Any]]:
        """The ``generate`` settings of each pass: the greedy one first, then the sampled ones."""
        sampled = {"do_sample": True, "temperature": self.temperature, "top_k": 0, "top_p": self.top_p}
        return [{"do_sample": False}] + [sampled] * self.samples


def run_key(
    inputs: Mapping[str, str],
    prompts: str,
    data: Mapping[str, Any],
    settings: GenerationSettings,
    generation: Mapping[str, Any],
    k: int,
) -> dict[str, Any]:
    """What pass ``k``'s answers are made from, as JSON reads it back: the model and the set (``inputs``, the records'
    provenance inputs), the prompts' text (``prompts``, the prompt file's), the data config that renders them
    (:func:`rendering`, as the records' knobs hold it), the pass's ``generation`` settings, answer length and seed, the
    batch size and the device type."""
    key = {
        "inputs": dict(inputs),
        "prompts": strings_digest([prompts]),
        "data": rendering(data),
        "generation": dict(generation),
        "max_new_tokens": settings.max_new_tokens,
        "seed": settings.seed + k,
        "batch_size": settings.batch_size,
        "device": settings.device,
    }
    return as_json(key)


def kept_answers(path: Path, key: Mapping[str, Any]) -> list[str] | None:
    """The answers kept in ``path`` when they were made under ``key``, else None (none kept, or made from other
    inputs or settings: generated again, saying why)."""
    if not path.exists():
        return None
    try:
        kept = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("SIMA answers %s cannot be read (%s): generating them again", path, e)
        return None
    if not isinstance(kept, dict) or kept.get("key") != key or not isinstance(kept.get("answers"), list):
        log.info("SIMA answers %s were made from another model, prompts or settings: generating them again", path)
        return None
    log.info("SIMA answers %s reused (the same model, prompts and settings)", path)
    return kept["answers"]


def answer_pass(
    model: Any, prompt_file: Path, data: Mapping[str, Any], image_root: str, path: Path, key: Mapping[str, Any]
) -> list[str]:
    """One pass's answers to every prompt of ``prompt_file``, in order: those kept in ``path`` under ``key``, or
    generated with the settings ``key`` holds and kept there, whole, before the next pass starts."""
    kept = kept_answers(path, key)
    if kept is not None:
        return kept
    generated = generate_set(
        model,
        str(prompt_file),
        data,
        key["batch_size"],
        key["max_new_tokens"],
        None,
        key["generation"],
        key["seed"],
        image_root,
    )
    answers = [pred for _, pred, _ in generated]
    replace_text(path, json.dumps({"key": key, "answers": answers}))
    return answers


def write_preferences(
    model: Any,
    s: Mapping[str, Any],
    prompts: list[dict[str, Any]],
    out_dir: Path,
    data: Mapping[str, Any],
    settings: GenerationSettings,
    inputs: Mapping[str, str],
    drop_inconsistent: bool,
) -> None:
    """Answer (each pass kept in ``<name>.run<k>.json``, or reused from there: :func:`answer_pass`), judge and write
    one set's ``<name>.critic.json`` and ``<name>.json`` (see the module docstring); ``inputs`` are what the set's
    records are made from."""
    image_root = str(Path(s["path"]).parent)
    prompt_file = out_dir / f"{s['name']}.prompts.json"
    prompt_text = json.dumps(prompts)
    replace_text(prompt_file, prompt_text)
    answers_by_run = [
        answer_pass(
            model,
            prompt_file,
            data,
            image_root,
            out_dir / f"{s['name']}.run{k}.json",
            run_key(inputs, prompt_text, data, settings, g, k),
        )
        for k, g in enumerate(settings.passes())
    ]
    answers = [list(a) for a in zip(*answers_by_run)]
    pairs = self_critic_pairs(model, prompts, answers, data, image_root, out_dir, settings.batch_size)
    if not pairs:
        empty = sum(not a.strip() for options in answers for a in options)
        why = (
            f"{empty} of {sum(map(len, answers))} answers were empty: a model that answers nothing has not learnt to "
            "answer yet, train it longer"
            if empty
            else "every sampled answer was the greedy one: sample more answers, or at a higher temperature or top_p"
        )
        raise ValueError(
            f"SIMA made no answer pair of {s['name']} to judge: no prompt of {len(prompts)} had two different "
            f"non-empty answers ({why}). The answers are in {out_dir / s['name']}.run<k>.json"
        )
    records = []
    for p in pairs:
        prefer_a = (p["p_a_first"] + p["p_a_second"]) / 2 > 0.5
        consistent = (p["p_a_first"] > 0.5) == (p["p_a_second"] > 0.5)
        p["consistent"], p["chosen"] = consistent, p["a"] if prefer_a else p["b"]
        if consistent or not drop_inconsistent:
            prompt = p["prompt"]
            records.append(
                {
                    "id": f"{prompt['id']}",
                    "image": prompt["image"],
                    "conversations": prompt["conversations"],
                    "chosen": p["chosen"],
                    "rejected": p["b"] if prefer_a else p["a"],
                }
            )
    critic = [
        {
            "id": p["prompt"]["id"],
            "question": p["prompt"]["conversations"][0]["value"],
            "answer": p["prompt"]["answer"],
            "a": p["a"],
            "b": p["b"],
            "p_a_first": p["p_a_first"],
            "p_a_second": p["p_a_second"],
            "consistent": p["consistent"],
            "chosen": p["chosen"],
        }
        for p in pairs
    ]
    replace_text(out_dir / f"{s['name']}.critic.json", json.dumps(critic, indent=1))
    if not records:
        raise ValueError(
            f"SIMA kept no preference pair of {s['name']}: {len(pairs)} pairs judged, "
            f"{sum(p['consistent'] for p in pairs)} with both judging orders agreeing (a judge that always answers "
            "the same letter agrees with itself in neither order). Set drop_inconsistent=false (`alignlm sima generate --keep-inconsistent`) to keep every pair "
            f"with the two orders averaged; the judged pairs are in {out_dir / (s['name'] + '.critic.json')}"
        )
    replace_text(out_dir / f"{s['name']}.json", json.dumps(records))
