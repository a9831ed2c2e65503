"""An organization's side of fed_distill across tokenizers: its soft labels on the byte-aligned layout,
distillation from the ensemble, and bits per byte on its held-out records.

- `byte_soft_labels`: the student's rows of the layout (`federation.byte_layout.span_rows`, float64,
  temperature 1) over the transfer records as its own tokenizer cuts them, `[positions, k + 2]`.
- `distill_from_bytes`: `transfer.digest_steps` steps of AdamW (`train.lr`, `train.weight_decay`,
  gradients clipped to `train.max_grad_norm`) on `kd.kd_weight * KL(ensemble row || student row)`, the
  mean over the batch's rows, plus `kd.ce_weight *` the next-token cross-entropy on the transfer text,
  as the engine's Distiller weighs them. The student's rows come from the same `span_rows`, so the
  gradient flows through its probability of the true span (column 0, in log space) and its next-byte
  probabilities (sums of token probabilities). Public data only: no DP. `kd.loss` and `kd.temperature`
  are not used (the layout is a distribution at temperature 1 over its own columns).
- `heldout_bits_per_byte`: the engine's `bits_per_byte` on the organization's held-out records, the
  bytes its tokenizer predicts (after the first token, up to `data.max_length` tokens): unlike the
  per-token loss, comparable between organizations with different tokenizers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from federation.byte_layout import ByteLayout, TokenizerView, span_rows
from federation.client.workspace import OrgWorkspace
from federation.cross_tokenizer_config import tokenizer_of
from federation.soft_labels import check_soft_labels
from secure_kd.data import IGNORE_INDEX, collate
from secure_kd.data.paired import tokenize_pairs
from secure_kd.evaluate import bits_per_byte, paired_batches

MIN_ROW_PROBABILITY = 1e-12


def is_byte_layout(ws: OrgWorkspace) -> bool:
    return isinstance(ws.public.layout, ByteLayout)


def view_of(ws: OrgWorkspace) -> TokenizerView:
    layout = ws.public.layout
    assert isinstance(layout, ByteLayout)
    return layout.views[tokenizer_of(ws.job, ws.index)]


def _offsets(layout: ByteLayout) -> list[int]:
    return [0, *np.cumsum(layout.rows_per_record()).tolist()]


def example_rows(
    log_probs: Tensor, example_index: int, length: int, view: TokenizerView, layout: ByteLayout, device
) -> tuple[Tensor, Tensor]:
    """`span_rows` of layout record `example_index` from its log-probabilities `[L, V]` (unpadded)."""
    offsets = _offsets(layout)
    example = view.examples[example_index]
    long = dict(dtype=torch.long, device=device)
    return span_rows(
        log_probs[:length],
        torch.tensor(example.input_ids, **long),
        torch.tensor(view.starts[example_index], **long),
        torch.tensor(view.ends[example_index], **long),
        torch.from_numpy(view.buckets.copy()).to(device),
        torch.from_numpy(layout.span_buckets[offsets[example_index] : offsets[example_index + 1]].copy()).to(
            device
        ),
        layout.k,
    )


def _forward(model: nn.Module, view: TokenizerView, chosen: list[int], pad_id: int, device):
    batch = collate([view.examples[i] for i in chosen], pad_id=pad_id)
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits
    return batch, logits


@torch.no_grad()
def byte_soft_labels(ws: OrgWorkspace, model: nn.Module, *, batch_size: int = 16) -> np.ndarray:
    """The student's `[positions, k + 2]` rows of the byte-aligned layout, float64."""
    layout, view = ws.public.layout, view_of(ws)
    was_training = model.training
    model.eval()
    rows: list[np.ndarray] = []
    try:
        for start in range(0, len(view.examples), batch_size):
            chosen = list(range(start, min(start + batch_size, len(view.examples))))
            _, logits = _forward(model, view, chosen, ws.public.pad_id, ws.device)
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            for offset, i in enumerate(chosen):
                if view.starts[i]:
                    row, _ = example_rows(
                        log_probs[offset], i, len(view.examples[i]), view, layout, ws.device
                    )
                    rows.append(row.cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(rows).astype(np.float64)


def row_kl(target: Tensor, rows: Tensor, log_span: Tensor) -> Tensor:
    """Mean over rows of KL(target || rows); column 0's log is `log_span` (exact, no log(exp(.)))."""
    log_q = torch.cat([log_span[:, None], rows[:, 1:].clamp_min(MIN_ROW_PROBABILITY).log()], dim=-1)
    return (torch.xlogy(target, target) - target * log_q).sum(-1).mean()


def _ce(logits: Tensor, labels: Tensor) -> Tensor:
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
    )


def distill_from_bytes(
    ws: OrgWorkspace, model: nn.Module, soft: object, round_index: int, *, steps: int
) -> float:
    """Distil the student towards the ensemble `soft` ([positions, k + 2]); returns the last loss."""
    layout, view = ws.public.layout, view_of(ws)
    target = torch.from_numpy(check_soft_labels(np.asarray(soft), layout).clip(0.0, 1.0)).float()
    offsets = _offsets(layout)
    usable = [i for i in range(len(view.examples)) if view.starts[i]]
    job = ws.job
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=job.train.lr, weight_decay=job.train.weight_decay)
    generator = torch.Generator().manual_seed(job.seed * 1_000_003 + ws.index * 1009 + round_index)
    size = min(job.train.batch_size, len(usable))
    model.train()
    loss_value = float("nan")
    for _ in range(steps):
        picks = torch.randperm(len(usable), generator=generator)[:size].tolist()
        chosen = [usable[p] for p in picks]
        batch, logits = _forward(model, view, chosen, ws.public.pad_id, ws.device)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        rows, spans, targets = [], [], []
        for offset, i in enumerate(chosen):
            row, log_span = example_rows(log_probs[offset], i, len(view.examples[i]), view, layout, ws.device)
            rows.append(row)
            spans.append(log_span)
            targets.append(target[offsets[i] : offsets[i + 1]])
        loss = job.kd.kd_weight * row_kl(torch.cat(targets).to(ws.device), torch.cat(rows), torch.cat(spans))
        if job.kd.ce_weight > 0:
            loss = loss + job.kd.ce_weight * _ce(logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if job.train.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, job.train.max_grad_norm)
        optimizer.step()
        loss_value = float(loss.detach())
    return loss_value


def heldout_bits_per_byte(ws: OrgWorkspace, model: nn.Module) -> float:
    """Bits per byte of the student on (at most `train.eval_batches` batches of) its held-out records."""
    job, tokenizer = ws.job, ws.public.tokenizer
    pairs = tokenize_pairs(
        ws.own_data.heldout,
        tokenizer,
        tokenizer,
        max_length=job.data.max_length,
        teacher_max_length=job.data.max_length,
        text_field=job.data.text_field,
        mask_prompt=job.data.mask_prompt,
    ).pairs
    batches = paired_batches(
        pairs,
        "student",
        pad_id=ws.public.pad_id,
        batch_size=job.train.batch_size,
        limit=job.train.eval_batches,
    )
    value = bits_per_byte(model, batches, eos_id=tokenizer.eos_token_id, device=ws.device)["bits_per_byte"]
    return float(value) if math.isfinite(value) else float("nan")
