"""Bits per byte: a language model's loss per UTF-8 byte of text, comparable across tokenizers.

Perplexity per token depends on the tokenizer: a tokenizer with longer tokens has fewer, harder
predictions. The loss of the whole text does not: the probability a model gives a text is the product
of its tokens' probabilities whatever the tokenization. Dividing that total by the text's length in
bytes gives a number two models with different tokenizers can be compared on:

    bits_per_byte    = sum over the text's tokens of -log2 p(token | before) / (bytes of the text)
    byte_perplexity  = 2 ** bits_per_byte = exp(total NLL in nats / bytes)

(as lm-evaluation-harness's `bits_per_byte`). The text scored is that of the byte spans
(`secure_kd.data.paired`): every target token whose span lies in the shared text is scored, and the
bytes counted are those the scored spans cover. The end-of-sequence token appended after the text
covers no byte and is not part of it: it is left out unless `include_eos`. With `PairedExample`s both
sides cover the same bytes (the pair's `[aligned_start, aligned_end)`), so a teacher and a student,
or two students with different tokenizers, are scored on exactly the same text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from secure_kd.cross_teacher import stack_example_spans
from secure_kd.data.collate import collate
from secure_kd.data.paired import PairedExample
from secure_kd.evaluate._model_io import evaluation_mode, model_logits, prepare_batch, resolve_device


def paired_batches(
    pairs: Sequence[PairedExample], side: str, *, pad_id: int, batch_size: int, limit: int | None = None
) -> list[dict[str, Tensor]]:
    """Collated batches of one side ("student" or "teacher") of paired examples, with `byte_spans`
    [batch, seq, 2] (per token, unshifted; (-1, -1) outside the shared text) added."""
    if side not in ("student", "teacher"):
        raise ValueError(f"side must be 'student' or 'teacher', got {side!r}")
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = collate([getattr(p, side) for p in chunk], pad_id=pad_id)
        spans = [getattr(p, f"{side}_spans") for p in chunk]
        batch["byte_spans"] = stack_example_spans(spans, batch["input_ids"].shape[1])
        out.append(batch)
        if limit is not None and len(out) >= limit:
            break
    return out


def bits_per_byte(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    eos_id: int | None = None,
    include_eos: bool = False,
    device: str | torch.device | None = None,
    per_example: bool = False,
) -> dict[str, Any]:
    """Bits per byte and per-byte perplexity of `model` on the text the batches' byte spans cover.

    Batches hold input_ids, attention_mask, labels and `byte_spans` (see `paired_batches`). A position
    t is scored when its target (token t + 1) has a label and a span in the text; a zero-width target
    equal to `eos_id` (the appended end of sequence) only with `include_eos`. Returns `bits_per_byte`,
    `byte_perplexity`, `nll` (total, nats), `bytes` and `tokens` (scored); with `per_example`, also
    `example_nll` and `example_bytes`, one entry per row of the batches in order (for paired bootstraps).
    """
    target = resolve_device(model, device)
    total_nll, total_bytes, total_tokens = 0.0, 0, 0
    example_nll: list[float] = []
    example_bytes: list[int] = []
    with evaluation_mode(model):
        for index, raw in enumerate(batches):
            if "byte_spans" not in raw:
                raise ValueError(f"batch {index} has no 'byte_spans'; build it with paired_batches")
            spans = raw["byte_spans"].to(target)
            batch = prepare_batch({k: v for k, v in raw.items() if k != "byte_spans"}, target, index)
            if spans.shape != (*batch["input_ids"].shape, 2):
                raise ValueError(f"batch {index}: byte_spans must be [batch, seq, 2] like input_ids")
            logits = model_logits(model, batch)[:, :-1].float()
            next_ids, next_spans = batch["input_ids"][:, 1:], spans[:, 1:]
            width = (next_spans[..., 1] - next_spans[..., 0]).clamp_min(0)
            keep = (batch["labels"][:, 1:] != -100) & (next_spans[..., 0] >= 0)
            if eos_id is not None and not include_eos:
                keep &= ~((next_ids == eos_id) & (width == 0))
            log_probs = torch.log_softmax(logits, dim=-1)
            nll = -log_probs.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)
            row_nll = nll.double().masked_fill(~keep, 0.0).sum(-1)
            row_bytes = width.masked_fill(~keep, 0).sum(-1)
            example_nll += row_nll.tolist()
            example_bytes += row_bytes.tolist()
            total_nll += float(row_nll.sum())
            total_bytes += int(row_bytes.sum())
            total_tokens += int(keep.sum())
    if total_bytes == 0:
        raise ValueError("no text to score: no target token has a byte span (or every label is -100)")
    nats_per_byte = total_nll / total_bytes
    out: dict[str, Any] = {
        "bits_per_byte": nats_per_byte / math.log(2),
        "byte_perplexity": math.exp(nats_per_byte),
        "nll": total_nll,
        "bytes": total_bytes,
        "tokens": total_tokens,
    }
    if per_example:
        out.update(example_nll=example_nll, example_bytes=example_bytes)
    return out
