"""The digits task of the image attacks and defenses: scikit-learn's bundled digits and a small CNN.

- `load_digits_data(test_fraction, seed)`: the 1,797 8x8 digit images bundled with scikit-learn
  (no download), scaled to [0, 1] as `[n, 1, 8, 8]` float32, split stratified by class with a seed.
- `DigitsCNN(width)`: two conv blocks and a two-layer head; `feature_maps(x)` returns each block's
  activation (attention transfer / NAD), `features(x)` the last one.
- `save_digits_cnn` / `load_digits_cnn`: safetensors weights and the architecture in `model.json`.

Training and scoring are `apparatus.classifiers` (`train_classifier`, `evaluate_classifier`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from apparatus.classifiers import load_weights, read_meta, save_weights
from secure_kd.seeding import seeded

DIGITS_CLASSES = 10
DIGITS_SHAPE = (1, 8, 8)
_DIGITS_KIND = "secure-kd/digits-cnn"


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


# --------------------------------------------------------------------------- save / load


def save_digits_cnn(model: DigitsCNN, directory: str | Path) -> Path:
    """`model.safetensors` + `model.json` (architecture) in `directory`; returns the directory."""
    meta = {
        "kind": _DIGITS_KIND,
        "width": model.width,
        "hidden": model.hidden,
        "num_classes": model.num_classes,
    }
    return save_weights(model, directory, meta)


def load_digits_cnn(directory: str | Path, device: str | torch.device = "cpu") -> DigitsCNN:
    """A `DigitsCNN` written by `save_digits_cnn` (safetensors only, nothing unpickled), in eval mode."""
    meta = read_meta(directory, _DIGITS_KIND, what=f"a digits CNN ({_DIGITS_KIND})", saver="save_digits_cnn")
    model = DigitsCNN(width=meta["width"], num_classes=meta["num_classes"], hidden=meta["hidden"])
    return load_weights(model, directory).to(device).eval()
