"""What the cross-tokenizer objectives (`uld`, `span_aligned`) receive, checked and merged per group.

A trainer calls them like any objective, plus the alignment of the two tokenizations:

    alignment = TokenAlignment.build(student_ids, student_spans, teacher_ids, teacher_spans)
    loss = uld(student_logits, teacher_logits, labels, alignment=alignment,
               teacher_labels=teacher_labels, vocab=vocab, temperature=T, reduction="none")

- `student_logits [B, Ls, Ws]` on the student's tokenization, already shifted: position t predicts the
  target token `student_ids[b, t]` (input_ids[:, 1:]) whose byte span is `student_spans[b, t]`.
- `teacher_logits [B, Lt, Wt]` (or a `TopKLogits` with positions [B, Lt], then `tail="uniform"`) on
  the teacher's tokenization of the same text, shifted the same way; `teacher_ids`/`teacher_spans`
  describe its targets. Spans are byte offsets into the same text on both sides (e.g. the completion
  text), (-1, -1) where a position is outside it; `secure_kd.cross_tokenizer.token_byte_spans` and
  `stack_spans` compute them from each tokenizer.
- `labels [B, Ls]` and `teacher_labels [B, Lt]` (optional) are -100 where a position is not
  distilled; a group takes part only if none of its positions, on either side, is masked. Where not
  -100 they must equal the alignment's target ids (a check that the shifts agree).
- `vocab` (a `VocabPair`): each side's real vocabulary size (padded output columns are dropped before
  the softmax) and the tokens both vocabularies share. Optional for `uld` with dense logits (then
  every column is a token), required with a TopKLogits teacher and for `span_aligned`.
- `reduction`: "mean" = the mean over the aligned groups of the batch, "none" = per example, the
  mean over its own groups ([B], 0 for an example without any; what DP-SGD needs), "sum".

Merging (the chain rule, TRL GOLD's "bayesian" strategy): for a group of positions t_1 < ... < t_k
with target tokens y_1..y_k, the merged vector is
    m(v) = prod_{i<k} max(p_{t_i}(y_i), 1e-8) * p_{t_k}(v)      for every token v,
the joint probability of the group's earlier tokens followed by v; m(y_k) is the probability of the
group's text. Probabilities are softmax(logits / temperature) over the real vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from secure_kd.cross_tokenizer.alignment import TokenAlignment
from secure_kd.cross_tokenizer.vocab import VocabPadding, VocabPair
from secure_kd.losses.inputs import IGNORE_INDEX, check_reduction, check_temperature, compute_dtype
from secure_kd.topk import TopKLogits

# Per-batch inputs of the cross-tokenizer objectives: the trainer supplies them, never `kd.params`.
CROSS_TOKENIZER_ARGUMENTS = frozenset({"alignment", "teacher_labels", "vocab"})
PROB_FLOOR = 1e-8  # the floor TRL's ULDLoss puts under the scalar probabilities it multiplies


@dataclass(frozen=True)
class MergedGroups:
    """Per aligned group: merged probability vectors and the log-probability of the group's text."""

    student: Tensor  # [G, Vs] (carries the gradient)
    teacher: Tensor  # [G, Vt] (constant)
    student_text_logp: Tensor  # [G]
    teacher_text_logp: Tensor  # [G]
    alignment: TokenAlignment  # the groups that took part

    @property
    def coincident(self) -> Tensor:
        return self.alignment.coincident()


def reduce_groups(losses: Tensor, alignment: TokenAlignment, reduction: str, anchor: Tensor) -> Tensor:
    """Reduce per-group losses; `anchor` (the student logits) keeps a gradient path when G = 0."""
    zero = anchor.reshape(-1)[:0].sum().to(losses.dtype)  # 0 with a grad path, even for -inf logits
    if reduction == "sum":
        return losses.sum() + zero
    if reduction == "mean":
        return losses.sum() / max(losses.numel(), 1) + zero
    examples = alignment.group_example
    totals = losses.new_zeros(alignment.batch_size).index_add(0, examples, losses)
    counts = losses.new_zeros(alignment.batch_size).index_add(0, examples, torch.ones_like(losses))
    return totals / counts.clamp_min(1) + zero


