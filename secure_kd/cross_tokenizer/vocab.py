"""Padded vocabularies and the tokens two vocabularies share.

Models often have more output columns than their tokenizer has tokens: the embedding and output
layers are padded to a multiple of 64 or 128 for speed (Qwen2.5-0.5B: 151,936 columns for 151,665
tokens), and two models of one family may pad differently. The extra columns are not tokens: no
text encodes to them and decoding skips them. `VocabPadding.detect(tokenizer, width)` finds the real
vocabulary size, 1 + the largest id the tokenizer has (regular and added tokens alike), so the
columns from there on are padding. Because every id the tokenizer knows is below that size by
construction, trimming the logits to it keeps every real token (ids missing below it, if any, are
kept too); a tokenizer with an id at or above the model's width is refused, since that is not
padding but a tokenizer that does not belong to the model.

Trimming logits before the softmax gives the model's distribution conditioned on a real token,
which is what either side of a distillation can be compared on; for a trained model the padded
columns hold almost no mass, so this changes little.

`VocabPair` holds both sides' padding and the tokens the two vocabularies share: ids whose token
strings are equal, as GOLD's hybrid ULD maps them. `trim_pair` makes one family's logits
comparable by the ordinary objectives; `uld` and `span_aligned` take the pair as `vocab=`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _vocab(tokenizer) -> dict[str, int]:
    """token string -> id, regular and added tokens, for a transformers or a `tokenizers` tokenizer."""
    if hasattr(tokenizer, "backend_tokenizer") or not hasattr(tokenizer, "get_added_tokens_decoder"):
        vocab = dict(tokenizer.get_vocab())
    else:
        vocab = dict(tokenizer.get_vocab(with_added_tokens=True))
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if hasattr(backend, "get_added_tokens_decoder"):
        for token_id, token in backend.get_added_tokens_decoder().items():
            vocab.setdefault(token.content, token_id)
    return vocab


@dataclass(frozen=True)
class VocabPadding:
    """A model's logits width against its tokenizer's real vocabulary.

    real_size: 1 + the largest token id of the tokenizer: columns [0, real_size) are kept.
    width:     the number of columns of the model's logits (its config.vocab_size).
    n_tokens:  how many distinct ids the tokenizer has (== real_size when its ids have no gaps).
    """

    real_size: int
    width: int
    n_tokens: int

    def __post_init__(self) -> None:
        if not 0 < self.real_size <= self.width:
            raise ValueError(f"VocabPadding needs 0 < real_size <= width, got {self.real_size}, {self.width}")

    @classmethod
    def detect(cls, tokenizer, width: int, *, what: str = "model") -> VocabPadding:
        ids = set(_vocab(tokenizer).values())
        ids.update(getattr(tokenizer, "all_special_ids", []) or [])
        if not ids:
            raise ValueError(f"{what}: the tokenizer has no tokens")
        largest = max(ids)
        if largest >= width:
            raise ValueError(
                f"{what}: the tokenizer has token id {largest} but the logits have only {width} columns, "
                "so that token could never be predicted. This is not a padded vocabulary: the tokenizer "
                "does not belong to this model (load the tokenizer saved with the model)"
            )
        return cls(real_size=largest + 1, width=int(width), n_tokens=len(ids))

    @classmethod
    def unpadded(cls, width: int) -> VocabPadding:
        return cls(real_size=int(width), width=int(width), n_tokens=int(width))

    @property
    def padding(self) -> int:
        """Columns past the real vocabulary."""
        return self.width - self.real_size

    def trim(self, logits: Tensor, what: str = "logits") -> Tensor:
        """logits[..., :real_size], after checking the width."""
        if logits.shape[-1] != self.width:
            raise ValueError(
                f"{what} have {logits.shape[-1]} columns but this vocabulary was detected for {self.width}"
            )
        return logits if self.padding == 0 else logits[..., : self.real_size]


@dataclass(frozen=True)
class VocabPair:
    """Student and teacher vocabularies: real sizes and the tokens both have (same string).

    shared_teacher_ids: int64 [n], ascending; shared_student_ids: int64 [n], the student id of the same
    token string. Both only hold real ids (below each side's real_size).
    """

    student: VocabPadding
    teacher: VocabPadding
    shared_teacher_ids: Tensor
    shared_student_ids: Tensor

    @classmethod
    def from_tokenizers(
        cls, student_tokenizer, teacher_tokenizer, *, student_width: int, teacher_width: int
    ) -> VocabPair:
        student = VocabPadding.detect(student_tokenizer, student_width, what="student")
        teacher = VocabPadding.detect(teacher_tokenizer, teacher_width, what="teacher")
        s_vocab = _vocab(student_tokenizer)
        pairs = sorted(
            (t_id, s_vocab[tok]) for tok, t_id in _vocab(teacher_tokenizer).items() if tok in s_vocab
        )
        t_ids = torch.tensor([t for t, _ in pairs], dtype=torch.long)
        s_ids = torch.tensor([s for _, s in pairs], dtype=torch.long)
        return cls(student, teacher, t_ids, s_ids)

    @classmethod
    def identical(cls, size: int, *, student_width: int | None = None, teacher_width: int | None = None):
        """One tokenizer of `size` real tokens on both sides (widths default to size: no padding)."""
        s_width = size if student_width is None else student_width
        t_width = size if teacher_width is None else teacher_width
        ids = torch.arange(size, dtype=torch.long)
        return cls(VocabPadding(size, s_width, size), VocabPadding(size, t_width, size), ids, ids.clone())

    @property
    def n_shared(self) -> int:
        return int(self.shared_teacher_ids.numel())

    def trim_pair(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Both logits trimmed to the real vocabulary, for one tokenizer padded to two widths.

        Then any same-vocabulary objective (forward_kl, jsd, ...) applies. Refused when the real
        vocabularies differ (then use `uld` or `span_aligned`).
        """
        same = (
            self.student.real_size == self.teacher.real_size
            and self.n_shared == self.student.n_tokens == self.teacher.n_tokens
            and bool((self.shared_student_ids == self.shared_teacher_ids).all())
        )
        if not same:
            raise ValueError(
                f"student and teacher vocabularies differ (real sizes {self.student.real_size} and "
                f"{self.teacher.real_size}, {self.n_shared} tokens shared with the same id): trimming the "
                "padding cannot make them comparable token by token; use the `uld` or `span_aligned` "
                "objective"
            )
        return self.student.trim(student_logits, "student_logits"), self.teacher.trim(
            teacher_logits, "teacher_logits"
        )
