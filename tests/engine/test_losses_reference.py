"""Every logit objective against a direct formula written here, in float64.

The references build both distributions by hand (softmax written out, the top-k teacher densified
explicitly) and compute each divergence as an explicit sum, then reduce with explicit masks; the
gradients come from autograd through those formulas.
"""

from __future__ import annotations

import math

import pytest
import torch

from secure_kd.losses import TopKLogits, get_loss

B, S, V, K = 3, 4, 7, 3


def softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distribution with logits log(p) / T."""
    w = p ** (1.0 / temperature)
    return w / w.sum(-1, keepdim=True)


def per_token(name: str, p: torch.Tensor, q: torch.Tensor, params: dict) -> torch.Tensor:
    """Divergence per position, p = teacher, q = student, last axis = distribution."""
    if name == "forward_kl":
        return (p * (p.log() - q.log())).sum(-1)
    if name == "reverse_kl":
        return (q * (q.log() - p.log())).sum(-1)
    if name == "jsd":
        beta = params["beta"]
        if beta == 0:
            return (p * (p.log() - q.log())).sum(-1)
        if beta == 1:
            return (q * (q.log() - p.log())).sum(-1)
        m = beta * p + (1 - beta) * q
        return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skew_forward_kl":
        a = params["alpha"]
        return (p * (p / (a * p + (1 - a) * q)).log()).sum(-1)
    if name == "skew_reverse_kl":
        a = params["alpha"]
        return (q * (q / (a * q + (1 - a) * p)).log()).sum(-1)
    raise AssertionError(name)


def reduce(values: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    masked = values * mask
    if reduction == "sum":
        return masked.sum()
    if reduction == "mean":
        return masked.sum() / mask.sum()
    counts = mask.sum(-1)
    return masked.sum(-1) / torch.where(counts > 0, counts, torch.ones_like(counts))


def make_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, S, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
    teacher = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 1] = -100
    labels[1, :] = -100  # an example with no kept token
    labels[2, 3] = -100
    return student, teacher, labels


def teacher_on_support(teacher: torch.Tensor, kind: str, temperature: float):
    """(teacher argument for the loss, reference teacher distribution, support indices or None)."""
    if kind == "dense":
        return teacher, softmax(teacher / temperature), None
    top = TopKLogits.from_logits(teacher, K)
    probs = top.values.exp()
    if kind == "uniform":
        full = torch.zeros(B, S, V, dtype=torch.float64)
        missing = 1 - probs.sum(-1, keepdim=True)
        full[...] = missing / (V - K)
        for b in range(B):
            for s in range(S):
                for j in range(K):
                    full[b, s, top.indices[b, s, j]] = probs[b, s, j]
        return top, sharpen(full, temperature), None
    on_support = probs / probs.sum(-1, keepdim=True)
    return top, sharpen(on_support, temperature), top.indices


OBJECTIVES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.2}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("tvd", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.3}),
]


@pytest.mark.parametrize("name,params", OBJECTIVES)
@pytest.mark.parametrize("kind", ["dense", "uniform", "zero"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_objective_matches_direct_formula(name, params, kind, temperature, reduction):
    student, teacher, labels = make_inputs(seed=len(name) + int(temperature * 10))
    teacher_arg, p, support = teacher_on_support(teacher, kind, temperature)
    logits = student if support is None else student.gather(-1, support)
    q = softmax(logits / temperature)
    expected = reduce(per_token(name, p, q, params), (labels != -100).double(), reduction)

    got = get_loss(name)(
        student,
        teacher_arg,
        labels,
        temperature=temperature,
        reduction=reduction,
        tail=None if kind == "dense" else kind,
        chunk_size=2,
        **params,
    )
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    if reduction == "none":
        assert got[1].item() == 0.0  # the example without kept tokens
    weights = torch.arange(1.0, expected.numel() + 1, dtype=torch.float64).reshape(expected.shape)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), student)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), student)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-8, atol=1e-12)


def test_forward_kl_hand_computed_number():
    # teacher (0.5, 0.5), student (0.25, 0.75): KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3)
    student = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)
    teacher = torch.zeros(1, 1, 2, dtype=torch.float64)
    got = get_loss("forward_kl")(student, teacher)
    assert abs(got.item() - 0.5 * math.log(4.0 / 3.0)) < 1e-12


def test_cross_entropy_matches_torch_and_ignores_teacher():
    student, _, labels = make_inputs(seed=3)
    got = get_loss("ce")(student, None, labels)
    flat_student, flat_labels = student.reshape(-1, V), labels.reshape(-1)
    expected = torch.nn.functional.cross_entropy(flat_student, flat_labels, ignore_index=-100)
    torch.testing.assert_close(got, expected)
    (g1,) = torch.autograd.grad(got, student)
    (g2,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(g1, g2)
    per_example = get_loss("ce")(student, None, labels, reduction="none", temperature=2.0)
    logq = torch.log(softmax(student / 2.0))
    nll = -logq.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    torch.testing.assert_close(per_example, reduce(nll, (labels != -100).double(), "none"))


def test_no_labels_mean_is_over_every_token():
    student, teacher, _ = make_inputs(seed=5)
    p, q = softmax(teacher), softmax(student)
    expected = per_token("forward_kl", p, q, {}).sum() / (B * S)
    torch.testing.assert_close(get_loss("forward_kl")(student, teacher), expected)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_classifier_shaped_logits(reduction):
    g = torch.Generator().manual_seed(11)
    student = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, -100, 3, 1, 2])
    got = get_loss("jsd")(student, teacher, labels, temperature=3.0, reduction=reduction, beta=0.3)
    per = per_token("jsd", softmax(teacher / 3.0), softmax(student / 3.0), {"beta": 0.3})
    keep = (labels != -100).double()
    expected = (per * keep).sum() / keep.sum() if reduction == "mean" else per * keep
    torch.testing.assert_close(got, expected)
    assert got.shape == (() if reduction == "mean" else (5,))


def test_taid_matches_its_formula():
    student, teacher, labels = make_inputs(seed=8)
    taid = get_loss("taid")(t_start=0.3)
    got = taid(student, teacher, labels, temperature=2.0, reduction="none")
    log_q = torch.log(softmax(student / 2.0))
    r = softmax(0.7 * log_q.detach() + 0.3 * torch.log(softmax(teacher / 2.0)))
    per = (r * (r.log() - log_q)).sum(-1)
    expected = reduce(per, (labels != -100).double(), "none")
    torch.testing.assert_close(got, expected)
    (g1,) = torch.autograd.grad(got.sum(), student)
    (g2,) = torch.autograd.grad(expected.sum(), student)
    torch.testing.assert_close(g1, g2)


def test_uniform_tail_with_full_vocabulary_top_k_is_the_dense_teacher():
    student, teacher, labels = make_inputs(seed=9)
    full = TopKLogits.from_logits(teacher, V)
    dense = get_loss("reverse_kl")(student, teacher, labels, temperature=1.5)
    sparse = get_loss("reverse_kl")(student, full, labels, temperature=1.5, tail="uniform")
    torch.testing.assert_close(sparse, dense)
