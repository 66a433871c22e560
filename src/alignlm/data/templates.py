"""Prompt templates and label masks, derived from the template itself rather than string splitting.

Each template renders a conversation into one string *and* records the character spans it wrote for
the assistant turns (answer plus end of turn). The string is tokenized whole with offsets (see :func:`tokenize`),
and a token is supervised when it overlaps an assistant span. This holds for any tokenizer, including
BPE merges across boundaries, and a template that finds no assistant span raises instead of silently
masking the sample (LLaVA's string-splitting failure mode).

Templates: ``plain`` (LLaVA pretraining: images + caption + newline), ``vicuna_v1`` (LLaVA-1.5), and
``chat`` (the tokenizer's own chat template, located turn by turn through prefix rendering).

``plain`` and ``vicuna_v1`` never write the BOS as text: ``tokenize`` puts the tokenizer's BOS id first where the
tokenizer adds one, as LLaVA's tokenizer call does, and the exported chat templates leave it to the tokenizer too
(a BOS written as text gets a second one from ``processor(text=...)``, and shifts a SentencePiece tokenizer's first
word from "▁A" to "A").
"""

from __future__ import annotations

import bisect
import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import numpy as np

from alignlm.constants import IGNORE_INDEX, IMAGE_TOKEN

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class TemplateError(ValueError):
    """A conversation the template cannot render or supervise."""

    cause = "conversation the template cannot render"


@dataclass(frozen=True)
class Turn:
    role: str  # user | assistant | system
    content: str


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: tuple[tuple[int, int], ...]  # character spans of supervised text
    # character spans of text the data supplied (message contents) and the role it came from: what it holds is
    # text, never a control token (an image placeholder only in a user turn)
    contents: tuple[tuple[int, int, str], ...] = ()


def role_of(name: Any) -> str | None:
    """The role (user, assistant, system) a turn's ``from`` names, in any case ("GPT" is "gpt"), or None for one no
    template knows. Every reader of a record's turns reads roles here: the caption readers compared ``from``
    case-sensitively, so a record with "Human"/"GPT" turns trained but read as having no caption."""
    return ROLES.get(str(name).lower())


_SURROGATE = re.compile("[\ud800-\udfff]")


def unicode_problem(text: str, where: str) -> str | None:
    """Why ``text`` (at ``where``) is no Unicode text, or None: a lone UTF-16 surrogate, valid JSON as an escape such as
    ``"\\ud83d"`` (scraped text holds half an emoji), is no character, so the tokenizer and the file system refuse it.
    Found when records are read, it is a malformed record; found when the sample was drawn, it had ended the stage."""
    found = _SURROGATE.search(text)
    return None if found is None else f"{where} is not valid Unicode (a lone surrogate at character {found.start()})"


def to_turns(conversations: Sequence[dict[str, Any]]) -> list[Turn]:
    """LLaVA's ``[{"from": "human"|"gpt", "value": ...}]`` -> typed turns, with a clear error for bad roles and for
    text that is not Unicode."""
    turns = []
    for i, msg in enumerate(conversations):
        if not isinstance(msg, dict) or "value" not in msg or "from" not in msg:
            raise TemplateError(f"conversations[{i}] must be an object with 'from' and 'value', got {msg!r}")
        role = role_of(msg["from"])
        if role is None:
            raise TemplateError(f"conversations[{i}].from={msg['from']!r} is not one of {sorted(ROLES)}")
        if not isinstance(msg["value"], str):  # never str() a number, a null or a list into training text
            raise TemplateError(f"conversations[{i}].value must be a string, got {type(msg['value']).__name__}")
        if (problem := unicode_problem(msg["value"], f"conversations[{i}].value")) is not None:
            raise TemplateError(problem)
        if role == "system" and i > 0:  # the templates use one system text, the first turn's
            raise TemplateError(f"conversations[{i}] is a system turn: only the first turn may be one")
        turns.append(Turn(role, msg["value"]))
    return turns


class Template:
    """Base: ``render`` a conversation for training, or a prompt (ending at the assistant's turn) for generation.

    ``jinja`` gives the same template as a Hugging Face processor chat template, so an exported model is prompted
    exactly as it was trained (messages may carry ``[{"type": "image"}, {"type": "text", ...}]`` content).
    """

    name: str = ""

    def render(self, turns: Sequence[Turn], tokenizer: Any, add_generation_prompt: bool = False) -> Rendered:
        raise NotImplementedError  # pragma: no cover - interface

    def jinja(self, tokenizer: Any) -> str:
        raise NotImplementedError  # pragma: no cover - interface


# Typed message content -> the training text convention: "<image>" per image, a newline, then the text.
_JINJA_FLATTEN = (
    "{%- set ns = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': m['content']}] -%}"
    "{%- else -%}{%- set c = namespace(img='', txt='') -%}"
    "{%- for item in m['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set c.img = c.img + '" + IMAGE_TOKEN + "' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set c.txt = c.txt + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': (c.img + '\\n' + c.txt) if (c.img and c.txt) else (c.img + c.txt)}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.msgs -%}"
)


