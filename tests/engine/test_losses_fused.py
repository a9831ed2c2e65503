"""fused_linear_kd_loss equals the objective on explicit logits (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from secure_kd.losses import TopKLogits, fused_linear_kd_loss, get_loss

H, V = 6, 11


def inputs(dtype, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 5, H, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    teacher = (torch.randn(2, 5, V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[0, 0] = labels[1, 3] = -100
    return hidden, weight, b, teacher, labels


def assert_relative_close(got, expected, tol):
    """|got - expected| <= tol * |expected| in the Euclidean norm: float32 rounding of near-zero
    entries makes an entry-wise relative test meaningless at 1e-6."""
    error = (got - expected).norm() / expected.norm().clamp_min(1e-30)
    assert error <= tol, f"relative error {error:.3g} > {tol}"


def grads(value, tensors):
    return torch.autograd.grad(value, [t for t in tensors if t is not None])


CASES = [
    ("forward_kl", {}, "dense"),
    ("forward_kl", {}, "uniform"),
    ("forward_kl", {}, "zero"),
    ("reverse_kl", {}, "uniform"),
    ("jsd", {"beta": 0.5}, "dense"),
    ("jsd", {"beta": 0.3}, "zero"),
    ("tvd", {}, "dense"),
    ("skew_forward_kl", {"alpha": 0.2}, "uniform"),
    ("skew_reverse_kl", {"alpha": 0.2}, "dense"),
    ("ce", {}, None),
]


@pytest.mark.parametrize("name,params,kind", CASES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_equals_unfused(name, params, kind, dtype, rtol, reduction):
    hidden, weight, bias, teacher, labels = inputs(dtype, bias=name == "jsd")
    if kind in ("uniform", "zero"):
        teacher = TopKLogits.from_logits(teacher, 4)
    elif kind is None:
        teacher = None
    tail = kind if kind in ("uniform", "zero") else None
    common = dict(temperature=1.5, reduction=reduction, **params)
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    unfused = get_loss(name)(logits, teacher, labels, tail=tail, **common)
    expected_grads = grads(unfused * 1.7, (hidden, weight, bias))
    for chunk_size in (1, 3, 64):
        fused = fused_linear_kd_loss(
            hidden,
            weight,
            teacher,
            labels,
            loss=name,
            tail=tail,
            chunk_size=chunk_size,
            lm_head_bias=bias,
            **common,
        )
        assert_relative_close(fused, unfused.detach(), rtol)
        for got, expected in zip(grads(fused * 1.7, (hidden, weight, bias)), expected_grads, strict=True):
            assert_relative_close(got, expected, rtol)


def test_fused_flat_hidden_without_labels():
    hidden, weight, _, teacher, _ = inputs(torch.float64, seed=4)
    flat_hidden = hidden.detach().reshape(10, H).requires_grad_()
    top = TopKLogits.from_logits(teacher.reshape(10, V), 3)
    fused = fused_linear_kd_loss(flat_hidden, weight, top, loss="jsd", beta=0.7)
    unfused = get_loss("jsd")(flat_hidden @ weight.T, top, tail="uniform", beta=0.7)
    torch.testing.assert_close(fused, unfused)


def test_fused_rejects_what_it_cannot_do():
    hidden, weight, _, teacher, labels = inputs(torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_kd_loss(hidden, weight, teacher, labels, reduction="none")
    with pytest.raises(ValueError, match="cannot be fused"):
        fused_linear_kd_loss(hidden, weight, teacher, labels, loss="taid")
    with pytest.raises(ValueError, match="lm_head_weight"):
        fused_linear_kd_loss(hidden, weight[:, :3], teacher, labels)
    with pytest.raises(ValueError, match="unexpected parameters"):
        fused_linear_kd_loss(hidden, weight, teacher, labels, loss="forward_kl", beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        fused_linear_kd_loss(hidden, weight, teacher, labels, loss="jsd", beta=1.5)


def test_fused_backward_twice_raises():
    hidden, weight, _, teacher, labels = inputs(torch.float32)
    loss = fused_linear_kd_loss(hidden, weight, teacher, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through it twice"):
        loss.backward()
