"""`uld` and `span_aligned` (teacher and student with different tokenizers) against TRL GOLD's
`ULDLoss` (the installed oracle, as TRL's GKD is for `jsd`) and hand-computed values.

TRL's conventions, and how the inputs here map onto them: TRL takes unshifted logits, input ids,
labels (the prompt masked) and completion-relative byte offsets, and with
`uld_token_merge_strategy="bayesian"` uses logits[t - 1] for the answer token at t. Our objectives
take the shifted logits (logits[:, :-1]) with the targets input_ids[:, 1:] and their spans, (-1, -1)
outside the completion. TRL averages per-example means: ours is `reduction="none"` then `.mean()`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import warnings

import pytest
import torch

from secure_kd.cross_tokenizer import TokenAlignment, VocabPadding, VocabPair, stack_spans, token_byte_spans
from secure_kd.data.tokenizer import train_tiny_tokenizer
from secure_kd.losses import CROSS_TOKENIZER_ARGUMENTS, TopKLogits, get_loss, jsd, loss_info, uld
from secure_kd.losses import span_aligned as span_aligned_loss

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # trl.experimental warns on import
    from trl.experimental.gold import GOLDConfig
    from trl.experimental.gold.gold_trainer import ULDLoss, build_teacher_inputs_from_texts

TRL_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(GOLDConfig)
    if f.name.startswith("uld") or f.name in ("use_extended_uld", "beta")
}


def trl_loss(student_tok=None, teacher_tok=None, **overrides) -> ULDLoss:
    """TRL's ULDLoss with its own defaults, EOS skipping off and the chain-rule merge, unless overridden."""
    fields = {
        **TRL_DEFAULTS,
        "uld_skip_student_eos": False,
        "uld_skip_teacher_eos": False,
        "uld_token_merge_strategy": "bayesian",
        **overrides,
    }
    return ULDLoss(
        types.SimpleNamespace(**fields), student_tokenizer=student_tok, teacher_tokenizer=teacher_tok
    )