def _jinja_str(text: str) -> str:
    """A Jinja string literal of ``text``, read back as exactly ``text``: JSON escaping of quotes, backslashes and
    control characters is valid Jinja, and inside a literal ``{{`` or ``{%`` is text, never run. Every other character
    is written as itself: Jinja reads a ``\\uXXXX`` escape as one UTF-16 unit, so JSON's surrogate pair for a
    character beyond U+FFFF (an emoji) became two lone surrogates, garbled text that the tokenizer refuses."""
    return json.dumps(text, ensure_ascii=False)


def adds_bos(tokenizer: Any) -> bool:
    """Whether this tokenizer starts a sequence with its BOS itself (Llama does, GPT-2-style ones do not)."""
    if tokenizer.bos_token is None:
        return False
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


class PlainTemplate(Template):
    """LLaVA pretraining: ``<image>...`` then the caption and a newline; only the caption is supervised."""

    name = "plain"

    def render(self, turns: Sequence[Turn], tokenizer: Any, add_generation_prompt: bool = False) -> Rendered:
        dialog = [t for t in turns if t.role != "system"]
        expected = 1 if add_generation_prompt else 2
        if len(dialog) != expected or dialog[0].role != "user" or (expected == 2 and dialog[1].role != "assistant"):
            raise TemplateError(
                f"template 'plain' needs one user turn then one assistant turn, got {[t.role for t in dialog]}"
            )
        prefix = IMAGE_TOKEN * dialog[0].content.count(IMAGE_TOKEN)
        if add_generation_prompt:
            return Rendered(prefix, ())
        _check_replies(dialog, self.name)
        caption = dialog[1].content.strip()
        text = prefix + caption + "\n"
        return Rendered(text, ((len(prefix), len(text)),), ((len(prefix), len(prefix) + len(caption), "assistant"),))

    def jinja(self, tokenizer: Any) -> str:
        return _JINJA_FLATTEN + (
            "{%- for m in messages if m['role'] == 'user' -%}"
            "{{ '" + IMAGE_TOKEN + "' * (m['content'].split('" + IMAGE_TOKEN + "') | length - 1) }}{%- endfor -%}"
            "{%- for m in messages if m['role'] == 'assistant' -%}{{ m['content'] | trim }}{{ '\\n' }}{%- endfor -%}"
        )


def image_first(content: str) -> str:
    """LLaVA-1.5's placement of images in a user turn: its ``<image>`` placeholders moved to the front, then a newline,
    then the rest of the text, stripped (LLaVA-Instruct writes "What is in the image?\n<image>")."""
    n = content.count(IMAGE_TOKEN)
    if not n:
        return content
    return (IMAGE_TOKEN * n + "\n" + content.replace(IMAGE_TOKEN, "").strip()).strip()


# The same rule in Jinja, on a string ``c``: the exported chat template prompts exactly as training rendered.
_JINJA_IMAGE_FIRST = (
    "{%- if '" + IMAGE_TOKEN + "' in c -%}"
    "{%- set c = ('" + IMAGE_TOKEN + "' * (c.split('" + IMAGE_TOKEN + "') | length - 1) + '\\n' + "
    "(c.replace('" + IMAGE_TOKEN + "', '') | trim)) | trim -%}{%- endif -%}"
)


class VicunaV1Template(Template):
    """LLaVA-1.5: ``SYSTEM USER: q ASSISTANT: a</s>USER: ...``; answers and their EOS are supervised.

    ``image_first`` (default, as LLaVA-1.5 does): a user turn's images go to its front (:func:`image_first`), so
    LLaVA's own records prompt exactly as in LLaVA; false keeps each ``<image>`` where the record wrote it. Answers are
    stripped of surrounding whitespace (LLaVA keeps it): a stray space would otherwise be a token the model must learn
    to write, and the exported chat template trims them alike.
    """

    name = "vicuna_v1"

    def __init__(
        self,
        system: str = "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        image_first: bool = True,
    ) -> None:
        self.system = system
        self.image_first = image_first

    def render(self, turns: Sequence[Turn], tokenizer: Any, add_generation_prompt: bool = False) -> Rendered:
        record_system = next((t.content for t in turns if t.role == "system"), None)
        text = ""
        contents: list[tuple[int, int, str]] = []
        if record_system is not None:
            contents.append((len(text), len(text) + len(record_system), "system"))
        text += (self.system if record_system is None else record_system) + " "
        spans: list[tuple[int, int]] = []
        dialog = [t for t in turns if t.role != "system"]
        _check_alternation(dialog, self.name, add_generation_prompt)
        for turn in dialog:
            if turn.role == "user":
                question = image_first(turn.content) if self.image_first else turn.content
                text += "USER: "
                contents.append((len(text), len(text) + len(question), "user"))
                text += f"{question} ASSISTANT:"
            else:
                start = len(text)
                answer = turn.content.strip()
                contents.append((start + 1, start + 1 + len(answer), "assistant"))
                text += " " + answer + tokenizer.eos_token
                spans.append((start, len(text)))
        return Rendered(text, tuple(spans), tuple(contents))

    def jinja(self, tokenizer: Any) -> str:
        return _JINJA_FLATTEN + (
            "{%- set sys = namespace(text=" + _jinja_str(self.system) + ") -%}"
            "{%- for m in messages if m['role'] == 'system' -%}{%- if loop.first -%}{%- set sys.text = m['content'] -%}{%- endif -%}{%- endfor -%}"
            "{{ sys.text + ' ' }}"
            "{%- for m in messages if m['role'] != 'system' -%}"
            "{%- if m['role'] == 'user' -%}{%- set c = m['content'] -%}"
            + (_JINJA_IMAGE_FIRST if self.image_first else "")
            + "{{ 'USER: ' + c + ' ASSISTANT:' }}"
            "{%- else -%}{{ ' ' + (m['content'] | trim) + " + _jinja_str(tokenizer.eos_token) + " }}{%- endif -%}"
            "{%- endfor -%}"
        )


