"""Label masks: for every template and tokenizer, the supervised tokens decode to exactly the assistant turns."""

from __future__ import annotations

import json
from functools import lru_cache

import pytest

from alignlm.constants import IGNORE_INDEX, IMAGE_TOKEN
from alignlm.data.templates import (
    TemplateError,
    TurnEnd,
    get_template,
    plain_text_ids,
    special_ids,
    to_turns,
    tokenize,
    turn_end,
)
from alignlm.models.tokenizer import CHATML, build_tiny_tokenizer

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat digit is shown in the image? Answer with a single number."},
    {"from": "gpt", "value": "7"},
    {"from": "human", "value": "Is it even or odd?"},
    {"from": "gpt", "value": "It is odd, because seven is not divisible by two."},
]
CAPTION = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A handwritten digit seven."}]


def _with_image_token(tok):
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    return tok


def _tiny():
    return _with_image_token(build_tiny_tokenizer())


def _tiny_with_bos():
    """A Llama-like tokenizer that prepends BOS itself."""
    from tokenizers.processors import TemplateProcessing

    tok = _tiny()
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    return tok


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from alignlm.models.llm import _smollm2_gguf

    gguf = _smollm2_gguf()
    return _with_image_token(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))


def supervised_segments(ids, labels, tok) -> list[str]:
    """Decode each maximal run of supervised tokens separately."""
    segments, current = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            current.append(int(i))
        elif current:
            segments.append(tok.decode(current))
            current = []
    if current:
        segments.append(tok.decode(current))
    return segments


def expected_answers(template: str, tok, conversation) -> list[str]:
    answers = [m["value"] for m in conversation if m["from"] == "gpt"]
    if template == "plain":
        return [answers[0] + "\n"]
    eot = tok.eos_token if template == "vicuna_v1" else "<|im_end|>"
    return [a + eot for a in answers]


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "chat"])
@pytest.mark.parametrize("make_tok", [_tiny, _tiny_with_bos], ids=["tiny", "tiny_bos"])
def test_supervised_tokens_are_the_assistant_turns(template, make_tok):
    tok = make_tok()
    conv = CAPTION if template == "plain" else CONVERSATION
    ids, labels = tokenize(get_template(template).render(to_turns(conv), tok), tok)
    got = [s.strip(" ") for s in supervised_segments(ids, labels, tok)]
    assert got == expected_answers(template, tok, conv)
    assert (ids == tok.convert_tokens_to_ids(IMAGE_TOKEN)).sum() == 1


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "chat"])
def test_real_tokenizer_smollm2(template, smollm2_tokenizer):
    tok = smollm2_tokenizer
    conv = CAPTION if template == "plain" else CONVERSATION
    ids, labels = tokenize(get_template(template).render(to_turns(conv), tok), tok)
    got = [s.strip(" ") for s in supervised_segments(ids, labels, tok)]
    assert got == expected_answers(template, tok, conv)


@pytest.mark.parametrize("template", ["plain", "vicuna_v1"])
def test_bos_only_when_the_tokenizer_uses_one_and_as_an_id_never_text(template):
    """The BOS is the tokenizer's, as in LLaVA's tokenizer call: text holding "<s>" got a second BOS from the exported
    processor, and a SentencePiece tokenizer tokenizes the word after a written "<s>" without its "▁"."""
    conv = CAPTION if template == "plain" else CONVERSATION
    for tok, first in ((_tiny(), []), (_tiny_with_bos(), [_tiny_with_bos().bos_token_id])):
        rendered = get_template(template).render(to_turns(conv), tok)
        ids, labels = tokenize(rendered, tok)
        assert "<s>" not in rendered.text and ids[:1].tolist() != [] and (ids == tok.bos_token_id).sum() == len(first)
        assert ids[: len(first)].tolist() == first and (labels[: len(first)] == -100).all()


def test_generation_prompt_ends_where_the_answer_starts():
    tok = _tiny()
    for name in ("vicuna_v1", "chat"):
        t = get_template(name)
        prompt = t.render(to_turns(CONVERSATION[:1]), tok, add_generation_prompt=True).text
        full = t.render(to_turns(CONVERSATION[:2]), tok).text
        assert full.startswith(prompt) and full[len(prompt) :].strip().startswith("7")


def test_system_prompt_is_configurable():
    tok = _tiny()
    text = get_template("chat", system="Answer briefly.").render(to_turns(CONVERSATION), tok).text
    assert text.startswith("<|im_start|>system\nAnswer briefly.")
    text = get_template("vicuna_v1", system="Be terse.").render(to_turns(CONVERSATION), tok).text
    assert text.startswith("Be terse. USER:")


@pytest.mark.parametrize(
    "conv,template,match",
    [
        (CONVERSATION, "plain", "one user turn then one assistant turn"),
        ([{"from": "human", "value": "hi"}], "vicuna_v1", "alternate"),
        ([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}], "chat", "alternate"),
        ([{"from": "robot", "value": "hi"}], "chat", "robot"),
    ],
)
def test_bad_conversations_raise(conv, template, match):
    with pytest.raises(TemplateError, match=match):
        get_template(template).render(to_turns(conv), _tiny())


def test_unknown_template_lists_choices():
    with pytest.raises(ValueError, match="chat.*plain.*vicuna_v1"):
        get_template("alpaca")


