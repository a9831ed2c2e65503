"""Teacher targets across tokenizers and across padded vocabularies, and the objectives' adapters.

A teacher with another tokenizer sees each training text as its own token sequence. Per batch, the
trainer's targets object (`targets(batch)`, as for `LiveTeacher` / `CachedTeacher`) returns a
`CrossTeacherBatch`: the teacher's logits (or top-k) on its own tokenization of the batch's texts,
its shifted labels, and the `TokenAlignment` of the two tokenizations built from their byte spans
(`secure_kd.data.paired`). `CrossTokenizerObjective` passes these to `uld` / `span_aligned` with the
`VocabPair`, so `Distiller.loss_on` and `DPDistiller` call it like any objective.

- `LiveCrossTeacher` runs the teacher on its tokenization of each batch.
- `CachedCrossTeacher` reads the teacher's top-k, token ids and byte spans from a `LogitCache` built
  with `byte_spans` (secure_kd.cache): no teacher and no teacher tokenizer at training time.

Shift: as everywhere in the trainer, logits are not shifted, labels are: position t of either side
predicts its token t + 1, so position t's alignment target is token t + 1 with that token's span,
and the last position has none.

One tokenizer, two widths (a teacher padded to 49,216 columns for a 49,152-token tokenizer):
`TrimmedLiveTeacher` drops the padding columns before the softmax and the top-k, and
`PaddedVocabObjective` trims the student's; then any same-vocabulary objective applies. Every id
the tokenizer has is below the real size (`VocabPadding`), so no real token is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from secure_kd.cross_tokenizer.alignment import TokenAlignment
from secure_kd.cross_tokenizer.vocab import VocabPair
from secure_kd.data.collate import collate
from secure_kd.data.paired import PairedExample
from secure_kd.teacher_targets import shift_labels
from secure_kd.topk import TopKLogits

Span = tuple[int, int]


@dataclass(frozen=True)
class CrossTeacherBatch:
    """What a cross-tokenizer targets object gives the objective for one batch.

    logits:         the teacher's logits [B, Lt, Wt] or TopKLogits [B, Lt, k] on its own tokenization
                    (unshifted: position t predicts the teacher's token t + 1).
    teacher_labels: [B, Lt], shifted like the student's labels, -100 where not distilled.
    alignment:      the groups of student and teacher positions that cover the same bytes.
    """

    logits: Tensor | TopKLogits
    teacher_labels: Tensor
    alignment: TokenAlignment


def stack_example_spans(spans: Sequence[Sequence[Span]], length: int) -> Tensor:
    """[B, length, 2] int64 byte spans, (-1, -1) past each sequence's end."""
    out = torch.full((len(spans), length, 2), -1, dtype=torch.long)
    for row, row_spans in enumerate(spans):
        if len(row_spans) > length:
            raise ValueError(
                f"sequence {row} has {len(row_spans)} spans, more than the batch length {length}"
            )
        if len(row_spans):
            out[row, : len(row_spans)] = torch.tensor(row_spans, dtype=torch.long)
    return out


def shifted_targets(ids: Tensor, spans: Tensor) -> tuple[Tensor, Tensor]:
    """Token t + 1 and its span at position t; the last position has token 0 and span (-1, -1)."""
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    shifted = torch.full_like(spans, -1)
    shifted[:, :-1] = spans[:, 1:]
    return targets, shifted


def align_batch(student_ids: Tensor, student_spans: Tensor, teacher_ids: Tensor, teacher_spans: Tensor):
    """The `TokenAlignment` of a batch from unshifted ids [B, L] and spans [B, L, 2] of both sides."""
    s_targets, s_spans = shifted_targets(student_ids.cpu(), student_spans)
    t_targets, t_spans = shifted_targets(teacher_ids.cpu(), teacher_spans)
    return TokenAlignment.build(s_targets, s_spans, t_targets, t_spans)


def _teacher_labels(ids: Tensor, spans: Tensor) -> Tensor:
    """Shifted teacher labels: token t + 1 where its span lies in the shared text, -100 elsewhere."""
    labels = ids.masked_fill((spans < 0).any(-1), -100)
    return shift_labels(labels)


def _check_width(logits: Tensor, vocab: VocabPair) -> None:
    if logits.shape[-1] != vocab.teacher.width:
        raise ValueError(
            f"the teacher returned {logits.shape[-1]} logits columns but its vocabulary was set up for "
            f"{vocab.teacher.width}; build the VocabPair from this teacher's config.vocab_size"
        )


class LiveCrossTeacher:
    """Run the teacher on its own tokenization of the batch's texts (`pairs[example_index]`)."""

    cross_tokenizer = True

    def __init__(
        self,
        model: nn.Module,
        pairs: Sequence[PairedExample],
        *,
        top_k: int | None,
        vocab: VocabPair,
        pad_id: int,
    ) -> None:
        self.model, self.pairs, self.top_k, self.vocab, self.pad_id = model, list(pairs), top_k, vocab, pad_id

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor]) -> CrossTeacherBatch:
        device = batch["input_ids"].device
        pairs = [self.pairs[i] for i in batch["example_index"].tolist()]
        t_batch = collate([p.teacher for p in pairs], pad_id=self.pad_id)
        t_spans = stack_example_spans([p.teacher_spans for p in pairs], t_batch["input_ids"].shape[1])
        s_spans = stack_example_spans([p.student_spans for p in pairs], batch["input_ids"].shape[1])
        alignment = align_batch(batch["input_ids"], s_spans, t_batch["input_ids"], t_spans)
        logits = self.model(
            input_ids=t_batch["input_ids"].to(device), attention_mask=t_batch["attention_mask"].to(device)
        ).logits
        _check_width(logits, self.vocab)
        if self.top_k is None:
            out: Tensor | TopKLogits = logits.float()
        else:  # the padding columns are no tokens: drop them before the softmax and the top-k
            out = TopKLogits.from_logits(self.vocab.teacher.trim(logits), self.top_k)
        labels = _teacher_labels(t_batch["input_ids"], t_spans).to(device)
        return CrossTeacherBatch(out, labels, alignment)