class ChatTemplate(Template):
    """The tokenizer's own chat template; assistant spans found by rendering each prefix of the dialog.

    ``image_first`` (default, as LLaVA does for every template): a user turn's images go to its front
    (:func:`image_first`), as the exported chat template places them too. Answers are stripped of surrounding
    whitespace, as ``vicuna_v1`` strips them and the exported chat template trims them alike."""

    name = "chat"

    def __init__(self, system: str | None = None, image_first: bool = True) -> None:
        self.system = system
        self.image_first = image_first

    def render(self, turns: Sequence[Turn], tokenizer: Any, add_generation_prompt: bool = False) -> Rendered:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("template 'chat' needs a tokenizer with a chat_template; use vicuna_v1 or plain")
        messages = [{"role": t.role, "content": self._content(t)} for t in turns]
        if self.system is not None and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.system})
        dialog = [m for m in messages if m["role"] != "system"]
        _check_alternation([Turn(m["role"], m["content"]) for m in dialog], self.name, add_generation_prompt)

        bos = tokenizer.bos_token if adds_bos(tokenizer) else None

        def render(msgs: list[dict[str, str]], gen: bool) -> str:
            try:
                out = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            except jinja2.TemplateError as e:  # raise_exception(...) in the template: a record it does not take
                roles = [m["role"] for m in msgs]
                raise TemplateError(
                    f"the tokenizer's chat template refused this conversation (roles {roles}): {e}"
                ) from e
            # the BOS the template writes first is the one the tokenizer adds (``tokenize``), as the exported
            # processor adds it to a prompt without it: the text after it is then tokenized as the text's start
            return out[len(bos) :] if bos and out.startswith(bos) else out

        text = render(messages, add_generation_prompt)
        controls = control_texts(tokenizer)
        spans, contents = [], []
        upto = ""
        for i, m in enumerate(messages):
            # each distinct prefix rendered once: before a turn other than an answer the text so far is the last
            # turn's render, and the last turn's render is the text
            before = render(messages[:i], True) if m["role"] == "assistant" and i else upto
            last = i == len(messages) - 1 and not add_generation_prompt
            upto = text if last else _as_prefix(render(messages[: i + 1], False), text, controls)
            before = _as_prefix(before, text, controls)
            if not (text.startswith(before) and text.startswith(upto) and upto.startswith(before)):
                raise TemplateError(
                    "the tokenizer's chat template does not render conversations prefix by prefix, "
                    "so turns cannot be located; use template vicuna_v1"
                )
            marked = render([*messages[:i], {**m, "content": _MARK}], False)
            at = marked.find(_MARK, len(before))
            if at < 0 and m["role"] == "system" and i + 1 < len(messages):
                # a template that writes the system prompt inside the first user turn (Llama-2, Mistral, Gemma-3)
                # writes nothing for it alone
                at = render([*messages[:i], {**m, "content": _MARK}, messages[i + 1]], False).find(_MARK, len(before))
            contents.append(_locate(m["content"], text, at, m["role"]))
            if m["role"] == "assistant":
                spans.append((len(before), _turn_close(upto, contents[-1][1], controls)))
        return Rendered(text, tuple(spans), tuple(contents))

    def _content(self, turn: Turn) -> str:
        """A turn's content as this template gives it to the tokenizer's chat template (and :func:`_jinja_contents`
        in the export): an answer stripped (a stray space is never a token the model must learn to write), a question
        with its images first where ``image_first`` asks."""
        if turn.role == "assistant":
            return turn.content.strip()
        return image_first(turn.content) if self.image_first and turn.role == "user" else turn.content

    def jinja(self, tokenizer: Any) -> str:
        """The tokenizer's chat template behind the same message rewriting as :meth:`render`. Where the tokenizer adds
        the BOS itself, a template that also writes ``bos_token`` first (Llama-3, Mistral, Gemma) is rendered without
        that one: training puts one BOS first (``tokenize``), and ``processor(text=...)`` adds its own to the rendered
        text. A BOS written later is kept, as training keeps it (Llama-2 writes one before every question; blanking
        ``bos_token`` had dropped them from the export); only in a template with ``{% generation %}`` blocks (the
        assistant masks of transformers' ``return_assistant_tokens_mask``), which a captured text would misplace, is
        ``bos_token`` blanked throughout."""
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("template 'chat' needs a tokenizer with a chat_template; use vicuna_v1 or plain")
        system = ""
        if self.system is not None:
            system = (
                "{%- if not (messages and messages[0]['role'] == 'system') -%}"
                "{%- set messages = [{'role': 'system', 'content': " + _jinja_str(self.system) + "}] + messages -%}"
                "{%- endif -%}"
            )
        template = tokenizer.chat_template
        if adds_bos(tokenizer):
            if _GENERATION_TAG.search(template):  # its spans are of the text a capture holds, not of the output
                template = "{%- set bos_token = '' -%}" + template
            else:  # less the one line break Jinja drops at a template's end, which inside the block it would keep
                template = (
                    "{%- set alignlm_text %}" + _JINJA_LAST_BREAK.sub("", template) + "{% endset -%}"
                    "{{- alignlm_text[bos_token | length :] if bos_token is string and bos_token and "
                    "alignlm_text.startswith(bos_token) else alignlm_text -}}"
                )
        return _JINJA_FLATTEN + _jinja_contents(self.image_first) + system + template