def test_chat_template_without_prefix_property_raises():
    tok = _tiny()
    # a template that renders the last turn differently breaks prefix rendering: refuse, do not guess
    tok.chat_template = "{% for m in messages %}{% if loop.last %}LAST:{% endif %}{{ m['content'] }}|{% endfor %}"
    with pytest.raises(TemplateError, match="prefix"):
        get_template("chat").render(to_turns(CONVERSATION), tok)


def test_a_chat_template_that_refuses_a_conversation_is_a_template_error():
    """A template's raise_exception (Gemma: no system role) is alignlm's TemplateError, so the dataset skips and counts
    the record under on_error=skip; jinja2's own error stopped the run."""
    tok = _tiny()
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + CHATML
    )
    turns = to_turns([{"from": "system", "value": "Be brief."}, *CONVERSATION])
    with pytest.raises(TemplateError, match="chat template refused this conversation.*System role not supported"):
        get_template("chat").render(turns, tok)


THREE_HASH = (  # an assistant turn that ends in plain text, no control token
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '### Human: ' + m['content'] + '\\n' }}"
    "{% else %}{{ '### Assistant: ' + m['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant: ' }}{% endif %}"
)


def test_a_chat_turn_that_ends_in_text_supervises_that_text_and_stops_there():
    """The text that closes an assistant turn is learnt and ends generation, as ``plain``'s newline does (it was
    stripped: the model never learnt to stop and generation ran to max_new_tokens)."""
    tok = _tiny()
    tok.chat_template = THREE_HASH
    ids, labels = tokenize(get_template("chat").render(to_turns(CONVERSATION), tok), tok)
    assert supervised_segments(ids, labels, tok) == [m["value"] + "\n\n" for m in CONVERSATION if m["from"] == "gpt"]
    assert turn_end(get_template("chat"), tok) == TurnEnd((), "\n\n")


def test_a_chat_template_that_writes_nothing_after_an_answer_has_no_turn_end():
    tok = _tiny()
    tok.chat_template = THREE_HASH.replace(" + '\\n\\n'", "")
    with pytest.raises(TemplateError, match="template 'chat' writes nothing after an answer"):
        turn_end(get_template("chat"), tok)


# ---- SentencePiece (Llama-style) tokenizers -------------------------------------------------------------------------

ZEPHYR = (  # TinyLlama-Chat's template: the answer follows a newline
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
MISTRAL = (  # Mistral-Instruct's: the answer follows "[/INST]"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)


@lru_cache(maxsize=2)
def _llama_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A SentencePiece-style BPE vocabulary (pieces start with "▁", byte-fallback pieces) trained in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    bpe.train_from_iterator([m["value"] for m in CONVERSATION] * 8, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return vocab, [tuple(m) for m in model["merges"]]


def _llama(legacy: bool):
    """transformers' own LlamaTokenizer (what AutoTokenizer gives for Llama-2, Vicuna, Mistral), offline."""
    from transformers import LlamaTokenizer

    vocab, merges = _llama_vocab()
    return _with_image_token(LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy))


@pytest.mark.parametrize("chat_template", [ZEPHYR, MISTRAL], ids=["zephyr", "mistral"])
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "not_legacy"])
def test_a_sentencepiece_chat_answer_is_tokenized_as_the_whole_conversation(chat_template, legacy):
    """Training sees the tokens the whole conversation gives (LLaVA, apply_chat_template(tokenize=True), the exported
    processor): an answer after "\\n" or "]" starts "It", not the "▁It" of the answer tokenized alone; the prompt
    is still the one generation tokenizes."""
    tok = _llama(legacy)
    tok.chat_template = chat_template
    chat = get_template("chat")
    ids, labels = tokenize(chat.render(to_turns(CONVERSATION), tok), tok)
    assert ids.tolist() == tok(chat.render(to_turns(CONVERSATION), tok).text).input_ids
    prompt, _ = tokenize(chat.render(to_turns(CONVERSATION[:1]), tok, add_generation_prompt=True), tok)
    assert ids[: len(prompt)].tolist() == prompt.tolist() and (labels[: len(prompt)] == IGNORE_INDEX).all()
    starts = [int(i) for k, i in enumerate(ids) if k and labels[k] != IGNORE_INDEX and labels[k - 1] == IGNORE_INDEX]
    assert len(starts) == 2 and not any(t.startswith("▁") for t in tok.convert_ids_to_tokens(starts))


def test_an_answer_that_would_merge_into_the_prompt_is_tokenized_alone(smollm2_tokenizer, monkeypatch):
    """Where the whole string would merge the prompt's last token into the answer ("\\n" + "  7" is "\\n " then " 7"
    in SmolLM2), the answer is tokenized alone: training sees the prompt generation sees. Answers are stripped, so
    here the chat template writes the spaces that open the answer's turn."""
    tok, chat = smollm2_tokenizer, get_template("chat")
    monkeypatch.setattr(
        tok,
        "chat_template",
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + ('  ' if m['role'] == 'assistant' else '') "
        "+ m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}",
    )
    turns = to_turns([{"from": "human", "value": "Digit?"}, {"from": "gpt", "value": "7"}])
    prompt, _ = tokenize(chat.render(turns[:1], tok, add_generation_prompt=True), tok)
    ids, labels = tokenize(chat.render(turns, tok), tok)
    assert ids[: len(prompt)].tolist() == prompt.tolist() and (labels[: len(prompt)] == IGNORE_INDEX).all()
    assert supervised_segments(ids, labels, tok) == ["  7<|im_end|>"]