@dataclasses.dataclass
class Side:
    """One side in TRL's layout: a prompt token at position 0, the answer, right padding."""

    ids: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], -100 on the prompt and the padding
    offsets: torch.Tensor  # [B, L, 2], (0, 0) outside the answer (TRL's convention)
    logits: torch.Tensor  # [B, L, V]

    def shifted(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Our inputs: logits[:, :-1], targets input_ids[:, 1:], their labels and spans (-1 outside)."""
        spans = self.offsets[:, 1:].clone()
        spans[self.labels[:, 1:] == -100] = -1
        return self.logits[:, :-1], self.ids[:, 1:], self.labels[:, 1:], spans


def make_side(offsets: list[list[tuple[int, int]]], vocab: int, seed: int, width: int | None = None) -> Side:
    g = torch.Generator().manual_seed(seed)
    length = 2 + max(len(o) for o in offsets)
    ids = torch.randint(0, vocab, (len(offsets), length), generator=g)
    labels = torch.full_like(ids, -100)
    spans = torch.zeros(len(offsets), length, 2, dtype=torch.long)
    for b, o in enumerate(offsets):
        labels[b, 1 : 1 + len(o)] = ids[b, 1 : 1 + len(o)]
        spans[b, 1 : 1 + len(o)] = torch.tensor(o)
    logits = torch.randn(len(offsets), length, width or vocab, generator=g, dtype=torch.float64) * 2
    return Side(ids, labels, spans, logits)


def ours_uld(student: Side, teacher: Side, **kwargs) -> torch.Tensor:
    s_logits, s_ids, s_labels, s_spans = student.shifted()
    t_logits, t_ids, t_labels, t_spans = teacher.shifted()
    alignment = TokenAlignment.build(s_ids, s_spans, t_ids, t_spans)
    loss = kwargs.pop("loss", uld)
    return loss(s_logits, t_logits, s_labels, alignment=alignment, teacher_labels=t_labels, **kwargs)


def trl_call(fn: ULDLoss, student: Side, teacher: Side, student_logits=None, teacher_logits=None):
    return fn(
        student.logits if student_logits is None else student_logits,
        teacher.logits if teacher_logits is None else teacher_logits,
        student.labels,
        teacher.labels,
        student.ids,
        teacher.ids,
        student.offsets,
        teacher.offsets,
    )


# Hand-made pairs of tokenizations of one answer each: crossing splits, the student splitting what
# the teacher merges and the reverse, zero-width EOS tokens on both sides or the teacher's only.
STUDENT_OFFSETS = [[(0, 2), (2, 3), (3, 5), (5, 5)], [(0, 1), (1, 4)], [(0, 3)]]
TEACHER_OFFSETS = [[(0, 1), (1, 3), (3, 5), (5, 5)], [(0, 4)], [(0, 1), (1, 2), (2, 3), (3, 3)]]


def grads(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("vocabs", [(7, 11), (11, 7)], ids=["student-smaller", "teacher-smaller"])
def test_uld_equals_trl_extended_uld_on_hand_made_tokenizations(temperature, vocabs):
    student = make_side(STUDENT_OFFSETS, vocabs[0], seed=1)
    teacher = make_side(TEACHER_OFFSETS, vocabs[1], seed=2)
    student.logits.requires_grad_()
    theirs = trl_call(
        trl_loss(uld_student_temperature=temperature, uld_teacher_temperature=temperature), student, teacher
    )
    ours = ours_uld(student, teacher, temperature=temperature, reduction="none")
    assert ours.shape == (3,)
    torch.testing.assert_close(ours.mean(), theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads(ours.mean(), student.logits), grads(theirs, student.logits))


def test_uld_mean_weights_every_aligned_group_equally_and_sum_adds_them():
    student = make_side(STUDENT_OFFSETS, 7, seed=3)
    teacher = make_side(TEACHER_OFFSETS, 11, seed=4)
    per_example = ours_uld(student, teacher, reduction="none")
    # aligned groups per example: "ab"+"c" | "de" | eos, then "abcd", then "abc" (the teacher's
    # lone EOS has no student counterpart and is dropped)
    groups = torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(ours_uld(student, teacher, reduction="sum"), (per_example * groups).sum())
    torch.testing.assert_close(
        ours_uld(student, teacher, reduction="mean"), (per_example * groups).sum() / groups.sum()
    )


def test_uld_without_alignment_equals_trl_original_positional_uld():
    g = torch.Generator().manual_seed(5)
    s_logits = torch.randn(2, 6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(2, 8, 13, generator=g, dtype=torch.float64)
    s_ids = torch.randint(0, 9, (2, 6), generator=g)
    t_ids = torch.randint(0, 13, (2, 8), generator=g)
    s_labels, t_labels = s_ids.clone(), t_ids.clone()
    s_labels[0, :2] = -100  # answers of different lengths and starts on each side
    s_labels[1, :1] = -100
    t_labels[0, :1] = -100
    t_labels[1, :4] = -100
    t_labels[1, 7:] = -100
    fn = trl_loss(use_extended_uld=False, uld_token_merge_strategy="observed")
    theirs = fn(s_logits, t_logits, s_labels, t_labels, s_ids, t_ids)
    ours = uld(s_logits, t_logits, s_labels, teacher_labels=t_labels, reduction="none")
    torch.testing.assert_close(ours.mean(), theirs)
    torch.testing.assert_close(grads(ours.mean(), s_logits), grads(theirs, s_logits))


def test_uld_hand_computed_on_two_and_three_tokens():
    # one position: student [1/4, 3/4], teacher [1/2, 3/10, 1/5]; sorted and zero-padded:
    # |3/4 - 1/2| + |1/4 - 3/10| + |0 - 1/5| = 0.25 + 0.05 + 0.2 = 0.5
    student = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)
    teacher = torch.tensor([[[0.5, 0.3, 0.2]]], dtype=torch.float64).log()
    torch.testing.assert_close(uld(student, teacher), torch.tensor(0.5, dtype=torch.float64))
    # the student writes "ab" as "a" + "b", the teacher as one token: merged student vector
    # q1(a) * q2 = 3/4 * [1/2, 1/2] = [3/8, 3/8]; against [1/2, 3/10, 1/5]:
    # 1/8 + 3/40 + 1/5 = 0.4
    student2 = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]], dtype=torch.float64)
    s_ids = torch.tensor([[1, 0]])  # "a" is student token 1, with probability 3/4 at position 0
    alignment = TokenAlignment.build(
        s_ids, torch.tensor([[[0, 1], [1, 2]]]), torch.tensor([[2]]), torch.tensor([[[0, 2]]])
    )
    assert alignment.student_groups(0) == [[0, 1]] and alignment.teacher_groups(0) == [[0]]
    torch.testing.assert_close(
        uld(student2, teacher, s_ids, alignment=alignment), torch.tensor(0.4, dtype=torch.float64)
    )


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, naïve café! Smörgåsbord and crème brûlée.",
    "Emojis 😀 🎉 and CJK 你好 世界 are several bytes each.",
    "the the the quick quick brown brown fox",
] * 3


@pytest.fixture(scope="module")
def tokenizers():
    return train_tiny_tokenizer(CORPUS, vocab_size=300), train_tiny_tokenizer(CORPUS, vocab_size=420)


def side_from_texts(tokenizer, prompts, completions, seed) -> tuple[Side, list]:
    """TRL's own input builder, plus our spans of each completion (checked to give TRL's ids)."""
    ids, labels, _, offsets = build_teacher_inputs_from_texts(tokenizer, prompts, completions)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*ids.shape, len(tokenizer), generator=g, dtype=torch.float64) * 2
    return Side(ids, labels, offsets, logits), [token_byte_spans(tokenizer, c) for c in completions]


def test_uld_equals_trl_on_two_trained_tokenizers_with_multibyte_text(tokenizers):
    small, large = tokenizers
    prompts = ["<|im_start|>user\nWrite.<|im_end|>\n"] * 3
    completions = ["Héllo the quick café 😀!", "naïve 你好世界 brûlée", "the lazy dog 🎉 jumps"]
    student, s_spans = side_from_texts(small, prompts, completions, seed=6)
    teacher, t_spans = side_from_texts(large, prompts, completions, seed=7)
    student.logits.requires_grad_()
    theirs = trl_call(trl_loss(), student, teacher)

    # our inputs from our own spans: the completion's tokens, then the EOS with an empty span at its end
    def ours_side(side: Side, spans):
        logits, targets, labels, _ = side.shifted()
        seqs = []
        for b, s in enumerate(spans):
            start = int((side.labels[b] != -100).nonzero()[0]) - 1  # first answer target, shifted
            n_text = len(completions[b].encode())
            seqs.append(([-1] * start, [*s.spans, (n_text, n_text)], [*s.ids, 0]))
            kept = targets[b][labels[b] != -100].tolist()
            assert kept == [*s.ids, 0], "our tokenization must be TRL's"
        padded = torch.full((len(spans), targets.shape[1], 2), -1, dtype=torch.long)
        for b, (prefix, sp, _) in enumerate(seqs):
            padded[b, len(prefix) : len(prefix) + len(sp)] = torch.tensor(sp)
        return logits, targets, labels, padded

    s_logits, s_ids, s_labels, s_sp = ours_side(student, s_spans)
    t_logits, t_ids, t_labels, t_sp = ours_side(teacher, t_spans)
    alignment = TokenAlignment.build(s_ids, s_sp, t_ids, t_sp)
    assert (~alignment.coincident()).any(), "the two tokenizers should split some text differently"
    ours = uld(s_logits, t_logits, s_labels, alignment=alignment, teacher_labels=t_labels, reduction="none")
    torch.testing.assert_close(ours.mean(), theirs)
    torch.testing.assert_close(grads(ours.mean(), student.logits), grads(theirs, student.logits))


def test_padded_vocabularies_are_trimmed_not_refused():
    # both models pad their output layer: student 7 real ids in 8 columns, teacher 11 in 16
    student = make_side(STUDENT_OFFSETS, 7, seed=8, width=8)
    teacher = make_side(TEACHER_OFFSETS, 11, seed=9, width=16)
    student.logits.data[..., 7:] += 4.0  # padded columns with real mass would distort the comparison
    teacher.logits.data[..., 11:] += 4.0
    vocab = VocabPair(VocabPadding(7, 8, 7), VocabPadding(11, 16, 11), torch.arange(0), torch.arange(0))
    ours = ours_uld(student, teacher, vocab=vocab, reduction="none").mean()
    # TRL on the models' distributions over real tokens: the padded columns at -inf
    real_s = student.logits.detach().clone()
    real_s[..., 7:] = -math.inf
    real_t = teacher.logits.detach().clone()
    real_t[..., 11:] = -math.inf
    theirs = trl_call(trl_loss(), student, teacher, real_s, real_t)
    torch.testing.assert_close(ours, theirs)
    ignoring_padding = trl_call(trl_loss(), student, teacher)
    assert abs(float(ignoring_padding) - float(theirs)) > 1e-2  # the padding mattered
    with pytest.raises(ValueError, match="columns"):
        ours_uld(student, teacher, vocab=VocabPair.identical(7), reduction="none")


def _tail_filled(top: TopKLogits, real: int) -> torch.Tensor:
    """Dense teacher log-probs [B, L, real] from a top-k by hand: entries on real ids kept, the
    missing mass spread evenly over the other real ids (entries on padded ids dropped)."""
    out = torch.empty(*top.shape, real, dtype=torch.float64)
    for pos in torch.cartesian_prod(*[torch.arange(n) for n in top.shape]):
        b, t = pos.tolist()
        values, indices = top.values[b, t].double(), top.indices[b, t]
        missing = 1.0 - values.exp().sum()
        keep = indices < real
        out[b, t] = torch.log(missing / (real - int(keep.sum())))
        out[b, t, indices[keep]] = values[keep]
    return out


@pytest.mark.parametrize("k", [3, 11])
def test_uld_with_a_topk_teacher_equals_the_tail_filled_dense_teacher(k):
    student = make_side(STUDENT_OFFSETS, 7, seed=10)
    teacher = make_side(TEACHER_OFFSETS, 11, seed=11, width=13)  # 2 padded columns
    teacher.logits[..., 11:] += 3.0  # the padded ids enter the top-k
    top = TopKLogits.from_logits(teacher.logits, k)
    assert bool((top.indices >= 11).any())
    s_logits, s_ids, s_labels, s_spans = student.shifted()
    _, t_ids, t_labels, t_spans = teacher.shifted()
    alignment = TokenAlignment.build(s_ids, s_spans, t_ids, t_spans)
    vocab = VocabPair(VocabPadding(7, 7, 7), VocabPadding(11, 13, 11), torch.arange(0), torch.arange(0))
    top_shifted = TopKLogits(top.values[:, :-1], top.indices[:, :-1])
    common = dict(alignment=alignment, teacher_labels=t_labels, temperature=1.5)
    ours = uld(s_logits, top_shifted, s_labels, tail="uniform", vocab=vocab, **common)
    dense = _tail_filled(top_shifted, 11)
    expected = uld(s_logits, dense, s_labels, **common)
    torch.testing.assert_close(ours, expected)
    for tail in (None, "zero"):
        with pytest.raises(ValueError, match="tail='uniform'"):
            uld(s_logits, top_shifted, s_labels, tail=tail, vocab=vocab, **common)
    with pytest.raises(ValueError, match="vocab="):
        uld(s_logits, top_shifted, s_labels, tail="uniform", **common)


def test_a_masked_position_drops_exactly_the_groups_it_belongs_to():
    student = make_side(STUDENT_OFFSETS[:1], 7, seed=12)
    teacher = make_side(TEACHER_OFFSETS[:1], 11, seed=13)
    s_logits, s_ids, s_labels, s_spans = student.shifted()
    t_logits, t_ids, t_labels, t_spans = teacher.shifted()
    alignment = TokenAlignment.build(s_ids, s_spans, t_ids, t_spans)
    assert alignment.student_groups(0) == [[0, 1], [2], [3]]  # "ab"+"c" | "de" | eos
    # mask the student's second token: the first group goes, the other two stay
    masked = s_labels.clone()
    masked[0, 1] = -100
    ours = uld(s_logits, t_logits, masked, alignment=alignment, teacher_labels=t_labels, reduction="sum")
    # independent: align only the text after byte 3 (the first group's positions have no text)
    s_rest, t_rest = s_spans.clone(), t_spans.clone()
    s_rest[0, :2] = -1
    t_rest[0, :2] = -1
    rest = TokenAlignment.build(s_ids, s_rest, t_ids, t_rest)
    assert rest.n_groups == 2
    expected = uld(s_logits, t_logits, s_labels, alignment=rest, teacher_labels=t_labels, reduction="sum")
    torch.testing.assert_close(ours, expected)
    # the same from the teacher's side
    t_masked = t_labels.clone()
    t_masked[0, 0] = -100
    ours_t = uld(s_logits, t_logits, s_labels, alignment=alignment, teacher_labels=t_masked, reduction="sum")
    torch.testing.assert_close(ours_t, expected)


def test_reduction_none_is_per_example_as_dp_sgd_needs():
    student = make_side(STUDENT_OFFSETS, 7, seed=14)
    teacher = make_side(TEACHER_OFFSETS, 11, seed=15)
    s_logits, s_ids, s_labels, s_spans = student.shifted()
    t_logits, t_ids, t_labels, t_spans = teacher.shifted()
    alignment = TokenAlignment.build(s_ids, s_spans, t_ids, t_spans)
    s_logits = s_logits.detach().requires_grad_()
    masked = s_labels.clone()
    masked[2] = -100  # example 2 has nothing to distil
    per_example = uld(
        s_logits, t_logits, masked, alignment=alignment, teacher_labels=t_labels, reduction="none"
    )
    assert per_example[2] == 0
    g = grads(per_example[0], s_logits)
    assert g[1:].abs().max() == 0 and g[0].abs().max() > 0  # example 0's loss only reaches example 0
    other = t_logits.clone()
    other[0] = other[0] * 2.0  # another teacher for example 0 only
    changed = uld(s_logits, other, masked, alignment=alignment, teacher_labels=t_labels, reduction="none")
    torch.testing.assert_close(changed[1:], per_example[1:])
    assert changed[0] != per_example[0]
    # nothing at all to distil: 0, and backward still works
    empty = uld(s_logits, t_logits, torch.full_like(s_labels, -100), alignment=alignment)
    empty.backward()
    assert float(empty.detach()) == 0.0


# -- span_aligned ---------------------------------------------------------------------------------------
class FakeTokenizer:
    """What TRL's vocabulary mapping and our VocabPair read: get_vocab()."""

    def __init__(self, tokens: list[str]) -> None:
        self.vocab = {tok: i for i, tok in enumerate(tokens)}

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


