"""`kd.swing`: swing distillation's settings for `secure-kd distill` (hotter, noised teacher targets on
private tokens of the user's own training data).

The teacher's distribution at a position whose next token a detector flags (score s in [0, 1])
becomes softmax(z / T + noise_std * s * eps) with T = kd.temperature + (max_temperature -
kd.temperature) * s and eps ~ N(0, I) drawn once per training text; every other position is the
teacher's own, bit for bit (`secure_kd.swing_targets`, `secure_kd.swing_job`). A heuristic that lowers
measured memorization of what the detectors find; it gives no differential-privacy guarantee.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from secure_kd.swing_targets import DETECTORS


class SwingKD(BaseModel):
    """`kd.swing`: which tokens count as private and how much their teacher targets are softened."""

    model_config = ConfigDict(extra="forbid")

    max_temperature: float = Field(
        10.0, gt=0, description="the teacher's temperature where a token scores 1 (kd.temperature where 0)"
    )
    noise_std: float = Field(
        2.0,
        ge=0,
        description="std of the Gaussian noise on the tempered teacher logits where a token scores 1",
    )
    detectors: list[str] = Field(
        default_factory=lambda: list(DETECTORS),
        description=f"regex detectors of private text, any of: {', '.join(DETECTORS)}",
    )

    @field_validator("detectors")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in DETECTORS]
        if unknown:
            raise ValueError(f"unknown detectors {unknown}; available: {', '.join(DETECTORS)}")
        if not value:
            raise ValueError(
                "no detectors: nothing would be flagged; name at least one, e.g. [email, digits]"
            )
        return value


def check_swing(kd: Any) -> None:
    """`kd.swing` against the rest of `kd` (a `secure_kd.config.KDConfig`): refusals naming field and fix."""
    swing = kd.swing
    if swing is None:
        return
    if kd.kd_weight == 0:
        raise ValueError("kd.swing softens the teacher's targets, but kd.kd_weight is 0: set kd_weight > 0")
    if kd.mode != "off_policy":
        raise ValueError(
            f"kd.swing scores the training texts' tokens, but kd.mode {kd.mode!r} trains on generated text "
            "the detectors never saw; use kd.mode: off_policy with kd.swing"
        )
    if swing.max_temperature < kd.temperature:
        raise ValueError(
            f"kd.swing.max_temperature ({swing.max_temperature}) is below kd.temperature "
            f"({kd.temperature}): private tokens would get sharper targets; set it >= kd.temperature"
        )
