"""jsd / forward_kl / reverse_kl against TRL's own GKDTrainer.generalized_jsd_loss."""

from __future__ import annotations

import warnings

import pytest
import torch

from secure_kd.losses import forward_kl, jsd, reverse_kl

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # trl.experimental warns on import
    from trl.experimental.gkd import GKDTrainer

trl_jsd = GKDTrainer.generalized_jsd_loss


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(3, 6, 17, generator=g) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(3, 6, 17, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 17, (3, 6), generator=g)
    labels[0, :2] = -100
    labels[2, 4:] = -100
    return student, teacher, labels


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_equals_trl(beta, temperature):
    student, teacher, labels = inputs()
    ours = jsd(student, teacher, labels, beta=beta, temperature=temperature, chunk_size=4)
    theirs = trl_jsd(student, teacher, labels, beta=beta, temperature=temperature, reduction="batchmean")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, student)
    (g_theirs,) = torch.autograd.grad(theirs, student)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_and_reverse_kl_are_trl_endpoints(temperature):
    student, teacher, labels = inputs(torch.float64, seed=1)
    fkl = forward_kl(student, teacher, labels, temperature=temperature)
    rkl = reverse_kl(student, teacher, labels, temperature=temperature)
    torch.testing.assert_close(fkl, trl_jsd(student, teacher, labels, beta=0.0, temperature=temperature))
    torch.testing.assert_close(rkl, trl_jsd(student, teacher, labels, beta=1.0, temperature=temperature))


def test_without_labels_mean_is_per_token_while_trl_divides_by_batch():
    student, teacher, _ = inputs(torch.float64, seed=2)
    ours = jsd(student, teacher, beta=0.5)
    theirs = trl_jsd(student, teacher, beta=0.5, reduction="batchmean")
    seq_len = student.shape[1]
    torch.testing.assert_close(ours * seq_len, theirs)
