"""Per-teacher attribution: which of several teachers a student's next-token distributions came from.

For each record (one row of a batch), the student's distance to teacher i is the mean over the record's
scored positions (next label not -100, the positions `perplexity` scores) of KL(p_student || p_teacher_i)
at temperature 1, in nats: how surprised the teacher is by what the student predicts. The record is
attributed to the teacher with the smallest distance (ties go to the lower index). The shares of records
per teacher come with 95% Wilson intervals (`secure_kd.proportions`), and each teacher's mean distance
over the records is reported too.

What it tells: a share near 1 for one teacher says the student's distributions sit closest to that
teacher's on these records, e.g. that the student was distilled from it, or from an ensemble it
dominates. It is a comparison among the teachers given, not a proof of provenance: a student close to
none of them is still attributed to the nearest, so read `mean_kl` alongside, and two near-identical
teachers split the records between them by noise. The interval treats records as independent draws.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from pydantic import BaseModel, Field
from torch import nn

from secure_kd.evaluate._model_io import evaluation_mode, model_logits, prepare_batch, resolve_device
from secure_kd.proportions import wilson_interval

Batch = dict[str, torch.Tensor]


class TeacherShare(BaseModel):
    teacher: str
    records: int = Field(description="records whose closest teacher this is")
    share: float
    ci95: tuple[float, float]
    mean_kl: float = Field(description="mean over records of KL(student || teacher), nats per position")


class Attribution(BaseModel):
    n_records: int
    definition: str = (
        "record -> the teacher minimizing the mean over its scored positions of KL(p_student || p_teacher) "
        "at temperature 1; shares with 95% Wilson intervals"
    )
    teachers: list[TeacherShare]
    closest: list[int] = Field(description="per record, in batch order: the index of its closest teacher")


def record_distances(
    student: nn.Module,
    teachers: Sequence[nn.Module],
    batches: Iterable[Batch],
    *,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """[records, teachers]: each record's mean KL(p_student || p_teacher_i) over its scored positions."""
    target = resolve_device(student, device)
    rows = []
    with evaluation_mode(student, *teachers):
        for index, raw in enumerate(batches):
            batch = prepare_batch(raw, target, index)
            keep = (batch["labels"][:, 1:] != -100).double()
            if bool((keep.sum(-1) == 0).any()):
                raise ValueError(f"batch {index}: a record has no scored position (every label is -100)")
            student_lp = torch.log_softmax(model_logits(student, batch)[:, :-1].double(), dim=-1)
            per_teacher = []
            for teacher in teachers:
                teacher_batch = {k: v.to(resolve_device(teacher, None)) for k, v in batch.items()}
                logits = model_logits(teacher, teacher_batch)[:, :-1].double().to(target)
                if logits.shape != student_lp.shape:
                    raise ValueError(
                        f"batch {index}: teacher logits {tuple(logits.shape)} != student logits "
                        f"{tuple(student_lp.shape)}; attribution needs one shared vocabulary"
                    )
                kl = (student_lp.exp() * (student_lp - torch.log_softmax(logits, dim=-1))).sum(-1)
                per_teacher.append((kl * keep).sum(-1) / keep.sum(-1))
            rows.append(torch.stack(per_teacher, dim=-1))
    if not rows:
        raise ValueError("no batches to attribute")
    return torch.cat(rows).cpu()


def teacher_attribution(
    student: nn.Module,
    teachers: Sequence[nn.Module],
    batches: Iterable[Batch],
    *,
    names: Sequence[str] | None = None,
    device: str | torch.device | None = None,
) -> Attribution:
    """Attribute every record of `batches` to its closest teacher; see the module."""
    if not teachers:
        raise ValueError("attribution needs at least one teacher")
    names = list(names) if names is not None else [f"teacher_{i}" for i in range(len(teachers))]
    if len(names) != len(teachers):
        raise ValueError(f"{len(teachers)} teachers but {len(names)} names")
    distances = record_distances(student, teachers, batches, device=device)
    closest = distances.argmin(dim=-1)  # the first minimum: ties go to the lower index
    n = int(distances.shape[0])
    shares = []
    for i, name in enumerate(names):
        hits = int((closest == i).sum())
        shares.append(
            TeacherShare(
                teacher=name,
                records=hits,
                share=hits / n,
                ci95=wilson_interval(hits, n),
                mean_kl=float(distances[:, i].mean()),
            )
        )
    return Attribution(n_records=n, teachers=shares, closest=closest.tolist())
