"""Tiny causal-LM plumbing shared by the LM defenses: data, CE training, KD through the engine's
Distiller, canary exposure and held-out perplexity. Defenses never import attacks, so this is a small,
self-contained counterpart of what the memorization attack does."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from secure_kd.config import KDConfig, Strict, TinyModelConfig, TrainConfig
from secure_kd.data import Canary, TokenizedExample, collate, generate_corpus, train_tiny_tokenizer
from secure_kd.evaluate import canary_exposure, per_example_loss, perplexity
from secure_kd.models import build_tiny
from secure_kd.teacher_targets import TeacherTargets
from secure_kd.trainer import fit_in_scratch

PAD_ID = 0  # the tiny tokenizer's <|endoftext|>: eos and pad


class LMRecipe(Strict):
    """A tiny Llama and how long it trains."""

    model: TinyModelConfig = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4)
    epochs: float = Field(15.0, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-3, gt=0)


class CanaryCorpus(Strict):
    """The synthetic corpus (Faker records with PII spans) with Secret-Sharer canaries."""

    n_records: int = Field(60, gt=0)
    n_canaries: int = Field(2, ge=1)
    canary_repeats: int | list[int] = Field(
        8, description="insertions per canary (one number or one per canary)"
    )
    secret_digits: int = Field(3, ge=1, le=5, description="the whole 10^digits space is enumerated")
    heldout_fraction: float = Field(0.25, gt=0, lt=1)
    max_length: int = Field(64, ge=16)
    tokenizer_vocab: int = Field(512, ge=259)


def public_tokenizer(seed: int, vocab: int) -> Any:
    """A byte-level BPE tokenizer trained on fresh canary-free records: a tokenizer trained on the
    canaries could hold a secret as one token and fake exposure."""
    return train_tiny_tokenizer(generate_corpus(200, seed=seed + 104729, n_canaries=0).texts(), vocab)


def encode(texts: Sequence[str], tokenizer: Any, max_length: int) -> list[TokenizedExample]:
    """`tokenizer(text)` + eos per text, truncated to `max_length`, every token trained."""
    examples = []
    for index, text in enumerate(texts):
        ids = (list(tokenizer(text)["input_ids"]) + [tokenizer.eos_token_id])[:max_length]
        examples.append(TokenizedExample(ids, list(ids), index, truncated=len(ids) == max_length))
    return examples


def new_model(recipe: LMRecipe, vocab: int, seed: int) -> nn.Module:
    return build_tiny(recipe.model, vocab, seed=seed, pad_token_id=PAD_ID)


def _train(
    model: nn.Module,
    examples: list[TokenizedExample],
    recipe: LMRecipe,
    kd: KDConfig,
    *,
    seed: int,
    device: torch.device,
    targets: TeacherTargets | None = None,
) -> list[float]:
    train = TrainConfig(
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        precision="fp32",
    )
    fit = fit_in_scratch(model, examples, kd, train, pad_id=PAD_ID, seed=seed, device=device, targets=targets)
    return fit.losses


def train_ce(model, examples, recipe: LMRecipe, *, seed: int, device: torch.device) -> list[float]:
    """Cross-entropy training in place (the engine's Distiller with kd_weight 0)."""
    kd = KDConfig(kd_weight=0.0, ce_weight=1.0, top_k=None)
    return _train(model, examples, recipe, kd, seed=seed, device=device)


def distil(
    student: nn.Module,
    targets: TeacherTargets,
    examples: list[TokenizedExample],
    recipe: LMRecipe,
    *,
    temperature: float,
    seed: int,
    device: torch.device,
) -> list[float]:
    """Forward-KL distillation in place from `targets` (full logits), no hard-label term."""
    kd = KDConfig(loss="forward_kl", temperature=temperature, kd_weight=1.0, ce_weight=0.0, top_k=None)
    return _train(student, examples, recipe, kd, seed=seed, device=device, targets=targets)


def exposures(
    model: nn.Module, tokenizer: Any, canaries: Sequence[Canary], digits: int, device: torch.device
) -> list[float]:
    """Exact exposure (bits) of each canary over its whole secret space, scored after the text before
    the secret (the trailing space goes in front of every candidate, where BPE puts it)."""
    space = [f"{i:0{digits}d}" for i in range(10**digits)]
    values = []
    for canary in canaries:
        head = canary.prefix.rstrip()
        gap = canary.prefix[len(head) :]
        result = canary_exposure(
            model,
            tokenizer,
            head,
            [gap + s for s in space],
            gap + canary.secret,
            batch_size=512,
            device=device,
        )
        values.append(float(result["exposure"]))
    return values


def heldout_perplexity(model: nn.Module, examples: list[TokenizedExample], device: torch.device) -> float:
    batches = [collate(examples[i : i + 32], pad_id=PAD_ID) for i in range(0, len(examples), 32)]
    return float(perplexity(model, batches, device=device)["perplexity"])


def example_losses(model: nn.Module, examples: list[TokenizedExample], device: torch.device) -> list[float]:
    """Mean next-token NLL (nats) of each example, in order."""
    batches = (collate(examples[i : i + 32], pad_id=PAD_ID) for i in range(0, len(examples), 32))
    return [float(x) for x in per_example_loss(model, batches, device=device)]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan
