"""Teacher-hacking detection during distillation (Tiapkin et al. 2025, "On Teacher Hacking in Language
Model Distillation"): the monitor, and `train.teacher_hacking`, its settings on a distillation job.

The paper's setting: the teacher is itself an imperfect proxy of a golden "oracle" model; distilling
on a fixed offline prompt set, the student keeps getting closer to the teacher on those prompts
(the proxy metric improves) while its distance to the oracle (the golden metric) starts to grow.
The paper measures both curves; it gives no online rule. secure-kd's rule: given one (proxy,
golden) pair per evaluation, lower is better for both, an evaluation is "hacking" when the proxy
improved by more than `min_delta` since the previous evaluation and the golden metric worsened by
more than `min_delta`; the monitor flags after `patience` consecutive hacking evaluations (any other
evaluation resets the count). It is a stopping signal, not a guarantee: without an oracle, a
held-out perplexity can stand in for the golden metric.

`TeacherHackingMonitor.on_step(every, proxy_fn, golden_fn)` returns a callable for the
`Distiller`'s `on_step(step, loss)` hook that evaluates every `every` optimizer steps;
`secure_kd.hacking_callback` builds the proxy and golden metrics of a `secure-kd distill` job.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo


class MonitorPoint(BaseModel):
    step: int
    proxy: float
    golden: float
    hacking: bool


class TeacherHackingMonitor:
    def __init__(self, patience: int = 3, min_delta: float = 0.0) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1 (consecutive evaluations), got {patience!r}")
        if not (math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta}")
        self.patience, self.min_delta = patience, min_delta
        self.history: list[MonitorPoint] = []
        self.streak = 0
        self.flagged_at_step: int | None = None

    @property
    def flagged(self) -> bool:
        return self.flagged_at_step is not None

    def update(self, step: int, proxy: float, golden: float) -> bool:
        """Record one evaluation; True once the monitor has flagged (it stays flagged)."""
        if not (math.isfinite(proxy) and math.isfinite(golden)):
            raise ValueError(f"step {step}: proxy={proxy} and golden={golden} must be finite numbers")
        hacking = False
        if self.history:
            last = self.history[-1]
            hacking = proxy < last.proxy - self.min_delta and golden > last.golden + self.min_delta
        self.streak = self.streak + 1 if hacking else 0
        self.history.append(MonitorPoint(step=step, proxy=proxy, golden=golden, hacking=hacking))
        if self.streak >= self.patience and self.flagged_at_step is None:
            self.flagged_at_step = step
        return self.flagged

    def on_step(
        self, every: int, proxy_fn: Callable[[], float], golden_fn: Callable[[], float]
    ) -> Callable[[int, float], None]:
        """A `Distiller(on_step=...)` hook: evaluate both metrics every `every` steps."""
        if every < 1:
            raise ValueError(f"every must be >= 1 optimizer steps, got {every}")

        def hook(step: int, loss: float) -> None:
            if step % every == 0:
                self.update(step, float(proxy_fn()), float(golden_fn()))

        return hook


class TeacherHackingConfig(BaseModel):
    """`train.teacher_hacking`: watch a distillation job for teacher hacking and warn or stop.

    Every `every` optimizer steps: proxy = mean KL(teacher || student) per target token on the first
    `proxy_batches` training batches (what the student is trained toward); golden = the student's mean
    NLL per token on `golden_batches` held-out batches, or, with `oracle` (a model directory with the
    student's vocabulary), mean KL(oracle || student) on them."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(10, ge=1, description="evaluate every N optimizer steps")
    patience: int = Field(3, ge=1, description="consecutive hacking evaluations before it flags")
    min_delta: float = Field(0.0, ge=0, description="a change smaller than this is no change")
    action: Literal["warn", "stop"] = Field(
        "warn", description="warn: log once and train on; stop: end training at the flagging step"
    )
    proxy_batches: int = Field(2, ge=1, description="training batches the proxy is measured on")
    golden_batches: int = Field(2, ge=1, description="held-out batches the golden metric is measured on")
    oracle: str | None = Field(
        None, description="a model directory to measure the golden metric against (default: held-out NLL)"
    )


def _not_with_privacy(
    value: TeacherHackingConfig | None, info: ValidationInfo
) -> TeacherHackingConfig | None:
    if value is not None and info.data.get("privacy") is not None:
        raise ValueError(
            "train.teacher_hacking evaluates the student on training and held-out batches outside the DP "
            "accounting (and the DP loop does not run step callbacks): remove train.teacher_hacking or "
            "train.privacy"
        )
    return value


# the field of `TrainConfig`, declared after `privacy` (the check reads it)
TeacherHackingField = Annotated[TeacherHackingConfig | None, AfterValidator(_not_with_privacy)]
