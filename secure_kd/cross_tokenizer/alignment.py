"""Aligning a student and a teacher tokenization of the same text by byte offsets.

`align_spans(student_spans, teacher_spans)` walks both lists of byte spans, advancing the side
whose current token ends earlier; a group closes where both sides end at the same byte, i.e. at the
boundaries the two tokenizers agree on. Each group is a list of student positions and a list of
teacher positions that cover the same bytes: one token on each side where the tokenizations
coincide, several on one side where that side splits what the other merges ("hel" + "lo" against
"hello"), several on both sides where the splits cross ("ab" + "c" against "a" + "bc"). Tokens left
over at the end form a last group; a group with an empty side (a teacher EOS the student lacks) is
dropped. This is exactly TRL's `ULDLoss._align_by_byte_offsets` (tests/engine/test_alignment.py), plus
input checks: spans in order and disjoint, and both sides ending at the same byte (the same text).

`TokenAlignment.build(...)` does this for a padded batch and stores the groups as flat index
tensors, the form the cross-tokenizer objectives (`uld`, `span_aligned`) consume. Its positions are
those of the logits the objectives receive: position t of the student holds the student's
prediction of target token `student_ids[b, t]` whose byte span is `student_spans[b, t]`; likewise for
the teacher. With causal LM logits the caller shifts first (logits[:, :-1], ids and spans of
input_ids[:, 1:]), as for every objective. Positions with span (-1, -1) are outside the aligned
text (padding, a prompt rendered with a different chat template) and take no part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from secure_kd.cross_tokenizer.spans import check_spans

Groups = list[list[int]]


def align_spans(
    student_spans: Sequence[tuple[int, int]], teacher_spans: Sequence[tuple[int, int]]
) -> tuple[Groups, Groups]:
    """Aligned groups of positions (student groups, teacher groups), the same number of each.

    Spans are byte `(start, end)` pairs; only the ends decide the grouping. A final group holds the
    tokens left over after the last common boundary (it may have an empty side).
    """
    s_groups: Groups = []
    t_groups: Groups = []
    s = t = s_start = t_start = 0
    while s < len(student_spans) and t < len(teacher_spans):
        s_end, t_end = student_spans[s][1], teacher_spans[t][1]
        if s_end < t_end:
            s += 1
        elif t_end < s_end:
            t += 1
        else:
            s += 1
            t += 1
            s_groups.append(list(range(s_start, s)))
            t_groups.append(list(range(t_start, t)))
            s_start, t_start = s, t
    if s < len(student_spans) or t < len(teacher_spans):
        s_groups.append(list(range(s_start, len(student_spans))))
        t_groups.append(list(range(t_start, len(teacher_spans))))
    return s_groups, t_groups


def _text_positions(spans: Tensor, what: str, b: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Positions of example b that carry text (span != (-1, -1)) and their checked spans."""
    row = spans[b]
    inside = (row >= 0).all(-1)
    outside = (row == -1).all(-1)
    if bool((~inside & ~outside).any()):
        raise ValueError(f"{what}[{b}] has a negative byte offset other than (-1, -1) (= no text)")
    positions = inside.nonzero().squeeze(1).tolist()
    pairs = check_spans(row[positions].tolist(), f"{what}[{b}]")
    return positions, pairs


