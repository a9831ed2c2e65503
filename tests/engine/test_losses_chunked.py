"""Chunking does not change values or gradients; the memory-saving Function behaves like autograd."""

from __future__ import annotations

import pytest
import torch

from secure_kd.losses import TopKLogits, get_loss

N_TOKENS = 2 * 5  # batch 2, seq 5
NAMES = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl", "token_selective"]


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(2, 5, 13, generator=g) * 2).to(dtype).requires_grad_()
    teacher = (torch.randn(2, 5, 13, generator=g) * 2).to(dtype)
    labels = torch.randint(0, 13, (2, 5), generator=g)
    labels[0, 1] = labels[1, 4] = -100
    return student, teacher, labels


def value_and_grad(name, student, teacher, labels, chunk_size, tail=None, reduction="none"):
    out = get_loss(name)(
        student, teacher, labels, chunk_size=chunk_size, temperature=1.7, tail=tail, reduction=reduction
    )
    weights = torch.linspace(0.5, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    (grad,) = torch.autograd.grad((out * weights).sum(), student)
    return out.detach(), grad


@pytest.mark.parametrize("name", NAMES + ["ce"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("masked", [True, False])
def test_chunk_size_does_not_change_values_or_gradients(name, dtype, rtol, masked):
    student, teacher, labels = inputs(dtype)
    if not masked:
        labels = labels.clamp_min(0)
    if name == "ce":
        teacher = None
    reference = value_and_grad(name, student, teacher, labels, chunk_size=N_TOKENS)
    for chunk_size in (1, 3, N_TOKENS + 7, None):
        value, grad = value_and_grad(name, student, teacher, labels, chunk_size)
        torch.testing.assert_close(value, reference[0], rtol=rtol, atol=rtol * 1e-2)
        torch.testing.assert_close(grad, reference[1], rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("tail", ["uniform", "zero"])
def test_chunking_with_top_k_teacher(tail):
    student, teacher, labels = inputs(torch.float64, seed=1)
    top = TopKLogits.from_logits(teacher, 4)
    reference = value_and_grad("jsd", student, top, labels, chunk_size=N_TOKENS, tail=tail)
    for chunk_size in (1, 3, 100):
        value, grad = value_and_grad("jsd", student, top, labels, chunk_size, tail=tail)
        torch.testing.assert_close(value, reference[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, reference[1], rtol=1e-12, atol=1e-14)


def test_gradient_matches_plain_autograd_of_the_unchunked_formula():
    student, teacher, labels = inputs(torch.float64, seed=2)
    loss = get_loss("forward_kl")(student, teacher, labels, chunk_size=2, reduction="sum")
    (grad,) = torch.autograd.grad(loss * 3.0, student)
    log_q = torch.log_softmax(student, -1)
    p = torch.softmax(teacher, -1)
    keep = (labels != -100).double()
    direct = ((p * (p.log() - log_q)).sum(-1) * keep).sum()
    (expected,) = torch.autograd.grad(direct * 3.0, student)
    torch.testing.assert_close(grad, expected)
    assert torch.all(grad[0, 1] == 0) and torch.all(grad[1, 4] == 0)  # masked positions get no gradient


def test_second_backward_through_the_same_graph_raises():
    student, teacher, labels = inputs(torch.float32)
    loss = get_loss("forward_kl")(student, teacher, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through it twice"):
        loss.backward()


def test_no_grad_and_non_leaf_inputs():
    student, teacher, labels = inputs(torch.float32)
    with torch.no_grad():
        value = get_loss("jsd")(student, teacher, labels)
    assert not value.requires_grad
    scale = torch.tensor(2.0, requires_grad=True)
    loss = get_loss("jsd")(student * scale, teacher, labels)
    loss.backward()
    assert scale.grad is not None and student.grad is not None
    assert torch.isfinite(scale.grad)


def test_bfloat16_logits_compute_in_float32():
    student, teacher, labels = inputs(torch.float32, seed=3)
    rounded_student, rounded_teacher = student.detach().bfloat16().float(), teacher.bfloat16().float()
    reference = get_loss("forward_kl")(rounded_student, rounded_teacher, labels)
    low = student.detach().bfloat16().requires_grad_()
    value = get_loss("forward_kl")(low, teacher.bfloat16(), labels)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)
    value.backward()
    assert low.grad is not None and low.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("tail", ["uniform", "zero"])
def test_bfloat16_logits_with_a_float32_top_k_teacher(tail):
    """What bf16 autocast gives the trainer: bf16 student logits, a float32 top-k teacher (cache or live
    teacher outside autocast). The uniform tail once scattered the teacher's values cast to the logits'
    bf16 into a float32 buffer (a dtype error); the value is the float32 loss of the bf16-rounded logits."""
    student, teacher, labels = inputs(torch.float32, seed=4)
    top = TopKLogits.from_logits(teacher, 8)
    reference = get_loss("forward_kl")(student.detach().bfloat16().float(), top, labels, tail=tail)
    low = student.detach().bfloat16().requires_grad_()
    value = get_loss("forward_kl")(low, top, labels, tail=tail)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)
    value.backward()
    assert low.grad is not None and low.grad.dtype == torch.bfloat16


def test_all_positions_masked_gives_zero_and_zero_gradient():
    student, teacher, labels = inputs(torch.float32)
    labels = torch.full_like(labels, -100)
    loss = get_loss("jsd")(student, teacher, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(student.grad == 0)
