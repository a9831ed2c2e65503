"""Universal Logit Distillation (Boizard et al., 2024): teacher and student with different tokenizers.

ULD compares the two next-token distributions without mapping one vocabulary onto the other: both
are sorted in decreasing order, the smaller vocabulary is padded with zeros, and the loss is the L1
distance between the sorted vectors, the closed form of the Wasserstein-1 distance when every
token is at the same cost from every other. It is blind to which token carries which probability;
it transfers the shape of the teacher's distribution (its confidence), not its choices.

Positions are paired in one of two ways:
- with `alignment=` (a `TokenAlignment` from both tokenizations' byte spans of the same text), per
  aligned group, with the probabilities of each side merged over the group by the chain rule (see
  `cross_inputs`): TRL GOLD's extended ULD with `uld_token_merge_strategy="bayesian"`;
- without, the original ULD: per example the i-th kept student position with the i-th kept teacher
  position, up to the shorter (TRL's `use_extended_uld=False`). With one tokenizer on both sides
  this is every kept position with itself, so `uld` also runs where the other objectives do.

How a trainer calls it, and every input, is in `secure_kd/losses/cross_inputs.py`.

Deliberate differences from TRL's `ULDLoss` (tests/engine/test_losses_cross_tokenizer.py shows equality
everywhere else): no cross-entropy term and no weights (the trainer adds CE, as for every
objective); one temperature for both sides; no `skip_*_eos` (mask the EOS label to -100 instead);
labels need not be one contiguous answer span; positions are not shifted here (TRL's "observed"
strategy pairs the logits at a position with that position's own input token, which a causal LM
does not predict; we only merge by the chain rule); "mean" is the mean over all aligned groups of
the batch, while TRL averages per-example means (that is `reduction="none"` then `.mean()`);
padded vocabulary columns are dropped before the softmax when `vocab=` says where they start.
"""

from __future__ import annotations

from torch import Tensor

from secure_kd.cross_tokenizer.alignment import TokenAlignment
from secure_kd.cross_tokenizer.vocab import VocabPair
from secure_kd.losses.catalog import register_loss
from secure_kd.losses.cross_inputs import merged_groups, reduce_groups, sorted_l1
from secure_kd.topk import TopKLogits


@register_loss("uld", sparse_teacher=True, cross_tokenizer="optional")
def uld(
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
) -> Tensor:
    """ULD loss: per aligned group, sum_i |sort(p_student)_i - sort(p_teacher)_i| (zero-padded).

    student_logits [B, Ls, Vs] and teacher_logits [B, Lt, Vt] (or a TopKLogits with tail="uniform"
    and vocab=) may differ in length and vocabulary. See `secure_kd.losses.cross_inputs` for
    alignment, teacher_labels and vocab. chunk_size is accepted for the shared signature and has no
    effect: all aligned groups are processed at once (memory O(groups x vocabulary)).
    """
    del chunk_size
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
        name="uld",
        allow_positional=True,
    )
    losses = sorted_l1(merged.student, merged.teacher)
    return reduce_groups(losses, merged.alignment, reduction, student_logits)
