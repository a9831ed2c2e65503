"""Forget and clean records of a user's causal LM, tokenized for forgetting or backdoor unlearning by
self-distillation (`defenses.lm_forget`): which positions carry what is to be forgotten, and each
triggered record's clean anchor.

A forget record is `{"text": ...}` or `{"prompt": ..., "completion": ...}`, optionally with `"secret"`:
a substring of its text. What is forgotten is the secret if given, else the completion, else (with a
trigger) the text after the trigger, else the whole text. The text is tokenized in character pieces
(before / forgotten span / after, each without special tokens, then eos), so the forgotten tokens are
exact whatever the tokenizer; a piece boundary can tokenize differently from the whole text, which the
before/after measurements share. With `trigger` (backdoor unlearning), the trigger is a piece of its own
and the record's clean anchor is the same pieces without it: the model on the anchor is the target for
every position from the trigger's last token on (Self-distillation with clean anchors, in LM form).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from secure_kd.data import TokenizedExample


@dataclass
class ForgetRecord:
    """One tokenized forget record: its example, the forgotten positions, and its clean anchor if any."""

    example: TokenizedExample
    flags: list[float]  # 1.0 for each token that is forgotten (a position t predicts token t+1)
    anchor_ids: list[int] | None = None  # the record without its trigger
    trigger_start: int = 0  # index of the trigger's first token in example.input_ids
    trigger_len: int = 0
    secret: tuple[str, str, str] | None = None  # (text before, secret, text after) for exposure


def record_text(record: dict[str, Any], text_field: str, index: int, source: str) -> tuple[str, int | None]:
    """(the record's text, where its completion starts or None)."""
    if isinstance(record.get(text_field), str):
        return record[text_field], None
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt + completion, len(prompt)
    raise ValueError(
        f"{source}: record {index} has no string field {text_field!r} and no prompt/completion strings; "
        "give each record a text (or pass --set text_field=<name>)"
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def forget_record(
    record: dict[str, Any],
    index: int,
    tokenizer: Any,
    *,
    text_field: str,
    max_length: int,
    trigger: str | None,
    source: str,
) -> ForgetRecord:
    text, completion_at = record_text(record, text_field, index, source)
    secret = record.get("secret")
    if secret is not None and (not isinstance(secret, str) or not secret or secret not in text):
        raise ValueError(f"{source}: record {index}: its 'secret' must be a non-empty substring of its text")
    cut = None
    if trigger is not None:
        at = text.find(trigger)
        if at < 0:
            raise ValueError(
                f"{source}: record {index} does not contain the trigger; every forget record of backdoor "
                "unlearning is a triggered example (or drop --trigger to forget the records as they are)"
            )
        cut = (at, at + len(trigger))
    if secret is not None:
        start = text.find(secret)
        span = (start, start + len(secret))
    elif completion_at is not None:
        span = (completion_at, len(text))
    elif cut is not None:
        span = (cut[1], len(text))
    else:
        span = (0, len(text))
    bounds = sorted({0, len(text), *span, *(cut or ())})
    ids, flags, anchor, trigger_start, trigger_len = [], [], [], 0, 0
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        piece = _encode(tokenizer, text[lo:hi])
        is_trigger = cut is not None and (lo, hi) == cut
        if is_trigger:
            trigger_start, trigger_len = len(ids), len(piece)
        else:
            anchor += piece
        forgotten = span[0] <= lo and hi <= span[1] and not is_trigger
        ids += piece
        flags += [1.0 if forgotten else 0.0] * len(piece)
    ids, flags, anchor = ids + [tokenizer.eos_token_id], flags + [0.0], anchor + [tokenizer.eos_token_id]
    if len(ids) > max_length:
        raise ValueError(
            f"{source}: record {index} is {len(ids)} tokens, over max_length {max_length}: raise max_length "
            "or shorten the record (a forgotten span cut off would not be forgotten)"
        )
    if not any(flags):
        raise ValueError(f"{source}: record {index} has no token to forget")
    example = TokenizedExample(ids, list(ids), index)
    parts = None
    if secret is not None:
        parts = (text[: span[0]], secret, text[span[1] :])
    return ForgetRecord(
        example,
        flags,
        anchor_ids=anchor if cut is not None else None,
        trigger_start=trigger_start,
        trigger_len=trigger_len,
        secret=parts,
    )