def _check_logits(logits, what: str) -> Tensor:
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{what} must be a floating-point tensor [batch, seq, vocab], got {shape}")
    return logits


def _check_mask_labels(labels: Tensor | None, shape: tuple[int, int], what: str, logits_what: str) -> None:
    if labels is None:
        return
    if tuple(labels.shape) != shape:
        raise ValueError(
            f"{what} have shape {tuple(labels.shape)} but {logits_what} has positions {shape}; "
            "they must be [batch, seq], -100 where a position is not distilled"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{what} must be integer token ids (-100 where ignored), got dtype {labels.dtype}")


def _vocab_sides(vocab: VocabPair | None, s_width: int, teacher) -> tuple[VocabPadding, VocabPadding]:
    if vocab is None:
        if isinstance(teacher, TopKLogits):
            raise ValueError(
                "a TopKLogits teacher needs vocab= (a VocabPair): the teacher's vocabulary size, over which "
                "its missing mass is spread, is not in the top-k"
            )
        return VocabPadding.unpadded(s_width), VocabPadding.unpadded(teacher.shape[-1])
    if not isinstance(vocab, VocabPair):
        raise ValueError(f"vocab must be a secure_kd.cross_tokenizer.VocabPair, got {type(vocab).__name__}")
    if vocab.student.width != s_width:
        raise ValueError(
            f"student_logits have {s_width} columns but vocab.student.width is {vocab.student.width}"
        )
    if isinstance(teacher, Tensor) and vocab.teacher.width != teacher.shape[-1]:
        raise ValueError(
            f"teacher_logits have {teacher.shape[-1]} columns but vocab.teacher.width is "
            f"{vocab.teacher.width}"
        )
    return vocab.student, vocab.teacher


def _keep_groups(alignment: TokenAlignment, labels: Tensor | None, teacher_labels: Tensor | None) -> Tensor:
    """bool [G]: groups none of whose members is masked; checks labels against the target ids."""
    keep = torch.ones(alignment.n_groups, dtype=torch.bool, device=alignment.group_example.device)
    for side, side_labels in (("student", labels), ("teacher", teacher_labels)):
        if side_labels is None:
            continue
        rows, group, targets = (getattr(alignment, f"{side}_{name}") for name in ("rows", "group", "targets"))
        member_labels = side_labels.reshape(-1).to(rows.device)[rows]
        masked = member_labels == IGNORE_INDEX
        wrong = ~masked & (member_labels != targets)
        if bool(wrong.any()):
            what = "labels" if side == "student" else "teacher_labels"
            raise ValueError(
                f"{what} disagree with the alignment's {side} target ids at {int(wrong.sum())} aligned "
                f"positions; build the alignment from the same (shifted) target ids the {what} hold"
            )
        bad_group = torch.zeros_like(keep).index_fill_(0, group[masked], True)
        keep &= ~bad_group
    return keep


def _resolve_alignment(
    alignment: TokenAlignment | None,
    labels: Tensor | None,
    teacher_labels: Tensor | None,
    s_shape: tuple[int, int],
    t_shape: tuple[int, int],
    allow_positional: bool,
    name: str,
) -> TokenAlignment:
    if alignment is None:
        if not allow_positional:
            raise ValueError(
                f"{name} needs alignment= (a secure_kd.cross_tokenizer.TokenAlignment built from both "
                "tokenizations' byte spans of the same text); the trainer must pass it with every batch"
            )
        if teacher_labels is None and labels is not None and s_shape != t_shape:
            raise ValueError(
                f"student positions {s_shape} and teacher positions {t_shape} differ: without an alignment "
                "pass teacher_labels (-100 where not distilled) so the kept positions can be paired in order"
            )
        t_labels = teacher_labels if teacher_labels is not None else labels
        s_keep = torch.ones(s_shape, dtype=torch.bool) if labels is None else labels.cpu() != IGNORE_INDEX
        t_keep = torch.ones(t_shape, dtype=torch.bool) if t_labels is None else t_labels.cpu() != IGNORE_INDEX
        s_ids = torch.zeros(s_shape, dtype=torch.long) if labels is None else labels.cpu()
        t_ids = torch.zeros(t_shape, dtype=torch.long) if t_labels is None else t_labels.cpu()
        return TokenAlignment.positional(s_keep, t_keep, s_ids, t_ids)
    if not isinstance(alignment, TokenAlignment):
        raise ValueError(f"alignment must be a TokenAlignment, got {type(alignment).__name__}")
    expected = (alignment.batch_size, alignment.student_seq_len, alignment.teacher_seq_len)
    if expected != (s_shape[0], s_shape[1], t_shape[1]) or s_shape[0] != t_shape[0]:
        raise ValueError(
            f"the alignment was built for batch {expected[0]}, student seq {expected[1]}, teacher seq "
            f"{expected[2]}, but the logits have student positions {s_shape} and teacher positions "
            f"{t_shape}; build it from this batch's (shifted) targets"
        )
    return alignment.select(_keep_groups(alignment, labels, teacher_labels))


def _check_targets(targets: Tensor, real_size: int, side: str) -> None:
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= real_size):
        raise ValueError(
            f"the alignment's {side} target ids must be real token ids in [0, {real_size}); got values in "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )


