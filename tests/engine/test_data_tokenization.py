"""Tokenization and label masking, checked against independent tokenizations of the pieces and
against Hugging Face's own assistant mask (`{% generation %}` template)."""

from __future__ import annotations

import logging

import datasets
import pytest

from secure_kd.data import IGNORE_INDEX, detect_schema, tokenize_records, train_tiny_tokenizer

TEXTS = [
    "What is the capital of France? The capital of France is Paris.",
    "Please summarise the ticket. The customer reported a broken router.",
    "Hello there, how are you today? I am fine, thank you for asking.",
] * 4

# The same ChatML rendering, with the assistant content and end marker inside a generation block,
# so `apply_chat_template(..., return_assistant_tokens_mask=True)` gives a reference mask.
CHATML_WITH_GENERATION = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871."},
]


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer(TEXTS, vocab_size=320)


def trained_ids(example):
    return [label for label in example.labels if label != IGNORE_INDEX]


def trained_runs(example):
    """Contiguous runs of trained labels."""
    runs, current = [], []
    for label in example.labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs


def test_plain_text_trains_every_token_and_appends_eos(tok):
    [example] = tokenize_records([{"text": TEXTS[0]}], tok, max_length=512)
    assert example.input_ids[-1] == tok.eos_token_id
    assert tok.decode(example.input_ids) == TEXTS[0] + "<|endoftext|>"
    assert example.labels == example.input_ids
    assert example.record_index == 0 and not example.truncated
    [no_eos] = tokenize_records([{"text": TEXTS[0]}], tok, max_length=512, add_eos=False)
    assert tok.decode(no_eos.input_ids) == TEXTS[0]


def test_prompt_completion_masks_the_prompt(tok):
    prompt, completion = "What is the capital of France?", " The capital of France is Paris."
    records = datasets.Dataset.from_list([{"prompt": prompt, "completion": completion}])
    [example] = tokenize_records(records, tok, max_length=512)
    prompt_ids = tok(prompt)["input_ids"]
    completion_ids = tok(completion, add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt_ids + completion_ids + [tok.eos_token_id]
    assert example.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert tok.decode(trained_ids(example)) == completion + "<|endoftext|>"

    [unmasked] = tokenize_records(records, tok, max_length=512, mask_prompt=False)
    assert unmasked.labels == unmasked.input_ids == example.input_ids


def test_chat_masks_all_but_assistant_turns(tok):
    [example] = tokenize_records([{"messages": CONVERSATION}], tok, max_length=512)
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tok.decode(run) for run in trained_runs(example)] == [a + "<|im_end|>" for a in assistant]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    expected = [i for a in assistant for i in tok(a, add_special_tokens=False)["input_ids"] + [im_end]]
    assert trained_ids(example) == expected
    # the whole sequence is what the tokenizer makes of the rendered conversation (no eos added)
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert example.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]


def test_chat_mask_equals_hugging_face_assistant_mask(tok):
    reference = tok.apply_chat_template(
        CONVERSATION,
        chat_template=CHATML_WITH_GENERATION,
        return_assistant_tokens_mask=True,
        return_dict=True,
    )
    [example] = tokenize_records([{"messages": CONVERSATION}], tok, max_length=512)
    assert example.input_ids == list(reference["input_ids"])
    assert [int(label != IGNORE_INDEX) for label in example.labels] == list(reference["assistant_masks"])


def test_chat_prompt_matches_generation_prompt(tok):
    """The tokens before the first trained one are exactly what the model sees at inference."""
    [example] = tokenize_records([{"messages": CONVERSATION[:3]}], tok, max_length=512)
    first_trained = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert example.input_ids[:first_trained] == tok(prompt, add_special_tokens=False)["input_ids"]


def test_conversational_prompt_completion_trains_only_the_completion(tok):
    record = {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}
    [example] = tokenize_records([record], tok, max_length=512)
    assert [tok.decode(run) for run in trained_runs(example)] == ["Rome, since 1871.<|im_end|>"]


def test_string_prompt_completion_through_chat_template(tok):
    record = {"prompt": "Capital of Italy?", "completion": "Rome."}
    [example] = tokenize_records([record], tok, max_length=512, use_chat_template=True)
    assert tok.decode(example.input_ids) == (
        "<|im_start|>user\nCapital of Italy?<|im_end|>\n<|im_start|>assistant\nRome.<|im_end|>\n"
    )
    assert tok.decode(trained_ids(example)) == "Rome.<|im_end|>"


def test_truncation_is_flagged_and_logged(tok, caplog):
    records = [{"text": TEXTS[0]}, {"text": "short"}]
    with caplog.at_level(logging.WARNING, logger="secure_kd.data.tokenization"):
        examples = tokenize_records(records, tok, max_length=8)
    assert [len(e) for e in examples][0] == 8
    assert [e.truncated for e in examples] == [True, False]
    assert examples[0].input_ids == tok(TEXTS[0])["input_ids"][:8]
    assert "1 of 2 records were truncated to max_length=8" in caplog.text


def test_record_with_nothing_trained_is_dropped_but_indices_stay(tok, caplog):
    records = [
        {"prompt": "a very long prompt " * 20, "completion": " yes"},
        {"prompt": "short", "completion": " ok"},
    ]
    with caplog.at_level(logging.WARNING, logger="secure_kd.data.tokenization"):
        examples = tokenize_records(records, tok, max_length=16)
    assert [e.record_index for e in examples] == [1]
    assert "1 of 2 records were dropped" in caplog.text


def test_schema_detection():
    assert detect_schema(["messages", "id"]) == "chat"
    assert detect_schema(["prompt", "completion"]) == "prompt_completion"
    assert detect_schema(["text", "label"]) == "text"
    assert detect_schema(["body"], text_field="body") == "text"


def test_missing_field_names_the_field_and_the_fields_present(tok):
    with pytest.raises(ValueError, match=r"'text'.*fields present: \['body', 'id'\]"):
        tokenize_records([{"body": "x", "id": 1}], tok, max_length=8)
    with pytest.raises(ValueError, match=r"record 1 has no field 'completion'; fields present: \['prompt'\]"):
        tokenize_records([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], tok, max_length=8)


def test_bad_chat_input_is_refused(tok):
    with pytest.raises(ValueError, match="needs the chat template"):
        tokenize_records([{"messages": CONVERSATION}], tok, max_length=64, use_chat_template=False)
    with pytest.raises(ValueError, match=r"message 0 must be a mapping with string 'role' and 'content'"):
        tokenize_records([{"messages": [{"role": "user"}]}], tok, max_length=64)
    no_template = train_tiny_tokenizer(TEXTS, vocab_size=300)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        tokenize_records([{"messages": CONVERSATION}], no_template, max_length=64)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        tokenize_records([{"text": "x"}], tok, max_length=0)


def test_template_whose_prefixes_disagree_is_refused_unless_unmasked(tok):
    # renders the last message differently from the same message inside a longer conversation
    odd = (
        "{% for message in messages %}{% if loop.last %}{{ message['content'] | upper }}"
        "{% else %}{{ message['content'] }}{% endif %}{% endfor %}"
    )
    tok_odd = train_tiny_tokenizer(TEXTS, vocab_size=300)
    tok_odd.chat_template = odd
    with pytest.raises(ValueError, match="renders a conversation's prefixes differently"):
        tokenize_records([{"messages": CONVERSATION}], tok_odd, max_length=256)
    [example] = tokenize_records([{"messages": CONVERSATION}], tok_odd, max_length=256, mask_prompt=False)
    assert example.labels == example.input_ids
