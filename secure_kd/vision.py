"""Small classifiers for attack and defense experiments: scikit-learn digits, a CNN, training and KD.

- `load_digits_data(test_fraction, seed)`: the 1,797 8x8 digit images bundled with scikit-learn
  (no download), scaled to [0, 1] as `[n, 1, 8, 8]` float32, split stratified by class with a seed.
- `DigitsCNN(width)`: two conv blocks and a two-layer head; `feature_maps(x)` returns each block's
  activation (attention transfer / NAD), `features(x)` the last one.
- `train_classifier(model, (x, y), ...)`: cross-entropy training, or classic KD from a teacher's soft
  labels through `secure_kd.losses` (Hinton et al.: T**2 scaling of the soft term when
  `scale_by_t2`). Works for any classifier that maps an input tensor to `[batch, classes]` logits
  (images here, padded token ids for `secure_kd.text_classifier`).
- `evaluate_classifier(model, x, y) -> accuracy`, `predict_logits`, and safetensors save/load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from secure_kd.losses import get_loss, loss_info
from secure_kd.metrics import top1_accuracy
from secure_kd.paths import atomic_write_json
from secure_kd.seeding import seeded

DIGITS_CLASSES = 10
DIGITS_SHAPE = (1, 8, 8)
_MODEL_FILE = "model.safetensors"
_META_FILE = "model.json"
_DIGITS_KIND = "secure-kd/digits-cnn"

# (model, inputs, labels) -> inputs to train on; e.g. PGD examples for adversarial training
Perturbation = Callable[[nn.Module, Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DigitsData:
    """Train/test tensors: images `[n, 1, 8, 8]` float32 in [0, 1], labels `[n]` int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        return self.x_test, self.y_test


def load_digits_data(test_fraction: float = 0.25, seed: int = 0) -> DigitsData:
    """scikit-learn's bundled digits (pixel values 0..16, divided by 16), stratified split by `seed`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}; 0.25 is the usual choice")
    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return DigitsData(
        torch.from_numpy(x_train),
        torch.from_numpy(y_train).long(),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test).long(),
    )


# --------------------------------------------------------------------------- model


class DigitsCNN(nn.Module):
    """conv(width) -> conv(2*width) -> 2x2 max-pool -> linear(hidden) -> linear(classes), ReLU between.

    `width` sets the capacity (students are narrower teachers); inputs are `[batch, 1, 8, 8]` in [0, 1].
    """

    def __init__(self, width: int = 16, num_classes: int = DIGITS_CLASSES, hidden: int = 64) -> None:
        super().__init__()
        for name, value in (("width", width), ("num_classes", num_classes), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DigitsCNN {name} must be a positive int, got {value!r}")
        self.width, self.num_classes, self.hidden = width, num_classes, hidden
        self.block1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 4 * 4, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != DIGITS_SHAPE:
            raise ValueError(f"DigitsCNN expects images [batch, 1, 8, 8], got {tuple(x.shape)}")

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        """Each conv block's output: `[b, width, 8, 8]` and `[b, 2*width, 4, 4]`."""
        self._check(x)
        first = self.block1(x)
        return [first, self.block2(first)]

    def features(self, x: Tensor) -> Tensor:
        """The last conv block's activation `[b, 2*width, 4, 4]` (what the head sees)."""
        return self.feature_maps(x)[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def make_digits_cnn(width: int = 16, seed: int = 0, hidden: int = 64) -> DigitsCNN:
    """A `DigitsCNN` whose initial weights depend only on `seed` (the global RNG is left untouched)."""
    with seeded(seed):
        return DigitsCNN(width=width, hidden=hidden)


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


def save_digits_cnn(model: DigitsCNN, directory: str | Path) -> Path:
    """`model.safetensors` + `model.json` (architecture) in `directory`; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    tmp = directory / f".{_MODEL_FILE}.tmp"
    save_file(state, str(tmp))
    tmp.replace(directory / _MODEL_FILE)
    atomic_write_json(
        directory / _META_FILE,
        {
            "kind": _DIGITS_KIND,
            "width": model.width,
            "hidden": model.hidden,
            "num_classes": model.num_classes,
        },
    )
    return directory


def load_digits_cnn(directory: str | Path, device: str | torch.device = "cpu") -> DigitsCNN:
    """A `DigitsCNN` written by `save_digits_cnn` (safetensors only, nothing unpickled), in eval mode."""
    directory = Path(directory)
    meta_path, weights_path = directory / _META_FILE, directory / _MODEL_FILE
    if not (meta_path.is_file() and weights_path.is_file()):
        raise FileNotFoundError(
            f"{directory} has no {_META_FILE} + {_MODEL_FILE}; save one with save_digits_cnn"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("kind") != _DIGITS_KIND:
        raise ValueError(f"{meta_path} describes {meta.get('kind')!r}, not a digits CNN ({_DIGITS_KIND})")
    model = DigitsCNN(width=meta["width"], num_classes=meta["num_classes"], hidden=meta["hidden"])
    model.load_state_dict(load_file(str(weights_path)))
    return model.to(device).eval()