STUDENT_TOKENS = ["a", "b", "c", "ab", "bc", "s1", "s2"]  # 7 tokens, 5 shared with the teacher
TEACHER_TOKENS = ["c", "x", "a", "b", "y", "bc", "ab", "z", "w", "v", "u"]  # 11 tokens
COINCIDING = [[(0, 1), (1, 3), (3, 4)], [(0, 2), (2, 3)]]  # the same boundaries on both sides


def _pair(student_offsets, teacher_offsets, seed):
    s_tok, t_tok = FakeTokenizer(STUDENT_TOKENS), FakeTokenizer(TEACHER_TOKENS)
    student = make_side(student_offsets, 7, seed=seed)
    teacher = make_side(teacher_offsets, 11, seed=seed + 1)
    vocab = VocabPair.from_tokenizers(s_tok, t_tok, student_width=7, teacher_width=11)
    return s_tok, t_tok, student, teacher, vocab


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("weights", [(None, None), (0.7, 0.3)], ids=["adaptive", "fixed"])
def test_span_aligned_equals_trl_hybrid_where_the_tokens_coincide(beta, weights):
    s_tok, t_tok, student, teacher, vocab = _pair(COINCIDING, COINCIDING, seed=16)
    assert vocab.n_shared == 5
    student.logits.requires_grad_()
    fn = trl_loss(
        s_tok,
        t_tok,
        uld_use_hybrid_loss=True,
        beta=beta,
        uld_hybrid_matched_weight=weights[0],
        uld_hybrid_unmatched_weight=weights[1],
    )
    theirs = trl_call(fn, student, teacher)
    ours = ours_uld(
        student,
        teacher,
        loss=span_aligned_loss,
        vocab=vocab,
        beta=beta,
        matched_weight=weights[0],
        unmatched_weight=weights[1],
        reduction="none",
    )
    torch.testing.assert_close(ours.mean(), theirs)
    torch.testing.assert_close(grads(ours.mean(), student.logits), grads(theirs, student.logits))


