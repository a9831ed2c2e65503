"""A new objective written here, in one decorated per-token function, gets the chunked training path.

Each is checked against a naive full-tensor autograd computation written out below (its own softmax,
its own dense teacher for a TopKLogits, its own masking and reductions), and the re-implementation of
forward KL against the built-in analytic `forward_kl`.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import Field
from torch import Tensor

from secure_kd.config import ConfigError, load_config
from secure_kd.losses import (
    LossParams,
    LossParamsError,
    TokenDists,
    TokenLogits,
    TopKLogits,
    autograd_loss,
    available_losses,
    fused_linear_kd_loss,
    get_loss,
    loss_info,
)

CHUNKS_SEEN: list[int] = []  # rows each call of a per-token function received


class ProbSquaredErrorParams(LossParams):
    scale: float = Field(1.0, gt=0, description="multiplies the loss")


@autograd_loss("example_prob_squared_error", params=ProbSquaredErrorParams)
def prob_squared_error(d: TokenDists, *, scale: float) -> Tensor:
    """scale * sum_v (q_v - p_v)^2 per token."""
    CHUNKS_SEEN.append(d.log_student.shape[0])
    return scale * (d.student - d.teacher).pow(2).sum(-1)


@autograd_loss("example_forward_kl")
def forward_kl_by_autograd(d: TokenDists) -> Tensor:
    return (d.teacher * (d.log_teacher - d.log_student)).sum(-1)


class LogitMSEParams(LossParams):
    margin: float = Field(ge=0, examples=[0.1], description="required: no default")


@autograd_loss("example_logit_mse", params=LogitMSEParams, on="logits")
def logit_mse(x: TokenLogits, *, margin: float) -> Tensor:
    """mean_v (z_s - z_t)^2 + margin * sum_v z_s^2 / V (not shift-invariant: needs the logits)."""
    return (x.student - x.teacher).pow(2).mean(-1) + margin * x.student.pow(2).mean(-1)


@autograd_loss("example_label_nll", needs_teacher=False)
def label_nll(d: TokenDists) -> Tensor:
    return -d.log_student.gather(1, d.labels[:, None]).squeeze(1)


# -- the naive reference -------------------------------------------------------------------------------
def dense_teacher_logp(teacher, vocab: int, tail: str | None, temperature: float) -> Tensor:
    """[B, S, V] log-probabilities of the teacher at the temperature, built by hand."""
    if not isinstance(teacher, TopKLogits):
        return torch.log_softmax(teacher / temperature, -1)
    probs = teacher.values.exp()
    if tail == "uniform":
        missing = (1 - probs.sum(-1, keepdim=True)) / (vocab - teacher.k)
        full = missing.expand(*probs.shape[:-1], vocab).clone().scatter(-1, teacher.indices, probs)
        return torch.log_softmax(full.log() / temperature, -1)
    return torch.log_softmax(teacher.values / temperature, -1)  # zero: renormalized over the top-k


def naive(per_token, student, teacher, labels, *, temperature, reduction, tail=None) -> Tensor:
    log_q = torch.log_softmax(student / temperature, -1)
    log_p = dense_teacher_logp(teacher, student.shape[-1], tail, temperature)
    if isinstance(teacher, TopKLogits) and tail == "zero":
        log_q = torch.log_softmax(student.gather(-1, teacher.indices) / temperature, -1)
    losses = per_token(log_q, log_p)  # [B, S]
    keep = (labels != -100).to(losses.dtype)
    if reduction == "mean":
        return (losses * keep).sum() / keep.sum()
    if reduction == "sum":
        return (losses * keep).sum()
    return (losses * keep).sum(1) / keep.sum(1).clamp_min(1)


def naive_squared_error(log_q, log_p, scale=1.0):
    return scale * (log_q.exp() - log_p.exp()).pow(2).sum(-1)


def naive_forward_kl(log_q, log_p):
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def inputs(dtype=torch.float64, seed=0, vocab=11):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(2, 5, vocab, generator=g) * 2).to(dtype).requires_grad_()
    teacher = (torch.randn(2, 5, vocab, generator=g) * 2).to(dtype)
    labels = torch.randint(0, vocab, (2, 5), generator=g)
    labels[0, 1] = labels[1, 3] = labels[1, 4] = -100
    return student, teacher, labels


def value_and_grad(out: Tensor, student: Tensor) -> tuple[Tensor, Tensor]:
    weights = torch.linspace(0.5, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    (grad,) = torch.autograd.grad((out * weights).sum(), student)
    return out.detach(), grad


TEACHERS = ["dense", "topk-uniform", "topk-zero"]


def teacher_and_tail(kind: str, teacher: Tensor):
    if kind == "dense":
        return teacher, None
    return TopKLogits.from_logits(teacher, 4), kind.removeprefix("topk-")


# -- registration and parameters -----------------------------------------------------------------------
def test_a_decorated_function_is_a_registered_objective_with_typed_params():
    assert {"example_prob_squared_error", "example_forward_kl", "example_logit_mse"} <= set(
        available_losses()
    )
    objective = get_loss("example_prob_squared_error")
    assert objective.per_token is prob_squared_error.per_token and objective.__name__ == "prob_squared_error"
    info = loss_info("example_prob_squared_error")
    assert info.params is ProbSquaredErrorParams and not info.stateful and info.sparse_teacher
    assert info.kernel_factory is not None and loss_info("example_logit_mse").kernel_factory is None
    assert "scale" in str(__import__("inspect").signature(objective))
    student, teacher, labels = inputs()
    with pytest.raises(LossParamsError, match=r"scale=0 .*a number > 0"):
        objective(student, teacher, labels, scale=0)
    with pytest.raises(LossParamsError, match="unexpected parameters"):
        objective(student, teacher, labels, beta=0.5)
    with pytest.raises(LossParamsError, match=r"needs margin: a number >= 0, required"):
        get_loss("example_logit_mse")(student, teacher, labels)


def test_its_params_are_validated_in_a_config():
    job = load_config("configs/tiny.yaml", ["kd.loss=example_prob_squared_error", "kd.params={scale: 2}"])
    assert job.kd.params == {"scale": 2.0}
    for params, field, needle in [
        ("{scale: 0}", "kd.params.scale", "a number > 0"),
        ("{beta: 0.5}", "kd.params", "do not apply to loss 'example_prob_squared_error'"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config("configs/tiny.yaml", ["kd.loss=example_prob_squared_error", f"kd.params={params}"])
        assert needle in dict(info.value.problems)[field]
    with pytest.raises(ConfigError) as info:
        load_config("configs/tiny.yaml", ["kd.loss=example_logit_mse", "kd.params={}"])
    assert "is required" in dict(info.value.problems)["kd.params.margin"]


# -- values and gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TEACHERS)
@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_values_and_gradients_equal_the_naive_full_tensor_computation(kind, reduction, chunk_size):
    student, dense, labels = inputs(seed=1)
    teacher, tail = teacher_and_tail(kind, dense)
    common = dict(temperature=1.7, reduction=reduction)
    ours = get_loss("example_prob_squared_error")(
        student, teacher, labels, tail=tail, chunk_size=chunk_size, scale=2.5, **common
    )
    expected = naive(
        lambda q, p: naive_squared_error(q, p, 2.5), student, teacher, labels, tail=tail, **common
    )
    assert ours.shape == ((2,) if reduction == "none" else ())
    for a, b in zip(value_and_grad(ours, student), value_and_grad(expected, student), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", TEACHERS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_forward_kl_by_autograd_equals_the_builtin_analytic_forward_kl(kind, dtype, tol):
    student, dense, labels = inputs(dtype, seed=2)
    teacher, tail = teacher_and_tail(kind, dense)
    for reduction in ("mean", "none"):
        common = dict(temperature=0.8, reduction=reduction, tail=tail)
        ours = value_and_grad(
            get_loss("example_forward_kl")(student, teacher, labels, chunk_size=3, **common), student
        )
        builtin = value_and_grad(get_loss("forward_kl")(student, teacher, labels, **common), student)
        reference = value_and_grad(naive(naive_forward_kl, student, teacher, labels, **common), student)
        for a, b, c in zip(ours, builtin, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
            torch.testing.assert_close(a, c, rtol=tol, atol=tol)


@autograd_loss("example_forward_kl_by_matmul")
def forward_kl_by_matmul(d: TokenDists) -> Tensor:
    """Forward KL with the sum over the vocabulary as a matmul (which autocast would run in bf16)."""
    return (d.teacher * (d.log_teacher - d.log_student)) @ torch.ones(
        d.log_student.shape[1], dtype=d.log_student.dtype
    )


def test_under_autocast_it_still_computes_in_float32():
    student, teacher, labels = inputs(torch.float32, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = value_and_grad(get_loss("example_forward_kl_by_matmul")(student, teacher, labels), student)
    builtin = value_and_grad(get_loss("forward_kl")(student, teacher, labels), student)
    for a, b in zip(ours, builtin, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_the_function_only_ever_sees_one_chunk():
    student, teacher, labels = inputs(seed=3)
    CHUNKS_SEEN.clear()
    get_loss("example_prob_squared_error")(student, teacher, labels, chunk_size=3).backward()
    kept = int((labels != -100).sum())
    assert max(CHUNKS_SEEN) <= 3 and sum(CHUNKS_SEEN) == kept == 7  # masked tokens never computed
    assert student.grad[0, 1].abs().max() == 0 and student.grad[1, 3:].abs().max() == 0


def test_logits_form_equals_naive_and_refuses_a_top_k_teacher():
    student, teacher, labels = inputs(seed=4)
    T = 1.3
    for reduction in ("mean", "none"):
        ours = get_loss("example_logit_mse")(
            student, teacher, labels, temperature=T, reduction=reduction, chunk_size=2, margin=0.1
        )
        z_s, z_t = student / T, teacher / T
        per_token = (z_s - z_t).pow(2).mean(-1) + 0.1 * z_s.pow(2).mean(-1)
        keep = (labels != -100).to(per_token.dtype)
        expected = (
            (per_token * keep).sum() / keep.sum()
            if reduction == "mean"
            else (per_token * keep).sum(1) / keep.sum(1)
        )
        for a, b in zip(value_and_grad(ours, student), value_and_grad(expected, student), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="full logits.*TopKLogits"):
        get_loss("example_logit_mse")(student, TopKLogits.from_logits(teacher, 3), labels, margin=0.0)
    with pytest.raises(ValueError, match="cannot be fused"):
        fused_linear_kd_loss(
            torch.randn(4, 3), torch.randn(11, 3), teacher.reshape(10, 11)[:4], loss="example_logit_mse"
        )


def test_a_hard_label_objective_equals_cross_entropy():
    student, _, labels = inputs(seed=5)
    ours = get_loss("example_label_nll")(student, None, labels, chunk_size=4)
    expected = torch.nn.functional.cross_entropy(
        student.reshape(-1, 11), labels.reshape(-1), ignore_index=-100
    )
    for a, b in zip(value_and_grad(ours, student), value_and_grad(expected, student), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="labels"):
        get_loss("example_label_nll")(student, None, None)


def test_it_runs_fused_with_the_output_layer():
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 5, 4, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(11, 4, generator=g, dtype=torch.float64).requires_grad_()
    _, dense, labels = inputs(seed=6)
    top = TopKLogits.from_logits(dense, 4)
    fused = fused_linear_kd_loss(
        hidden, weight, top, labels, loss="example_prob_squared_error", chunk_size=3, scale=2.0
    )
    unfused = get_loss("example_prob_squared_error")(
        hidden @ weight.T, top, labels, tail="uniform", scale=2.0
    )
    torch.testing.assert_close(fused, unfused, rtol=1e-12, atol=1e-14)
    for a, b in zip(
        torch.autograd.grad(fused, (hidden, weight)),
        torch.autograd.grad(unfused, (hidden, weight)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_wrong_per_token_function_gets_a_clear_error():
    @autograd_loss("example_bad_shape")
    def bad_shape(d: TokenDists) -> Tensor:
        return (d.student - d.teacher).pow(2)  # forgot the sum over the vocabulary

    @autograd_loss("example_detached")
    def detached(d: TokenDists) -> Tensor:
        return (d.student - d.teacher).pow(2).sum(-1).detach()

    student, teacher, labels = inputs()
    with pytest.raises(ValueError, match=r"one loss per token, a tensor of shape \[3\]"):
        bad_shape(student, teacher, labels, chunk_size=3)
    with pytest.raises(ValueError, match="without a gradient"):
        detached(student, teacher, labels)
    assert math.isfinite(float(detached(student.detach(), teacher, labels)))  # fine without a gradient
    with pytest.raises(ValueError, match="on must be"):
        autograd_loss("example_never", on="hidden")


@pytest.mark.parametrize("fused", [False, True])
def test_the_distiller_trains_with_it_as_kd_loss(tiny_llama, token_examples, tmp_path, fused):
    """Through the trainer (kd.loss, top-k teacher, labels, fused or not), the re-implementation gives the
    built-in forward_kl's loss and gradients."""
    from secure_kd.config import KDConfig, TrainConfig
    from secure_kd.teacher_targets import LiveTeacher
    from secure_kd.trainer import Distiller

    examples = token_examples(n=8)
    teacher = tiny_llama(hidden=48, layers=2, seed=0).eval()
    results = []
    for loss in ("example_forward_kl", "forward_kl"):
        kd = KDConfig(loss=loss, top_k=8, tail="uniform", temperature=1.5, fused=fused)
        distiller = Distiller(
            student=tiny_llama(seed=1),
            teacher=teacher,
            targets=LiveTeacher(teacher, kd.top_k),
            examples=examples,
            kd=kd,
            train=TrainConfig(max_steps=1, batch_size=4),
            out=tmp_path / loss,
            pad_id=0,
            eos_id=1,
            progress=False,
        )
        value, _ = distiller.loss_on(distiller.micro_batch(0))
        value.backward()
        results.append((value.detach(), [p.grad for p in distiller.student.parameters()]))
    (ours, our_grads), (builtin, builtin_grads) = results
    # float32: a KL near 0 is a difference of terms of size ~log V, so its rounding is absolute (~1e-8)
    torch.testing.assert_close(ours, builtin, rtol=1e-6, atol=1e-7)
    for a, b in zip(our_grads, builtin_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
