"""Self-distillation with privileged information (`kd.mode: self_privileged`).

The teacher is the student's own weights (`kd.self_teacher`: `frozen`, a copy made at the start; or
`shared`, the live student under no_grad) shown each record's privileged context
(`data.privileged_field`: a document, a solution, a customer record) before the student's own
input; the student sees the prompt only. As in OPSD / TRL's experimental SDFT, the student samples
continuations of its prompts (a share `kd.lmbda` of the batches, as in on_policy) and the teacher
scores the same tokens with the context in front: the teacher's input is `[bos] + context + "\\n" +
prompt + continuation`, the student's `[bos] + prompt + continuation`, and position t of the student
is compared with position t + len(context) of the teacher, so both predict the same next token.

`kd.token_share` < 1 distils at most that share of each example's response tokens: those where the
privileged teacher is the more certain of the two (entropy gap H(student) - H(teacher) > 0, largest
first), the selection rule of the `token_selective` objective, applied per example (so a DP-SGD
example's loss still depends on that example only) and then any `kd.loss` on the selected tokens.

The privileged context is private data of the record: under DP-SGD the record, context included,
is the unit (it changes only its own example's targets, hence only its own clipped gradient).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from secure_kd.data import IGNORE_INDEX, TokenizedExample
from secure_kd.losses.base import token_losses_and_aux
from secure_kd.losses.token_selective import _kl_and_entropy_gap, select_tokens
from secure_kd.topk import TopKLogits

SEPARATOR = "\n"
"""Between the privileged context and the prompt in the teacher's input."""


def privileged_text(record: Mapping[str, Any], field: str, index: int) -> str:
    """The record's privileged context, or a ValueError naming the record and the field (never its text)."""
    if field not in record:
        raise ValueError(
            f"record {index} has no field {field!r} (data.privileged_field); every training record of "
            f"kd.mode: self_privileged needs its privileged context there (fields present: {sorted(record)})"
        )
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        kind = "empty" if isinstance(value, str) else f"a {type(value).__name__}, not a string"
        raise ValueError(
            f"record {index} field {field!r} (data.privileged_field) is {kind}; give the privileged context "
            "as non-empty text"
        )
    return value


def privileged_token_ids(
    records: Sequence[Mapping[str, Any]],
    examples: Sequence[TokenizedExample],
    tokenizer: Any,
    field: str,
    *,
    max_tokens: int,
) -> list[list[int]]:
    """Per example, the token ids of its record's privileged context plus the separator (at most
    `max_tokens`, the first ones), without special tokens."""
    ids = []
    for example in examples:
        text = privileged_text(records[example.record_index], field, example.record_index)
        ids.append(list(tokenizer(text + SEPARATOR, add_special_tokens=False)["input_ids"])[:max_tokens])
    return ids


