"""Model-level evaluation of causal LMs (or any model returning `.logits`): perplexity, per-example
loss, agreement with a teacher. All use the standard causal shift: logits[:, :-1] predict labels[:, 1:],
and labels of -100 are ignored."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from secure_kd.evaluate._model_io import (
    evaluation_mode,
    model_logits,
    prepare_batch,
    resolve_device,
    shifted_token_nll,
)

Batch = Mapping[str, Tensor]


def perplexity(
    model: nn.Module, batches: Iterable[Batch], *, device: str | torch.device | None = None
) -> dict[str, float | int]:
    """Token-weighted perplexity over all label tokens of all batches.

    Returns `perplexity` = exp(nll), `nll` = mean next-token NLL in nats over every kept token of
    the whole set (not a mean of per-batch values), and `tokens` = the number of kept tokens.
    Batches are dicts with input_ids, attention_mask, labels ([batch, seq] tensors); without labels,
    input_ids with padding masked out are the labels. `device` None/"auto" is the model's device.
    """
    target = resolve_device(model, device)
    total_nll, total_tokens = 0.0, 0
    with evaluation_mode(model):
        for index, raw_batch in enumerate(batches):
            batch = prepare_batch(raw_batch, target, index)
            nll, keep = shifted_token_nll(model_logits(model, batch), batch["labels"])
            total_nll += float(nll.double().sum())
            total_tokens += int(keep.sum())
    if total_tokens == 0:
        raise ValueError("no label tokens to score: batches are empty or every label is -100")
    mean_nll = total_nll / total_tokens
    return {"perplexity": math.exp(mean_nll), "nll": mean_nll, "tokens": total_tokens}


def per_example_loss(
    model: nn.Module, batches: Iterable[Batch], *, device: str | torch.device | None = None
) -> Tensor:
    """Mean next-token NLL of each example, concatenated over batches: a float32 Tensor[n_examples].

    Membership-inference attacks score examples with it. An example with no label token has no
    loss and raises a ValueError naming it.
    """
    target = resolve_device(model, device)
    losses: list[Tensor] = []
    with evaluation_mode(model):
        for index, raw_batch in enumerate(batches):
            batch = prepare_batch(raw_batch, target, index)
            nll, keep = shifted_token_nll(model_logits(model, batch), batch["labels"])
            counts = keep.sum(dim=1)
            if (counts == 0).any():
                row = int((counts == 0).nonzero()[0])
                raise ValueError(f"batch {index}, example {row} has no label token (all -100); drop it first")
            losses.append((nll.sum(dim=1) / counts).float().cpu())
    if not losses:
        raise ValueError("batches is empty; pass at least one batch")
    return torch.cat(losses)


def teacher_agreement(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Batch],
    *,
    device: str | torch.device | None = None,
    real_vocab: int | None = None,
) -> dict[str, float | int]:
    """Top-1 agreement and mean forward KL(teacher || student) over the shifted label positions.

    Both models see the same batch; the positions scored are those whose next label is not -100
    (the positions `perplexity` scores). KL is at temperature 1, in nats, averaged over positions.
    `device` is where the student runs; the teacher runs on its own device. `real_vocab`: one
    tokenizer whose logits are padded to two widths; both are compared on the first `real_vocab`
    columns (`secure_kd.cross_tokenizer.VocabPadding.real_size`). For two tokenizers see
    `secure_kd.evaluate.cross_agreement`.
    """
    student_device = resolve_device(student, device)
    teacher_device = resolve_device(teacher, None)
    matches, kl_sum, positions = 0, 0.0, 0
    with evaluation_mode(student, teacher):
        for index, raw_batch in enumerate(batches):
            batch = prepare_batch(raw_batch, student_device, index)
            student_logits = model_logits(student, batch)[:, :-1].float()
            teacher_batch = {name: tensor.to(teacher_device) for name, tensor in batch.items()}
            teacher_logits = model_logits(teacher, teacher_batch)[:, :-1].float().to(student_device)
            if real_vocab is not None:
                student_logits = student_logits[..., :real_vocab]
                teacher_logits = teacher_logits[..., :real_vocab]
            if teacher_logits.shape != student_logits.shape:
                raise ValueError(
                    f"batch {index}: student logits {tuple(student_logits.shape)} != teacher logits "
                    f"{tuple(teacher_logits.shape)}; agreement needs a shared vocabulary"
                )
            keep = batch["labels"][:, 1:] != -100
            student_logprobs = torch.log_softmax(student_logits[keep], dim=-1)
            teacher_logprobs = torch.log_softmax(teacher_logits[keep], dim=-1)
            kl = (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(dim=-1)
            kl_sum += float(kl.double().sum())
            matches += int((student_logprobs.argmax(-1) == teacher_logprobs.argmax(-1)).sum())
            positions += int(keep.sum())
    if positions == 0:
        raise ValueError("no label positions to compare: batches are empty or every label is -100")
    return {
        "top1_agreement": matches / positions,
        "mean_forward_kl": kl_sum / positions,
        "positions": positions,
    }