def test_span_aligned_compares_merged_groups_by_sorted_distributions_only():
    # example 0: every token coincides; example 1: the student splits, the teacher merges
    s_tok, t_tok, student, teacher, vocab = _pair(
        [COINCIDING[0], [(0, 1), (1, 3)]], [COINCIDING[0], [(0, 3)]], seed=18
    )
    ours = ours_uld(student, teacher, loss=span_aligned_loss, vocab=vocab, reduction="none")

    def one(side: Side, b: int) -> Side:
        return Side(
            side.ids[b : b + 1], side.labels[b : b + 1], side.offsets[b : b + 1], side.logits[b : b + 1]
        )

    hybrid = trl_loss(s_tok, t_tok, uld_use_hybrid_loss=True)
    torch.testing.assert_close(ours[0], trl_call(hybrid, one(student, 0), one(teacher, 0)))
    # a merged group has no coordinates that are the same event on both sides: plain ULD
    torch.testing.assert_close(ours[1], trl_call(trl_loss(), one(student, 1), one(teacher, 1)))
    # where TRL's hybrid still maps token ids (the deliberate difference)
    assert abs(float(trl_call(hybrid, one(student, 1), one(teacher, 1))) - float(ours[1])) > 1e-3


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_span_aligned_with_one_tokenizer_on_both_sides_is_jsd(beta):
    student = make_side(COINCIDING, 9, seed=20)
    teacher = make_side(COINCIDING, 9, seed=21)
    teacher.ids, teacher.labels = student.ids, student.labels  # one tokenization of the text
    ours = ours_uld(student, teacher, loss=span_aligned_loss, vocab=VocabPair.identical(9), beta=beta)
    s_logits, _, s_labels, _ = student.shifted()
    expected = jsd(s_logits, teacher.logits[:, :-1], s_labels, beta=beta)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)


