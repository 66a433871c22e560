"""A small byte-level BPE tokenizer trained in memory, so tests need no hub and no files.

It behaves like the real ones the framework meets: BOS/EOS/PAD specials, offsets for label masking,
and a ChatML chat template, so the ``chat`` template path is exercised by the tiny model too.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "A handwritten digit zero one two three four five six seven eight nine 0 1 2 3 4 5 6 7 8 9.",
    "What digit is shown in the image? Answer with a single number. Is it even or odd? yes no",
    "A red circle in the top left and a blue square in the bottom right, a green triangle.",
    "How many shapes are there? What color is the shape? Where is the yellow purple orange object?",
    "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:",
    "The quick brown fox jumps over the lazy dog. Describe the picture briefly, please.",
]


@lru_cache(maxsize=4)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = 512):
    """A fresh ``PreTrainedTokenizerFast`` (callers add tokens to it, so never share one instance)."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab_size)),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHATML
    return tok
