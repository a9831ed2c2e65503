"""TAID: the interpolation parameter's schedule, its endpoints, and the stop-gradient on the target."""

from __future__ import annotations

import math

import pytest
import torch

from secure_kd.losses import TAID, forward_kl, get_loss


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(2, 4, 9, generator=g, dtype=torch.float64) * 2).requires_grad_()
    teacher = torch.randn(2, 4, 9, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 9, (2, 4), generator=g)
    labels[1, 0] = -100
    return student, teacher, labels


def test_registry_entry_is_the_class():
    assert get_loss("taid") is TAID


def test_t_is_monotone_and_bounded_for_any_loss_sequence():
    taid = TAID(t_start=0.2, t_end=0.9, alpha=0.05, beta=0.9)
    losses = [5.0, 4.0, 6.0, 1.0, 8.0, 0.5, 0.5, 3.0, 100.0, 0.01] * 3
    seen = [float(taid.t)]
    for step, loss in enumerate(losses, start=1):
        seen.append(taid.update(loss, step, total_steps=20))
    assert seen[0] == pytest.approx(0.2)
    assert all(b >= a for a, b in zip(seen, seen[1:], strict=False))
    assert all(0.2 <= t <= 0.9 for t in seen)
    assert seen[-1] == pytest.approx(0.9)  # past the planned steps the linear floor is t_end


def test_update_follows_the_reference_rule():
    taid = TAID(t_start=0.4, t_end=1.0, alpha=0.1, beta=0.5)
    assert taid.update(2.0, 1, 1000) == pytest.approx(0.4)  # first call only records the loss
    # relative change (2 - 1) / 2 = 0.5; momentum 0.5 * 0 + 0.5 * 0.5 = 0.25
    delta = 0.1 * (1 / (1 + math.exp(-0.25))) * (1 - 0.4)
    floor = 0.4 + 0.6 * 2 / 1000
    assert taid.update(1.0, 2, 1000) == pytest.approx(max(floor, 0.4 + delta), rel=1e-12)
    restored = TAID()
    restored.load_state_dict(taid.state_dict())
    assert float(restored.t) == float(taid.t) and float(restored.momentum) == pytest.approx(0.25)


def test_non_adaptive_follows_the_linear_floor():
    taid = TAID(t_start=0.5, t_end=1.0, adaptive=False)
    assert taid.update(1.0, 5, 10) == pytest.approx(0.75)


def test_bad_update_arguments():
    taid = TAID()
    with pytest.raises(ValueError, match="total_steps"):
        taid.update(1.0, 1, 0)
    with pytest.raises(ValueError, match="non-finite"):
        taid.update(float("nan"), 1, 10)
    with pytest.raises(ValueError, match="t_start"):
        TAID(t_start=0.9, t_end=0.5)


def test_at_t_one_the_loss_is_forward_kl():
    student, teacher, labels = inputs()
    taid = TAID(t_start=0.0, t_end=1.0, adaptive=False)
    taid.update(1.0, 10, 10)
    assert float(taid.t) == 1.0
    got = taid(student, teacher, labels, temperature=1.5, reduction="none")
    expected = forward_kl(student, teacher, labels, temperature=1.5, reduction="none")
    torch.testing.assert_close(got, expected)
    (g1,) = torch.autograd.grad(got.sum(), student)
    (g2,) = torch.autograd.grad(expected.sum(), student)
    torch.testing.assert_close(g1, g2)


def test_target_carries_no_gradient():
    # With r held constant, d KL(r || q) / dz = q - r; with a gradient through r it would differ.
    student, teacher, labels = inputs(seed=1)
    taid = TAID(t_start=0.5)
    loss = taid(student, teacher, labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, student)
    q = torch.softmax(student.detach(), -1)
    interpolated = 0.5 * torch.log_softmax(student.detach(), -1) + 0.5 * torch.log_softmax(teacher, -1)
    r = torch.softmax(interpolated, -1)
    expected = (q - r) * (labels != -100)[..., None]
    torch.testing.assert_close(grad, expected)
    # at t = 0 the target is the student itself: zero loss and zero gradient
    zero = TAID(t_start=0.0)(student, teacher, labels)
    assert abs(zero.item()) < 1e-12
    (grad0,) = torch.autograd.grad(zero, student)
    assert grad0.abs().max() < 1e-12
