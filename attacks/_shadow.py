"""Tiny causal LMs for attacks: train them (targets, shadow and reference models), score texts with them.

Training goes through the engine's `Distiller` with cross-entropy only (kd_weight 0, ce_weight 1),
so a shadow model is trained exactly like a CE student of this project; the Distiller's final
checkpoint lands in a temporary directory that is removed afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from secure_kd.config import KDConfig, Strict, TinyModelConfig, TrainConfig
from secure_kd.data import TokenizedExample, collate, tokenize_records, train_tiny_tokenizer
from secure_kd.evaluate import per_example_loss
from secure_kd.models import build_tiny, load_tokenizer
from secure_kd.trainer import FitResult, fit_in_scratch


class TrainRecipe(Strict):
    """How a tiny model is built and trained with cross-entropy (targets, shadows, references)."""

    model: TinyModelConfig = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4)
    epochs: float = Field(10.0, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"


def resolve_tokenizer(spec: str, texts: Sequence[str]) -> Any:
    """`tiny:<vocab>` trains a byte-level BPE tokenizer on `texts`; anything else is a local directory."""
    if spec.startswith("tiny:"):
        size = spec.removeprefix("tiny:")
        if not size.isdigit():
            raise ValueError(f"tokenizer {spec!r}: write tiny:<vocab size>, e.g. tiny:512")
        return train_tiny_tokenizer(texts, int(size))
    return load_tokenizer(spec)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id (what collation pads with)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return int(pad)


def tokenize_texts(texts: Sequence[str], tokenizer: Any, max_length: int) -> list[TokenizedExample]:
    """One example per text (every token trained, eos appended), in order; refuses an empty text."""
    records = [{"text": text} for text in texts]
    examples = tokenize_records(records, tokenizer, max_length=max_length, schema="text")
    if len(examples) != len(records):
        kept = {example.record_index for example in examples}
        missing = next(i for i in range(len(records)) if i not in kept)
        raise ValueError(f"text {missing} gives no token to score (is it empty?); drop it from the data")
    return examples


def build_model(recipe: TrainRecipe, vocab_size: int, *, seed: int, pad_id: int | None) -> nn.Module:
    return build_tiny(recipe.model, vocab_size, seed=seed, pad_token_id=pad_id)


def train_causal_lm(
    model: nn.Module,
    examples: Sequence[TokenizedExample],
    recipe: TrainRecipe,
    *,
    pad_id: int,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> FitResult:
    """Train `model` in place with cross-entropy on `examples` for `recipe.epochs` epochs."""
    if not examples:
        raise ValueError("no training examples: a model cannot be trained on an empty set")
    kd = KDConfig(kd_weight=0.0, ce_weight=1.0, top_k=None)
    train = TrainConfig(
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        schedule=recipe.schedule,
        precision="fp32",
    )
    return fit_in_scratch(
        model, list(examples), kd, train, pad_id=pad_id, seed=seed, device=device, progress=progress
    )


def example_losses(
    model: nn.Module,
    examples: Sequence[TokenizedExample],
    *,
    pad_id: int,
    device: torch.device,
    batch_size: int = 64,
) -> np.ndarray:
    """Mean next-token NLL (nats) of each example, float64 [n_examples], in order."""
    if not examples:
        raise ValueError("no examples to score")
    batches = (
        collate(examples[start : start + batch_size], pad_id=pad_id)
        for start in range(0, len(examples), batch_size)
    )
    return per_example_loss(model, batches, device=device).double().numpy()


def balanced_membership(n_examples: int, n_models: int, seed: int) -> np.ndarray:
    """Bool [n_examples, n_models]: example i is in model j's training set.

    Every example is IN for exactly half the models (LiRA's design, Carlini et al. 2022), chosen at
    random per example, so each example has n_models/2 IN and n_models/2 OUT shadows.
    """
    if n_models < 2 or n_models % 2:
        raise ValueError(f"n_shadows must be an even number >= 2 (half IN, half OUT), got {n_models}")
    if n_examples < 1:
        raise ValueError(f"n_examples must be >= 1, got {n_examples}")
    rng = np.random.default_rng([seed, 0x5AD0])
    order = rng.random((n_examples, n_models)).argsort(axis=1)
    return order < n_models // 2
