"""Configuration and results of the `membership` attack (see `attacks.membership.audit`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from apparatus.tiny_lm import TrainRecipe
from secure_kd.config import Strict, TinyModelConfig
from secure_kd.plugins import PluginConfig

AttackName = Literal["loss", "rmia", "rmia_online", "lira_offline", "lira_online"]
HEADLINE_NONMEMBERS = 10_000
MIN_ONLINE_SHADOWS = 16
_DEFAULT_RECIPE = TrainRecipe(
    model=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2), epochs=20, batch_size=16, lr=3e-3
)


class MembershipData(Strict):
    """Members, non-members and population (RMIA's z): generated, or three local files."""

    source: Literal["synthetic", "files"] = "synthetic"
    members: str | None = None
    nonmembers: str | None = None
    population: str | None = None
    text_field: str = "text"
    n_members: int | None = Field(200, gt=0, description="files: at most this many (null: all)")
    n_nonmembers: int | None = Field(200, gt=0)
    n_population: int | None = Field(200, gt=0)
    max_length: int = Field(64, ge=8)
    synthetic_seed: int | None = Field(None, description="default: the job's seed")

    @model_validator(mode="after")
    def _files_present(self) -> MembershipData:
        paths = {"members": self.members, "nonmembers": self.nonmembers, "population": self.population}
        if self.source == "synthetic":
            given = [name for name, path in paths.items() if path is not None]
            if given:
                raise ValueError(
                    f"data.{given[0]} is a file but data.source is 'synthetic'; set source: files"
                )
            if None in (self.n_members, self.n_nonmembers, self.n_population):
                raise ValueError("synthetic data needs n_members, n_nonmembers and n_population as numbers")
            return self
        for name, path in paths.items():
            if path is None and name != "population":
                raise ValueError(
                    f"data.source 'files' needs data.{name}: a .jsonl/.json/.csv/.parquet/.txt file"
                )
            if path is not None and not Path(path).is_file():
                raise ValueError(
                    f"data.{name} file {path!r} does not exist (paths are from the current directory)"
                )
        return self


class TargetModel(Strict):
    source: str = Field(
        "train", description="'train' (a tiny target trained on the members here) or a local HF dir"
    )
    recipe: TrainRecipe = _DEFAULT_RECIPE

    @field_validator("source")
    @classmethod
    def _known(cls, value: str) -> str:
        if value != "train" and not Path(value).is_dir():
            raise ValueError(f"target.source {value!r} is neither 'train' nor an existing model directory")
        return value


class RMIASettings(Strict):
    n_references: int = Field(2, gt=0, description="OUT models per example offline (k IN + k OUT online)")
    offline_a: float | Literal["auto"] = Field("auto", description="auto: tuned on a reference model")
    gamma: float = Field(1.0, gt=0)

    @field_validator("offline_a")
    @classmethod
    def _in_unit_interval(cls, value: float | str) -> float | str:
        if value != "auto" and not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"rmia.offline_a must be 'auto' or in [0, 1], got {value}")
        return value


class LiRASettings(Strict):
    fixed_variance: bool | Literal["auto"] = Field(
        "auto", description="auto: one global variance below 64 shadows"
    )


class MembershipConfig(PluginConfig):
    """`secure-kd attack membership`: loss, RMIA and LiRA membership inference."""

    out: str = "runs/attacks/membership"
    target: TargetModel = TargetModel()
    tokenizer: str | None = Field(
        None,
        description="default: tiny:512 for a trained target, else the target's own; a tiny tokenizer is "
        "trained on public text (fresh synthetic records, or data.population; the pool only without it)",
    )
    data: MembershipData = MembershipData()
    attacks: list[AttackName] = ["loss", "rmia"]
    n_shadows: int = Field(4, ge=0)
    shadow: TrainRecipe | None = Field(None, description="default: target.recipe")
    rmia: RMIASettings = RMIASettings()
    lira: LiRASettings = LiRASettings()
    progress: bool = False

    @model_validator(mode="after")
    def _enough_shadows(self) -> MembershipConfig:
        if not self.attacks:
            raise ValueError(
                "attacks is empty; choose from loss, rmia, rmia_online, lira_offline, lira_online"
            )
        needs_shadows = [a for a in self.attacks if a != "loss"]
        if needs_shadows and (self.n_shadows < 2 or self.n_shadows % 2):
            raise ValueError(
                f"{needs_shadows} need shadow models: n_shadows must be even and >= 2 "
                f"(half IN, half OUT per example), got {self.n_shadows}"
            )
        if "lira_online" in self.attacks and self.n_shadows < MIN_ONLINE_SHADOWS:
            raise ValueError(
                f"lira_online needs n_shadows >= {MIN_ONLINE_SHADOWS} (IN and OUT Gaussians per "
                f"example); got {self.n_shadows}. Use lira_offline with fewer shadows"
            )
        if (
            needs_shadows
            and self.rmia.n_references > self.n_shadows // 2
            and any("rmia" in a for a in self.attacks)
        ):
            raise ValueError(
                f"rmia.n_references={self.rmia.n_references} exceeds the {self.n_shadows // 2} OUT "
                "models each example has; lower it or raise n_shadows"
            )
        if "rmia" in self.attacks and self.rmia.offline_a == "auto" and self.n_shadows < 4:
            raise ValueError(
                "rmia.offline_a 'auto' tunes a by attacking one shadow with the others and needs "
                "n_shadows >= 4; set a number (0.3 is a common choice) for fewer shadows"
            )
        if self.target.source != "train" and self.data.source == "synthetic":
            raise ValueError(
                "a target loaded from a directory was trained on its own data: give its members and "
                "non-members with data.source: files"
            )
        return self


class AttackROC(BaseModel):
    attack: str
    auc: float
    tpr_at_fpr: dict[float, float]
    roc_fpr: list[float]
    roc_tpr: list[float]
    n_members: int
    n_nonmembers: int
    params: dict[str, float | int | bool | str] = {}


class MembershipResult(BaseModel):
    kind: str = "membership"
    target_source: str
    n_members: int
    n_nonmembers: int
    n_population: int
    n_shadows: int
    mean_loss_members: float
    mean_loss_nonmembers: float
    attacks: list[AttackROC]
    notes: list[str]
    seconds: float
