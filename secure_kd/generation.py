"""Sampling continuations for on-policy KD (the student writes) and sequence-level KD (the teacher
writes), as in TRL's GKDTrainer: the prompt is the masked part of the example (labels == -100
before the first trained token); for plain text with nothing masked, the first half is the prompt.
The new sequence is prompt + generated tokens, and only the generated tokens are trained.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from secure_kd.data import TokenizedExample, collate


def prompt_lengths(batch: dict[str, Tensor]) -> list[int]:
    lengths = []
    for labels, mask in zip(batch["labels"], batch["attention_mask"], strict=True):
        n = int(mask.sum())
        trained = (labels[:n] != -100).nonzero()
        first = int(trained[0]) if len(trained) else n
        lengths.append(first if first > 0 else max(1, n // 2))
    return lengths


@torch.no_grad()
def generate_continuations(
    model: nn.Module,
    batch: dict[str, Tensor],
    *,
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    temperature: float,
) -> dict[str, Tensor]:
    """Return a new right-padded batch: prompts from `batch` plus what `model` samples."""
    device = batch["input_ids"].device
    lengths = prompt_lengths(batch)
    width = max(lengths)
    prompts = torch.full((len(lengths), width), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros_like(prompts)
    for i, n in enumerate(lengths):  # left padding for generation
        prompts[i, width - n :] = batch["input_ids"][i, :n]
        attention[i, width - n :] = 1
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=prompts,
        attention_mask=attention,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    model.train(was_training)
    examples = []
    for i, n in enumerate(lengths):
        new = out[i, width:].tolist()
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id) + 1]
        elif pad_id in new and pad_id != eos_id:
            new = new[: new.index(pad_id)]
        prompt = batch["input_ids"][i, :n].tolist()
        examples.append(
            TokenizedExample(
                input_ids=prompt + new, labels=[-100] * n + new, record_index=int(batch["record_index"][i])
            )
        )
    new_batch = collate(examples, pad_id=pad_id)
    new_batch["example_index"] = batch["example_index"].cpu()
    return {k: v.to(device) for k, v in new_batch.items()}