def _typed(conversation):
    """LLaVA records -> Hugging Face processor messages with typed image/text content."""
    msgs = []
    for m in conversation:
        text = m["value"].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")
        content = [{"type": "image"}] * m["value"].count(IMAGE_TOKEN) + (
            [{"type": "text", "text": text}] if text else []
        )
        msgs.append({"role": "user" if m["from"] == "human" else "assistant", "content": content})
    return msgs


@pytest.mark.parametrize(
    "template,kwargs", [("plain", {}), ("vicuna_v1", {}), ("chat", {}), ("chat", {"system": "Answer briefly."})]
)
@pytest.mark.parametrize("make_tok", [_tiny, _tiny_with_bos], ids=["tiny", "tiny_bos"])
def test_jinja_export_renders_what_training_saw(template, kwargs, make_tok):
    """The processor chat template an export ships gives the training text, for the prompt and the whole dialog."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = make_tok()
    t = get_template(template, **kwargs)
    conv = CAPTION if template == "plain" else CONVERSATION
    for upto, gen in ((len(conv), False), (1, True)):
        want = t.render(to_turns(conv[:upto]), tok, add_generation_prompt=gen).text
        got, _ = render_jinja_template(
            conversations=[_typed(conv[:upto])],
            chat_template=t.jinja(tok),
            add_generation_prompt=gen,
            **tok.special_tokens_map,
        )
        assert got[0] == want


# ---- LLaVA-1.5 fidelity -----------------------------------------------------------------------------------------------

LLAVA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_RECORDS = [  # LLaVA-Instruct-150K's shapes: the image after the question, before it, alone; several turns
    [
        {"from": "human", "value": "What are the colors of the bus in the image?\n<image>"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."},
    ],
    [{"from": "human", "value": "<image>\nWhat is the man doing?"}, {"from": "gpt", "value": "He is surfing."}],
    [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A photo of a cat on a sofa."}],
    [{"from": "human", "value": "Describe it. <image> Briefly."}, {"from": "gpt", "value": "A red square."}],
]


def llava15_prompt(conversation: list[dict]) -> str:
    """LLaVA-1.5's prompt, written from its description: ``preprocess_multimodal`` moves a turn's <image> to its front
    (removed, the rest stripped, "<image>\\n" prepended, stripped again); ``conv_vicuna_v1`` joins the system prompt and
    "ROLE: message" turns with " " after user turns and "</s>" after assistant turns."""
    text = LLAVA_SYSTEM + " "
    for m in conversation:
        value = m["value"]
        if IMAGE_TOKEN in value:
            value = (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()
        text += ("USER: " + value + " ") if m["from"] == "human" else ("ASSISTANT: " + value + "</s>")
    return text


def llava15_supervised(conversation: list[dict]) -> list[str]:
    """LLaVA-1.5's masking rule: per round, what follows "ASSISTANT: " up to and including "</s>"."""
    return [m["value"] + "</s>" for m in conversation if m["from"] == "gpt"]


@pytest.mark.parametrize("conversation", LLAVA_RECORDS, ids=["image_last", "image_first", "image_only", "image_inside"])
def test_vicuna_v1_is_llava15_on_llava_records(conversation):
    tok = _tiny()
    rendered = get_template("vicuna_v1").render(to_turns(conversation), tok)
    assert rendered.text == llava15_prompt(conversation)  # the same prompt text, image placement included
    ids, labels = tokenize(rendered, tok)
    assert [s.strip() for s in supervised_segments(ids, labels, tok)] == llava15_supervised(conversation)


def test_image_placement_in_place_on_request():
    tok = _tiny()
    turns = to_turns(LLAVA_RECORDS[0])
    kept = get_template("vicuna_v1", image_first=False).render(turns, tok).text
    assert (
        "the image?\n<image> ASSISTANT:" in kept
        and "USER: <image>\nWhat are" in get_template("vicuna_v1").render(turns, tok).text
    )


