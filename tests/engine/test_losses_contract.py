"""The contract every registered objective keeps, built-in or contributed (a loss registered by another
test module imported before this one is checked too): its params model round-trips and documents
itself; a tiny call on [2, 3, V] logits with labels gives a scalar for "mean" and [batch] for "none",
finite, with finite gradients that are zero on masked positions; an example's "none" loss depends on
that example only (what DP-SGD's per-example clipping needs)."""

from __future__ import annotations

import pytest
import torch

from secure_kd.cross_tokenizer import TokenAlignment, VocabPair
from secure_kd.losses import TopKLogits, available_losses, check_params, get_loss, loss_info

B, S, V, H = 2, 3, 7, 5


def example_params(name: str) -> dict:
    """Defaults, plus each required parameter's first declared example."""
    model = loss_info(name).params
    return {n: f.examples[0] for n, f in model.model_fields.items() if f.is_required()}


def logits_inputs(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, S, V, generator=g, dtype=dtype) * 2).requires_grad_()
    teacher = torch.randn(B, S, V, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 1] = -100
    return student, teacher, labels


def identity_alignment(labels: torch.Tensor) -> TokenAlignment:
    """One tokenizer on both sides: every position is its own group (the same byte span)."""
    ids = labels.clamp_min(0)
    starts = torch.arange(S).expand(B, S)
    spans = torch.stack([starts, starts + 1], -1)
    return TokenAlignment.build(ids, spans, ids, spans)


def call(name: str, student, teacher, labels, reduction: str, **extra):
    """Call the objective the way the trainer does for its kind; `student` is what gets gradients."""
    info, entry, params = loss_info(name), get_loss(name), example_params(name)
    if info.inputs == "hidden":
        torch.manual_seed(0)  # the same random projection on every call
        module = entry(**{**params, "student_dim": student.shape[-1], "teacher_dim": teacher.shape[-1]})
        module = module.to(student.dtype)
        return module(student, teacher, labels, reduction=reduction)
    if info.stateful:
        return entry(**params)(student, teacher, labels, reduction=reduction, **extra)
    if info.cross_tokenizer == "required":
        extra = {**extra, "alignment": identity_alignment(labels), "vocab": VocabPair.identical(V)}
    return entry(
        student, teacher if info.needs_teacher else None, labels, reduction=reduction, **extra, **params
    )


def inputs_for(name: str, seed: int = 0):
    student, teacher, labels = logits_inputs(seed)
    if loss_info(name).inputs == "hidden":
        g = torch.Generator().manual_seed(seed)
        student = torch.randn(B, S, H, generator=g, dtype=torch.float64).requires_grad_()
        teacher = torch.randn(B, S, H + 2, generator=g, dtype=torch.float64)
    return student, teacher, labels


NAMES = available_losses()


@pytest.mark.parametrize("name", NAMES)
def test_params_model_round_trips_and_documents_itself(name):
    model = loss_info(name).params
    for field_name, field in model.model_fields.items():
        assert field.description, f"{name}.{field_name} has no description (it is shown by validate --schema)"
        if field.is_required():
            assert field.examples, f"{name}.{field_name} is required: declare Field(examples=[...])"
    values = model.model_validate(example_params(name))
    assert model.model_validate_json(values.model_dump_json()) == values
    assert model.model_validate(values.model_dump()) == values
    assert check_params(name, values.model_dump()) == values.model_dump()
    schema = model.model_json_schema()
    assert schema["additionalProperties"] is False and set(schema.get("properties", {})) == set(
        model.model_fields
    )


@pytest.mark.parametrize("name", NAMES)
def test_a_tiny_call_with_labels_gives_finite_losses_of_the_documented_shapes(name):
    student, teacher, labels = inputs_for(name)
    mean = call(name, student, teacher, labels, "mean")
    none = call(name, student, teacher, labels, "none")
    assert mean.shape == () and none.shape == (B,)
    assert torch.isfinite(mean) and torch.isfinite(none).all()
    (grad,) = torch.autograd.grad(none.sum(), student)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert grad[0, 1].abs().max() == 0, "a position whose label is -100 must get no gradient"


@pytest.mark.parametrize("name", NAMES)
def test_an_examples_none_loss_depends_on_that_example_only(name):
    student, teacher, labels = inputs_for(name)
    other = student.detach().clone()
    other[1] = other[1] * -0.5 + 1.0
    first = call(name, student.detach(), teacher, labels, "none")
    second = call(name, other, teacher, labels, "none")
    assert torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])


@pytest.mark.parametrize(
    "name", [n for n in NAMES if loss_info(n).sparse_teacher and loss_info(n).cross_tokenizer == "none"]
)
@pytest.mark.parametrize("tail", ["uniform", "zero"])
def test_a_top_k_teacher_works_with_either_tail(name, tail):
    student, teacher, labels = logits_inputs(seed=1)
    top = TopKLogits.from_logits(teacher, 3)
    none = call(name, student, top, labels, "none", tail=tail)
    (grad,) = torch.autograd.grad(none.sum(), student)
    assert none.shape == (B,) and torch.isfinite(none).all() and torch.isfinite(grad).all()
