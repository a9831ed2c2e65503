"""The tiny local tokenizer: lossless round trip, ChatML template, deterministic training."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from secure_kd.data import generate_corpus, train_tiny_tokenizer

CORPUS = generate_corpus(60, seed=11, n_canaries=2)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(CORPUS.texts(), vocab_size=400)


def test_round_trip_on_corpus_and_unseen_text(tokenizer):
    samples = CORPUS.texts()[:20] + [
        "  leading spaces,\ttabs\nand newlines\n\n",
        "unicode: café, Straße, 東京, emoji 😀, and a zero-width\u200bspace",
        "",
    ]
    for text in samples:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_special_tokens(tokenizer):
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    # special tokens are atomic, not split into bytes
    assert tokenizer("<|im_start|>user", add_special_tokens=False)["input_ids"][0] == 1
    # nothing is added silently around a text
    assert (
        tokenizer("hi", add_special_tokens=True)["input_ids"]
        == tokenizer("hi", add_special_tokens=False)["input_ids"]
    )
    assert len(tokenizer) <= 400


def test_chat_template_renders_chatml(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == expected[: expected.index("Hello.")]


def test_system_prompt_is_added_like_smollm2():
    tokenizer = train_tiny_tokenizer(CORPUS.texts()[:10], vocab_size=300, system_prompt="You are helpful.")
    user_only = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(user_only, tokenize=False) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "S"}] + user_only
    assert tokenizer.apply_chat_template(with_system, tokenize=False).count("system") == 1


def test_training_is_deterministic_and_depends_on_the_texts():
    first = train_tiny_tokenizer(CORPUS.texts(), vocab_size=350)
    second = train_tiny_tokenizer(CORPUS.texts(), vocab_size=350)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    other = train_tiny_tokenizer(generate_corpus(60, seed=12).texts(), vocab_size=350)
    assert other.backend_tokenizer.to_str() != first.backend_tokenizer.to_str()


def test_bpe_learns_merges_within_the_vocab_budget(tokenizer):
    text = CORPUS.texts()[0]
    n_tokens = len(tokenizer(text)["input_ids"])
    assert len(tokenizer) > 259  # some merges were learned beyond the 256 bytes + 3 specials
    assert n_tokens < 0.75 * len(text.encode("utf-8"))  # and they compress the text


def test_save_and_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = CORPUS.texts()[3]
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.chat_template == tokenizer.chat_template
    assert reloaded.eos_token == "<|endoftext|>"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab_size": 100}, "vocab_size must be >= 259"),
        ({"min_frequency": 0}, "min_frequency"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_tiny_tokenizer(["some text"], **kwargs)
    with pytest.raises(ValueError, match="at least one text"):
        train_tiny_tokenizer([])
