"""An organization's student on disk between messages: one safetensors file, full weights or an adapter.

- A full student (tiny, a local directory, `teacher_layers`) is saved with every tied tensor stored
  once, as Hugging Face's `save_pretrained` does. SmolLM2 ties `lm_head.weight` to
  `model.embed_tokens.weight`; `safetensors.torch.save_file` refuses two names for one storage. The
  file's metadata names each dropped alias and the name it shares storage with; loading copies into
  the freshly built student, whose own ties carry the values to the aliases, and it refuses the file
  when the student does not share those names (the job's architecture changed).
- A PEFT (LoRA) student is saved as its adapter: the tensors and names of PEFT's
  `adapter_model.safetensors` (`get_peft_model_state_dict`), megabytes instead of the base model's
  hundreds. The base is rebuilt from the job: PEFT freezes it, so training never changes it.

The metadata key `secure-kd-student` says which (`full` or `adapter`); loading checks that every
tensor of the file lands in the student and that every weight of the student came from the file.
The file is written to a temporary name and renamed, so a kill mid-save leaves the previous student.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_KEY = "secure-kd-student"
TIED_KEY = "secure-kd-tied"


class StudentFileError(ValueError):
    """A saved student does not fit the student the job builds; the message says how to go on."""


def is_adapter_model(model: nn.Module) -> bool:
    """True for a PEFT model (its adapters are what training changes)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """alias -> kept name for every tensor of `state` that is the same view of a storage as an earlier
    one (state-dict order, so Llama keeps `model.embed_tokens.weight`). Other overlaps are refused."""
    first: dict[int, tuple[str, tuple]] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage().data_ptr()
        view = (tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if storage not in first:
            first[storage] = (name, view)
        elif first[storage][1] == view:
            aliases[name] = first[storage][0]
        else:
            raise StudentFileError(
                f"student tensors {first[storage][0]!r} and {name!r} overlap in memory without being the "
                "same tensor; secure-kd saves tied weights only when they are identical"
            )
    return aliases


def _full_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    state = model.state_dict()
    aliases = tied_aliases(state)
    return {k: _cpu(v) for k, v in state.items() if k not in aliases}, {FORMAT_KEY: "full"} | {
        TIED_KEY: json.dumps(aliases, sort_keys=True)
    }


def _adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: "auto" may look the base model up on the Hub to decide
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    if len(state) != len(trainable) or sum(t.numel() for t in state.values()) != sum(trainable.values()):
        raise StudentFileError(
            f"the LoRA student trains {len(trainable)} tensors but its adapter holds {len(state)}: "
            "parameters outside the adapters are trainable, and saving the adapter alone would lose them"
        )
    return {k: _cpu(v) for k, v in state.items()}, {FORMAT_KEY: "adapter", "format": "pt"}


def save_student_file(model: nn.Module, path: str | Path) -> None:
    """Write `model` to `path` (a full student with its ties, or a LoRA student's adapter), atomically."""
    path = Path(path)
    state, metadata = _adapter_state(model) if is_adapter_model(model) else _full_state(model)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def student_file_metadata(path: str | Path) -> dict[str, str]:
    """The file's metadata: `secure-kd-student` (full or adapter; absent in files of older runs, which
    are full and untied) and, for a full student, `secure-kd-tied` (JSON alias -> kept name)."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _mismatch(path: Path, what: str) -> StudentFileError:
    return StudentFileError(
        f"{path} does not fit the student this job builds ({what}): it was saved by a run with another "
        "student; start the run afresh (a new run removes it) or restore the job it belongs to"
    )


def _load_full(model: nn.Module, path: Path, metadata: dict[str, str], device: str) -> None:
    state = load_file(str(path), device=device)
    saved_aliases = json.loads(metadata.get(TIED_KEY, "{}"))
    model_aliases = tied_aliases(model.state_dict())
    if saved_aliases != model_aliases:
        raise _mismatch(path, f"tied weights {saved_aliases} saved, {model_aliases} in the student")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise _mismatch(path, str(exc).splitlines()[0]) from None
    missing = sorted(set(missing) - set(saved_aliases))
    if missing or unexpected:
        raise _mismatch(path, f"missing {missing[:3]}, unexpected {sorted(unexpected)[:3]}")


def _load_adapter(model: nn.Module, path: Path, device: str) -> None:
    from peft import set_peft_model_state_dict

    state = load_file(str(path), device=device)
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError as exc:
        raise _mismatch(path, str(exc).splitlines()[0]) from None
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable & set(result.missing_keys))
    if missing or result.unexpected_keys:
        raise _mismatch(
            path, f"adapter weights missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


def load_student_file(model: nn.Module, path: str | Path, *, device: torch.device | str = "cpu") -> None:
    """Load what `save_student_file` wrote into `model` (the student the job builds), in place."""
    path = Path(path)
    metadata = student_file_metadata(path)
    kind = metadata.get(FORMAT_KEY, "full")
    if kind not in ("full", "adapter"):
        raise _mismatch(path, f"unknown format {kind!r}")
    if (kind == "adapter") != is_adapter_model(model):
        saved = "a LoRA adapter" if kind == "adapter" else "a full model"
        built = "a LoRA student" if is_adapter_model(model) else "a student without LoRA"
        raise _mismatch(path, f"it holds {saved}, the job builds {built}")
    if kind == "adapter":
        _load_adapter(model, path, str(device))
    else:
        _load_full(model, path, metadata, str(device))
