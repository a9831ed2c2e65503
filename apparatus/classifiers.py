"""Training, scoring and saving the small classifiers of the attacks and defenses.

Any model that maps an input tensor to `[batch, classes]` logits: the digits CNN of `apparatus.digits`,
the bag-of-words model of `apparatus.text_classifier`.

- `train_classifier(model, (x, y), ...)`: cross-entropy training, or classic KD from a teacher's soft
  labels through `secure_kd.losses` (Hinton et al.: T**2 scaling of the soft term when
  `scale_by_t2`), optionally on perturbed inputs (adversarial training).
- `predict_logits`, `evaluate_classifier(model, x, y) -> accuracy`.
- `save_weights` / `load_weights`: a model's safetensors weights plus a `model.json` that names its
  kind and architecture (nothing unpickled), written atomically.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from secure_kd.losses import get_loss, loss_info
from secure_kd.metrics import top1_accuracy
from secure_kd.paths import atomic_write_json

MODEL_FILE = "model.safetensors"
META_FILE = "model.json"

M = TypeVar("M", bound=nn.Module)

# (model, inputs, labels) -> inputs to train on; e.g. PGD examples for adversarial training
Perturbation = Callable[[nn.Module, Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- training


@dataclass
class TrainHistory:
    """Mean training loss per epoch."""

    epoch_losses: list[float] = field(default_factory=list)


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _check_positive(name: str, value: float, *, integer: bool = False) -> None:
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive {'int' if integer else 'number'}, got {value!r}")


def _check_data(data: tuple[Tensor, Tensor | None], need_labels: bool) -> tuple[Tensor, Tensor | None]:
    if not (isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], Tensor)):
        raise ValueError("data must be a pair (inputs, labels) of tensors; labels may be None for KD only")
    x, y = data
    if y is None:
        if need_labels:
            raise ValueError(
                "labels are None but the loss needs them: pass labels, or a teacher with ce_weight=0"
            )
        return x, None
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"labels must be 1-D with one label per input: inputs {tuple(x.shape)}, labels {tuple(y.shape)}"
        )
    if y.dtype != torch.long:
        raise ValueError(f"labels must be int64 class ids, got {y.dtype}")
    return x, y


def train_classifier(
    model: nn.Module,
    data: tuple[Tensor, Tensor | None],
    epochs: int,
    lr: float,
    seed: int,
    *,
    teacher: nn.Module | None = None,
    kd_loss: str | None = None,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    kd_weight: float = 1.0,
    ce_weight: float | None = None,
    ce_temperature: float = 1.0,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    perturb: Perturbation | None = None,
) -> TrainHistory:
    """Train `model` in place with Adam on `data = (inputs, labels)`, shuffled per epoch by `seed`.

    Without a teacher the loss is cross-entropy at `ce_temperature` (1 normally; T for the teacher of
    defensive distillation, Papernot et al. 2016). With a teacher (kept in eval mode, no gradients):
        kd_weight * [T**2 if scale_by_t2] * kd_loss(student, teacher, temperature=T)
        + ce_weight * CE(student, labels)            (ce_weight defaults to 0 with a teacher)
    `kd_loss` is any registered logit objective (`secure_kd.losses`; default "forward_kl"); the
    objectives never scale by T**2 themselves. `perturb(model, x, y)`, when given, replaces every
    batch's inputs before the step (adversarial training); the teacher sees the perturbed inputs too.
    Batches go to the model's device. Returns the mean loss per epoch.
    """
    _check_positive("epochs", epochs, integer=True)
    _check_positive("lr", lr)
    _check_positive("batch_size", batch_size, integer=True)
    _check_positive("temperature", temperature)
    _check_positive("ce_temperature", ce_temperature)
    if teacher is None and kd_loss is not None:
        raise ValueError(f"kd_loss={kd_loss!r} was given without a teacher; pass teacher=... or drop kd_loss")
    if ce_weight is None:
        ce_weight = 0.0 if teacher is not None else 1.0
    if ce_weight < 0 or kd_weight < 0 or (teacher is None and ce_weight == 0):
        raise ValueError(
            f"weights must be >= 0 with something to learn from (ce_weight={ce_weight}, "
            f"kd_weight={kd_weight}, teacher={'yes' if teacher is not None else 'no'})"
        )
    kd_objective = None
    if teacher is not None:
        kd_loss = kd_loss or "forward_kl"
        info = loss_info(kd_loss)
        if info.stateful or info.inputs != "logits" or not info.needs_teacher:
            raise ValueError(
                f"kd_loss {kd_loss!r} is not a stateless teacher-logit objective; use e.g. "
                "forward_kl, reverse_kl, jsd or tvd"
            )
        kd_objective = get_loss(kd_loss)
        teacher.eval()
    x_all, y_all = _check_data(data, need_labels=ce_weight > 0)
    ce = get_loss("ce")
    device = _model_device(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    kd_scale = kd_weight * (temperature**2 if scale_by_t2 else 1.0)
    history = TrainHistory()
    n = x_all.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            x = x_all[index].to(device)
            y = None if y_all is None else y_all[index].to(device)
            if perturb is not None:
                x = perturb(model, x, y).detach()
            model.train()
            logits = model(x)
            loss = logits.new_zeros(())
            if ce_weight > 0:
                loss = loss + ce_weight * ce(logits, None, y, temperature=ce_temperature)
            if kd_objective is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x)
                loss = loss + kd_scale * kd_objective(logits, teacher_logits, temperature=temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * index.numel()
        history.epoch_losses.append(total / n)
    model.eval()
    return history


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """The model's logits `[n, classes]` on CPU, in eval mode, `batch_size` inputs at a time."""
    model.eval()
    device = _model_device(model)
    chunks = [
        model(x[start : start + batch_size].to(device)).float().cpu()
        for start in range(0, x.shape[0], batch_size)
    ]
    if not chunks:
        raise ValueError("no inputs to predict on (x is empty)")
    return torch.cat(chunks)


def evaluate_classifier(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` on `(x, y)`."""
    return top1_accuracy(predict_logits(model, x, batch_size), y.cpu())


# --------------------------------------------------------------------------- save / load


def save_weights(model: nn.Module, directory: str | Path, meta: dict[str, Any]) -> Path:
    """`model.safetensors` (the state dict) + `model.json` (`meta`: kind and architecture) in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    tmp = directory / f".{MODEL_FILE}.tmp"
    save_file(state, str(tmp))
    tmp.replace(directory / MODEL_FILE)
    atomic_write_json(directory / META_FILE, meta)
    return directory


def read_meta(directory: str | Path, kind: str, *, what: str, saver: str) -> dict[str, Any]:
    """The `model.json` of a model `saver` wrote to `directory`; refuses a missing file, or another kind
    than `kind` (`what` names the expected model in the message)."""
    directory = Path(directory)
    meta_path, weights_path = directory / META_FILE, directory / MODEL_FILE
    if not (meta_path.is_file() and weights_path.is_file()):
        raise FileNotFoundError(f"{directory} has no {META_FILE} + {MODEL_FILE}; save one with {saver}")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("kind") != kind:
        raise ValueError(f"{meta_path} describes {meta.get('kind')!r}, not {what}")
    return meta


def load_weights(model: M, directory: str | Path) -> M:
    """`model` with the safetensors weights of `directory` loaded (strict)."""
    model.load_state_dict(load_file(str(Path(directory) / MODEL_FILE)))
    return model
