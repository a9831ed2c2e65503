"""Distilling across tokenizers: byte spans, token alignment and padded vocabularies.

A teacher and a student with different tokenizers see the same text as different token sequences.
`token_byte_spans` places every token of a tokenization in the text's UTF-8 bytes; `TokenAlignment`
groups teacher and student positions that cover the same bytes; `VocabPadding` and `VocabPair` find
each model's real vocabulary inside a padded output layer and the tokens two vocabularies share.
The objectives that use them are `secure_kd.losses.uld` and `secure_kd.losses.span_aligned`.

How a trainer wires them, per batch of texts (prompt + completion):

    vocab = VocabPair.from_tokenizers(student_tok, teacher_tok,
                                      student_width=student.config.vocab_size,
                                      teacher_width=teacher.config.vocab_size)       # once per run
    s = [token_byte_spans(student_tok, completion) for completion in completions]   # per batch
    t = [token_byte_spans(teacher_tok, completion) for completion in completions]
    # place them at the completion positions of each side's input_ids, shift by one (the logits at
    # position t predict input_ids[t + 1]), (-1, -1) spans for the prompt and the padding:
    alignment = TokenAlignment.build(student_targets, student_spans, teacher_targets, teacher_spans)
    loss = get_loss("uld")(student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:],
                           alignment=alignment, teacher_labels=teacher_labels[:, 1:], vocab=vocab)

A logit cache of a teacher with another tokenizer would store the teacher's target ids and spans
next to its top-k, so the alignment can be built without the teacher.
"""

from secure_kd.cross_tokenizer.alignment import TokenAlignment, align_spans
from secure_kd.cross_tokenizer.spans import TokenSpans, check_spans, stack_spans, token_byte_spans
from secure_kd.cross_tokenizer.vocab import VocabPadding, VocabPair

__all__ = [
    "TokenAlignment",
    "TokenSpans",
    "VocabPadding",
    "VocabPair",
    "align_spans",
    "check_spans",
    "stack_spans",
    "token_byte_spans",
]