@pytest.mark.parametrize(
    "template,kwargs",
    [("vicuna_v1", {}), ("chat", {}), ("chat", {"image_first": False})],
)
def test_answers_are_stripped_in_training_and_in_the_exported_template(template, kwargs):
    """docs/core.md: an answer's surrounding whitespace is never a token the model must learn to write. ``chat``
    supervised " 7\n\n" (the spaces and newlines before its end of turn); the exported chat template trims alike, so
    an exported model is prompted with the history as training rendered it."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = _tiny()
    t = get_template(template, **kwargs)
    conversation = [
        {"from": "human", "value": "<image>\nDigit?"},
        {"from": "gpt", "value": "  7\n\n"},
        {"from": "human", "value": "Sure?"},
        {"from": "gpt", "value": " yes "},
    ]
    rendered = t.render(to_turns(conversation), tok)
    ids, labels = tokenize(rendered, tok)
    assert [s.strip(" ") for s in supervised_segments(ids, labels, tok)] == expected_answers(
        template, tok, [{**m, "value": m["value"].strip()} for m in conversation]
    )
    for upto, gen in ((len(conversation), False), (3, True)):
        want = t.render(to_turns(conversation[:upto]), tok, add_generation_prompt=gen).text
        got, _ = render_jinja_template(
            conversations=[_typed(conversation[:upto])],
            chat_template=t.jinja(tok),
            add_generation_prompt=gen,
            **tok.special_tokens_map,
        )
        assert got[0] == want


@pytest.mark.parametrize("with_image", [True, False], ids=["image_token", "no_image_token"])
def test_a_sample_is_tokenized_without_building_the_whole_vocabulary(with_image, monkeypatch):
    """``tokenize`` built the whole vocabulary as a dict (``get_vocab``) for every sample, to ask whether ``<image>``
    is in it: 80 % of a sample's CPU time at SmolLM2's 49k entries, 69 ms a sample at Qwen2's 151k. The image token
    stays a control token in a user turn and is plain text in an answer, with it in the vocabulary or not."""
    tok = _tiny() if with_image else build_tiny_tokenizer()
    conversation = [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A <image> tag."},
    ]
    rendered = get_template("vicuna_v1").render(to_turns(conversation), tok)
    expected = tokenize(rendered, tok)
    monkeypatch.setattr(type(tok), "get_vocab", lambda self: pytest.fail("get_vocab() for one sample"))
    ids, labels = tokenize(rendered, tok)
    assert ids.tolist() == expected[0].tolist() and labels.tolist() == expected[1].tolist()
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (ids.tolist().count(image_id) == 1) == with_image  # the question's, not the answer's
    assert tok.decode(labels[labels != IGNORE_INDEX].tolist()).strip() == "A <image> tag.</s>"


# ---- cost that grew with the square of the number of turns ---------------------------------------------------------


def _reference_tokenize(rendered, tok):
    """``tokenize`` as it was, tokenizing the whole prefix again at every answer and scanning every content span for
    every token: the definition the faster one must match. Ids and offsets (no BOS), then ids and labels."""
    import numpy as np

    from alignlm.data.templates import _image_id, adds_bos, special_ids

    text = rendered.text
    cuts = sorted({0, len(text), *(start for start, _ in rendered.spans)})
    ids, offsets, before = [], [], []
    for a, b in zip(cuts, cuts[1:]):
        upto = tok(text[:b], add_special_tokens=False, return_offsets_mapping=True)
        if upto["input_ids"][: len(before)] == before:
            ids += upto["input_ids"][len(before) :]
            offsets += upto["offset_mapping"][len(before) :]
        else:
            alone = tok(text[a:b], add_special_tokens=False, return_offsets_mapping=True)
            ids += alone["input_ids"]
            offsets += [(x + a, y + a) for x, y in alone["offset_mapping"]]
        before = upto["input_ids"]
    if rendered.contents:
        specials, image, plain_ids, plain_offsets = special_ids(tok), _image_id(tok), [], []
        for token, (a, b) in zip(ids, offsets):
            piece = text[a:b]  # placed by its characters less the whitespace an rstrip/lstrip token swallows
            x = a + len(piece) - len(piece.lstrip()) if piece.strip() else a
            y = x + len(piece.strip()) if piece.strip() else b
            role = next((r for s, e, r in rendered.contents if s <= x and y <= e and x < y), None)
            if token in specials and role is not None and not (token == image and role == "user"):
                enc = tok(text[a:b], add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
                plain_ids += enc["input_ids"]
                plain_offsets += [(x + a, y + a) for x, y in enc["offset_mapping"]]
            else:
                plain_ids.append(token)
                plain_offsets.append((a, b))
        ids, offsets = plain_ids, plain_offsets
    pieces = (list(ids), [tuple(o) for o in offsets])
    if adds_bos(tok) and ids[:1] != [tok.bos_token_id]:
        ids, offsets = [tok.bos_token_id, *ids], [(0, 0), *offsets]
    ids_arr, offs = np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    labels = np.full_like(ids_arr, IGNORE_INDEX)
    if rendered.spans:
        spans = np.asarray(rendered.spans, dtype=np.int64)
        supervised = ((offs[:, None, 0] < spans[None, :, 1]) & (offs[:, None, 1] > spans[None, :, 0])).any(axis=1)
        labels[supervised] = ids_arr[supervised]
    return pieces, ids_arr.tolist(), labels.tolist()


def _reference_chat_render(template, turns, tok, add_generation_prompt=False):
    """``ChatTemplate.render`` as it was, three renders of a prefix per message."""
    from alignlm.data.templates import _MARK, Rendered, _locate, _turn_close, control_texts

    messages = [{"role": t.role, "content": template._content(t)} for t in turns]
    if template.system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": template.system})
    render = lambda msgs, gen: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    text = render(messages, add_generation_prompt)
    spans, contents = [], []
    for i, m in enumerate(messages):
        before = render(messages[:i], m["role"] == "assistant") if i else ""
        upto = render(messages[: i + 1], False)
        assert text.startswith(before) and text.startswith(upto) and upto.startswith(before)
        marked = render([*messages[:i], {**m, "content": _MARK}], False)
        contents.append(_locate(m["content"], upto, marked.find(_MARK, len(before)), m["role"]))
        if m["role"] == "assistant":
            spans.append((len(before), _turn_close(upto, contents[-1][1], control_texts(tok))))
    return Rendered(text, tuple(spans), tuple(contents))


_PIECES = [  # what a conversation's text is drawn from: words, spaces that merge, control-token text, unicode
    "The", " cat", "7", " 42", "  ", " ", "\n", "\n\n", "\t", "<image>", "</s>", "<s>", "<|im_end|>",
    "<|im_start|>assistant\n", "é", "e\u0301", "🙂", "漢字", "▁", "ASSISTANT:", "USER:", "!", "...", "'s", "  x",
    "<|end|>", " <|end|> ",
]  # fmt: skip


def _random_conversation(rng, pairs: int) -> list[dict]:
    """Turns of random pieces, empty ones too; an answer of only whitespace (refused: a reply of nothing to train on)
    gets a word after it, so its spaces still meet the template's."""
    text = lambda: "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 8)))
    answer = lambda: (lambda t: t if t.strip() else t + "x")(text())
    system = [{"from": "system", "value": text()}] if rng.random() < 0.2 else []
    return system + [
        {"from": f, "value": answer() if f == "gpt" else text()} for _ in range(pairs) for f in ("human", "gpt")
    ]


