"""A tiny byte-level BPE tokenizer with a ChatML template, trained locally (no hub needed)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)  # ids 0, 1, 2

# ChatML as in SmolLM2-Instruct, without its default system prompt (pass `system_prompt` for one).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chatml_template(system_prompt: str | None = None) -> str:
    """The ChatML Jinja template; with `system_prompt`, it is inserted when the first turn is not a
    system turn (SmolLM2's behaviour)."""
    if system_prompt is None:
        return CHATML_TEMPLATE
    if "'" in system_prompt or "\\" in system_prompt or "{" in system_prompt:
        raise ValueError("system_prompt must not contain quotes, backslashes or braces (it goes into Jinja)")
    default_turn = (
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\n" + system_prompt + "<|im_end|>\n' }}{% endif %}"
    )
    return CHATML_TEMPLATE.replace(
        "{% for message in messages %}", "{% for message in messages %}" + default_turn
    )


def train_tiny_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    *,
    min_frequency: int = 2,
    system_prompt: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` with the `tokenizers` library.

    Special tokens: `<|endoftext|>` (id 0; eos and pad), `<|im_start|>` (1), `<|im_end|>` (2).
    The 256 byte symbols are always in the vocabulary, so any text round-trips:
    `decode(encode(text)) == text`. The chat template is ChatML (see `chatml_template`).
    Training is deterministic: the same texts in the same order give the same tokenizer.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (256 byte symbols + "
            f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    texts = list(texts)
    if not texts:
        raise ValueError("train_tiny_tokenizer needs at least one text")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    tokenizer.chat_template = chatml_template(system_prompt)
    return tokenizer


def load_tokenizer_dir(path: str) -> PreTrainedTokenizerFast:
    """A tokenizer saved with `save_pretrained` (a directory holding tokenizer.json, no model needed).

    Refuses, naming the directory, one without tokenizer.json: byte offsets need a fast tokenizer."""
    from pathlib import Path

    from transformers import AutoTokenizer

    directory = Path(path)
    if not (directory / "tokenizer.json").is_file():
        raise ValueError(
            f"tokenizer directory {path!r} has no tokenizer.json; save a fast tokenizer there with "
            "`tokenizer.save_pretrained(dir)` (or give a Hugging Face model directory)"
        )
    try:
        return AutoTokenizer.from_pretrained(directory, use_fast=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load a tokenizer from {path!r}: {exc}") from None