def test_span_aligned_endpoints_are_the_generalized_kl_and_never_negative():
    s_tok, t_tok, student, teacher, vocab = _pair(COINCIDING, COINCIDING, seed=22)
    # on the shared tokens the teacher is the student scaled down (p = c q, c < 1): there TRL's plain
    # KL(p || q) of the unnormalized shared vectors is sum p log c < 0
    s_shared, t_shared = vocab.shared_student_ids, vocab.shared_teacher_ids
    teacher.logits.data[...] = 2.0
    teacher.logits.data[..., t_shared] = student.logits.data[..., s_shared]
    student.logits.data[..., [5, 6]] = -3.0  # the student's two unshared tokens
    only_matched = dict(uld_hybrid_matched_weight=1.0, uld_hybrid_unmatched_weight=0.0)
    trl_matched = trl_call(
        trl_loss(s_tok, t_tok, uld_use_hybrid_loss=True, beta=0.0, **only_matched), student, teacher
    )
    assert trl_matched < 0
    ours_matched = ours_uld(
        student,
        teacher,
        loss=span_aligned_loss,
        vocab=vocab,
        beta=0.0,
        matched_weight=1.0,
        unmatched_weight=0.0,
    )
    assert ours_matched > 0
    # the difference is w_m * (sum q - sum p) over the shared tokens, averaged per example
    ours = ours_uld(student, teacher, loss=span_aligned_loss, vocab=vocab, beta=0.0, reduction="none").mean()
    theirs = trl_call(trl_loss(s_tok, t_tok, uld_use_hybrid_loss=True, beta=0.0), student, teacher)
    s_logits, _, s_labels, _ = student.shifted()
    t_logits, _, _, _ = teacher.shifted()
    q = torch.softmax(s_logits, -1)[..., s_shared].sum(-1)
    p = torch.softmax(t_logits, -1)[..., t_shared].sum(-1)
    kept = s_labels != -100
    per_example = [float((q[b] - p[b])[kept[b]].mean()) for b in range(2)]
    torch.testing.assert_close(ours, theirs + (5 / 11) * sum(per_example) / 2)


