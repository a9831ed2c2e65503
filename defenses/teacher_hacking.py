"""Teacher-hacking detection during distillation (Tiapkin et al. 2025, "On Teacher Hacking in Language
Model Distillation").

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
`Distiller`'s `on_step(step, loss)` hook that evaluates every `every` optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pydantic import BaseModel


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
