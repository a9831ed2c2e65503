"""Span-aligned cross-tokenizer distillation: exact where the tokens coincide, sorted elsewhere.

In the spirit of GOLD's hybrid ULD (TRL) and of approximate likelihood matching (ALM, Minixhofer et
al., 2025). Teacher and student tokenizations of the same text are aligned by byte offsets into
groups that cover the same bytes (`TokenAlignment`), and each side's probabilities are merged over
its part of a group by the chain rule (see `cross_inputs`). Then, per group g:

- Coinciding tokens (one token on each side, the same bytes after the same text prefix): the two
  next-token distributions are over continuations of one text, so a token string both vocabularies
  have is the same event on both sides. Those shared coordinates are matched exactly, by the
  generalized JSD with weight `beta` (TRL's convention); the remaining coordinates, which have no
  counterpart, by ULD's sorted L1 (zero-padded):
      L_g = w_m * JSD_beta(q[shared_s], p[shared_t]) + w_u * sortedL1(q[other_s], p[other_t]).
- Merged groups (several tokens on a side): the merged vectors are joint probabilities of
  different prefixes followed by a token, so no coordinate corresponds; the matched set is empty
  and only the sorted term remains: L_g = w_u * sortedL1(q, p).
- Optionally (`likelihood_weight` > 0), ALM's idea: the probability of the group's text is the same
  event on both sides whatever the tokenization; add
      likelihood_weight * BinaryKL(P_teacher(text_g) || P_student(text_g)),
  the KL between the Bernoulli distributions "the model emits the group's text here" (probabilities
  at the temperature, of the given tokenization, hence approximate).

Weights as in GOLD: `matched_weight` and `unmatched_weight` both None (default) adapt to the overlap,
w_m = (number of shared tokens) / (teacher's real vocabulary) for coinciding groups, 0 for merged
ones, and w_u = 1 - w_m; or give both as numbers. JSD_beta is on the probability vectors restricted
to the shared tokens (not renormalized) and floored at 1e-8, as TRL does; at beta = 0 and 1 it is the
generalized KL of those vectors (sum p log(p/q) - sum p + sum q), which stays >= 0 where the plain KL
of unnormalized vectors, TRL's, can go negative. With one tokenizer on both sides every group
coincides, every token is shared and w_m = 1, so the loss is the `jsd` objective up to the floor.

Deliberate differences from TRL's hybrid (equal otherwise, tests/engine/test_losses_cross_tokenizer.py):
TRL applies the vocabulary mapping to merged groups too, whose vectors' coordinates are not the same
events; the endpoints beta = 0, 1 above; an empty unmatched set on one side is compared with the
other side's unmatched mass (padding), where TRL skips the term; the adaptive weight divides by the
real teacher vocabulary, not the padded width. Plus everything listed for `uld`.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import Tensor

from secure_kd.cross_tokenizer.alignment import TokenAlignment
from secure_kd.cross_tokenizer.vocab import VocabPair
from secure_kd.losses.catalog import register_loss
from secure_kd.losses.cross_inputs import PROB_FLOOR, merged_groups, reduce_groups, sorted_l1
from secure_kd.losses.params import LossParams
from secure_kd.topk import TopKLogits


def generalized_jsd(student: Tensor, teacher: Tensor, beta: float) -> Tensor:
    """Per row, on nonnegative vectors floored at 1e-8: beta KL(t || m) + (1 - beta) KL(s || m),
    m = beta t + (1 - beta) s; at beta = 0 / 1 the generalized KL(t || s) / KL(s || t)."""
    s = student.clamp_min(PROB_FLOOR)
    t = teacher.clamp_min(PROB_FLOOR)
    log_s, log_t = s.log(), t.log()
    if beta == 0.0:
        return (t * (log_t - log_s)).sum(-1) - t.sum(-1) + s.sum(-1)
    if beta == 1.0:
        return (s * (log_s - log_t)).sum(-1) - s.sum(-1) + t.sum(-1)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * (t * (log_t - log_m)).sum(-1) + (1 - beta) * (s * (log_s - log_m)).sum(-1)


def binary_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(Bernoulli(p) || Bernoulli(q)) from log p and log q, per element."""
    tiny = torch.finfo(log_q.dtype).tiny
    p = log_p.exp()
    log_1mp = torch.log((-torch.expm1(log_p)).clamp_min(tiny))
    log_1mq = torch.log((-torch.expm1(log_q)).clamp_min(tiny))
    return p * (log_p - log_q) + (1 - p) * (log_1mp - log_1mq)


