"""Tiny causal LMs for attacks and defenses: tokenizers, tokenized texts, models, training and scoring.

Targets, shadow and reference models (attacks) and teachers and students (defenses) are small Llamas
(`secure_kd.models.build_tiny`) trained through the engine's `Distiller` in a scratch directory
(`secure_kd.trainer.fit_in_scratch`): with cross-entropy only (`train_causal_lm`: kd_weight 0,
ce_weight 1), exactly like a CE student of this project, or by forward-KL distillation from teacher
targets (`distil`). A tokenizer meant to measure memorization is trained on public, canary-free text
(`public_texts`, `public_tokenizer`): one trained on the canaries could hold a secret as one token and
fake exposure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from secure_kd.config import KDConfig, Strict, TinyModelConfig, TrainConfig
from secure_kd.data import TokenizedExample, collate, generate_corpus, tokenize_records, train_tiny_tokenizer
from secure_kd.evaluate import per_example_loss, perplexity
from secure_kd.models import build_tiny, load_tokenizer
from secure_kd.teacher_targets import TeacherTargets
from secure_kd.trainer import FitResult, fit_in_scratch

# Public text is the synthetic corpus under another seed than the private one: seed + this offset.
PUBLIC_SEED_OFFSET = 104729


class LMRecipe(Strict):
    """A tiny Llama and how long it trains."""

    model: TinyModelConfig = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4)
    epochs: float = Field(15.0, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-3, gt=0)

    def train_config(self) -> TrainConfig:
        """The engine's optimizer loop for this recipe (fp32; AdamW, cosine schedule, no weight decay)."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, precision="fp32")


class TrainRecipe(LMRecipe):
    """How a tiny model is built and trained with cross-entropy (targets, shadows, references)."""

    epochs: float = Field(10.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            schedule=self.schedule,
            precision="fp32",
        )


# --------------------------------------------------------------------------- tokenizers and data


def public_texts(n_records: int, seed: int) -> list[str]:
    """Fresh synthetic records without canaries (a stand-in for public in-domain text)."""
    return generate_corpus(n_records, seed=seed + PUBLIC_SEED_OFFSET, n_canaries=0).texts()


def public_tokenizer(seed: int, vocab: int) -> Any:
    """A byte-level BPE tokenizer trained on 200 public records (`public_texts`)."""
    return train_tiny_tokenizer(public_texts(200, seed), vocab)


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


# --------------------------------------------------------------------------- models and training


def build_model(recipe: LMRecipe, vocab_size: int, *, seed: int, pad_id: int | None) -> nn.Module:
    return build_tiny(recipe.model, vocab_size, seed=seed, pad_token_id=pad_id)


def train_causal_lm(
    model: nn.Module,
    examples: Sequence[TokenizedExample],
    recipe: LMRecipe,
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
    return fit_in_scratch(
        model,
        list(examples),
        kd,
        recipe.train_config(),
        pad_id=pad_id,
        seed=seed,
        device=device,
        progress=progress,
    )


def distil(
    student: nn.Module,
    targets: TeacherTargets,
    examples: Sequence[TokenizedExample],
    recipe: LMRecipe,
    *,
    temperature: float,
    pad_id: int,
    seed: int,
    device: torch.device,
) -> FitResult:
    """Forward-KL distillation in place from `targets` (full logits), no hard-label term."""
    kd = KDConfig(loss="forward_kl", temperature=temperature, kd_weight=1.0, ce_weight=0.0, top_k=None)
    train = recipe.train_config()
    return fit_in_scratch(
        student, list(examples), kd, train, pad_id=pad_id, seed=seed, device=device, targets=targets
    )


# --------------------------------------------------------------------------- scoring


def _batches(examples: Sequence[TokenizedExample], pad_id: int, batch_size: int):
    return (
        collate(examples[start : start + batch_size], pad_id=pad_id)
        for start in range(0, len(examples), batch_size)
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
    return per_example_loss(model, _batches(examples, pad_id, batch_size), device=device).double().numpy()


def heldout_perplexity(
    model: nn.Module,
    examples: Sequence[TokenizedExample],
    *,
    pad_id: int,
    device: torch.device,
    batch_size: int = 32,
) -> float:
    """Token-level perplexity of `model` on `examples` (e.g. held-out clean records)."""
    return float(perplexity(model, list(_batches(examples, pad_id, batch_size)), device=device)["perplexity"])
