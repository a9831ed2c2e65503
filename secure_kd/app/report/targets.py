"""What each attack runs on: where the audited model, records and secrets go in its config, which
kinds of model it can attack, and what it attacks when it is given none.

An audit with `--model DIR` must never report a verdict about another model. So each registered
attack has a `Binding` here: `model` is the dotted field of its config that takes the audited model
(None: the attack builds and attacks its own target, e.g. the backdoor's digits CNN), `kinds` are the
model kinds it can attack, and `requires` are the fields that must be set once a real model is given
(the records it was trained on, non-members). An entry that cannot apply is skipped with the reason
(`skip_reason`); `ran_on` says, for every entry that runs, which model it attacked.

`model_kind(name)` reads a model directory without loading weights: `causal_lm` (a Hugging Face
causal LM, by its config.json), `digits_cnn` (secure-kd's own digits classifier, model.json) or
`other (<model_type>)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DIGITS_CNN_KIND = "secure-kd/digits-cnn"  # what apparatus.digits.save_digits_cnn writes in model.json


class NotAModelError(ValueError):
    """The name is neither 'smollm2' nor a directory holding a model."""


@dataclass(frozen=True)
class Requirement:
    """Once a real model is given, `field` must not be one of `unset` (the attack would otherwise test
    data the model never saw); `reason` says what to give."""

    field: str
    unset: tuple[Any, ...]
    reason: str


@dataclass(frozen=True)
class Binding:
    model: str | None = None
    kinds: tuple[str, ...] = ("causal_lm",)
    data: dict[str, Any] = field(default_factory=dict)  # field -> DATA (the --data file) or a fixed value
    secrets: str | None = None
    budget: str | None = None
    with_model: dict[str, Any] = field(default_factory=dict)  # defaults that only fit its own target
    requires: tuple[Requirement, ...] = ()
    own_target: str = "a target it builds itself"


DATA = object()  # placeholder in `Binding.data`: the audit's --data file

_RECORDS = (  # what memorization of a given model needs
    "the records the model was trained on: give --data FILE (a .jsonl/.csv/.parquet/.txt of records with a "
    "`text` field), and --secrets FILE for canary exposure"
)
BINDINGS: dict[str, Binding] = {
    "memorization": Binding(
        model="model.source",
        data={"data.source": DATA},
        secrets="data.secrets",
        with_model={"tokenizer": None, "extraction.reference": None},
        requires=(
            Requirement("data.source", ("synthetic",), "memorization of a given model needs " + _RECORDS),
        ),  # noqa: E501
        own_target="a tiny Llama it trains on a synthetic corpus with canaries",
    ),
    "membership": Binding(
        model="target.source",
        data={"data.source": "files", "data.members": DATA},
        with_model={"tokenizer": None},
        requires=(
            Requirement(
                "data.members",
                (None,),
                "membership inference needs the model's training records (its members): give --data FILE",
            ),
            Requirement(
                "data.nonmembers",
                (None,),
                "membership inference needs records the model never "
                "trained on (non-members) next to its training records: set data.nonmembers of "
                "this suite entry (see configs/audit-lm.yaml)",
            ),
        ),  # fmt: skip
        own_target="a tiny Llama it trains on synthetic members",
    ),
    "logit_leak": Binding(model="victim.source", budget="max_queries", own_target="a tiny random Llama"),
    "clone": Binding(
        model="victim.source",
        budget="query_budget",
        with_model={"victim_logit_scale": 1.0},  # the sharpening is for a random tiny victim only
        own_target="a tiny random Llama",
    ),
    "adversarial": Binding(
        model="model",
        kinds=("digits_cnn",),
        own_target="a digits CNN it trains itself",
    ),
    "backdoor": Binding(own_target="a digits CNN or tiny text classifier it backdoors and distils itself"),
    "bias_cascade": Binding(own_target="a tiny teacher it poisons and the students it distils from it"),
    "federated": Binding(own_target="a simulated federation it runs itself"),
}
# Values of a model field that mean "build your own".
_OWN_VALUES = (None, "train", "tiny")


def model_kind(name: str) -> str:
    """`causal_lm`, `digits_cnn` or `other (<model_type>)`; raises NotAModelError for anything else."""
    if name == "smollm2":
        return "causal_lm"
    path = Path(name)
    if not path.is_dir():
        raise NotAModelError(
            f"{name!r} does not exist or is not a directory; give a local model directory (a Hugging Face "
            "save_pretrained directory with config.json) or 'smollm2'"
        )
    meta = _read_json(path / "model.json")
    if meta is not None and meta.get("kind") == DIGITS_CNN_KIND:
        return "digits_cnn"
    config = _read_json(path / "config.json")
    if config is None:
        raise NotAModelError(
            f"{name!r} holds no model: no config.json (Hugging Face) and no secure-kd model.json; give the "
            "directory that save_pretrained wrote"
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = config.get("architectures") or []
    if any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal_lm"
    model_type = config.get("model_type")
    if not architectures and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal_lm"
    return f"other ({model_type or ', '.join(map(str, architectures)) or 'unknown'})"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def dotted_get(data: dict, path: str, default: Any = None) -> Any:
    node: Any = data
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def skip_reason(attack: str, audited: str | None, kind: str | None, raw: dict[str, Any]) -> str | None:
    """Why this entry cannot run against `audited` (None: it can). `raw` is its attack config as built."""
    if audited is None:
        return None
    binding = BINDINGS.get(attack)
    if binding is None or binding.model is None:
        own = binding.own_target if binding else "its own target"
        return (
            f"{attack} has no field for the audited model: it attacks {own}, so its verdict would not be "
            f"about {audited}. Set `target: none` on the entry to run it on its own target anyway"
        )
    if kind not in binding.kinds:
        return f"{attack} attacks a {' or '.join(binding.kinds)}; {audited} is a {kind}"
    for requirement in binding.requires:
        if dotted_get(raw, requirement.field) in requirement.unset:
            return requirement.reason
    return None


def ran_on(attack: str, validated: dict[str, Any], audited: dict[str, str | None]) -> tuple[str, bool]:
    """(what the run attacked, whether that is one of the audited models) from its validated config."""
    binding = BINDINGS.get(attack)
    if binding is None or binding.model is None:
        return (binding.own_target if binding else "its own target (the attack has no model field)"), False
    value = dotted_get(validated, binding.model)
    for role, name in audited.items():
        if name is None or value is None:
            continue
        from secure_kd.app.report.provenance import model_directory

        directory = model_directory(name)
        names = [name] if directory is None else [name, str(directory)]
        if any(_same_model(str(value), candidate) for candidate in names):
            return f"{name} (the audited {role})", True
    if value in _OWN_VALUES:
        return binding.own_target, False
    return f"{value} (set in the entry's own config)", False


def _same_model(value: str, name: str) -> bool:
    if value == name:
        return True
    try:
        return Path(value).resolve() == Path(name).resolve()
    except OSError:
        return False
