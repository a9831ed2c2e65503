"""The registry of objectives and what a caller needs to know about each entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from secure_kd.losses.params import LossParams, NoParams
from secure_kd.registry import Registry

LOSSES: Registry[Any] = Registry("loss")

Obj = TypeVar("Obj")


@dataclass(frozen=True)
class LossInfo:
    """How to call a registered objective.

    stateful:        the entry is an `nn.Module` class: instantiate it once, keep it for the whole run
                     (its state and parameters are part of the checkpoint; parameters, if any, go to the
                     optimizer). Otherwise the entry is a plain function.
    inputs:          "logits" (student logits vs teacher logits / TopKLogits) or "hidden"
                     (student vs teacher hidden states).
    needs_teacher:   False only for `ce`, which compares the student with the labels.
    sparse_teacher:  accepts a `TopKLogits` teacher (then `tail` must be given).
    kernel_factory:  builds the per-token kernel that `fused_linear_kd_loss` uses; None when the
                     objective cannot be fused (it needs state or batch-level token selection).
    cross_tokenizer: "none" (one vocabulary: teacher and student logits have the same shape),
                     "optional" (`uld`: takes `alignment=`, `teacher_labels=`, `vocab=` for a teacher
                     with another tokenizer, pairs positions in order without them) or "required"
                     (`span_aligned`). See `secure_kd/losses/cross_inputs.py`.
    params:          the objective's typed parameters (a `LossParams` model; `NoParams` when it takes
                     none): what `kd.params` is validated by, and the keyword arguments of the call
                     (or, for a stateful entry, of its constructor). See `params.py`.
    """

    name: str
    stateful: bool
    inputs: Literal["logits", "hidden"]
    needs_teacher: bool
    sparse_teacher: bool
    kernel_factory: Callable[..., Any] | None
    cross_tokenizer: Literal["none", "optional", "required"] = "none"
    params: type[LossParams] = NoParams


_INFO: dict[str, LossInfo] = {}


def register_loss(
    name: str,
    *,
    stateful: bool = False,
    inputs: Literal["logits", "hidden"] = "logits",
    needs_teacher: bool = True,
    sparse_teacher: bool = True,
    kernel_factory: Callable[..., Any] | None = None,
    cross_tokenizer: Literal["none", "optional", "required"] = "none",
    params: type[LossParams] = NoParams,
) -> Callable[[Obj], Obj]:
    """Decorator: register an objective and attach its `LossInfo` as `obj.loss_info`."""
    if not (isinstance(params, type) and issubclass(params, LossParams)):
        raise TypeError(f"loss {name!r}: params must be a LossParams subclass (got {params!r})")

    def decorator(obj: Obj) -> Obj:
        info = LossInfo(
            name, stateful, inputs, needs_teacher, sparse_teacher, kernel_factory, cross_tokenizer, params
        )
        LOSSES.register(name, obj)
        _INFO[name] = info
        obj.loss_info = info  # type: ignore[attr-defined]
        return obj

    return decorator


def loss_info(name: str) -> LossInfo:
    LOSSES.get(name)  # raises the registry's "unknown loss ..., available: ..." error
    return _INFO[name]


def check_params(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """`values` validated by the objective's params model: the given keys only, typed (an int given for a
    float comes back as a float); a `LossParamsError` naming each bad key and its range otherwise."""
    model = loss_info(name).params
    return model.checked(name, **values).model_dump(include=set(values))