def self_teacher(student: nn.Module, kind: str) -> nn.Module:
    """The teacher of self-distillation: a frozen copy of `student` now, or `student` itself (shared)."""
    if kind == "shared":
        return student
    if kind != "frozen":
        raise ValueError(f"kd.self_teacher must be 'frozen' or 'shared', got {kind!r}")
    teacher = copy.deepcopy(student).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class PrivilegedSelfTeacher:
    """Teacher targets of self_privileged: the teacher run on context + the student's sequence, its
    logits moved back onto the student's positions (`TeacherTargets`: `targets(batch)`).

    `privileged[i]` are the context ids of example i (`batch["example_index"]` picks them, also for
    sequences the student generated); `bos_id` stays first when the student's sequence starts with it."""

    def __init__(
        self,
        model: nn.Module,
        privileged: Sequence[Sequence[int]],
        *,
        top_k: int | None,
        pad_id: int,
        bos_id: int | None,
    ) -> None:
        self.model, self.privileged, self.top_k = model, [list(p) for p in privileged], top_k
        self.pad_id, self.bos_id = pad_id, bos_id

    def teacher_batch(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(teacher input_ids, attention_mask, offset per row): student position t is teacher t + offset."""
        rows, offsets = [], []
        for row, index in enumerate(batch["example_index"].tolist()):
            n = int(batch["attention_mask"][row].sum())
            seq = batch["input_ids"][row, :n].tolist()
            lead = 1 if self.bos_id is not None and seq[:1] == [self.bos_id] else 0
            context = self.privileged[index]
            rows.append(seq[:lead] + context + seq[lead:])
            offsets.append(len(context))
        width = max(len(r) for r in rows)
        device = batch["input_ids"].device
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
            mask[i, : len(r)] = 1
        return ids, mask, torch.tensor(offsets, dtype=torch.long, device=device)

    @torch.no_grad()
    def aligned_logits(self, batch: dict[str, Tensor]) -> Tensor:
        """The teacher's logits [batch, seq, vocab] on the student's positions (float32)."""
        ids, mask, offsets = self.teacher_batch(batch)
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        finally:
            self.model.train(was_training)
        seq = batch["input_ids"].shape[1]
        positions = torch.arange(seq, device=ids.device)[None, :] + offsets[:, None]
        positions = positions.clamp(max=logits.shape[1] - 1)  # padding rows: never trained
        return logits.gather(1, positions[:, :, None].expand(-1, -1, logits.shape[-1]))

    def __call__(self, batch: dict[str, Tensor]) -> Tensor | TopKLogits:
        logits = self.aligned_logits(batch)
        return logits if self.top_k is None else TopKLogits.from_logits(logits, self.top_k)


def selected_labels(
    student_logits: Tensor,
    teacher: Tensor | TopKLogits,
    labels: Tensor,
    share: float,
    *,
    temperature: float = 1.0,
    tail: str | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """`labels` with every token but the selected ones set to -100: per example, at most
    ceil(share * n_b) of its n_b kept tokens, largest entropy gap H(student) - H(teacher) first, gap > 0
    (`secure_kd.losses.token_selective.select_tokens`)."""
    with torch.no_grad():
        _, gaps, layout = token_losses_and_aux(
            _kl_and_entropy_gap,
            student_logits.detach(),
            teacher,
            labels,
            temperature=temperature,
            reduction="none",
            tail=tail,
            chunk_size=chunk_size,
        )
        examples = layout.example_ids(student_logits.device)
        chosen = select_tokens(gaps[:, 0], examples, layout.batch_size, share)
        rows = layout.kept_rows if layout.kept_rows is not None else torch.arange(layout.n_kept)
        keep = torch.zeros(labels.numel(), dtype=torch.bool, device=labels.device)
        keep[rows.to(labels.device)[chosen.to(labels.device)]] = True
        return labels.masked_fill(~keep.view_as(labels), IGNORE_INDEX)


class TokenShareObjective:
    """Any logit objective on the tokens `selected_labels` keeps (kd.token_share < 1)."""

    def __init__(self, objective: Callable[..., Tensor], share: float) -> None:
        self.objective, self.share = objective, share

    def __call__(self, student_logits: Tensor, teacher, labels: Tensor, **kwargs: Any) -> Tensor:
        common = {k: kwargs[k] for k in ("temperature", "tail", "chunk_size") if k in kwargs}
        kept = selected_labels(student_logits, teacher, labels, self.share, **common)
        return self.objective(student_logits, teacher, kept, **kwargs)


def privileged_targets(
    job: Any, teacher: nn.Module, tokenizer: Any, records: Sequence[Mapping[str, Any]], examples
) -> PrivilegedSelfTeacher:
    """The targets of a `DistillJob` in mode self_privileged: `teacher` (from `self_teacher`) shown the
    `data.privileged_field` of each training example's record (at most `data.max_length` tokens of it)."""
    privileged = privileged_token_ids(
        records, examples, tokenizer, job.data.privileged_field, max_tokens=job.data.max_length
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PrivilegedSelfTeacher(
        teacher, privileged, top_k=job.kd.top_k, pad_id=pad_id, bos_id=tokenizer.bos_token_id
    )


def ledger_texts(records: Sequence[Mapping[str, Any]], texts: Sequence[str], field: str | None) -> list[str]:
    """What the DP ledger's dataset key hashes per record: its text, plus its privileged context when
    there is one (the context is part of the record: another context is another dataset)."""
    if field is None:
        return list(texts)
    return [
        f"{text}\x00{privileged_text(r, field, i)}"
        for i, (r, text) in enumerate(zip(records, texts, strict=True))
    ]
