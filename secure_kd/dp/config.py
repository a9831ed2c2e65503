"""`train.privacy`: the DP-SGD settings of a job (pydantic only, no torch, no secure_kd.config import).

Exactly one of these decides the noise:
- `target_epsilon` alone: the noise multiplier is calibrated with Opacus so that the planned steps
  end at that epsilon (counting what the dataset's ledger has already spent), and training stops
  before a step that would exceed it;
- `noise_multiplier` alone: fixed noise, the epsilon is whatever the ledger adds up to;
- both: fixed noise, and `target_epsilon` is a hard budget (stop before exceeding it).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LEDGER_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_ledger_dir(value: str, error: type[Exception] = ValueError) -> str:
    """A ledger directory must be a plain path: secure-kd expands `~` but no `$VARIABLE`."""
    if "$" in value:
        raise error(
            f"privacy.ledger_dir {value!r} contains '$': secure-kd does not expand environment variables "
            "in paths, so it would create a directory literally named so and keep the ledger there, where "
            "no later run looks. Write the path out (e.g. /home/me/privacy-ledgers or ~/privacy-ledgers), "
            'let your shell expand it (--set train.privacy.ledger_dir="$HOME/ledgers"), or leave '
            "ledger_dir unset and set SECURE_KD_HOME"
        )
    if "\x00" in value or not value.strip():
        raise error(f"privacy.ledger_dir {value!r} is not a usable path: give a directory")
    return value


GradSampleMode = Literal["hooks", "functorch", "ghost"]
AccountantName = Literal["rdp", "prv"]
PrivacyUnit = Literal["record", "user"]


class PrivacyConfig(BaseModel):
    """Differentially private training of the student (Opacus DP-SGD, record- or user-level)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    unit: PrivacyUnit = Field(
        "record",
        description=(
            "what one neighbouring dataset adds or removes: one record (default), or every record of one "
            "user (data.user_field names the user; users are Poisson-sampled, secure_kd.dp.user_level)"
        ),
    )
    max_records_per_user: int | None = Field(
        None,
        gt=0,
        description="unit: user only: the most records of a sampled user trained on per step (at random)",
    )

    target_epsilon: float | None = Field(None, gt=0, description="the budget for this dataset (all runs)")
    noise_multiplier: float | None = Field(None, gt=0, description="fixed noise; omit to calibrate it")
    delta: float | None = Field(
        None, gt=0, lt=1, description="default: the largest power of ten not above 1/(10*N); must be < 1/N"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="per-example gradient clipping bound C")
    accountant: AccountantName = Field("rdp", description="calibrates the noise and enforces the budget")
    poisson_sampling: bool = Field(True, description="false: shuffled fixed-size batches (not covered)")
    grad_sample_mode: GradSampleMode = "hooks"
    max_physical_batch_size: int | None = Field(
        None, gt=0, description="examples per forward/backward (memory); default: train.batch_size"
    )
    max_noise_multiplier: float = Field(
        10.0, gt=0, description="refuse a calibrated noise multiplier above this (noise would swamp learning)"
    )
    untie_embeddings: bool = Field(
        False, description="give a tied output layer its own copy of the embedding matrix (needed for ghost)"
    )
    secure_mode: bool = Field(False, description="Opacus' noise sampling robust to floating-point attacks")
    ledger_dir: str | None = Field(None, description="default: $SECURE_KD_HOME/privacy-ledgers")
    ledger_key: str | None = Field(
        None,
        description=(
            "name of the private dataset's ledger (one dataset per key); default: a fingerprint of its "
            "records before any split"
        ),
    )

    @field_validator("accountant", mode="before")
    @classmethod
    def _no_gdp(cls, value: object) -> object:
        if value == "gdp":
            raise ValueError(
                "accountant 'gdp' is not offered: Opacus documents that the Gaussian DP accountant can "
                "underestimate epsilon for DP-SGD; use 'rdp' (default) or 'prv'"
            )
        return value

    @field_validator("ledger_dir")
    @classmethod
    def _plain_dir(cls, value: str | None) -> str | None:
        return None if value is None else check_ledger_dir(value)

    @field_validator("ledger_key")
    @classmethod
    def _safe_key(cls, value: str | None) -> str | None:
        if value is not None and not LEDGER_KEY_PATTERN.match(value):
            raise ValueError(
                f"ledger_key {value!r} must be 1-128 characters of letters, digits, '.', '_' or '-' "
                "(it names a file), starting with a letter or digit"
            )
        return value

    @model_validator(mode="after")
    def _noise_is_decided(self) -> PrivacyConfig:
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError(
                "set target_epsilon (the noise is then calibrated to it) or noise_multiplier (fixed noise), "
                "or both (fixed noise with a hard budget)"
            )
        self._check_unit()
        if self.noise_multiplier is not None and self.noise_multiplier > self.max_noise_multiplier:
            raise ValueError(
                f"noise_multiplier {self.noise_multiplier} is above max_noise_multiplier "
                f"{self.max_noise_multiplier}; raise max_noise_multiplier if you mean it"
            )
        return self

    def _check_unit(self) -> None:
        if self.unit == "record":
            if self.max_records_per_user is not None:
                raise ValueError(
                    "train.privacy.max_records_per_user only applies to user-level DP: set "
                    "train.privacy.unit: user (with data.user_field), or remove max_records_per_user"
                )
            return
        if self.max_records_per_user is None:
            raise ValueError(
                "train.privacy.unit: user needs train.privacy.max_records_per_user: the most records of one "
                "sampled user a step trains on (e.g. 8); the guarantee does not depend on it, compute and "
                "memory do (a step holds up to that many records per sampled user)"
            )
        if self.grad_sample_mode == "ghost":
            raise ValueError(
                "train.privacy.unit: user with grad_sample_mode: ghost: user-level clipping needs each "
                "user's summed per-record gradients, and ghost clipping computes only per-record norms. "
                "Use grad_sample_mode: hooks (or functorch)"
            )
        if not self.poisson_sampling:
            raise ValueError(
                "train.privacy.unit: user with poisson_sampling: false: users are always Poisson-sampled "
                "(the sampling the accountants analyse); remove poisson_sampling: false"
            )

    def resume_relevant(self) -> dict:
        """The settings a resumed run must share with its checkpoint (all but the physical batch size).

        A record-level run leaves the user-level fields out, so checkpoints written before they existed
        still resume."""
        exclude = {"max_physical_batch_size"}
        if self.unit == "record":
            exclude |= {"unit", "max_records_per_user"}
        return self.model_dump(mode="json", exclude=exclude)