def test_span_aligned_likelihood_term_hand_computed():
    # one coinciding token: student P = 1/4, teacher P = 1/2 for the text's token;
    # BinaryKL(1/2 || 1/4) = 1/2 ln 2 + 1/2 ln(2/3)
    s_logits = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)  # q = [1/4, 3/4]
    t_logits = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64).log()
    spans = torch.tensor([[[0, 1]]])
    ids = torch.tensor([[0]])
    alignment = TokenAlignment.build(ids, spans, ids, spans)
    vocab = VocabPair.identical(2)
    base = span_aligned_loss(s_logits, t_logits, ids, alignment=alignment, vocab=vocab)
    with_term = span_aligned_loss(
        s_logits, t_logits, ids, alignment=alignment, vocab=vocab, likelihood_weight=2.0
    )
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    torch.testing.assert_close(with_term - base, torch.tensor(2 * expected, dtype=torch.float64))
    # a merged group: the student's text probability is the product q1(y1) q2(y2) = 3/4 * 1/2
    s2 = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]], dtype=torch.float64)
    s_ids = torch.tensor([[1, 0]])
    merged = TokenAlignment.build(s_ids, torch.tensor([[[0, 1], [1, 2]]]), ids, torch.tensor([[[0, 2]]]))
    base = span_aligned_loss(s2, t_logits, s_ids, alignment=merged, vocab=vocab)
    with_term = span_aligned_loss(s2, t_logits, s_ids, alignment=merged, vocab=vocab, likelihood_weight=1.0)
    p, q = 0.5, 0.375
    expected = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    torch.testing.assert_close(with_term - base, torch.tensor(expected, dtype=torch.float64))


