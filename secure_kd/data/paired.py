"""One text, two tokenizers: a student and a teacher tokenization of each record, with byte offsets.

A teacher and a student with different tokenizers are compared on the text they share. For each
record, `tokenize_pairs` cuts the record into segments exactly as `tokenize_records` does (the
student side is the same `TokenizedExample` `tokenize_records` gives), tokenizes every segment with
each tokenizer, and places each token in the *shared text*: the record's trained segments (the plain
text, the completion, the assistant turns), concatenated, as UTF-8 bytes. Tokens of untrained
segments (prompts, which each side may render with its own chat template) get the span (-1, -1);
the end-of-sequence token appended to a trained text gets the empty span at its end.

The trained segments must read the same on both sides (they do for plain text and prompt/completion
strings; chat records need templates that render assistant turns alike), else the record is
refused with its index. Both sides are then cut to the same byte range `[aligned_start, aligned_end)`,
so their aligned tokens cover exactly the same bytes:
- the end: each side is cut at its own `max_length` in tokens, so they may reach different amounts of
  the text; both are cut back to the last byte boundary (a token end on both sides) they share.
  Student tokens past it keep their labels (cross-entropy still trains them) with span (-1, -1);
  teacher tokens past it are dropped (a causal teacher's predictions up to there do not depend on them).
- the start: the first token of a sequence is never predicted (it has no context); where the shared
  text opens the sequence (plain text), it starts after the first token on both sides: at the first
  boundary they share past each side's first token. Tokens before it get (-1, -1). After a prompt,
  every token of the completion is predicted and the range starts at 0.

A record the student side drops (no trained token left) is dropped on both sides, as
`tokenize_records` drops it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from secure_kd.cross_tokenizer.spans import token_byte_spans
from secure_kd.data.example import IGNORE_INDEX, TokenizedExample
from secure_kd.data.tokenization import _as_mapping, _eos_id, _segments, detect_schema

Span = tuple[int, int]
NO_SPAN: Span = (-1, -1)


@dataclass(frozen=True)
class PairedExample:
    """One record tokenized by the student and by the teacher, each token placed in the shared text.

    student:        the student's sequence (equal to `tokenize_records`' example for the record).
    student_spans:  one byte span per student token; (-1, -1) outside the aligned range.
    teacher:        the teacher's sequence, cut after its last token inside the aligned range; labels
                    -100 wherever the span is (-1, -1).
    teacher_spans:  one byte span per teacher token, as for the student.
    aligned_start, aligned_end: the aligned text is bytes [aligned_start, aligned_end) of the record's
                    trained text; every span not (-1, -1) lies in it, on both sides.
    """

    student: TokenizedExample
    student_spans: tuple[Span, ...]
    teacher: TokenizedExample
    teacher_spans: tuple[Span, ...]
    aligned_start: int
    aligned_end: int

    def __post_init__(self) -> None:
        if len(self.student_spans) != len(self.student) or len(self.teacher_spans) != len(self.teacher):
            raise ValueError("PairedExample needs one span per token on each side")

    @property
    def record_index(self) -> int:
        return self.student.record_index


@dataclass(frozen=True)
class PairedData:
    """The paired examples of a dataset and the fingerprint of the shared texts they align on."""

    pairs: list[PairedExample]
    text_fingerprint: str

    @property
    def students(self) -> list[TokenizedExample]:
        return [pair.student for pair in self.pairs]

    @property
    def teachers(self) -> list[TokenizedExample]:
        return [pair.teacher for pair in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)


@dataclass(frozen=True)
class _Side:
    ids: list[int]
    labels: list[int]
    spans: list[Span]
    shared_text: str


def _encode_side(
    segments: list[tuple[str, bool]], template: bool, tokenizer: Any, add_eos: bool, index: int, what: str
) -> _Side:
    ids: list[int] = []
    labels: list[int] = []
    spans: list[Span] = []
    shared = b""
    for position, (text, trained) in enumerate(segments):
        special = not template and position == 0  # as tokenize_records' _encode
        encoded = token_byte_spans(tokenizer, text, add_special_tokens=special)
        expected = list(tokenizer(text, add_special_tokens=special)["input_ids"])
        if encoded.ids != expected:
            raise ValueError(
                f"record {index}: the {what} tokenizer's fast backend tokenizes a segment differently from "
                "the tokenizer itself, so byte offsets cannot be trusted; use a fast tokenizer whose "
                "backend matches it (AutoTokenizer.from_pretrained(..., use_fast=True))"
            )
        ids += encoded.ids
        if trained:
            offset = len(shared)
            spans += [(offset + start, offset + end) for start, end in encoded.spans]
            labels += encoded.ids
            shared += text.encode("utf-8")
        else:
            spans += [NO_SPAN] * len(encoded)
            labels += [IGNORE_INDEX] * len(encoded)
    if add_eos and not template:
        eos_id = _eos_id(tokenizer)
        if not ids or ids[-1] != eos_id:
            ids.append(eos_id)
            labels.append(eos_id)
            spans.append((len(shared), len(shared)))
    return _Side(ids, labels, spans, shared.decode("utf-8"))


def _cut(side: _Side, max_length: int) -> tuple[list[int], list[int], list[Span]]:
    return side.ids[:max_length], side.labels[:max_length], side.spans[:max_length]


def _first_end(spans: Sequence[Span]) -> int:
    """Where the never-predicted first token of a sequence ends, if it lies in the shared text."""
    return spans[0][1] if spans and spans[0][0] >= 0 else 0


def aligned_range(student_spans: Sequence[Span], teacher_spans: Sequence[Span]) -> tuple[int, int]:
    """[start, end) both sides cover with predicted tokens, start and end token boundaries on both sides
    (module docstring); (0, 0) when they share none."""
    s_ends = {end for start, end in student_spans if start >= 0}
    t_ends = {end for start, end in teacher_spans if start >= 0}
    if not s_ends or not t_ends:
        return 0, 0
    common = s_ends & t_ends
    limit = min(max(s_ends), max(t_ends))
    end = max((e for e in common if e <= limit), default=0)
    first = max(_first_end(student_spans), _first_end(teacher_spans))
    start = 0 if first == 0 else min((e for e in common if e >= first), default=end)
    return min(start, end), end


def _within(spans: Sequence[Span], start: int, end: int) -> list[Span]:
    return [span if span[0] >= start and span[1] <= end else NO_SPAN for span in spans]


def tokenize_pairs(
    records: Sequence[Mapping[str, Any]],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    max_length: int,
    teacher_max_length: int | None = None,
    text_field: str = "text",
    mask_prompt: bool = True,
    use_chat_template: bool | Literal["auto"] = "auto",
    add_eos: bool = True,
) -> PairedData:
    """Tokenize every record with both tokenizers and place each token in the shared text (module doc).

    max_length: the student's sequence length in tokens (as for `tokenize_records`);
    teacher_max_length: the teacher's (default 2 * max_length, room for a less efficient tokenizer).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    teacher_max = 2 * max_length if teacher_max_length is None else teacher_max_length
    if teacher_max < 1:
        raise ValueError(f"teacher_max_length must be >= 1, got {teacher_max}")
    if use_chat_template not in (True, False, "auto"):
        raise ValueError(f"use_chat_template must be True, False or 'auto', got {use_chat_template!r}")
    names = dict(text_field=text_field, prompt_field="prompt", completion_field="completion")
    names["messages_field"] = "messages"
    pairs: list[PairedExample] = []
    digest = hashlib.sha256()  # over the aligned bytes of every pair, length-prefixed, in order
    if len(records) == 0:
        return PairedData(pairs, digest.hexdigest())
    schema = detect_schema(list(_as_mapping(records[0], 0)), **names)
    for index, raw in enumerate(records):
        record = _as_mapping(raw, index)
        sides = {}
        for what, tokenizer in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
            segments, template = _segments(
                record, index, schema, tokenizer, mask_prompt, use_chat_template, names
            )
            sides[what] = _encode_side(segments, template, tokenizer, add_eos, index, what)
        student, teacher = sides["student"], sides["teacher"]
        if student.shared_text != teacher.shared_text:
            raise ValueError(
                f"record {index}: the student's and the teacher's tokenizers render its trained text "
                "differently (their chat templates differ around the assistant turns), so the two "
                "tokenizations cannot be aligned; give both tokenizers the same chat template, or use "
                "plain-text or prompt/completion string records"
            )
        s_ids, s_labels, s_spans = _cut(student, max_length)
        example = TokenizedExample(
            s_ids, s_labels, record_index=index, truncated=len(student.ids) > max_length
        )
        if example.n_trained == 0:
            continue  # tokenize_records drops it too
        t_ids, t_labels, t_spans = _cut(teacher, teacher_max)
        start, end = aligned_range(s_spans, t_spans)
        s_spans, t_spans = _within(s_spans, start, end), _within(t_spans, start, end)
        inside = [i for i, span in enumerate(t_spans) if span[0] >= 0]
        keep = inside[-1] + 1 if inside else len(t_ids)
        t_labels = [
            label if span[0] >= 0 else IGNORE_INDEX for label, span in zip(t_labels, t_spans, strict=True)
        ]
        teacher_example = TokenizedExample(
            t_ids[:keep], t_labels[:keep], record_index=index, truncated=keep < len(teacher.ids)
        )
        pairs.append(
            PairedExample(
                student=example,
                student_spans=tuple(s_spans),
                teacher=teacher_example,
                teacher_spans=tuple(t_spans[:keep]),
                aligned_start=start,
                aligned_end=end,
            )
        )
        aligned = student.shared_text.encode("utf-8")[start:end]
        digest.update(len(aligned).to_bytes(8, "little") + aligned)
    return PairedData(pairs, digest.hexdigest())
