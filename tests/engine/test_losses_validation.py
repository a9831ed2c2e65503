"""Bad input fails early with a message that names the problem; the registry describes its entries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secure_kd.losses import LOSSES, TopKLogits, available_losses, get_loss, is_stateful, loss_info
from secure_kd.registry import UnknownNameError


@pytest.fixture()
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan")])
def test_beta_outside_unit_interval(logits, beta):
    student, teacher = logits
    with pytest.raises(ValueError, match="beta"):
        get_loss("jsd")(student, teacher, beta=beta)


@pytest.mark.parametrize("name", ["skew_forward_kl", "skew_reverse_kl"])
def test_alpha_must_be_below_one(logits, name):
    student, teacher = logits
    with pytest.raises(ValueError, match="alpha"):
        get_loss(name)(student, teacher, alpha=1.0)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf")])
def test_temperature_must_be_positive(logits, temperature):
    student, teacher = logits
    with pytest.raises(ValueError, match="temperature"):
        get_loss("forward_kl")(student, teacher, temperature=temperature)


def test_shape_mismatch_names_both_shapes(logits):
    student, teacher = logits
    with pytest.raises(ValueError, match=r"\(2, 3, 7\).*\(2, 3, 8\)"):
        get_loss("forward_kl")(student, teacher[..., :7])
    with pytest.raises(ValueError, match="labels"):
        get_loss("forward_kl")(student, teacher, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="student_logits"):
        get_loss("forward_kl")(student[0, 0], teacher[0, 0])


def test_top_k_without_tail_explains_both_choices(logits):
    student, teacher = logits
    top = TopKLogits.from_logits(teacher, 3)
    with pytest.raises(ValueError, match="tail='uniform'.*tail='zero'"):
        get_loss("reverse_kl")(student, top)
    with pytest.raises(ValueError, match="tail"):
        get_loss("jsd")(student, top, tail="spread")


def test_top_k_must_hold_log_probabilities(logits):
    student, teacher = logits
    raw = TopKLogits(teacher.topk(3).values + 5.0, teacher.topk(3).indices)
    with pytest.raises(ValueError, match="log-probabilities"):
        get_loss("forward_kl")(student, raw, tail="uniform")
    top = TopKLogits.from_logits(teacher, 3)
    with pytest.raises(ValueError, match="positions"):
        get_loss("forward_kl")(student, top[:, :2], tail="uniform")
    out_of_vocab = TopKLogits(top.values, top.indices + 8)
    with pytest.raises(ValueError, match="token ids"):
        get_loss("forward_kl")(student, out_of_vocab, tail="zero")
    repeated = TopKLogits(top.values, top.indices[..., :1].expand(-1, -1, 3).contiguous())
    with pytest.raises(ValueError, match="distinct"):
        get_loss("forward_kl")(student, repeated, tail="zero")


def test_other_bad_arguments(logits):
    student, teacher = logits
    with pytest.raises(ValueError, match="reduction"):
        get_loss("tvd")(student, teacher, reduction="batchmean")
    with pytest.raises(ValueError, match="chunk_size"):
        get_loss("tvd")(student, teacher, chunk_size=0)
    with pytest.raises(ValueError, match="teacher_logits"):
        get_loss("tvd")(student, None)
    with pytest.raises(ValueError, match="labels"):
        get_loss("ce")(student, None)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        get_loss("ce")(student, None, torch.full((2, 3), 8))
    with pytest.raises(ValueError, match="ratio"):
        get_loss("token_selective")(student, teacher, ratio=0.0)


def test_registry_lists_and_describes_every_objective():
    names = available_losses()
    required = {
        "forward_kl",
        "reverse_kl",
        "jsd",
        "tvd",
        "skew_forward_kl",
        "skew_reverse_kl",
        "taid",
        "token_selective",
        "ce",
        "hidden_mse",
    }
    assert required <= set(names) and names == sorted(names) and names == LOSSES.names()
    for name in names:
        entry = get_loss(name)
        module_class = isinstance(entry, type) and issubclass(entry, nn.Module)
        assert is_stateful(name) == module_class == entry.loss_info.stateful
        assert loss_info(name) is entry.loss_info
    assert is_stateful("taid") and is_stateful("hidden_mse") and not is_stateful("jsd")
    assert loss_info("hidden_mse").inputs == "hidden" and loss_info("jsd").inputs == "logits"
    assert not loss_info("ce").needs_teacher
    with pytest.raises(UnknownNameError, match="available"):
        get_loss("kl")
