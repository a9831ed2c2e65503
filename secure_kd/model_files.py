"""Model files on disk: safetensors checks, the directory behind a source, and loading a causal LM or its
tokenizer from it (safetensors only; `trust_remote_code` off unless asked for by name).

Below `secure_kd.models` (which builds teachers and students from configs) so that what only needs a
checked directory, such as the served teacher's reference model, does not import the model builders.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# transformers builds the model on the meta device through process-wide state: two threads loading at
# once can get each other's empty tensors ("Cannot copy out of meta tensor"). Loads take turns.
_LOADING = threading.Lock()


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says which path and what to do."""


MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit on the JSON header
RESAVE_HINT = (
    "copy the file again (an interrupted copy or download leaves it short), or re-save the model with "
    "`model.save_pretrained(dir, safe_serialization=True)`"
)


def check_safetensors_file(path: Path) -> None:
    """Refuse a truncated or corrupt safetensors file before transformers reads it.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's byte
    range, then the data: the file must be exactly 8 + header + the end of the last range.
    """
    size = path.stat().st_size
    what = f"weights file {str(path)!r}"
    if size < 8:
        raise ModelLoadError(f"{what} is {size} bytes, too short to be safetensors; {RESAVE_HINT}")
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        if header_len > min(size - 8, MAX_SAFETENSORS_HEADER_BYTES):
            raise ModelLoadError(
                f"{what} is not a complete safetensors file (its header claims {header_len} bytes, the file "
                f"has {size}); {RESAVE_HINT}"
            )
        try:
            header = json.loads(fh.read(header_len))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ModelLoadError(f"{what} has a corrupt safetensors header; {RESAVE_HINT}") from None
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        state = "truncated" if size < expected else "longer than its header describes"
        raise ModelLoadError(
            f"{what} is {state}: {size} bytes where its header describes {expected}; {RESAVE_HINT}"
        )


def resolve_source(source: str) -> Path:
    """The local directory behind a model source ('smollm2' or a path)."""
    if source == "smollm2":
        from secure_kd.assets import fetch_smollm2

        return fetch_smollm2()
    path = Path(source)
    if not path.is_dir():
        raise ModelLoadError(
            f"model path {source!r} is not a directory; give a local Hugging Face model directory "
            "or 'smollm2' (fetched with `secure-kd assets fetch-smollm2`)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{source!r} has no config.json: it is not a Hugging Face model directory")
    return path


def load_tokenizer(source: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_source(str(source))
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a tokenizer from {str(path)!r}: {exc}") from None


def load_pretrained(
    source: str | Path, *, dtype: str = "float32", trust_remote_code: bool = False
) -> nn.Module:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = resolve_source(str(source))
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(
            f"{str(path)!r} has no .safetensors weights; secure-kd does not unpickle .bin checkpoints. "
            "Convert them once with `model.save_pretrained(dir, safe_serialization=True)` "
            "in a trusted session."
        )
    for file in weights:
        try:
            check_safetensors_file(file)
        except ModelLoadError as exc:
            if str(source) != "smollm2":
                raise
            raise ModelLoadError(
                f"{exc}. For the SmolLM2 asset: `secure-kd assets fetch-smollm2 --force` converts it again"
            ) from None
    try:
        with _LOADING:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelLoadError(f"could not load a causal LM from {str(path)!r}: {exc}") from None
    return model
