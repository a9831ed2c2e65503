"""Teacher agreement across tokenizers: does the student predict the same next piece of text?

With one tokenizer, top-1 agreement compares the two models' most likely next token id at every
position. With two, ids mean nothing to each other, and most positions have no counterpart. The
definition used here:

- Align the two tokenizations of each text by byte offsets (`TokenAlignment`). A *one-to-one group*
  is a student position and a teacher position whose next tokens are single tokens covering the same
  bytes after the same text (`TokenAlignment.coincident`): both models are asked for the next token
  at the same point of the same text, and the true next token is the same string on both sides.
- At each one-to-one group, the student agrees when its most likely next token (over its real
  vocabulary) stands for the same bytes as the teacher's most likely next token (over the teacher's):
  decoded piece bytes for regular tokens (byte-level BPE, SentencePiece, byte fallback), the content
  for special tokens; a token whose bytes cannot be decoded is compared by its piece string; each
  tokenizer's end-of-sequence token stands for "the text ends here", whatever its name.
- `top1_agreement` = agreeing groups / one-to-one groups; `coverage` = one-to-one groups / all aligned
  groups (how much of the text the measure sees). A teacher top-1 token the student's vocabulary
  lacks can never be matched, so the ceiling is below 1 when the vocabularies differ.

With one tokenizer on both sides every group is one-to-one and byte equality is id equality, so this
is `teacher_agreement`'s top-1 agreement (tests/engine/test_cross_tokenizer_distill.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from secure_kd.cross_teacher import align_batch, stack_example_spans
from secure_kd.cross_tokenizer.spans import _piece_bytes, backend_of
from secure_kd.cross_tokenizer.vocab import VocabPair
from secure_kd.data.collate import collate
from secure_kd.data.example import TokenizedExample
from secure_kd.data.paired import PairedExample
from secure_kd.evaluate._model_io import evaluation_mode, resolve_device


def token_strings(tokenizer, size: int) -> list[bytes]:
    """What each id below `size` stands for: its bytes, or its piece string (UTF-8) when undecodable;
    the end-of-sequence token stands for the same marker in every tokenizer."""
    backend = backend_of(tokenizer)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    added = {i: tok.content for i, tok in backend.get_added_tokens_decoder().items()}
    out = []
    for token_id in range(size):
        piece = _piece_bytes(backend, token_id, added)
        if piece is None:
            name = backend.id_to_token(token_id)
            piece = b"\x00piece:" + (name or f"<id {token_id}>").encode("utf-8")
        out.append(b"\x00end of sequence" if token_id == eos_id else piece)
    return out


def top1_predictions(
    model: nn.Module,
    examples: Sequence[TokenizedExample],
    *,
    real_size: int,
    pad_id: int,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> list[Tensor]:
    """The model's most likely next token (over its first `real_size` columns) at every position of
    each example: int64 [len(example)] each. Compute a teacher's once and pass them to
    `cross_tokenizer_agreement` for every student."""
    target = resolve_device(model, device)
    out: list[Tensor] = []
    with evaluation_mode(model):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate(chunk, pad_id=pad_id)
            logits = model(
                input_ids=batch["input_ids"].to(target), attention_mask=batch["attention_mask"].to(target)
            ).logits
            top = logits[..., :real_size].argmax(-1).cpu()
            out += [top[row, : len(example)] for row, example in enumerate(chunk)]
    return out


def cross_tokenizer_agreement(
    student: nn.Module,
    teacher: nn.Module | Sequence[Tensor],
    pairs: Sequence[PairedExample],
    *,
    student_tokenizer,
    teacher_tokenizer,
    vocab: VocabPair,
    student_pad_id: int,
    teacher_pad_id: int,
    batch_size: int = 8,
    limit: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float | int]:
    """Top-1 agreement of student and teacher on one-to-one aligned groups (module docstring).

    `teacher` is the model, or its `top1_predictions` on `[p.teacher for p in pairs]` (computed once
    for several students). Returns `top1_agreement`, `groups` (one-to-one groups scored),
    `aligned_groups` (all groups) and `coverage`. `limit` caps the number of batches; `device` is the
    student's (a teacher model runs on its own).
    """
    if limit is not None:
        pairs = pairs[: limit * batch_size]
    s_top = top1_predictions(
        student,
        [p.student for p in pairs],
        real_size=vocab.student.real_size,
        pad_id=student_pad_id,
        batch_size=batch_size,
        device=device,
    )
    if isinstance(teacher, nn.Module):
        t_top = top1_predictions(
            teacher,
            [p.teacher for p in pairs],
            real_size=vocab.teacher.real_size,
            pad_id=teacher_pad_id,
            batch_size=batch_size,
        )
    else:
        t_top = list(teacher)[: len(pairs)]
        if len(t_top) != len(pairs) or any(
            len(t) != len(p.teacher) for t, p in zip(t_top, pairs, strict=True)
        ):
            raise ValueError("teacher predictions must be top1_predictions over [p.teacher for p in pairs]")
    s_strings = token_strings(student_tokenizer, vocab.student.real_size)
    t_strings = token_strings(teacher_tokenizer, vocab.teacher.real_size)
    agree = groups = aligned = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        s_ids = collate([p.student for p in chunk], pad_id=student_pad_id)["input_ids"]
        t_ids = collate([p.teacher for p in chunk], pad_id=teacher_pad_id)["input_ids"]
        s_spans = stack_example_spans([p.student_spans for p in chunk], s_ids.shape[1])
        t_spans = stack_example_spans([p.teacher_spans for p in chunk], t_ids.shape[1])
        alignment = align_batch(s_ids, s_spans, t_ids, t_spans)
        aligned += alignment.n_groups
        one_to_one = alignment.select(alignment.coincident())
        s_flat = _flat(s_top[start : start + batch_size], s_ids.shape[1])
        t_flat = _flat(t_top[start : start + batch_size], t_ids.shape[1])
        s_pred = s_flat[one_to_one.student_rows].tolist()
        t_pred = t_flat[one_to_one.teacher_rows].tolist()
        agree += sum(s_strings[s] == t_strings[t] for s, t in zip(s_pred, t_pred, strict=True))
        groups += one_to_one.n_groups
    if groups == 0:
        raise ValueError("no one-to-one aligned groups to compare: the texts are empty or never align")
    return {
        "top1_agreement": agree / groups,
        "groups": groups,
        "aligned_groups": aligned,
        "coverage": groups / aligned if aligned else 0.0,
    }


def _flat(predictions: Sequence[Tensor], length: int) -> Tensor:
    """Per-example predictions padded to [B, length] and flattened (rows b * length + t)."""
    out = torch.zeros(len(predictions), length, dtype=torch.long)
    for row, top in enumerate(predictions):
        out[row, : len(top)] = top
    return out.reshape(-1)
