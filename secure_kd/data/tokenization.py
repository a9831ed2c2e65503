"""Records -> token sequences with unshifted labels: plain text, prompt/completion, chat.

Each record is cut into segments of text, each marked trained or not, and every segment is
tokenized on its own. A prompt is therefore tokenized exactly as it is at inference time
(`tokenizer(prompt)`, or the chat template with `add_generation_prompt=True`), and the trained
tokens decode exactly to the completion (plus eos) or to the assistant turns (plus the template's
end-of-turn marker).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from secure_kd.data.example import IGNORE_INDEX, TokenizedExample

if TYPE_CHECKING:  # not imported at run time: ~0.5 s per Flower ClientApp process
    import datasets

logger = logging.getLogger(__name__)

Schema = Literal["auto", "text", "prompt_completion", "chat"]
Segment = tuple[str, bool]  # (text, trained)


def detect_schema(
    fields: Iterable[str],
    *,
    text_field: str = "text",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
) -> Literal["text", "prompt_completion", "chat"]:
    """The record schema given its field names: chat, then prompt/completion, then plain text."""
    present = set(fields)
    if messages_field in present:
        return "chat"
    if prompt_field in present and completion_field in present:
        return "prompt_completion"
    if text_field in present:
        return "text"
    raise ValueError(
        f"records have none of the known schemas: need {text_field!r} (plain text), "
        f"{prompt_field!r} + {completion_field!r} (prompt/completion) or {messages_field!r} (chat); "
        f"fields present: {sorted(present)}. Pass text_field=... to name the text column."
    )


def tokenize_records(
    records: datasets.Dataset | Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    max_length: int,
    text_field: str = "text",
    mask_prompt: bool = True,
    use_chat_template: bool | Literal["auto"] = "auto",
    add_eos: bool = True,
    schema: Schema = "auto",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
) -> list[TokenizedExample]:
    """Tokenize records into `TokenizedExample`s (labels unshifted, -100 where not trained).

    Schemas (detected from the field names unless `schema=` says): plain text (`text_field`),
    prompt/completion (`prompt`, `completion`), chat (`messages`: a list of `{role, content}`).

    - Plain text: every token is trained; `add_eos` appends eos.
    - Prompt/completion as strings: `tokenizer(prompt) + tokenizer(completion) [+ eos]`; with
      `mask_prompt` only the completion and eos are trained. With `use_chat_template=True` the
      strings become a user turn and an assistant turn and go through the chat template.
    - Prompt/completion as message lists (TRL's conversational form) and chat records go through
      `tokenizer.apply_chat_template`; with `mask_prompt` only assistant turns are trained (for
      prompt/completion, only those in the completion), each with the template's end-of-turn
      marker. `add_eos` does not apply: as in TRL, the template ends the conversation.
    - `mask_prompt=False` trains every token.

    Sequences longer than `max_length` keep their first `max_length` tokens and are marked
    `truncated`; how many were truncated is logged. A record left with no trained token (a prompt
    longer than `max_length`) is dropped, with a warning; `record_index` keeps each example's
    position in `records`.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if use_chat_template not in (True, False, "auto"):
        raise ValueError(f"use_chat_template must be True, False or 'auto', got {use_chat_template!r}")
    if len(records) == 0:
        return []
    column_names = getattr(records, "column_names", None)  # a datasets.Dataset
    fields = list(column_names) if column_names is not None else list(_as_mapping(records[0], 0))
    names = dict(
        text_field=text_field,
        prompt_field=prompt_field,
        completion_field=completion_field,
        messages_field=messages_field,
    )
    if schema == "auto":
        schema = detect_schema(fields, **names)
    elif schema not in ("text", "prompt_completion", "chat"):
        raise ValueError(f"schema must be auto, text, prompt_completion or chat, got {schema!r}")

    examples: list[TokenizedExample] = []
    n_truncated = n_dropped = 0
    for index, raw in enumerate(records):
        record = _as_mapping(raw, index)
        segments, template = _segments(
            record, index, schema, tokenizer, mask_prompt, use_chat_template, names
        )
        input_ids, labels = _encode(segments, tokenizer, first_adds_special_tokens=not template)
        if add_eos and not template:
            eos_id = _eos_id(tokenizer)
            if not input_ids or input_ids[-1] != eos_id:
                input_ids.append(eos_id)
                labels.append(eos_id)  # outside chat the last segment (text, completion) is trained
        truncated = len(input_ids) > max_length
        if truncated:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            n_truncated += 1
        example = TokenizedExample(input_ids, labels, record_index=index, truncated=truncated)
        if example.n_trained == 0:
            n_dropped += 1
            continue
        examples.append(example)
    if n_truncated:
        logger.warning(
            "%d of %d records were truncated to max_length=%d", n_truncated, len(records), max_length
        )
    if n_dropped:
        logger.warning(
            "%d of %d records were dropped: no trained token left (prompt longer than max_length=%d, "
            "or an empty record)",
            n_dropped,
            len(records),
            max_length,
        )
    return examples


def _as_mapping(record: Any, index: int) -> Mapping[str, Any]:
    if not isinstance(record, Mapping):
        raise ValueError(f"record {index} is a {type(record).__name__}, expected a mapping of field -> value")
    return record


def _field(record: Mapping[str, Any], name: str, index: int) -> Any:
    if name not in record:
        raise ValueError(f"record {index} has no field {name!r}; fields present: {sorted(record)}")
    return record[name]


def _text(record: Mapping[str, Any], name: str, index: int) -> str:
    value = _field(record, name, index)
    if not isinstance(value, str):
        raise ValueError(f"record {index} field {name!r} must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, name: str, index: int) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"record {index} field {name!r} must be a non-empty list of {{role, content}}")
    messages = []
    for turn, message in enumerate(value):
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise ValueError(
                f"record {index} field {name!r} message {turn} must be a mapping with string 'role' and "
                f"'content', got {message!r}"
            )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _segments(
    record: Mapping[str, Any],
    index: int,
    schema: str,
    tokenizer: Any,
    mask_prompt: bool,
    use_chat_template: bool | str,
    names: dict[str, str],
) -> tuple[list[Segment], bool]:
    """The record's text segments and whether they came from the chat template."""
    if schema == "text":
        return [(_text(record, names["text_field"], index), True)], False

    if schema == "prompt_completion":
        prompt = _field(record, names["prompt_field"], index)
        completion = _field(record, names["completion_field"], index)
        conversational = isinstance(prompt, list) or isinstance(completion, list)
        if not conversational and use_chat_template is not True:
            prompt = _text(record, names["prompt_field"], index)
            completion = _text(record, names["completion_field"], index)
            return [(prompt, not mask_prompt), (completion, True)], False
        if conversational and use_chat_template is False:
            raise ValueError(
                f"record {index} has a conversational prompt/completion (message lists), which needs the "
                "chat template; pass use_chat_template='auto' or True"
            )
        if conversational:
            prompt_messages = _messages(prompt, names["prompt_field"], index)
            completion_messages = _messages(completion, names["completion_field"], index)
        else:
            prompt_messages = [{"role": "user", "content": prompt}]
            completion_messages = [{"role": "assistant", "content": completion}]
        messages = prompt_messages + completion_messages
        return chat_segments(messages, tokenizer, mask_prompt, trained_from=len(prompt_messages)), True

    if use_chat_template is False:
        raise ValueError(
            f"record {index} is a chat record ({names['messages_field']!r}), which needs the chat template; "
            "pass use_chat_template='auto' or True"
        )
    messages = _messages(_field(record, names["messages_field"], index), names["messages_field"], index)
    return chat_segments(messages, tokenizer, mask_prompt), True


def chat_segments(
    messages: list[dict[str, str]], tokenizer: Any, mask_prompt: bool, *, trained_from: int = 0
) -> list[Segment]:
    """Cut a rendered conversation into (text, trained) segments.

    The assistant turn `i` starts where `render(messages[:i], add_generation_prompt=True)` ends
    and ends where `render(messages[:i + 1])` ends, minus trailing whitespace (the newline after
    ChatML's `<|im_end|>` is not trained; the marker is, so the model learns to stop). Only
    assistant turns at index >= `trained_from` are trained.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the tokenizer has no chat_template, which chat records need; set tokenizer.chat_template "
            "(e.g. use train_tiny_tokenizer, which installs ChatML) or use plain-text records"
        )

    def render(turns: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, False)
    if not mask_prompt:
        return [(full, True)]
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < trained_from:
            continue
        before = render(messages[:i], True)
        through = render(messages[: i + 1], False)
        if not (before.startswith(done) and through.startswith(before) and full.startswith(through)):
            raise ValueError(
                "the chat template renders a conversation's prefixes differently from the whole "
                f"conversation (around message {i}), so assistant turns cannot be located; "
                "use mask_prompt=False or a template whose renderings extend each other"
            )
        turn = through[len(before) :]
        body = turn.rstrip()
        segments += [(before[len(done) :], False), (body, True), (turn[len(body) :], False)]
        done = through
    segments.append((full[len(done) :], False))
    return [segment for segment in segments if segment[0]]


def _encode(
    segments: list[Segment], tokenizer: Any, *, first_adds_special_tokens: bool
) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    for position, (text, trained) in enumerate(segments):
        # a chat rendering already holds its special tokens as text (HF tokenizes it the same way)
        special = first_adds_special_tokens and position == 0
        ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def _eos_id(tokenizer: Any) -> int:
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ValueError("add_eos=True but the tokenizer has no eos_token; set one or pass add_eos=False")
    return int(eos_id)