def _oracle_tokenizers(smollm2):
    """Every kind of tokenizer the data meets, and templates and tokenizers that defeat the shortcut (a cut then
    tokenized whole): spaces the answer merges into, a normalizer that strips, control tokens split as text."""
    from tokenizers import AddedToken, normalizers

    merge_template = (  # writes the spaces an answer merges into
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + ('  ' if m['role'] == 'assistant' else '') "
        "+ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    )
    strip = _tiny()
    strip.backend_tokenizer.normalizer = normalizers.Strip()  # a prefix's closing "\n" is dropped: no shortcut
    split = _tiny()
    split.split_special_tokens = True  # control tokens are text: no pieces to tokenize alone
    swallowing = _tiny()  # a control token that takes the whitespace after it, as Phi-3's <|end|>
    swallowing.add_special_tokens(
        {"additional_special_tokens": [AddedToken("<|end|>", rstrip=True, special=True, normalized=False)]},
        replace_extra_special_tokens=False,
    )
    out = [
        ("tiny", _tiny(), CHATML),
        ("tiny_bos", _tiny_with_bos(), CHATML),
        ("smollm2", smollm2, smollm2.chat_template),
    ]
    out += [("smollm2_merge", smollm2, merge_template), ("strip", strip, CHATML), ("split", split, CHATML)]
    out += [("swallowing", swallowing, CHATML)]
    for legacy in (True, False):
        out += [(f"llama_{legacy}_{n}", _llama(legacy), t) for n, t in (("zephyr", ZEPHYR), ("mistral", MISTRAL))]
    return out


def test_tokenize_matches_the_prefix_by_prefix_definition(smollm2_tokenizer, monkeypatch):
    """Reading each prefix's tokens off the whole text's (and rendering each prefix once) gives exactly the ids,
    offsets and labels of tokenizing every prefix, for every template and tokenizer, on conversations of 1 to 30
    rounds written to trip it: spaces that merge, control-token text and ``<image>`` in answers, empty questions."""
    import random

    from alignlm.data.templates import _pieces, _plain_specials

    for name, tok, chat_template in _oracle_tokenizers(smollm2_tokenizer):
        monkeypatch.setattr(tok, "chat_template", chat_template)
        rng = random.Random(name)
        for template in ("plain", "vicuna_v1", "chat"):
            for pairs in (1, rng.randint(2, 30), rng.randint(2, 30)) if template != "plain" else (1, 1):
                turns = to_turns(_random_conversation(rng, pairs))
                gen = template != "plain" and rng.random() < 0.25
                turns = turns[:-1] if gen else turns
                rendered = get_template(template).render(turns, tok, add_generation_prompt=gen)
                if template == "chat":
                    assert rendered == _reference_chat_render(get_template("chat"), turns, tok, gen), name
                pieces, ids, labels = _reference_tokenize(rendered, tok)
                got = _plain_specials(*_pieces(rendered, tok), rendered, tok)
                assert (got[0], [tuple(o) for o in got[1]]) == pieces, (name, template, rendered.text)
                got_ids, got_labels = tokenize(rendered, tok)
                assert (got_ids.tolist(), got_labels.tolist()) == (ids, labels), (name, template, rendered.text)


@pytest.mark.parametrize("template", ["vicuna_v1", "chat"])
def test_a_long_conversation_is_tokenized_in_about_two_passes(template, smollm2_tokenizer, monkeypatch):
    """Every answer's prefix was tokenized whole again: 30 rounds cost 15 passes over the text (51 ms against 3 ms for
    one tokenizer call). Now a sample's text is read about twice, whatever its number of turns."""
    tok = smollm2_tokenizer
    rendered = get_template(template).render(to_turns(CONVERSATION * 15), tok)
    read, call = [], type(tok).__call__

    def counting(self, text, *args, **kwargs):
        read.extend([text] if isinstance(text, str) else text)
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", counting)
    tokenize(rendered, tok)
    assert sum(map(len, read)) <= 2.5 * len(rendered.text)


def test_control_tokens_are_looked_up_in_the_content_spans_once(smollm2_tokenizer):
    """Each token was looked up in every content span (tokens x turns); the spans are now read once a sample."""
    from alignlm.data.templates import Rendered

    class Counted(tuple):
        reads = 0

        def __iter__(self):
            Counted.reads += 1
            return super().__iter__()

    tok = smollm2_tokenizer
    rendered = get_template("chat").render(to_turns(CONVERSATION * 15), tok)
    expected = tokenize(rendered, tok)
    ids, labels = tokenize(Rendered(rendered.text, rendered.spans, Counted(rendered.contents)), tok)
    assert ids.tolist() == expected[0].tolist() and labels.tolist() == expected[1].tolist()
    assert Counted.reads <= 2


def test_a_chat_conversation_renders_each_prefix_once(monkeypatch):
    """The text before a user turn is the render of the turns before it, and the last turn's render is the whole text:
    each was rendered again for every message."""
    tok = _tiny()
    calls, render = [], type(tok).apply_chat_template

    def recording(self, messages, *args, **kwargs):
        calls.append((json.dumps(messages), kwargs.get("add_generation_prompt")))
        return render(self, messages, *args, **kwargs)

    monkeypatch.setattr(type(tok), "apply_chat_template", recording)
    rendered = get_template("chat", system="Be brief.").render(to_turns(CONVERSATION * 3), tok)
    assert len(calls) == len(set(calls)) and rendered.text.count("<|im_start|>assistant") == 6


def test_offsets_out_of_order_tokenize_every_prefix_whole():
    """Where the whole text's offsets are not in order, no cut can be looked up in them: each prefix is tokenized."""
    from alignlm.data.templates import _encode, _prefix_tokens

    tok = _tiny()
    rendered = get_template("vicuna_v1").render(to_turns(CONVERSATION), tok)
    text = rendered.text
    ids, offsets = _encode([text], tok)[0]
    cuts = [start for start, _ in rendered.spans]
    shuffled = (ids, [offsets[1], offsets[0], *offsets[2:]])
    assert _prefix_tokens(text, cuts, shuffled, tok) == dict(zip(cuts, _encode([text[:c] for c in cuts], tok)))
    assert all(isinstance(k, int) for k in _prefix_tokens(text, cuts, (ids, offsets), tok).values())


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "chat"])
@pytest.mark.parametrize("reply", ["", " \n"])
def test_an_empty_reply_is_refused_for_training_not_in_a_prompt(template, reply):
    """An assistant turn of nothing had trained a lone space and the end of turn (plain: a newline after the image);
    LLaVA trains no such turn. In a prompt (generation) nothing is supervised, so an earlier empty turn stays."""
    tok = _tiny()
    tok.chat_template = CHATML
    turns = [("human", f"{IMAGE_TOKEN}\nWhat?"), ("gpt", reply)]
    if template != "plain":
        turns = [("human", "Hi"), ("gpt", "Hello."), *turns]
    conversation = to_turns([{"from": f, "value": v} for f, v in turns])
    with pytest.raises(TemplateError, match=f"template '{template}': assistant turn .* is empty, a reply of nothing"):
        get_template(template).render(conversation, tok)
    if template != "plain":
        earlier = to_turns([{"from": f, "value": v} for f, v in [turns[0], ("gpt", reply), ("human", "And?")]])
        assert "And?" in get_template(template).render(earlier, tok, add_generation_prompt=True).text


