"""The `teachers:` list of `secure-kd distill` and its checks: several teachers, one combined target.

`teachers: [{source: ..., weight: ...}, ...]` replaces `teacher:`; each entry is a teacher block
(`source`, `tiny`, `dtype`, ...) plus a `weight`. `kd.teacher_rule` says how the teachers' next-token
distributions are combined at each position (`secure_kd.robust_rules`):

- `mean` (default): the plain mean of the distributions, the usual multi-teacher ensemble;
- `weighted_mean`: sum_i weight_i p_i / sum_i weight_i, with each entry's `weight`;
- `median`: the coordinate-wise median over the teachers, renormalized to a distribution;
- `trimmed_mean`: per token, drop the `floor(kd.trim_fraction * n)` lowest and highest probabilities
  and average the rest, renormalized.

The median and the trimmed mean resist a minority of poisoned teachers (each token's probability stays
between the honest teachers' values before renormalization); they need at least 3 teachers (with 2 the
median is the mean), and `trimmed_mean` must cut at least one teacher at each end.

The first entry is the primary teacher: `tokenizer: teacher` means its tokenizer, a `teacher_layers`
student copies its layers, and the job's `teacher` is set to it (a dumped config reloads; a `teacher`
block that differs from it is refused). Every teacher shares the student's tokenizer and vocabulary
(checked again on the loaded models, `secure_kd.multi_teacher`). A tiny random teacher i is built from
seed `seed + 7919 * i`, so the teachers of one list differ and teacher 0 is the one `teacher:` builds.

This module defines only the `weight` field (`WeightedTeacher`, mixed into `config.TeacherConfig`) and
the job-level checks (`check_teachers`, called by `DistillJob`'s validator); it imports nothing of
`secure_kd.config`, which imports it.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from secure_kd.robust_rules import trim_count

TEACHER_SEED_STRIDE = 7919  # teacher i of a tiny list is built from seed + 7919 * i
DEFAULT_TRIM_FRACTION = 0.2


class WeightedTeacher(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    weight: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="kd.teacher_rule: weighted_mean: this teacher's weight"
    )


def teacher_seed(seed: int, index: int) -> int:
    return seed + TEACHER_SEED_STRIDE * index


def _model_block(entry: Any, model_class: type) -> Any:
    """The teacher block of one entry, without its weight (the type of the job's `teacher`)."""
    return model_class.model_validate(entry.model_dump(exclude={"weight"}))


def check_teachers(job: Any) -> None:
    """`teachers` against the rest of the job; with a list, the job's `teacher` becomes its first entry."""
    kd, teachers = job.kd, job.teachers
    if teachers is None:
        extra = []
        if kd.teacher_rule != "mean":
            extra.append(f"kd.teacher_rule: {kd.teacher_rule}")
        if kd.trim_fraction != DEFAULT_TRIM_FRACTION:
            extra.append(f"kd.trim_fraction: {kd.trim_fraction}")
        if extra:
            raise ValueError(
                f"{' and '.join(extra)}: these apply to a `teachers:` list only, but the job has one "
                "`teacher`; give a `teachers:` list (each with source and weight) or remove them"
            )
        return
    n = len(teachers)
    for i, entry in enumerate(teachers):
        if entry.source in ("teacher_layers", "served"):
            raise ValueError(
                f"teachers[{i}].source {entry.source!r}: a teacher of the list must be a model whose full "
                "distribution is read here: tiny, smollm2 or a model directory (teacher_layers builds a "
                "student; a served teacher gives top-k log-probabilities only)"
            )
        if entry.tokenizer not in (None, teachers[0].tokenizer):
            raise ValueError(
                f"teachers[{i}].tokenizer {entry.tokenizer!r} differs from teachers[0]'s "
                f"({teachers[0].tokenizer!r}): every teacher of the list must share the student's tokenizer "
                "and vocabulary; remove teachers[i].tokenizer or give them all the same one"
            )
    shared = teachers[0].tokenizer or job.tokenizer
    if job.student.tokenizer not in (None, shared):
        raise ValueError(
            f"student.tokenizer {job.student.tokenizer!r} differs from the teachers' "
            f"({shared!r}): the teachers' distributions are combined token "
            "by token over the student's vocabulary, so all of them share one tokenizer; remove "
            "student.tokenizer"
        )
    weighted = [i for i, entry in enumerate(teachers) if entry.weight != 1.0]
    if weighted and kd.teacher_rule != "weighted_mean":
        raise ValueError(
            f"teachers[{weighted[0]}].weight is {teachers[weighted[0]].weight} but kd.teacher_rule is "
            f"{kd.teacher_rule!r}, which ignores weights; set kd.teacher_rule: weighted_mean or remove the "
            "weights"
        )
    if kd.teacher_rule in ("median", "trimmed_mean") and n < 3:
        raise ValueError(
            f"kd.teacher_rule: {kd.teacher_rule} needs at least 3 teachers (got {n}): with 2 the median and "
            "the trimmed mean are the mean; add teachers or use kd.teacher_rule: mean"
        )
    if kd.teacher_rule == "trimmed_mean" and trim_count(n, kd.trim_fraction) == 0:
        raise ValueError(
            f"kd.trim_fraction {kd.trim_fraction} cuts no teacher of {n} "
            f"(floor({kd.trim_fraction} * {n}) = 0), so trimmed_mean would be the plain mean; set "
            f"kd.trim_fraction to at least {math.ceil(1000 / n) / 1000:.3f} (one teacher cut at each end)"
        )
    if kd.trim_fraction != DEFAULT_TRIM_FRACTION and kd.teacher_rule != "trimmed_mean":
        raise ValueError(
            f"kd.trim_fraction applies to kd.teacher_rule: trimmed_mean only, not {kd.teacher_rule!r}; "
            "remove it or set kd.teacher_rule: trimmed_mean"
        )
    if kd.mode == "self_privileged":
        raise ValueError(
            "kd.mode: self_privileged distils the student from its own weights; it takes no `teachers:` list"
        )
    if kd.teacher_targets == "cache":
        raise ValueError(
            "kd.teacher_targets: cache stores one teacher's top-k; a `teachers:` list is combined live at "
            "every step: set kd.teacher_targets: live"
        )
    primary = _model_block(teachers[0], type(job.teacher))
    if "teacher" in job.model_fields_set and job.teacher.model_dump() != primary.model_dump():
        raise ValueError(
            "`teacher` and `teachers` are exclusive: with a `teachers:` list the primary teacher is "
            "teachers[0]; remove the `teacher` block (or use `teacher:` alone for one teacher)"
        )
    job.__dict__["teacher"] = primary  # without re-validation (the validator runs on every assignment)
