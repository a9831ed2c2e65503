"""What kind of model a directory holds, read from its metadata without loading any weights.

`model_kind(name)` is one of `MODEL_KINDS`: `causal_lm` (a Hugging Face causal LM, by its config.json,
or the 'smollm2' asset), `digits_cnn` and `text_classifier` (secure-kd's own classifiers, by the `kind`
their model.json names), or `other (<model_type>)` for anything else that has a config.json. A name that
is no model directory raises `NotAModelError` naming the path and the fix. Plugins declare the kinds
their target field takes (`secure_kd.plugins.Plugin.kinds`); the audit and the CLI compare the two.
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_KINDS = ("causal_lm", "digits_cnn", "text_classifier")
# What apparatus.digits.save_digits_cnn and apparatus.text_classifier.save_text_classifier write.
_SECURE_KD_KINDS = {
    "secure-kd/digits-cnn": "digits_cnn",
    "secure-kd/bag-of-words-classifier": "text_classifier",
}


class NotAModelError(ValueError):
    """The name is neither 'smollm2' nor a directory holding a model."""


def model_kind(name: str) -> str:
    """`causal_lm`, `digits_cnn`, `text_classifier` or `other (<model_type>)`; NotAModelError otherwise."""
    if name == "smollm2":
        return "causal_lm"
    path = Path(name)
    if not path.is_dir():
        raise NotAModelError(
            f"{name!r} does not exist or is not a directory; give a local model directory (a Hugging Face "
            "save_pretrained directory with config.json) or 'smollm2'"
        )
    meta = _read_json(path / "model.json")
    if meta is not None and meta.get("kind") in _SECURE_KD_KINDS:
        return _SECURE_KD_KINDS[meta["kind"]]
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