class SpanAlignedParams(LossParams):
    beta: float = Field(0.5, ge=0, le=1, description="JSD weight on the shared tokens (TRL's convention)")
    matched_weight: float | None = Field(
        None,
        ge=0,
        description="weight of the exact term; null (with unmatched_weight null): adapted to the overlap",
    )
    unmatched_weight: float | None = Field(
        None, ge=0, description="weight of the sorted term; give both or neither"
    )
    likelihood_weight: float = Field(0.0, ge=0, description="weight of the group-text likelihood term (ALM)")

    @model_validator(mode="after")
    def _both_weights_or_neither(self) -> SpanAlignedParams:
        if (self.matched_weight is None) != (self.unmatched_weight is None):
            raise ValueError(
                "give matched_weight and unmatched_weight both (fixed weights) or neither (weights adapted "
                f"to the vocabulary overlap); got matched_weight={self.matched_weight}, "
                f"unmatched_weight={self.unmatched_weight}"
            )
        return self


@register_loss("span_aligned", sparse_teacher=True, cross_tokenizer="required", params=SpanAlignedParams)
def span_aligned(
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogits,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    tail: str | None = None,
    chunk_size: int | None = None,
    alignment: TokenAlignment | None = None,
    teacher_labels: Tensor | None = None,
    vocab: VocabPair | None = None,
    beta: float = 0.5,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    likelihood_weight: float = 0.0,
) -> Tensor:
    """Per aligned group: exact (JSD) on shared tokens where the tokens coincide, sorted L1 elsewhere.

    alignment= and vocab= are required (see `secure_kd.losses.cross_inputs` for every input);
    beta in [0, 1]; weights as in the module docstring; chunk_size has no effect (shared signature).
    """
    del chunk_size
    params = SpanAlignedParams.checked(
        "span_aligned",
        beta=beta,
        matched_weight=matched_weight,
        unmatched_weight=unmatched_weight,
        likelihood_weight=likelihood_weight,
    )
    beta, likelihood_weight = params.beta, params.likelihood_weight
    fixed = None if params.matched_weight is None else (params.matched_weight, params.unmatched_weight)
    if not isinstance(vocab, VocabPair):
        raise ValueError(
            "span_aligned needs vocab= (a secure_kd.cross_tokenizer.VocabPair, e.g. "
            "VocabPair.from_tokenizers(student_tok, teacher_tok, student_width=..., teacher_width=...)): "
            "it says which tokens both vocabularies share"
        )
    merged = merged_groups(
        student_logits,
        teacher_logits,
        labels,
        alignment=alignment,
        teacher_labels=teacher_labels,
        vocab=vocab,
        temperature=temperature,
        reduction=reduction,
        tail=tail,
        name="span_aligned",
        allow_positional=False,
    )
    q, p = merged.student, merged.teacher
    coincident = merged.coincident
    device = q.device
    shared_s = vocab.shared_student_ids.to(device)
    shared_t = vocab.shared_teacher_ids.to(device)
    other_s = torch.ones(q.shape[-1], dtype=torch.bool, device=device).index_fill_(0, shared_s, False)
    other_t = torch.ones(p.shape[-1], dtype=torch.bool, device=device).index_fill_(0, shared_t, False)

    losses = q.new_zeros(q.shape[0])
    if fixed is None:
        w_match = shared_t.numel() / vocab.teacher.real_size
        weights = (w_match, 1.0 - w_match)
    else:
        weights = fixed
    c_rows = coincident.nonzero().squeeze(1)
    if c_rows.numel():
        qc, pc = q[c_rows], p[c_rows]
        matched = generalized_jsd(qc[:, shared_s], pc[:, shared_t], beta) if shared_s.numel() else 0.0
        unmatched = sorted_l1(qc[:, other_s], pc[:, other_t])
        losses = losses.index_add(0, c_rows, weights[0] * matched + weights[1] * unmatched)
    m_rows = (~coincident).nonzero().squeeze(1)
    if m_rows.numel():
        w_unmatched = 1.0 if fixed is None else fixed[1]
        losses = losses.index_add(0, m_rows, w_unmatched * sorted_l1(q[m_rows], p[m_rows]))
    if likelihood_weight > 0:
        losses = losses + likelihood_weight * binary_kl(merged.teacher_text_logp, merged.student_text_logp)
    return reduce_groups(losses, merged.alignment, reduction, student_logits)