@dataclass(frozen=True)
class TokenAlignment:
    """Aligned groups of a batch, flat. Group g has student members `student_rows[student_group == g]`
    (flat positions b * student_seq_len + t, in order) and teacher members likewise; members are
    stored group by group. `*_targets` are the target token ids at the members."""

    batch_size: int
    student_seq_len: int
    teacher_seq_len: int
    student_rows: Tensor  # int64 [Ms]
    student_group: Tensor  # int64 [Ms]
    student_targets: Tensor  # int64 [Ms]
    teacher_rows: Tensor  # int64 [Mt]
    teacher_group: Tensor  # int64 [Mt]
    teacher_targets: Tensor  # int64 [Mt]
    group_example: Tensor  # int64 [G]

    @property
    def n_groups(self) -> int:
        return int(self.group_example.numel())

    def sizes(self) -> tuple[Tensor, Tensor]:
        """Members per group on each side, int64 [G] each."""
        g = self.n_groups
        return (
            torch.bincount(self.student_group, minlength=g),
            torch.bincount(self.teacher_group, minlength=g),
        )

    def last_rows(self) -> tuple[Tensor, Tensor]:
        """The flat position of each group's last member on each side, int64 [G] each."""
        s_sizes, t_sizes = self.sizes()
        return self.student_rows[s_sizes.cumsum(0) - 1], self.teacher_rows[t_sizes.cumsum(0) - 1]

    def coincident(self) -> Tensor:
        """bool [G]: one token on each side covering the same bytes after the same text prefix."""
        s_sizes, t_sizes = self.sizes()
        return (s_sizes == 1) & (t_sizes == 1)

    def student_groups(self, b: int) -> Groups:
        """Example b's student groups as lists of positions (for inspection and tests)."""
        return self._groups(b, self.student_rows, self.student_group, self.student_seq_len)

    def teacher_groups(self, b: int) -> Groups:
        return self._groups(b, self.teacher_rows, self.teacher_group, self.teacher_seq_len)

    def _groups(self, b: int, rows: Tensor, group: Tensor, seq_len: int) -> Groups:
        ids = (self.group_example == b).nonzero().squeeze(1).tolist()
        return [(rows[group == g] - b * seq_len).tolist() for g in ids]

    def to(self, device) -> TokenAlignment:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device)
        return TokenAlignment(**moved)

    def select(self, keep: Tensor) -> TokenAlignment:
        """The alignment restricted to the groups where `keep` (bool [G]) is true, renumbered."""
        new_id = torch.cumsum(keep.long(), 0) - 1
        s_keep = keep[self.student_group]
        t_keep = keep[self.teacher_group]
        return TokenAlignment(
            batch_size=self.batch_size,
            student_seq_len=self.student_seq_len,
            teacher_seq_len=self.teacher_seq_len,
            student_rows=self.student_rows[s_keep],
            student_group=new_id[self.student_group[s_keep]],
            student_targets=self.student_targets[s_keep],
            teacher_rows=self.teacher_rows[t_keep],
            teacher_group=new_id[self.teacher_group[t_keep]],
            teacher_targets=self.teacher_targets[t_keep],
            group_example=self.group_example[keep],
        )

    @classmethod
    def build(
        cls, student_ids: Tensor, student_spans: Tensor, teacher_ids: Tensor, teacher_spans: Tensor
    ) -> TokenAlignment:
        """Align a batch: ids `[B, L]` (target token at each logits position) and spans `[B, L, 2]`.

        Both sides of an example must cover the same text: their last spans end at the same byte.
        Groups with an empty side are dropped (as TRL does).
        """
        _check_side(student_ids, student_spans, "student")
        _check_side(teacher_ids, teacher_spans, "teacher")
        if student_ids.shape[0] != teacher_ids.shape[0]:
            raise ValueError(
                f"student and teacher batches differ in size ({student_ids.shape[0]} vs "
                f"{teacher_ids.shape[0]}); align the same texts, one example per row"
            )
        batch, s_len = student_ids.shape
        t_len = teacher_ids.shape[1]
        s_rows: list[int] = []
        s_group: list[int] = []
        t_rows: list[int] = []
        t_group: list[int] = []
        example: list[int] = []
        for b in range(batch):
            s_pos, s_pairs = _text_positions(student_spans, "student_spans", b)
            t_pos, t_pairs = _text_positions(teacher_spans, "teacher_spans", b)
            if s_pairs and t_pairs and s_pairs[-1][1] != t_pairs[-1][1]:
                raise ValueError(
                    f"example {b}: the student's text ends at byte {s_pairs[-1][1]} but the teacher's at "
                    f"byte {t_pairs[-1][1]}; both tokenizations must cover the same text (give positions "
                    "outside it the span (-1, -1))"
                )
            for sg, tg in zip(*align_spans(s_pairs, t_pairs), strict=True):
                if not sg or not tg:
                    continue
                g = len(example)
                example.append(b)
                s_rows += [b * s_len + s_pos[i] for i in sg]
                s_group += [g] * len(sg)
                t_rows += [b * t_len + t_pos[i] for i in tg]
                t_group += [g] * len(tg)
        long = dict(dtype=torch.long)
        s_rows_t = torch.tensor(s_rows, **long)
        t_rows_t = torch.tensor(t_rows, **long)
        return cls(
            batch_size=batch,
            student_seq_len=s_len,
            teacher_seq_len=t_len,
            student_rows=s_rows_t,
            student_group=torch.tensor(s_group, **long),
            student_targets=student_ids.reshape(-1).cpu()[s_rows_t],
            teacher_rows=t_rows_t,
            teacher_group=torch.tensor(t_group, **long),
            teacher_targets=teacher_ids.reshape(-1).cpu()[t_rows_t],
            group_example=torch.tensor(example, **long),
        )

    @classmethod
    def positional(cls, student_keep: Tensor, teacher_keep: Tensor, student_ids: Tensor, teacher_ids: Tensor):
        """Original ULD pairing: per example, the i-th kept student position with the i-th kept
        teacher position, up to the shorter of the two (bool keep masks `[B, L]`)."""
        batch, s_len = student_keep.shape
        t_len = teacher_keep.shape[1]
        s_rows: list[int] = []
        t_rows: list[int] = []
        example: list[int] = []
        for b in range(batch):
            s_pos = student_keep[b].nonzero().squeeze(1).tolist()
            t_pos = teacher_keep[b].nonzero().squeeze(1).tolist()
            n = min(len(s_pos), len(t_pos))
            s_rows += [b * s_len + p for p in s_pos[:n]]
            t_rows += [b * t_len + p for p in t_pos[:n]]
            example += [b] * n
        groups = torch.arange(len(example), dtype=torch.long)
        s_rows_t = torch.tensor(s_rows, dtype=torch.long)
        t_rows_t = torch.tensor(t_rows, dtype=torch.long)
        return cls(
            batch_size=batch,
            student_seq_len=s_len,
            teacher_seq_len=t_len,
            student_rows=s_rows_t,
            student_group=groups,
            student_targets=student_ids.reshape(-1).cpu()[s_rows_t],
            teacher_rows=t_rows_t,
            teacher_group=groups.clone(),
            teacher_targets=teacher_ids.reshape(-1).cpu()[t_rows_t],
            group_example=torch.tensor(example, dtype=torch.long),
        )


def _check_side(ids: Tensor, spans: Tensor, what: str) -> None:
    if ids.dim() != 2 or ids.is_floating_point():
        raise ValueError(
            f"{what}_ids must be integer token ids [batch, seq], got {tuple(ids.shape)} {ids.dtype}"
        )
    if spans.shape != (*ids.shape, 2) or spans.is_floating_point():
        raise ValueError(
            f"{what}_spans must be integer byte offsets [batch, seq, 2] matching {what}_ids "
            f"{tuple(ids.shape)}, got {tuple(spans.shape)} {spans.dtype}; (-1, -1) marks no text"
        )