# ---- chat templates of other LLM families ------------------------------------------------------------------------

LLAMA2 = (  # Llama-2-chat's: the system prompt inside the first question, a BOS before every question
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
PHI3 = (  # Phi-3's: its EOS after the last turn where no generation prompt follows
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "not_legacy"])
def test_llama2_prompts_the_exported_model_as_training_with_every_bos(legacy):
    """The export blanked ``bos_token``: Llama-2's BOS before each later question was gone, and under ``legacy=False``
    training tokenized the text after the first BOS as no text's start ("[", "INST]" against the processor's and
    Meta's "▁[INST]"). Training now tokenizes after the BOS it adds as the text's start, and the export keeps the
    later ones."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = _llama(legacy)
    tok.add_bos_token, tok.chat_template = True, LLAMA2  # as Llama-2's tokenizer: it adds the BOS itself
    chat = get_template("chat", system="Answer briefly.")
    for upto, gen in ((3, True), (4, False)):
        ids, _ = tokenize(chat.render(to_turns(CONVERSATION[:upto]), tok, add_generation_prompt=gen), tok)
        (text,), _ = render_jinja_template(
            conversations=[_typed(CONVERSATION[:upto])],
            chat_template=chat.jinja(tok),
            add_generation_prompt=gen,
            **tok.special_tokens_map,
        )
        assert ids.tolist() == tok(text).input_ids  # the exported processor: its BOS, then the text
        assert ids.tolist().count(tok.bos_token_id) == 2
        assert ids[1:4].tolist() == tok(text.removeprefix("<s>"), add_special_tokens=False).input_ids[:3]


def test_a_system_prompt_written_inside_the_first_question_is_located():
    """Llama-2, Mistral-v0.2 and Gemma-3 write the system prompt inside the first question and nothing for it alone:
    every record was refused, saying the template changes message contents."""
    tok = _llama(False)
    tok.add_bos_token, tok.chat_template = True, LLAMA2
    rendered = get_template("chat", system="Answer briefly.").render(to_turns(CONVERSATION), tok)
    assert rendered.text.startswith("[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\n<image>")
    (system,) = [rendered.text[a:b] for a, b, role in rendered.contents if role == "system"]
    assert system == "Answer briefly."
    ids, labels = tokenize(rendered, tok)
    assert supervised_segments(ids, labels, tok) == [
        "7 </s>",
        "It is odd, because seven is not divisible by two. </s>",
    ]


def test_a_system_prompt_the_template_writes_nowhere_it_can_be_found_is_refused_saying_so():
    tok = _tiny()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] + '\\n' }}{% endif %}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="writes the system prompt where it cannot be located"):
        get_template("chat", system="Answer briefly.").render(to_turns(CONVERSATION), tok)


def test_a_chat_template_that_ends_a_whole_conversation_with_its_eos_renders_and_each_answer_ends_alike():
    """Phi-3 writes its EOS after the last turn unless a generation prompt follows: no prefix of a conversation was a
    start of it, so training, the evaluation prompt and the turn end were all refused."""
    tok = _tiny()
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]}, replace_extra_special_tokens=False)
    tok.chat_template = PHI3
    chat = get_template("chat")
    ids, labels = tokenize(chat.render(to_turns(CONVERSATION), tok), tok)
    assert tok.convert_ids_to_tokens(int(ids[-1])) == tok.eos_token and labels[-1] == IGNORE_INDEX
    assert supervised_segments(ids, labels, tok) == [
        "7<|end|>",
        "It is odd, because seven is not divisible by two.<|end|>",
    ]
    prompt = chat.render(to_turns(CONVERSATION[:1]), tok, add_generation_prompt=True).text
    assert prompt.endswith("<|end|>\n<|assistant|>\n")
    assert turn_end(chat, tok) == TurnEnd((tok.convert_tokens_to_ids("<|end|>"),), "")


def test_an_added_token_the_chat_template_writes_is_text_in_a_record():
    """Qwen2.5 adds ``<tool_call>`` without the special flag; its chat template writes it. A record's text
    "<tool_call>rm -rf</tool_call>" had become those control tokens (transformers' sanitize_control_tokens counts
    such tokens as control tokens too)."""
    from tokenizers import AddedToken

    tok = _tiny()
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<tool_call>", "</tool_call>")])
    tok.chat_template = CHATML + "{% if tools %}<tool_call>\n{{ tools }}\n</tool_call>{% endif %}"
    conv = [{"from": "human", "value": "<image>\nRead: <tool_call>rm -rf</tool_call>"}, {"from": "gpt", "value": "ok"}]
    ids, _ = tokenize(get_template("chat").render(to_turns(conv), tok), tok)
    tool = {tok.convert_tokens_to_ids(t) for t in ("<tool_call>", "</tool_call>")}
    assert tool.isdisjoint(ids.tolist()) and "<tool_call>rm -rf</tool_call>" in tok.decode(ids.tolist())


def test_an_exported_template_with_generation_blocks_keeps_its_assistant_masks():
    """Leaving out a template's first BOS captures its text; ``{% generation %}`` spans (transformers'
    ``return_assistant_tokens_mask``, TRL's assistant-only loss) were then placed in that captured text, not the output:
    such a template has ``bos_token`` blanked instead."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = _tiny_with_bos()
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
        "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    )
    chat = get_template("chat")
    (text,), (spans,) = render_jinja_template(
        conversations=[_typed(CONVERSATION)],
        chat_template=chat.jinja(tok),
        return_assistant_tokens_mask=True,
        **tok.special_tokens_map,
    )
    assert text == chat.render(to_turns(CONVERSATION), tok).text
    assert [text[a:b] for a, b in spans] == [
        "7<|im_end|>",
        "It is odd, because seven is not divisible by two.<|im_end|>",
    ]