_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")
_JINJA_LAST_BREAK = re.compile(r"(?:\r\n|\r|\n)\Z")  # keep_trailing_newline=False, as transformers renders


def _jinja_contents(images_first: bool) -> str:
    """:meth:`ChatTemplate._content` in Jinja, applied to every message of ``messages`` (the chat template reads them
    as given): answers trimmed, and with ``images_first`` :data:`_JINJA_IMAGE_FIRST` on every user message."""
    user = ("{%- if m['role'] == 'user' -%}" + _JINJA_IMAGE_FIRST + "{%- endif -%}") if images_first else ""
    return (
        "{%- set ns = namespace(msgs=[]) -%}"
        "{%- for m in messages -%}{%- set c = m['content'] -%}"
        "{%- if m['role'] == 'assistant' -%}{%- set c = c | trim -%}{%- endif -%}"
        + user
        + "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': c}] -%}"
        "{%- endfor -%}"
        "{%- set messages = ns.msgs -%}"
    )


# Stands in for a message's content to find where the template writes it: a search for the content itself could
# match the template's own text, e.g. an answer "<|im_end|>" found at the turn's closing token.
_MARK = "\u2063alignlm-content\u2063"


def _turn_close(upto: str, content_end: int, controls: Sequence[str]) -> int:
    """Where the supervised end of an assistant turn rendered as ``upto`` lies: after the control token that follows
    its content (past whitespace), or else its closing one (whitespace after it is the template's, not the model's to
    write), else at the end of the turn's text, so the plain text that ends the turn (``### Assistant: a\\n\\n``) is
    learnt, as ``plain`` supervises its newline. The first control token, not the last: Phi-3 writes ``<|end|>``
    after an answer and its EOS after the last turn, which no other answer learnt to write."""
    gap = len(upto) - content_end - len(upto[content_end:].lstrip())
    following = next((c for c in controls if upto.startswith(c, content_end + gap)), None)
    if following is not None:
        return content_end + gap + len(following)
    closed = upto.rstrip()
    if any(closed.endswith(c) and len(closed) - len(c) >= content_end for c in controls):
        return len(closed)
    return len(upto)


def _as_prefix(part: str, text: str, controls: Sequence[str]) -> str:
    """A render of the start of a conversation as the start of the whole one's ``text``: less a tail of control tokens
    and whitespace that only ends a conversation (Phi-3 writes its EOS after the last turn where no generation prompt
    follows), where without it it is a start of ``text``; else as rendered (the caller refuses it)."""
    cut = part
    while not text.startswith(cut):
        stripped = cut.rstrip()
        control = next((c for c in controls if stripped.endswith(c)), None)
        if control is None and stripped == cut:
            return part
        cut = stripped[: -len(control)] if control else stripped
    return cut


