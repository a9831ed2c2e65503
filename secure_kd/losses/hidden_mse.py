"""Hidden-state matching: MSE between projected student states and teacher states (FitNets-style)."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from secure_kd.losses.catalog import register_loss
from secure_kd.losses.chunked import reduce_token_losses
from secure_kd.losses.inputs import TokenLayout, check_reduction
from secure_kd.losses.params import LossParams


class HiddenMSEParams(LossParams):
    """The arguments of `HiddenMSE(...)`."""

    student_dim: int = Field(gt=0, examples=[576], description="student hidden width")
    teacher_dim: int = Field(gt=0, examples=[576], description="teacher hidden width")
    bias: bool = Field(True, description="the projection has a bias")


@register_loss("hidden_mse", stateful=True, inputs="hidden", sparse_teacher=False, params=HiddenMSEParams)
class HiddenMSE(nn.Module):
    """MSE between `proj(student_hidden)` and `teacher_hidden`, with a learned Linear projection.

    `get_loss("hidden_mse")` returns this class: instantiate it with the two widths,
    `HiddenMSE(student_dim, teacher_dim)`, and add its parameters to the optimizer (the
    projection is trained with the student; it is part of the checkpoint).

    Call `(student_hidden [batch, seq, ds], teacher_hidden [batch, seq, dt], labels=None, *,
    reduction="mean")` (or [batch, d] states). Per token: mean over the teacher's dt features of
    (proj(h_s) - h_t)^2; positions whose label is -100 are excluded; reductions as for the logit
    objectives ("mean" over kept tokens, "sum", "none" = per-example mean, 0 for an empty example).
    The teacher's states are treated as constants (detached).
    """

    def __init__(self, student_dim: int, teacher_dim: int, bias: bool = True) -> None:
        super().__init__()
        p = HiddenMSEParams.checked("hidden_mse", student_dim=student_dim, teacher_dim=teacher_dim, bias=bias)
        self.proj = nn.Linear(p.student_dim, p.teacher_dim, bias=p.bias)

    def forward(
        self,
        student_hidden: Tensor,
        teacher_hidden: Tensor,
        labels: Tensor | None = None,
        *,
        reduction: str = "mean",
    ) -> Tensor:
        check_reduction(reduction)
        if student_hidden.dim() not in (2, 3) or teacher_hidden.dim() != student_hidden.dim():
            raise ValueError(
                f"hidden states must both be [batch, seq, dim] (or [batch, dim]); got student "
                f"{tuple(student_hidden.shape)}, teacher {tuple(teacher_hidden.shape)}"
            )
        if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
            raise ValueError(
                f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                f"{tuple(teacher_hidden.shape)} must have the same batch and sequence sizes"
            )
        widths = (student_hidden.shape[-1], teacher_hidden.shape[-1])
        if widths != (self.proj.in_features, self.proj.out_features):
            raise ValueError(
                f"HiddenMSE({self.proj.in_features}, {self.proj.out_features}) got student width "
                f"{student_hidden.shape[-1]} and teacher width {teacher_hidden.shape[-1]}; build it with "
                "HiddenMSE(student_dim, teacher_dim) matching the two models"
            )
        positions = student_hidden.shape[:-1]
        if labels is not None and labels.shape != positions:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must equal the positions {tuple(positions)}"
            )
        batch_size, seq_len = positions[0], positions[1] if student_hidden.dim() == 3 else 1
        layout = TokenLayout.from_labels(batch_size, seq_len, labels, student_hidden.device)
        student = student_hidden.reshape(batch_size * seq_len, -1)
        teacher = teacher_hidden.detach().reshape(batch_size * seq_len, -1)
        if layout.kept_rows is not None:
            student, teacher = student[layout.kept_rows], teacher[layout.kept_rows]
        per_token = (self.proj(student) - teacher.to(student.dtype)).pow(2).mean(-1)
        return reduce_token_losses(per_token, layout, reduction)