class CachedCrossTeacher:
    """Read the teacher's top-k, tokens and byte spans from a `LogitCache` built with byte spans.

    student_spans[i]: the byte spans of training example i's tokens (`PairedExample.student_spans`).
    """

    cross_tokenizer = True

    def __init__(self, cache, student_spans: Sequence[Sequence[Span]], device: torch.device | str) -> None:
        if not cache.has_teacher_tokens:
            raise ValueError(
                "this logit cache holds no teacher tokenization (token ids and byte spans): a student with "
                "another tokenizer cannot align with it; rebuild it with byte_spans (secure-kd distill with "
                "student.tokenizer set does)"
            )
        if len(student_spans) != len(cache):
            raise ValueError(
                f"{len(student_spans)} training examples but the cache holds {len(cache)} sequences; "
                "train on the data the cache was built from"
            )
        self.cache, self.student_spans, self.device = cache, list(student_spans), torch.device(device)

    def __call__(self, batch: dict[str, Tensor]) -> CrossTeacherBatch:
        indices = batch["example_index"].tolist()
        t_ids, t_spans, lengths = self.cache.teacher_tokens_batch(indices)
        s_spans = stack_example_spans([self.student_spans[i] for i in indices], batch["input_ids"].shape[1])
        alignment = align_batch(batch["input_ids"], s_spans, t_ids, t_spans)
        top = self.cache.batch(indices, pad_to=t_ids.shape[1]).to(self.device)
        labels = _teacher_labels(t_ids, t_spans).to(self.device)
        return CrossTeacherBatch(top, labels, alignment)


class CrossTokenizerObjective:
    """A cross-tokenizer objective (`uld`, `span_aligned`) called with a `CrossTeacherBatch` teacher."""

    def __init__(self, objective, vocab: VocabPair) -> None:
        self.objective, self.vocab = objective, vocab

    def __call__(self, student_logits: Tensor, teacher, labels: Tensor | None = None, **kwargs) -> Tensor:
        if not isinstance(teacher, CrossTeacherBatch):
            raise ValueError(
                "a cross-tokenizer objective needs the targets of LiveCrossTeacher or CachedCrossTeacher "
                f"(a CrossTeacherBatch), got {type(teacher).__name__}"
            )
        return self.objective(
            student_logits,
            teacher.logits,
            labels,
            alignment=teacher.alignment,
            teacher_labels=teacher.teacher_labels,
            vocab=self.vocab,
            **kwargs,
        )


def padded_to_other_width(vocab: VocabPair) -> bool:
    """True when one tokenizer's logits come in two widths (padding columns on one side or both); False
    when the widths are equal. Two different vocabularies are refused (naming uld / span_aligned)."""
    if vocab.student.width == vocab.teacher.width:
        return False
    vocab.trim_pair(torch.empty(0, vocab.student.width), torch.empty(0, vocab.teacher.width))
    return True


class PaddedVocabObjective:
    """A same-vocabulary objective on logits trimmed to the real vocabulary of one tokenizer.

    The student's padding columns are dropped here; a dense teacher's too (a TopKLogits teacher must
    come from `TrimmedLiveTeacher` or a cache built with `vocab_size`: ids below the real size only).
    """

    def __init__(self, objective, vocab: VocabPair) -> None:
        padded_to_other_width(vocab)  # refuses two different vocabularies, naming uld / span_aligned
        self.objective, self.vocab = objective, vocab

    def __call__(self, student_logits: Tensor, teacher, labels: Tensor | None = None, **kwargs) -> Tensor:
        real = self.vocab.student.real_size
        student_logits = self.vocab.student.trim(student_logits, "student_logits")
        if isinstance(teacher, TopKLogits):
            if teacher.indices.numel() and int(teacher.indices.max()) >= real:
                raise ValueError(
                    f"the teacher's top-k holds a padding column (id >= {real}); take the top-k of the "
                    "trimmed logits (TrimmedLiveTeacher, or build_cache(..., vocab_size=real size))"
                )
        elif isinstance(teacher, Tensor) and teacher.shape[-1] != real:
            teacher = self.vocab.teacher.trim(teacher, "teacher_logits")
        return self.objective(student_logits, teacher, labels, **kwargs)


class TrimmedLiveTeacher:
    """`LiveTeacher` for a teacher whose logits are wider than its tokenizer: the padding columns are
    dropped before the softmax and the top-k."""

    def __init__(self, model: nn.Module, top_k: int | None, real_size: int) -> None:
        self.model, self.top_k, self.real_size = model, top_k, real_size

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor]) -> Tensor | TopKLogits:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[..., : self.real_size]
        if self.top_k is None:
            return logits.float()
        return TopKLogits.from_logits(logits, self.top_k)
