"""What every model-level evaluation shares: eval mode, the model's device, batch checks, shifted NLL."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100


@contextmanager
def evaluation_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode without gradients, then restore each one's previous train/eval mode."""
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for model, training in zip(models, was_training, strict=True):
            model.train(training)


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """`None` or "auto" means the device of the model's first parameter (CPU for a parameterless model)."""
    if device is None or device == "auto":
        parameter = next(model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")
    return torch.device(device)


def prepare_batch(batch: Mapping[str, Tensor], device: torch.device, index: int) -> dict[str, Tensor]:
    """Check a batch and move it to `device`; labels default to input_ids with padding set to -100.

    `position_ids`, when present (e.g. for left padding), are passed to the model as they are.
    """
    if "input_ids" not in batch:
        raise ValueError(
            f"batch {index} has no 'input_ids'; batches are dicts of input_ids, attention_mask, labels"
        )
    input_ids = batch["input_ids"]
    if input_ids.ndim != 2:
        raise ValueError(f"batch {index}: input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
        if tensor.shape != input_ids.shape:
            raise ValueError(
                f"batch {index}: {name} shape {tuple(tensor.shape)} != "
                f"input_ids shape {tuple(input_ids.shape)}"
            )
    prepared = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if "position_ids" in batch:
        prepared["position_ids"] = batch["position_ids"]
    return {name: tensor.to(device) for name, tensor in prepared.items()}


def model_logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Logits of a forward pass on a prepared batch (labels are not passed: the model computes no loss)."""
    inputs = {name: tensor for name, tensor in batch.items() if name != "labels"}
    return model(**inputs).logits


def shifted_token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token next-token NLL and keep-mask, both [batch, seq-1]: logits[:, :-1] predict labels[:, 1:]."""
    next_labels = labels[:, 1:]
    keep = next_labels != IGNORE_INDEX
    vocab_size = logits.shape[-1]
    kept_labels = next_labels[keep]
    if kept_labels.numel() and (kept_labels.min() < 0 or kept_labels.max() >= vocab_size):
        raise ValueError(f"labels must be token ids in [0, {vocab_size - 1}] or -100 (ignored)")
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    safe_labels = next_labels.masked_fill(~keep, 0).unsqueeze(-1)
    nll = -logprobs.gather(-1, safe_labels).squeeze(-1)
    return nll.masked_fill(~keep, 0.0), keep