# -- the registry and bad input ------------------------------------------------------------------------
def test_the_cross_tokenizer_objectives_are_registered_like_the_others():
    assert get_loss("uld") is uld and get_loss("span_aligned") is span_aligned_loss
    assert loss_info("uld").cross_tokenizer == "optional"
    assert loss_info("span_aligned").cross_tokenizer == "required"
    assert loss_info("jsd").cross_tokenizer == "none"
    assert not loss_info("uld").stateful and loss_info("uld").sparse_teacher
    assert CROSS_TOKENIZER_ARGUMENTS == {"alignment", "teacher_labels", "vocab"}
    # with one tokenizer and no alignment, uld runs where the other objectives do: it is 0 at equality
    g = torch.Generator().manual_seed(23)
    logits = torch.randn(2, 4, 9, generator=g)
    labels = torch.randint(0, 9, (2, 4), generator=g)
    labels[0, 0] = -100
    assert float(uld(logits, logits, labels)) == 0.0
    assert float(uld(logits, torch.randn(2, 4, 9, generator=g), labels)) > 0
    # classifier logits [batch, classes], different label sets: sorted L1 per example
    two = torch.tensor([[0.0, math.log(3.0)]])
    three = torch.tensor([[0.5, 0.3, 0.2]]).log()
    torch.testing.assert_close(uld(two, three), torch.tensor(0.5))


