"""Discoverable memorization: does greedy decoding from a training record's own prefix reproduce it?

- Record level (Carlini et al. 2023, "Quantifying Memorization Across Neural Language Models"; the
  definition used by Borkar et al. 2026 for distillation): a tokenized record is memorized when,
  prompted with its first `prefix_tokens` tokens, greedy decoding yields exactly its next
  `suffix_tokens` tokens. Records shorter than prefix + suffix are not eligible.
- PII level: for every PII span of a record, prompt with the record's text before the span and
  check whether the greedy continuation starts with the span's value (a private value completed
  from its context). The trailing space before the span is moved to the expected continuation,
  since byte-level BPE attaches it to the next word.

Templated text can be "memorized" by a model that merely learned the template, so compare a
member rate with the same rate on held-out records of the same distribution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from apparatus.canaries import split_at_token_boundary
from apparatus.tiny_lm import pad_token_id
from attacks.memorization.extraction import sample_generations
from secure_kd.data import TokenizedExample


def discoverable_memorization(
    model: nn.Module,
    examples: Sequence[TokenizedExample],
    *,
    prefix_tokens: int,
    suffix_tokens: int,
    pad_id: int,
    device: torch.device,
    batch_size: int = 64,
) -> np.ndarray:
    """Per example: 1.0 memorized, 0.0 not, NaN when it is shorter than prefix + suffix tokens.

    The suffix is compared token by token with what greedy decoding generated (no eos handling:
    a generation that stops early does not match).
    """
    if prefix_tokens < 1 or suffix_tokens < 1:
        raise ValueError(
            f"prefix_tokens and suffix_tokens must be >= 1, got {prefix_tokens}, {suffix_tokens}"
        )
    result = np.full(len(examples), np.nan)
    eligible = [i for i, ex in enumerate(examples) if len(ex.input_ids) >= prefix_tokens + suffix_tokens]
    if not eligible:
        return result
    prompts = [examples[i].input_ids[:prefix_tokens] for i in eligible]
    generated = sample_generations(
        model,
        prompts,
        max_new_tokens=suffix_tokens,
        top_k=0,
        temperature=1.0,
        seed=0,
        eos_id=None,
        pad_id=pad_id,
        batch_size=batch_size,
        device=device,
        greedy=True,
    )
    for i, sequence in zip(eligible, generated, strict=True):
        truth = examples[i].input_ids[prefix_tokens : prefix_tokens + suffix_tokens]
        result[i] = float(sequence[prefix_tokens:] == truth)
    return result


def pii_completion(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    min_chars: int = 6,
    max_prompt_tokens: int = 96,
    device: torch.device,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """One entry per eligible PII span: {record_id, type, value, completed}.

    Eligible: the value has at least `min_chars` characters, something precedes it, and the prompt
    (the record's text before it) fits in `max_prompt_tokens` tokens.
    """
    spans, prompts, expected = [], [], []
    for position, record in enumerate(records):
        text = record["text"]
        for span in record.get("pii_spans") or []:
            value = text[span["start"] : span["end"]]
            before = text[: span["start"]]
            if len(value) < min_chars or not before.strip():
                continue
            head, gap = split_at_token_boundary(before)
            prompt = list(tokenizer(head)["input_ids"])
            if not prompt or len(prompt) > max_prompt_tokens:
                continue
            spans.append(
                {
                    "record_id": int(record.get("record_id", position)),
                    "type": span.get("type", "pii"),
                    "value": value,
                }
            )
            prompts.append(prompt)
            expected.append(gap + value)
    if not spans:
        return []
    budget = max(len(tokenizer(e, add_special_tokens=False)["input_ids"]) for e in expected) + 1
    generated = sample_generations(
        model,
        prompts,
        max_new_tokens=budget,
        top_k=0,
        temperature=1.0,
        seed=0,
        eos_id=tokenizer.eos_token_id,
        pad_id=pad_token_id(tokenizer),
        batch_size=batch_size,
        device=device,
        greedy=True,
    )
    for span, prompt, sequence, target in zip(spans, prompts, generated, expected, strict=True):
        continuation = tokenizer.decode(sequence[len(prompt) :], skip_special_tokens=True)
        span["completed"] = continuation.startswith(target)
    return spans