def _locate(content: str, text: str, at: int, role: str) -> tuple[int, int, str]:
    """The span of a message's content in ``text``, where the template wrote the stand-in at ``at`` (-1: nowhere):
    as written, or trimmed as some templates trim it."""
    for needle in (content, content.strip()):
        if at >= 0 and text.startswith(needle, at):
            return at, at + len(needle), role
    if role == "system":
        raise TemplateError(
            "the tokenizer's chat template writes the system prompt where it cannot be located (not before the "
            "first question nor inside it: Mistral-v0.3's writes it into the last question of a conversation), so it "
            "cannot be told apart from the template's own text; give no system prompt (template_args.system=null, "
            "records without a system turn) or use template vicuna_v1"
        )
    raise TemplateError(
        "the tokenizer's chat template changes message contents (beyond trimming), so they cannot be "
        "told apart from the template's own text; use template vicuna_v1"
    )


def _check_alternation(dialog: Sequence[Turn], name: str, add_generation_prompt: bool) -> None:
    roles = [t.role for t in dialog]
    expected = ["user", "assistant"] * ((len(roles) + 1) // 2)
    ends_ok = (roles[-1:] == ["user"]) if add_generation_prompt else (roles[-1:] == ["assistant"])
    if not roles or roles != expected[: len(roles)] or not ends_ok:
        want = (
            "alternate user/assistant and end with a user turn"
            if add_generation_prompt
            else "alternate user/assistant turns, starting with user and ending with assistant"
        )
        raise TemplateError(f"template {name!r}: turns must {want}, got {roles}")
    if not add_generation_prompt:
        _check_replies(dialog, name)


def _check_replies(dialog: Sequence[Turn], name: str) -> None:
    """Refuse an assistant turn of only whitespace in a conversation to train on: it had trained the model to answer
    with a lone space and the end of turn (a caption of nothing: a newline after the image), where LLaVA trains no
    such turn (an empty last reply masks its whole sample there). A prompt's turns, which nothing supervises, may
    be empty."""
    replies = [t for t in dialog if t.role == "assistant"]
    empty = [k for k, t in enumerate(replies) if not t.content.strip()]
    if empty:
        raise TemplateError(
            f"template {name!r}: assistant turn {empty[0] + 1} of {len(replies)} is empty, a reply of nothing to "
            "train on"
        )


TEMPLATES: dict[str, type[Template]] = {t.name: t for t in (PlainTemplate, VicunaV1Template, ChatTemplate)}


def get_template(name: str, **kwargs: Any) -> Template:
    """Template by config name, listing the choices when the name is unknown."""
    if name not in TEMPLATES:
        raise ValueError(f"data template {name!r} is not known; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name](**kwargs)


def tokenize(rendered: Rendered, tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and labels: a token is supervised iff it overlaps an assistant span; the tokenizer's BOS first where
    it adds one (and the text does not start with it).

    Each answer is tokenized as the whole string tokenizes it (as LLaVA and ``apply_chat_template(tokenize=True)`` do:
    a SentencePiece tokenizer writes "It" after ``[/INST]``, not "▁It"), except where the answer would merge into
    the prompt's last token: then it is tokenized alone (:func:`_pieces`), so each prompt is tokenized exactly as
    generation tokenizes it alone.
    A special token that the *data* wrote (inside a message's content) is text: it is tokenized as the plain
    characters it is made of, never as the control token (an answer holding ``</s>`` does not end early, a question
    holding ``<|im_start|>assistant`` cannot fake a turn); ``<image>`` is a placeholder in user turns only.
    """
    ids, offsets = _pieces(rendered, tokenizer)
    if rendered.contents:
        ids, offsets = _plain_specials(ids, offsets, rendered, tokenizer)
    if adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:  # a chat template may write it itself
        ids, offsets = [tokenizer.bos_token_id, *ids], [(0, 0), *offsets]
    ids_arr = np.asarray(ids, dtype=np.int64)
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    labels = np.full_like(ids_arr, IGNORE_INDEX)
    if rendered.spans:
        spans = np.asarray(rendered.spans, dtype=np.int64)
        overlap = (offs[:, None, 0] < spans[None, :, 1]) & (offs[:, None, 1] > spans[None, :, 0])
        supervised = overlap.any(axis=1)
        labels[supervised] = ids_arr[supervised]
    return ids_arr, labels


def _pieces(rendered: Rendered, tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and offsets of the text, cut at the start of every supervised span: the piece up to a cut is what the
    tokens of the whole text up to it add to those of the text before the piece, or, where the piece changed those
    (the prompt's last token merging into the answer, as byte-level BPE does with a leading space), its tokens alone.

    The tokens of the text up to each cut are read off the whole text's tokens where :func:`_prefix_tokens` shows them
    equal, so a sample costs about two tokenizer calls over its text: tokenizing every answer's prefix again grew with
    turns x length (51 ms for 30 rounds, against 3 ms for one call)."""
    text = rendered.text
    cuts = sorted({0, len(text), *(start for start, _ in rendered.spans)})
    if len(cuts) == 1:  # an empty text
        return [], []
    whole = _encode([text], tokenizer)[0]
    prefixes = {0: 0, **_prefix_tokens(text, cuts[1:-1], whole, tokenizer), len(text): len(whole[0])}
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for a, b in zip(cuts, cuts[1:]):
        before, upto = prefixes[a], prefixes[b]
        if isinstance(before, int) and isinstance(upto, int):  # both the whole text's: upto extends before
            ids += whole[0][before:upto]
            offsets += whole[1][before:upto]
            continue
        before_ids = _as_tokens(before, whole)[0]
        upto_ids, upto_offsets = _as_tokens(upto, whole)
        if upto_ids[: len(before_ids)] == before_ids:
            ids += upto_ids[len(before_ids) :]
            offsets += upto_offsets[len(before_ids) :]
        else:
            alone_ids, alone_offsets = _encode([text[a:b]], tokenizer)[0]
            ids += alone_ids
            offsets += [(x + a, y + a) for x, y in alone_offsets]
    return ids, offsets


_Tokens = tuple[list[int], list[tuple[int, int]]]


def _encode(texts: list[str], tokenizer: Any) -> list[_Tokens]:
    """Ids and offsets of each of ``texts``, in one call, with no special tokens added."""
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(list(i), [(x, y) for x, y in o]) for i, o in zip(enc["input_ids"], enc["offset_mapping"])]


def _as_tokens(prefix: int | _Tokens, whole: _Tokens) -> _Tokens:
    """A prefix's tokens: its own, or the whole text's first ``prefix``."""
    return (whole[0][:prefix], whole[1][:prefix]) if isinstance(prefix, int) else prefix


def _prefix_tokens(text: str, cuts: Sequence[int], whole: _Tokens, tokenizer: Any) -> dict[int, int | _Tokens]:
    """For each cut ``c`` inside ``text``, the tokens of ``text[:c]``: as the count of the whole text's first tokens
    that are exactly those (ids and offsets), or, where that is not shown, as tokenized.

    Why a window shows it: a tokenizer finds its added tokens in the raw text first (leftmost-longest) and normalizes,
    pre-tokenizes and merges each piece between them alone. So when no token of the whole text straddles ``c``,
    ``text[:c]`` finds the same added tokens before ``c``, and tokenizes alike up to the last of them; what follows
    it is the piece ending at ``c``, which ``text[s:c]`` from that added token's start ``s`` tokenizes as ``text[:c]``
    does (the added token first, so a piece is read as not the text's first, as Metaspace's ``prepend_scheme=first``
    asks). Where those tokens are the whole text's from ``s`` to ``c``, so are those of ``text[:c]``. Elsewhere (a
    pre-tokenizer's look-ahead past ``c``, such as byte-level BPE's ``\\s+(?!\\S)``, a merge across ``c``, no added
    token before ``c``: the window is ``text[:c]`` itself) ``text[:c]`` is tokenized whole, as before.
    """
    ids, offsets = whole
    starts = [a for a, _ in offsets]
    ends = [b for _, b in offsets]
    if starts != sorted(starts) or ends != sorted(ends):  # no order to look a cut up in
        return dict(zip(cuts, _encode([text[:c] for c in cuts], tokenizer)))
    bounds = _boundaries(text, whole, tokenizer)
    plan: dict[int, tuple[int, int, int]] = {}  # cut -> (the window's first token, the prefix's token count, start)
    for c in cuts:
        k = bisect.bisect_right(ends, c)
        if k < len(starts) and starts[k] < c:  # a token straddles the cut: no prefix of the whole text's tokens
            plan[c] = (0, k, 0)
            continue
        first = bounds[bisect.bisect_left(bounds, k) - 1] if bounds and bounds[0] < k else 0
        plan[c] = (first, k, starts[first] if first else 0)
    windows = _encode([text[s:c] for c, (_, _, s) in plan.items()], tokenizer)
    found: dict[int, int | _Tokens] = {}
    again = []
    for (c, (first, k, s)), (w_ids, w_offsets) in zip(plan.items(), windows):
        if w_ids == ids[first:k] and [(x + s, y + s) for x, y in w_offsets] == offsets[first:k]:
            found[c] = k
        elif s == 0:  # the window was text[:c] itself
            found[c] = (w_ids, w_offsets)
        else:
            again.append(c)
    found.update(zip(again, _encode([text[:c] for c in again], tokenizer)))
    return found


def _boundaries(text: str, whole: _Tokens, tokenizer: Any) -> list[int]:
    """Indices of the whole text's tokens that are added tokens found in the raw text (matched before normalization,
    not restricted to whole words, and written as themselves), where the tokenizer splits the text into pieces it
    tokenizes alone. Special tokens are no such split where the tokenizer is set to ``split_special_tokens``."""
    split_specials = bool(getattr(tokenizer, "split_special_tokens", False))
    raw = {
        i: t.content
        for i, t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()
        if not t.normalized and not t.single_word and not (t.special and split_specials)
    }
    ids, offsets = whole
    return [k for k in (k for k, i in enumerate(ids) if i in raw) if text[slice(*offsets[k])] == raw[ids[k]]]


@dataclass(frozen=True)
class TurnEnd:
    """What ends an answer under a template: a control token (``</s>`` for vicuna_v1, ``<|im_end|>`` for ChatML), or
    plain text (``plain``: a newline), where generation must stop and what the decoded answer is cut at."""

    ids: tuple[int, ...]  # control tokens that end a turn (beside the tokenizer's EOS)
    text: str  # plain text that ends a turn ("" when a control token does)


def reply(template: Template, tokenizer: Any, answer: str) -> tuple[Rendered, list[int]]:
    """A one-question exchange answered ``answer``, as ``template`` renders it, and the ids it supervises: the
    answer as the template writes it after its prompt, then its end of turn."""
    rendered = template.render(to_turns([{"from": "human", "value": "x"}, {"from": "gpt", "value": answer}]), tokenizer)
    ids, labels = tokenize(rendered, tokenizer)
    return rendered, ids[labels != IGNORE_INDEX].tolist()


def answer_preamble(template: Template, tokenizer: Any) -> str:
    """What ``template`` writes inside an answer's supervised span before the answer itself, surrounding whitespace
    aside: '' where the generation prompt ends where the answer starts. Qwen3's own template writes an empty think
    block there, after its generation prompt: a model trained on it learns to write the block, and its generated
    answers start with it."""
    rendered, _ = reply(template, tokenizer, "y")
    start = max(begin for begin, _, role in rendered.contents if role == "assistant")
    return rendered.text[rendered.spans[-1][0] : start].strip()


def turn_end(template: Template, tokenizer: Any) -> TurnEnd:
    """The end of an answer as ``template`` trains it: the supervised text after the answer's content."""
    rendered, supervised = reply(template, tokenizer, "y")
    last = supervised[-1]
    if last in special_ids(tokenizer):
        return TurnEnd((last,), "")
    answer_end = max(end for _, end, role in rendered.contents if role == "assistant")
    text = rendered.text[answer_end : rendered.spans[-1][1]]
    if not text:
        raise TemplateError(
            f"template {template.name!r} writes nothing after an answer (no control token, no text): a model trained "
            "on it never learns to stop and generation runs to max_new_tokens; use a chat template that ends the "
            "assistant turn (with the EOS or an end-of-turn token), or vicuna_v1"
        )
    return TurnEnd((), text)


def replace_chat_template(tokenizer: Any, template: str) -> None:
    """Give ``tokenizer`` the chat template ``template`` in place of its own (``model.llm.chat_template``), keeping its
    control tokens: unless the tokenizer lists them already, the control tokens of both templates (:func:`special_ids`)
    become its ``chat_control_tokens``, the list transformers' ``sanitize_control_tokens`` reads and
    ``save_pretrained`` writes, so that a record's text "<think>" does not become Qwen3's ``<think>`` under a template
    that no longer writes it, in training or in the exported tokenizer."""
    listed = getattr(tokenizer, "chat_control_tokens", None)
    before = control_texts(tokenizer)
    tokenizer.chat_template = template
    if listed is None:
        tokenizer.chat_control_tokens = sorted({*before, *control_texts(tokenizer)})


def special_ids(tokenizer: Any) -> set[int]:
    """Every id the tokenizer treats as a control token: its special tokens, its added special tokens, and, as
    transformers' ``sanitize_control_tokens`` counts them, an added token its ``chat_control_tokens`` list, or
    otherwise one that its chat template's literal text holds, whitespace tokens aside (Gemma's newlines are text
    there): Qwen2.5 adds ``<tool_call>`` without the special flag, and a record's text "<tool_call>" had become it."""
    found = set(tokenizer.all_special_ids)
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    listed = getattr(tokenizer, "chat_control_tokens", None)
    template = getattr(tokenizer, "chat_template", None)
    literal = _literal_text(template) if isinstance(template, str) and listed is None else ""
    for i, t in decoder.items():
        written = t.content in listed if listed is not None else t.content in literal and not t.content.isspace()
        if getattr(t, "special", False) or (t.content and written):
            found.add(i)
    return found


@functools.lru_cache(maxsize=16)
def _literal_text(template: str) -> str:
    """A chat template's literal text (its raw text and string constants, joined by NULs so that no token is found
    across two): what it can write as it stands. The whole template where it does not parse here."""
    source = _GENERATION_TAG.sub("", template)  # transformers' extension, unknown to a plain environment
    try:
        tree = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(source)
    except jinja2.TemplateSyntaxError:
        return template
    literals = {node.data for node in tree.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in tree.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return "\0".join(literals)


def control_texts(tokenizer: Any) -> list[str]:
    """The control tokens' texts (:func:`special_ids`), longest first, so that one is never found as a start of
    another."""
    texts = tokenizer.convert_ids_to_tokens(sorted(special_ids(tokenizer)))
    return sorted((t for t in texts if t), key=len, reverse=True)


def plain_text_ids(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """The token ids of each of ``texts`` (captions, answers: assistant text the data wrote) as :func:`tokenize`
    tokenizes them inside a rendered conversation: a special token or ``<image>`` written in them is the plain
    characters it is made of (:func:`_plain_specials`), so what reads a caption outside training (the alignment
    probes, VLAP's word prior) sees the tokens training saw, not control tokens. All are tokenized in one call; only a
    text where the tokenizer found a control token is tokenized again."""
    texts = list(texts)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    specials = special_ids(tokenizer)
    out = []
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        if not specials.isdisjoint(ids):
            as_text = Rendered(text, (), ((0, len(text), "assistant"),))
            ids, _ = _plain_specials(ids, [tuple(o) for o in offsets], as_text, tokenizer)
        out.append(list(ids))
    return out


def _image_id(tokenizer: Any) -> int | None:
    """The id of ``<image>`` where the vocabulary holds it. Looked up alone: ``get_vocab()`` builds the whole vocabulary
    as a dict (13 ms at 49k entries, 69 ms at 151k), which, once per sample, was 80 % of a sample's CPU time. An
    unknown token converts to the unknown token's id (or None), which does not convert back to ``<image>``."""
    image = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return image if image is not None and tokenizer.convert_ids_to_tokens(image) == IMAGE_TOKEN else None


def _plain_specials(
    ids: list[int], offsets: list[tuple[int, int]], rendered: Rendered, tokenizer: Any
) -> tuple[list[int], list[tuple[int, int]]]:
    """Replace each control token whose characters lie inside a content span by the plain tokens of its characters.
    Only the control tokens are looked up in the spans: every token against every span grew with tokens x turns
    (1.9 ms a sample at 30 rounds). A token is looked up by its characters less the whitespace around them: one
    that its tokenizer marks to swallow the whitespace beside it (``rstrip``/``lstrip``, as Phi-3 marks ``<|end|>``)
    reaches past a message that ends (or starts) with it into the template's own space, and was kept a control
    token."""
    specials = special_ids(tokenizer)
    image = _image_id(tokenizer)
    found = [k for k, token in enumerate(ids) if token in specials]
    out_ids: list[int] = []
    out_offsets: list[tuple[int, int]] = []
    done = 0  # ids[:done] are in the output
    cores = [_without_whitespace(rendered.text, offsets[k]) for k in found]
    for k, role in zip(found, _content_roles(cores, rendered.contents)):
        if role is None or (ids[k] == image and role == "user"):
            continue
        a, b = offsets[k]
        plain_ids, plain_offsets = _plain_tokens(rendered.text[a:b], tokenizer, specials)
        out_ids += [*ids[done:k], *plain_ids]
        out_offsets += [*offsets[done:k], *((x + a, y + a) for x, y in plain_offsets)]
        done = k + 1
    return out_ids + ids[done:], out_offsets + list(offsets[done:])


def _plain_tokens(piece: str, tokenizer: Any, controls: set[int]) -> _Tokens:
    """The tokens of ``piece`` as the plain characters it is made of: special tokens split (``split_special_tokens``),
    and where a control token that is no special one still matches (an added token the chat template writes, which
    the tokenizer always matches), the piece is cut after that match's first character and each side tokenized so."""
    enc = tokenizer(piece, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [(x, y) for x, y in enc["offset_mapping"]]
    hit = next((k for k, i in enumerate(ids) if i in controls and offsets[k][1] - offsets[k][0] > 1), None)
    if hit is None:
        return ids, offsets
    cut = offsets[hit][0] + 1
    left, right = _plain_tokens(piece[:cut], tokenizer, controls), _plain_tokens(piece[cut:], tokenizer, controls)
    return left[0] + right[0], left[1] + [(x + cut, y + cut) for x, y in right[1]]


def _without_whitespace(text: str, offset: tuple[int, int]) -> tuple[int, int]:
    """A token's offsets less the whitespace at either end of its characters (all of them where it is whitespace)."""
    a, b = offset
    piece = text[a:b]
    core = piece.strip()
    if not core:
        return a, b
    start = a + len(piece) - len(piece.lstrip())
    return start, start + len(core)


def _content_roles(offsets: list[tuple[int, int]], contents: Sequence[tuple[int, int, str]]) -> list[str | None]:
    """For each token's offsets, the role of the first content span that holds it (None for none, or for a token of
    no characters)."""
    if not offsets or not contents:
        return [None] * len(offsets)
    tokens = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    spans = np.asarray([(s, e) for s, e, _ in contents], dtype=np.int64)
    inside = (spans[None, :, 0] <= tokens[:, None, 0]) & (tokens[:, None, 1] <= spans[None, :, 1])
    inside &= (tokens[:, 0] < tokens[:, 1])[:, None]
    first = inside.argmax(axis=1)
    return [contents[j][2] if inside[t, j] else None for t, j in enumerate(first.tolist())]