def test_bad_input_gets_a_message_naming_the_fix():
    student = make_side(COINCIDING, 7, seed=24)
    teacher = make_side(COINCIDING, 11, seed=25)
    s_logits, s_ids, s_labels, s_spans = student.shifted()
    t_logits, t_ids, t_labels, t_spans = teacher.shifted()
    alignment = TokenAlignment.build(s_ids, s_spans, t_ids, t_spans)
    vocab = VocabPair.identical(7, teacher_width=11)
    with pytest.raises(ValueError, match="alignment="):
        span_aligned_loss(s_logits, t_logits, s_labels, vocab=vocab)
    with pytest.raises(ValueError, match="vocab="):
        span_aligned_loss(s_logits, t_logits, s_labels, alignment=alignment)
    wrong = s_labels.clone()
    wrong[0, 0] = (wrong[0, 0] + 1) % 7
    with pytest.raises(ValueError, match="disagree with the alignment"):
        uld(s_logits, t_logits, wrong, alignment=alignment)
    with pytest.raises(ValueError, match="built for batch"):
        uld(s_logits[:1], t_logits[:1], s_labels[:1], alignment=alignment)
    with pytest.raises(ValueError, match="teacher_labels"):
        uld(s_logits, t_logits[:, :3], s_labels)  # different lengths, no alignment, no teacher labels
    with pytest.raises(ValueError, match="both"):
        span_aligned_loss(s_logits, t_logits, s_labels, alignment=alignment, vocab=vocab, matched_weight=0.5)
    with pytest.raises(ValueError, match="beta"):
        span_aligned_loss(s_logits, t_logits, s_labels, alignment=alignment, vocab=vocab, beta=1.5)
    with pytest.raises(ValueError, match="reduction"):
        uld(s_logits, t_logits, s_labels, alignment=alignment, reduction="batchmean")
    padded_id = TokenAlignment.build(torch.full_like(s_ids, 6), s_spans, t_ids, t_spans)
    student_real_5 = VocabPair(
        VocabPadding(5, 7, 5), VocabPadding(11, 11, 11), torch.arange(0), torch.arange(0)
    )
    with pytest.raises(ValueError, match="real token ids"):  # a target on a padded column
        uld(s_logits, t_logits, None, alignment=padded_id, vocab=student_real_5)


def test_alignment_from_padded_token_spans_batches(tokenizers):
    """stack_spans + build on real tokenizers: the same groups as per-example alignment."""
    small, large = tokenizers
    texts = ["the café 😀", "naïve fox"]
    s = [token_byte_spans(small, t) for t in texts]
    t = [token_byte_spans(large, t) for t in texts]
    alignment = TokenAlignment.build(*stack_spans(s), *stack_spans(t))
    for b in range(2):
        one = TokenAlignment.build(*stack_spans(s[b : b + 1]), *stack_spans(t[b : b + 1]))
        assert alignment.student_groups(b) == one.student_groups(0)
        assert alignment.teacher_groups(b) == one.teacher_groups(0)