def take_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x[b, t] for the flat positions rows = b * seq + t of x [batch, seq, ...], without copying the
    rest of x (a shifted view logits[:, :-1] is not contiguous, and reshaping it would copy it all)."""
    seq = x.shape[1]
    return x[torch.div(rows, seq, rounding_mode="floor"), rows % seq]


def _merge(log_probs_of, rows: Tensor, group: Tensor, targets: Tensor, last: Tensor, n_groups: int):
    """(merged log-vectors [G, V], log-probability of each group's text [G]) by the chain rule."""
    is_last = torch.zeros_like(rows, dtype=torch.bool)
    sizes = torch.bincount(group, minlength=n_groups)
    is_last[sizes.cumsum(0) - 1] = True
    last_log = log_probs_of(last)  # [G, V]
    earlier = ~is_last
    scalar = log_probs_of(rows[earlier]).gather(1, targets[earlier][:, None]).squeeze(1)
    floor = math.log(PROB_FLOOR)
    chain = last_log.new_zeros(n_groups).index_add(0, group[earlier], scalar.clamp_min(floor))
    exact = last_log.new_zeros(n_groups).index_add(0, group[earlier], scalar)
    text = exact + last_log.gather(1, targets[is_last][:, None]).squeeze(1)
    return last_log + chain[:, None], text


def _topk_log_probs(teacher: TopKLogits, rows: Tensor, real: int, temperature: float, dtype) -> Tensor:
    """Teacher log-probs [n, real] at the rows: top-k entries on real ids, the missing mass spread
    evenly over the other real ids (entries on padded ids are dropped), then the temperature."""
    values = take_rows(teacher.values, rows).to(dtype)
    indices = take_rows(teacher.indices, rows)
    is_real = indices < real
    missing = (1.0 - values.exp().sum(-1)).clamp_min(torch.finfo(dtype).tiny)
    n_tail = real - is_real.sum(-1)
    fill = torch.where(n_tail > 0, missing.log() - n_tail.clamp_min(1).to(dtype).log(), -math.inf)
    out = fill[:, None].expand(rows.numel(), real + 1).contiguous()
    out.scatter_(1, torch.where(is_real, indices, real), torch.where(is_real, values, -math.inf))
    return torch.log_softmax(out[:, :real] / temperature, dim=-1)


def merged_groups(
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogits,
    labels: Tensor | None,
    *,
    alignment: TokenAlignment | None,
    teacher_labels: Tensor | None,
    vocab: VocabPair | None,
    temperature: float,
    reduction: str,
    tail: str | None,
    name: str,
    allow_positional: bool,
) -> MergedGroups:
    """Check the inputs of a cross-tokenizer objective and merge both sides over the aligned groups."""
    temperature = check_temperature(temperature)
    check_reduction(reduction)
    if allow_positional and isinstance(student_logits, Tensor) and student_logits.dim() == 2:
        student_logits = student_logits[:, None, :]  # classifier logits [batch, classes]: one position
        if isinstance(teacher_logits, Tensor) and teacher_logits.dim() == 2:
            teacher_logits = teacher_logits[:, None, :]
        labels = None if labels is None else labels.reshape(-1, 1)
    student_logits = _check_logits(student_logits, "student_logits")
    batch, s_len, s_width = student_logits.shape
    if isinstance(teacher_logits, TopKLogits):
        if tail != "uniform":
            raise ValueError(
                f"{name} with a TopKLogits teacher needs tail='uniform' (the missing mass spread over the "
                "teacher's other tokens); tail='zero' renormalizes the student over the teacher's top-k ids, "
                f"which has no meaning across vocabularies (got tail={tail!r})"
            )
        if teacher_logits.values.dim() != 3 or not teacher_logits.values.is_floating_point():
            raise ValueError("a TopKLogits teacher must have float values [batch, seq, k]")
        t_shape = tuple(teacher_logits.shape)
    elif isinstance(teacher_logits, Tensor):
        teacher_logits = _check_logits(teacher_logits, "teacher_logits")
        t_shape = tuple(teacher_logits.shape[:2])
    else:
        raise ValueError(
            f"teacher_logits must be a Tensor or a TopKLogits, got {type(teacher_logits).__name__}"
        )
    if t_shape[0] != batch:
        raise ValueError(f"student batch {batch} != teacher batch {t_shape[0]}")
    _check_mask_labels(labels, (batch, s_len), "labels", "student_logits")
    _check_mask_labels(teacher_labels, t_shape, "teacher_labels", "teacher_logits")
    s_vocab, t_vocab = _vocab_sides(vocab, s_width, teacher_logits)
    kept = _resolve_alignment(
        alignment, labels, teacher_labels, (batch, s_len), t_shape, allow_positional, name
    ).to(student_logits.device)
    merge_targets = alignment is not None
    if merge_targets:
        _check_targets(kept.student_targets, s_vocab.real_size, "student")
        _check_targets(kept.teacher_targets, t_vocab.real_size, "teacher")
    dtype = compute_dtype(student_logits, teacher_logits if isinstance(teacher_logits, Tensor) else None)
    s_last, t_last = kept.last_rows()

    def student_log_probs(rows: Tensor) -> Tensor:
        z = take_rows(student_logits, rows)[:, : s_vocab.real_size].to(dtype)
        return torch.log_softmax(z / temperature, dim=-1)

    def teacher_log_probs(rows: Tensor) -> Tensor:
        if isinstance(teacher_logits, TopKLogits):
            return _topk_log_probs(teacher_logits, rows, t_vocab.real_size, temperature, dtype)
        z = take_rows(teacher_logits, rows)[:, : t_vocab.real_size].to(dtype)
        return torch.log_softmax(z / temperature, dim=-1)

    g = kept.n_groups
    if not merge_targets:  # positional: one position per side and group, nothing to merge
        s_log, t_log = student_log_probs(s_last), None
        with torch.no_grad():
            t_log = teacher_log_probs(t_last)
        s_text = t_text = s_log.new_zeros(g)
    else:
        s_log, s_text = _merge(
            student_log_probs, kept.student_rows, kept.student_group, kept.student_targets, s_last, g
        )
        with torch.no_grad():
            t_log, t_text = _merge(
                teacher_log_probs, kept.teacher_rows, kept.teacher_group, kept.teacher_targets, t_last, g
            )
    return MergedGroups(s_log.exp(), t_log.exp(), s_text, t_text, kept)


def sorted_l1(student: Tensor, teacher: Tensor) -> Tensor:
    """Per row: sum_i |sort(student)_i - sort(teacher)_i|, both sorted descending, the shorter padded
    with zeros (ULD's closed-form Wasserstein-1 distance between the sorted distributions)."""
    s_sorted = student.sort(dim=-1, descending=True).values
    with torch.no_grad():
        t_sorted = teacher.sort(dim=-1, descending=True).values
    n = min(s_sorted.shape[-1], t_sorted.shape[-1])
    common = (s_sorted[:, :n] - t_sorted[:, :n]).abs().sum(-1)
    return common + s_sorted[:, n:].sum(-1) + t_sorted[:, n:].sum(-1)
