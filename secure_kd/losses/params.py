"""Typed parameters of the objectives: one pydantic model per loss, the one place their ranges live.

Every registered objective names a `LossParams` subclass (`loss_info(name).params`, `NoParams` when it
takes none), declared next to it in its own file, e.g.

    class JSDParams(LossParams):
        beta: float = Field(0.5, ge=0, le=1, description="...")

The model is what checks a parameter everywhere: a direct call (`jsd(..., beta=1.5)` raises a
`LossParamsError` naming `beta` and its range), the fused loss, and the config (`kd.params` is
validated by the chosen loss's model, each problem reported at `kd.params.<field>`, see
`secure_kd/config.py`); `secure-kd validate --schema` shows every loss's model. Models forbid unknown
keys, take no strings for numbers and no booleans for numbers (strict), and refuse inf and NaN.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Self

import annotated_types
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo


class LossParams(BaseModel):
    """Base of every objective's parameter model (frozen, strict, unknown keys refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @classmethod
    def checked(cls, loss: str, **values: Any) -> Self:
        """The validated parameters; a `LossParamsError` naming each bad one and its range otherwise."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise LossParamsError(loss, cls, problems_of(cls, exc)) from None


class NoParams(LossParams):
    """The objective takes no parameters of its own."""


@dataclass(frozen=True)
class ParamProblem:
    """One thing wrong with a parameter mapping; `field` None for a rule across fields."""

    field: str | None
    kind: Literal["unknown", "missing", "invalid"]
    reason: str
    value: Any = None


def problems_of(model: type[LossParams], exc: ValidationError) -> list[ParamProblem]:
    problems = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else None
        kind = {"extra_forbidden": "unknown", "missing": "missing"}.get(err["type"], "invalid")
        reason = err["msg"].removeprefix("Value error, ")
        problems.append(ParamProblem(field, kind, reason, err.get("input")))  # type: ignore[arg-type]
    return problems


def param_problems(model: type[LossParams], values: dict[str, Any]) -> list[ParamProblem]:
    """Everything wrong with `values` for `model` (empty when they validate)."""
    try:
        model.model_validate(values)
    except ValidationError as exc:
        return problems_of(model, exc)
    return []


def _kind_of(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [_kind_of(a) for a in args if a is not type(None)]
        return " or ".join(kinds) + (" or null" if type(None) in args else "")
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def _range_of(field: FieldInfo) -> str:
    low = high = None
    for m in field.metadata:
        if isinstance(m, annotated_types.Ge):
            low = ("[", m.ge)
        elif isinstance(m, annotated_types.Gt):
            low = ("(", m.gt)
        elif isinstance(m, annotated_types.Le):
            high = ("]", m.le)
        elif isinstance(m, annotated_types.Lt):
            high = (")", m.lt)
    if low and high:
        return f" in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {_num(low[1])}"
    if high:
        return f" {'<=' if high[0] == ']' else '<'} {_num(high[1])}"
    return ""


def _num(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and math.isfinite(x) and x.is_integer() else str(x)


def describe_param(model: type[LossParams], name: str) -> str:
    """E.g. "beta: a number in [0, 1], default 0.5"."""
    field = model.model_fields[name]
    text = f"{name}: {_kind_of(field.annotation)}{_range_of(field)}"
    return text + (", required" if field.is_required() else f", default {field.default!r}")


def describe_params(model: type[LossParams]) -> str:
    """Every parameter of `model` with its range and default, or "no parameters"."""
    if not model.model_fields:
        return "no parameters"
    return "; ".join(describe_param(model, name) for name in model.model_fields)


def param_defaults(model: type[LossParams]) -> dict[str, Any]:
    """name -> default, `inspect.Parameter.empty` for a required parameter."""
    import inspect

    return {
        name: (inspect.Parameter.empty if f.is_required() else f.default)
        for name, f in model.model_fields.items()
    }


class LossParamsError(ValueError):
    """Bad parameters for an objective: one sentence per problem, each naming the parameter and its range."""

    def __init__(self, loss: str, model: type[LossParams], problems: list[ParamProblem]) -> None:
        self.loss, self.model, self.problems = loss, model, problems
        unknown = [p.field for p in problems if p.kind == "unknown"]
        parts = []
        if unknown:
            parts.append(
                f"unexpected parameters for loss {loss!r}: {unknown}; it takes {describe_params(model)}"
            )
        for p in problems:
            if p.kind == "missing":
                parts.append(f"loss {loss!r} needs {describe_param(model, p.field)}")  # type: ignore[arg-type]
            elif p.kind == "invalid" and p.field is not None:
                parts.append(
                    f"loss {loss!r}: {p.field}={p.value!r} is refused ({p.reason}); "
                    f"{describe_param(model, p.field)}"
                )
            elif p.kind == "invalid":
                parts.append(f"loss {loss!r}: {p.reason}")
        super().__init__(". ".join(parts))
