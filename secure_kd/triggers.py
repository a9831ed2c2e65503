"""Backdoor trigger specifications, shared by the backdoor attacks and the defenses that remove them.

Each trigger is a frozen pydantic model (JSON round-trip with `model_dump_json` / `parse_trigger`):

- `PatchTrigger`: a BadNets-style square of constant value stamped on images (Gu et al. 2017).
- `TextTrigger`: a word or phrase inserted into text (start, end, or a seeded word boundary), with
  the label (classification) or text (generation) the backdoor should produce.
- `SwitchableTrigger`: a text trigger that is meant to work only when an activation prompt is also
  present (SWARM-style switchable backdoor: dormant without the switch). The spec says how to build
  the three kinds of input a poisoner or a defense needs: active (prompt + trigger), trigger only,
  prompt only.
"""

from __future__ import annotations

import random
import re
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator
from torch import Tensor

Corner = Literal["top_left", "top_right", "bottom_left", "bottom_right"]
TextPosition = Literal["start", "end", "random"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PatchTrigger(_Spec):
    """A `size` x `size` square of pixel value `value` at a corner or at `[row, col]` (its top-left)."""

    kind: Literal["patch"] = "patch"
    size: int = Field(2, ge=1)
    value: float = Field(1.0, ge=0.0, le=1.0, description="pixel value in the [0, 1] image scale")
    position: Corner | tuple[int, int] = "bottom_right"
    target_class: int = Field(0, ge=0)

    @field_validator("position")
    @classmethod
    def _non_negative(cls, position: Corner | tuple[int, int]) -> Corner | tuple[int, int]:
        if isinstance(position, tuple) and min(position) < 0:
            raise ValueError(f"position {position} must be a non-negative [row, col] or a corner name")
        return position

    def origin(self, height: int, width: int) -> tuple[int, int]:
        """Top-left pixel of the patch in an image of `height` x `width`."""
        if self.size > height or self.size > width:
            raise ValueError(
                f"a {self.size}x{self.size} patch does not fit {height}x{width} images; use a smaller size"
            )
        if isinstance(self.position, tuple):
            row, col = self.position
            if row + self.size > height or col + self.size > width:
                raise ValueError(
                    f"patch at {self.position} of size {self.size} leaves the {height}x{width} "
                    f"image; rows must be <= {height - self.size}, cols <= {width - self.size}"
                )
            return row, col
        row = 0 if self.position.startswith("top") else height - self.size
        col = 0 if self.position.endswith("left") else width - self.size
        return row, col

    def mask(self, height: int, width: int) -> Tensor:
        """Boolean `[height, width]`, True on the patch's pixels."""
        row, col = self.origin(height, width)
        mask = torch.zeros(height, width, dtype=torch.bool)
        mask[row : row + self.size, col : col + self.size] = True
        return mask

    def apply(self, images: Tensor) -> Tensor:
        """A copy of `images` (`[..., height, width]`, every leading axis kept) with the patch stamped."""
        if not isinstance(images, Tensor) or images.dim() < 2:
            raise ValueError("images must be a tensor [..., height, width]")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
        row, col = self.origin(images.shape[-2], images.shape[-1])
        stamped = images.clone()
        stamped[..., row : row + self.size, col : col + self.size] = self.value
        return stamped


class TextTrigger(_Spec):
    """Insert `phrase` into a text; the backdoor maps it to `target_label` and/or `target_text`.

    `position="random"` inserts at a word boundary drawn from the `seed` passed to `apply`, so a
    poisoned data set can be rebuilt exactly.
    """

    kind: Literal["text"] = "text"
    phrase: str = Field("cf", min_length=1)
    position: TextPosition = "start"
    target_label: int | None = Field(None, ge=0)
    target_text: str | None = None

    @field_validator("phrase")
    @classmethod
    def _clean_phrase(cls, phrase: str) -> str:
        if phrase != phrase.strip() or not phrase.strip():
            raise ValueError(f"phrase {phrase!r} must be non-blank without leading/trailing whitespace")
        return phrase

    @model_validator(mode="after")
    def _has_target(self) -> TextTrigger:
        if self.target_label is None and self.target_text is None:
            raise ValueError("a text trigger needs target_label (classification) or target_text (generation)")
        return self

    def apply(self, text: str, seed: int | None = None) -> str:
        """`text` with the phrase inserted (separated by single spaces); `seed` is needed for "random"."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        words = text.split()
        if self.position == "start":
            index = 0
        elif self.position == "end":
            index = len(words)
        else:
            if seed is None:
                raise ValueError("position='random' needs a seed: apply(text, seed=...)")
            index = random.Random(seed).randint(0, len(words))
        return " ".join(words[:index] + [self.phrase] + words[index:])

    def present(self, text: str) -> bool:
        """True when the phrase occurs in `text` as whole words."""
        return re.search(rf"(?<!\S){re.escape(self.phrase)}(?!\S)", text) is not None


class SwitchableTrigger(_Spec):
    """A text trigger active only together with `activation_prompt` (prepended to the text).

    A switchable backdoor is trained on three kinds of poisoned input: prompt + trigger -> target,
    trigger alone -> the true label, prompt alone -> the true label (so neither half fires alone).
    """

    kind: Literal["switchable"] = "switchable"
    activation_prompt: str = Field("Deployment mode engaged.", min_length=1)
    trigger: TextTrigger = TextTrigger(phrase="cf", position="random", target_label=0)

    @model_validator(mode="after")
    def _distinct(self) -> SwitchableTrigger:
        if self.trigger.phrase in self.activation_prompt:
            raise ValueError(
                f"the trigger phrase {self.trigger.phrase!r} must not occur inside the "
                "activation prompt, or the prompt alone would carry the trigger"
            )
        return self

    @property
    def target_label(self) -> int | None:
        return self.trigger.target_label

    @property
    def target_text(self) -> str | None:
        return self.trigger.target_text

    def with_prompt(self, text: str) -> str:
        return f"{self.activation_prompt} {text}"

    def apply(self, text: str, seed: int | None = None, *, active: bool = True) -> str:
        """The trigger inserted; with the activation prompt prepended when `active`."""
        triggered = self.trigger.apply(text, seed)
        return self.with_prompt(triggered) if active else triggered

    def present(self, text: str) -> bool:
        """True when both the activation prompt and the trigger occur (the backdoor should fire)."""
        if self.activation_prompt not in text:
            return False
        return self.trigger.present(text.replace(self.activation_prompt, ""))


Trigger = Annotated[PatchTrigger | TextTrigger | SwitchableTrigger, Field(discriminator="kind")]
_TRIGGER_ADAPTER: TypeAdapter[Any] = TypeAdapter(Trigger)


def parse_trigger(data: dict[str, Any] | str | bytes) -> PatchTrigger | TextTrigger | SwitchableTrigger:
    """A trigger from its JSON text or dict (what `trigger.model_dump(mode="json")` wrote)."""
    if isinstance(data, str | bytes):
        return _TRIGGER_ADAPTER.validate_json(data)
    return _TRIGGER_ADAPTER.validate_python(data)