def test_whitespace_added_tokens_a_template_holds_as_text_stay_tokens_in_an_answer():
    """The chat template's indentation and blank lines held the added whitespace tokens of some tokenizers (CodeGen's
    space runs, Gemma's newlines): counted as control tokens, an answer's code was re-tokenized character by
    character, and training's ids differed from the tokenizer's. Only the template's literal text counts, and no
    whitespace token (transformers' rule)."""
    from tokenizers import AddedToken

    tok = _tiny()
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("    ", "\n\n")])
    tok.chat_template = (
        "{%- for m in messages %}\n    {{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}\n"
        "{%- endfor %}\n\n{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    conv = [
        {"from": "human", "value": "<image>\nWrite f."},
        {"from": "gpt", "value": "Here:\n\ndef f():\n    return 1"},
    ]
    rendered = get_template("chat").render(to_turns(conv), tok)
    ids, _ = tokenize(rendered, tok)
    assert ids.tolist() == tok(rendered.text).input_ids


def test_an_exported_template_renders_without_its_special_tokens_given():
    """A renderer that passes no ``bos_token`` (undefined, or None) got a TypeError from the exported template."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = _tiny_with_bos()
    tok.chat_template = "{{ bos_token }}" + CHATML
    chat = get_template("chat")
    for given in ({}, {"bos_token": None}):
        (text,), _ = render_jinja_template(conversations=[_typed(CAPTION)], chat_template=chat.jinja(tok), **given)
        assert "<|im_start|>assistant\nA handwritten digit seven.<|im_end|>" in text


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\n\n", ""])
def test_an_exported_template_that_writes_bos_and_ends_in_a_line_break_prompts_as_training(ending):
    """A chat template saved with a final line break (chat_template.jinja files are): Jinja drops one at a template's
    end, but inside the block that strips the first BOS it was kept, and the exported prompt ended in a line break
    training never saw."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = _tiny_with_bos()
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}{{ '' }}" + ending
    )
    chat = get_template("chat")
    conversation = [{"from": "human", "value": "<image>\nDigit?"}]
    want = chat.render(to_turns(conversation), tok, add_generation_prompt=True).text
    (got,), _ = render_jinja_template(
        conversations=[_typed(conversation)],
        chat_template=chat.jinja(tok),
        add_generation_prompt=True,
        **tok.special_tokens_map,
    )
    assert got == want and got.endswith("assistant\n" + ending.replace("\r\n", "\n")[1:])


