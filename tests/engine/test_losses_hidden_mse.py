"""Hidden-state matching with a learned projection."""

from __future__ import annotations

import pytest
import torch

from secure_kd.losses import HiddenMSE, get_loss


def test_matches_explicit_formula_with_mask_and_reductions():
    torch.manual_seed(0)
    module = get_loss("hidden_mse")(4, 6)
    assert isinstance(module, HiddenMSE)
    student = torch.randn(2, 3, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 6)
    labels = torch.tensor([[1, -100, 2], [-100, -100, -100]])
    projected = student @ module.proj.weight.T + module.proj.bias
    per_token = ((projected - teacher) ** 2).sum(-1) / 6
    keep = (labels != -100).float()
    torch.testing.assert_close(module(student, teacher, labels), (per_token * keep).sum() / keep.sum())
    torch.testing.assert_close(module(student, teacher, labels, reduction="sum"), (per_token * keep).sum())
    per_example = module(student, teacher, labels, reduction="none")
    first_example = (per_token[0] * keep[0]).sum() / 2
    torch.testing.assert_close(per_example, torch.stack([first_example, torch.tensor(0.0)]))


def test_projection_learns_and_teacher_gets_no_gradient():
    torch.manual_seed(1)
    module = HiddenMSE(3, 2)
    mapping = torch.randn(3, 2)
    student = torch.randn(64, 3)  # pooled [batch, dim] states
    teacher = (student @ mapping).requires_grad_()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    first = module(student, teacher).item()
    for _ in range(300):
        optimizer.zero_grad()
        module(student, teacher).backward()
        optimizer.step()
    assert module(student, teacher).item() < 1e-3 * first
    assert teacher.grad is None


def test_width_mismatch_is_explained():
    module = HiddenMSE(4, 6)
    with pytest.raises(ValueError, match=r"HiddenMSE\(4, 6\)"):
        module(torch.randn(2, 3, 5), torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="batch and sequence"):
        module(torch.randn(2, 3, 4), torch.randn(2, 2, 6))
    with pytest.raises(ValueError, match="student_dim"):
        HiddenMSE(0, 6)