def test_text_read_outside_training_never_holds_a_control_token():
    """Captions and answers read outside training (the alignment probes, VLAP's word prior): a special token or
    ``<image>`` written in them is its plain characters, as training tokenizes it inside a conversation; the tests
    that use ``plain_text_ids`` took it as their own reference, so control tokens there had gone unseen."""
    tok = build_tiny_tokenizer()
    text = f"A {tok.eos_token} tag {IMAGE_TOKEN} here."
    ids = plain_text_ids([text, "A tag here."], tok)
    assert not set(ids[0]) & special_ids(tok)
    assert ids[1] == tok("A tag here.", add_special_tokens=False)["input_ids"]  # nothing else changed


# Qwen3's rule, cut down: an empty think block before the last answer only (earlier answers are written as ChatML)
THINK_LAST = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

UPPER_ROLES = (  # ChatML with the roles in capitals: a template no tokenizer of the tests has
    CHATML.replace("message['role']", "message['role'] | upper").replace("assistant\n", "ASSISTANT\n")
)


def test_model_llm_chat_template_replaces_the_tokenizers_for_training_and_export(tiny_model, tmp_path):
    """A tokenizer whose template writes an empty think block before the last answer only (Qwen3) renders no
    conversation prefix by prefix: records of several turns were refused, with no setting to give it another
    template. ``model.llm.chat_template`` sets one (``chatml`` or a Jinja file) for training, prompts and the export
    alike; a missing file or one that is not Jinja is refused, naming the key."""
    from transformers import AutoTokenizer

    from alignlm.config import ConfigError

    tok = _tiny()
    tok.chat_template = THINK_LAST
    with pytest.raises(TemplateError, match="does not render conversations prefix by prefix"):
        get_template("chat").render(to_turns(CONVERSATION), tok)

    from alignlm.models.llm import pretrained, tiny, with_chat_template

    llm, own = tiny()
    own.chat_template = THINK_LAST
    llm.save_pretrained(tmp_path / "llm")
    own.save_pretrained(tmp_path / "llm")
    assert pretrained(str(tmp_path / "llm"))[1].chat_template == THINK_LAST
    assert pretrained(str(tmp_path / "llm"), chat_template="chatml")[1].chat_template == CHATML
    upper = tmp_path / "upper.jinja"
    upper.write_text(UPPER_ROLES)
    tok = tiny_model(f"model.llm.chat_template={upper}").tokenizer
    template = get_template("chat")
    rendered = template.render(to_turns(CONVERSATION), tok)
    assert rendered.text.startswith("<|im_start|>USER\n") and rendered.text.count("<|im_start|>ASSISTANT\n") == 2
    ids, labels = tokenize(rendered, tok)
    answers = tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert answers == "7<|im_end|>It is odd, because seven is not divisible by two.<|im_end|>"
    assert "| upper" in template.jinja(tok)  # what the exported processor prompts with

    # Qwen3's <think> is an added token without the special flag, a control token because its own template writes
    # it: under ChatML, which does not, a record's "<think>" stays text all the same
    tok = _tiny()
    tok.add_tokens(["<think>"])
    tok.chat_template = THINK_LAST
    think = tok.convert_tokens_to_ids("<think>")
    with_chat_template(tok, "chatml")
    assert tok.chat_template == CHATML and think in special_ids(tok)
    said = [{"from": "human", "value": "Write <think> here."}, {"from": "gpt", "value": "<think> is a tag."}]
    ids, _ = tokenize(get_template("chat").render(to_turns(said), tok), tok)
    assert think not in ids.tolist()
    tok.save_pretrained(tmp_path / "exported")  # as the export writes it: the list goes with it
    assert think in special_ids(AutoTokenizer.from_pretrained(tmp_path / "exported"))

    with pytest.raises(ConfigError, match=r"chat_template='t.jinja': give chatml or a Jinja file's path with a folder"):
        tiny_model("model.llm.chat_template=t.jinja")  # a path without one is never stamped as the model's file
    with pytest.raises(ConfigError, match=r"model.llm.chat_template='./missing.jinja': no such file; give chatml"):
        tiny_model("model.llm.chat_template=./missing.jinja")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }}")
    with pytest.raises(ConfigError, match=r"model.llm.chat_template: .*broken.jinja is not a Jinja template \(line 1"):
        tiny_model(f"model.llm.chat_template={broken}")


def test_a_stage_is_warned_of_text_its_template_supervises_before_every_answer(
    tiny_model, colour_set, tmp_path, alignlm_log
):
    """Qwen3's own template writes an empty think block after its generation prompt, before the answer: a one-turn
    record trained it as part of the answer, so the model learns to write it and its answers start with it, without
    a word. Building a stage's dataset warns, naming the text and the remedy; a template without it says nothing."""
    from alignlm.data.build import build_dataset

    data = {"template": "chat", "sources": [{"path": str(colour_set["pretrain"])}]}  # one-turn records
    model = tiny_model()
    build_dataset(data, model, 0, key="stages.finetune.data")
    assert "before every answer" not in alignlm_log.text
    model.tokenizer.chat_template = THINK_LAST
    build_dataset(data, model, 0, key="stages.finetune.data")
    assert (
        "stages.finetune.data.template 'chat' writes '<think>\\n\\n</think>' before every answer, inside the span it "
        "supervises" in alignlm_log.text
    )
    assert "model.llm.chat_template (chatml, or a Jinja file of your own) trains without it" in alignlm_log.text
