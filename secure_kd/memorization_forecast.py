"""Before distilling: which training records will the student memorize? Scores from the teacher alone.

The seed paper on memorization in distillation finds a student's memorization predictable before any
distillation from three per-record signals; each is computed here from one forward pass of the teacher
(and of the initial student) over the record, nothing trained:

- `zlib_entropy`: zlib-compressed bytes per byte of the text. Low = repetitive, templated text, which
  every model completes from its prefix.
- `teacher_nll`: the teacher's mean next-token loss (log perplexity). A teacher fine-tuned on the record
  has a low loss on it, and the student learns the teacher's distribution.
- `teacher_student_kl`: mean per-token KL(teacher || initial student). How much the student has to
  move on this record (reported; its direction is an empirical matter, see the experiment).

`combined` is the mean of the rank-normalized `-teacher_nll` and `-zlib_entropy` (in [0, 1], higher =
more likely memorized): no weights are fit, so it needs no labels. Its AUC against what a distilled
student actually memorized (discoverable memorization: the greedy completion of a prefix reproduces
the suffix) is measured in benchmarks/experiments/memorization_forecast.py, numbers in
docs/audit.md. Records are named by index (and `record_id` when they have one), never by content.
Exact duplicates (after lower-casing and collapsing white space) are listed as groups to deduplicate:
a record seen k times is memorized more and protected by DP at about k epsilon.
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

FEATURES = ("zlib_entropy", "teacher_nll", "teacher_student_kl")
COMBINED_DIRECTIONS = {"teacher_nll": -1.0, "zlib_entropy": -1.0}


def zlib_entropy(text: str) -> float:
    """zlib-compressed bytes per UTF-8 byte (level 9); 0 for empty text."""
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / len(raw) if raw else 0.0


def _rank01(values: np.ndarray) -> np.ndarray:
    """Average ranks scaled to [0, 1] (ties share their mean rank)."""
    from scipy.stats import rankdata

    if len(values) < 2:
        return np.full(len(values), 0.5)
    return (rankdata(values) - 1.0) / (len(values) - 1.0)


def combined_score(features: dict[str, np.ndarray]) -> np.ndarray:
    """Mean of rank-normalized features in the direction of more memorization (`COMBINED_DIRECTIONS`)."""
    parts = [_rank01(sign * np.asarray(features[name], float)) for name, sign in COMBINED_DIRECTIONS.items()]
    return np.mean(parts, axis=0)


@torch.no_grad()
def model_features(
    teacher: torch.nn.Module,
    student: torch.nn.Module | None,
    token_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """`teacher_nll` and (with `student`) `teacher_student_kl`, per sequence, over every next-token
    position; the two models share the tokenizer (and the vocabulary up to the narrower width)."""
    device = next(teacher.parameters()).device
    nll_out, kl_out = [], []
    for model in (teacher, student):
        if model is not None:
            model.eval()
    for start in range(0, len(token_ids), batch_size):
        chunk = [list(ids) for ids in token_ids[start : start + batch_size]]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
        ids, mask = ids.to(device), mask.to(device)
        keep = mask[:, 1:].bool()
        count = keep.sum(1).clamp(min=1)
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(t_logits.transpose(1, 2), ids[:, 1:], reduction="none")
        nll_out.extend(((nll * keep).sum(1) / count).cpu().tolist())
        if student is not None:
            s_logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            vocab = min(t_logits.shape[-1], s_logits.shape[-1])
            t_log = torch.log_softmax(t_logits[..., :vocab], -1)
            s_log = torch.log_softmax(s_logits[..., :vocab], -1)
            kl = (t_log.exp() * (t_log - s_log)).sum(-1)
            kl_out.extend(((kl * keep).sum(1) / count).cpu().tolist())
    features = {"teacher_nll": np.array(nll_out)}
    if student is not None:
        features["teacher_student_kl"] = np.array(kl_out)
    return features


def duplicate_groups(texts: Sequence[str]) -> list[list[int]]:
    """Indices of records equal after lower-casing and collapsing white space, groups of two or more."""
    groups: dict[str, list[int]] = {}
    for index, text in enumerate(texts):
        key = hashlib.sha256(re.sub(r"\s+", " ", text.strip().lower()).encode("utf-8")).hexdigest()
        groups.setdefault(key, []).append(index)
    return [g for g in groups.values() if len(g) > 1]


def forecast(
    texts: Sequence[str],
    token_ids: Sequence[Sequence[int]],
    teacher: torch.nn.Module,
    student: torch.nn.Module | None = None,
    *,
    record_ids: Sequence[Any] | None = None,
    drop_fraction: float = 0.05,
    pad_id: int = 0,
) -> dict[str, Any]:
    """Per record its features and combined score, the `drop_fraction` highest-scored records to drop
    (index and record_id only) and the duplicate groups. No text in the result."""
    if len(texts) != len(token_ids) or not texts:
        raise ValueError(
            f"need one token sequence per text and >= 1 record, got {len(texts)}, {len(token_ids)}"
        )
    if not 0.0 < drop_fraction < 1.0:
        raise ValueError(f"drop_fraction must be in (0, 1), got {drop_fraction}")
    features = model_features(teacher, student, token_ids, pad_id=pad_id)
    features["zlib_entropy"] = np.array([zlib_entropy(t) for t in texts])
    score = combined_score(features)
    order = np.argsort(-score, kind="stable")
    n_drop = max(1, math.ceil(drop_fraction * len(texts)))
    ids = list(record_ids) if record_ids is not None else [None] * len(texts)
    records = [
        {"index": i, "record_id": ids[i], "combined": float(score[i]),
         **{name: float(features[name][i]) for name in FEATURES if name in features}}
        for i in range(len(texts))
    ]  # fmt: skip
    return {
        "n_records": len(texts),
        "features": [name for name in FEATURES if name in features],
        "combined": "mean rank of -teacher_nll and -zlib_entropy (higher = more likely memorized)",
        "records": records,
        "drop": [{"index": int(i), "record_id": ids[i], "combined": float(score[i])} for i in order[:n_drop]],
        "drop_fraction": drop_fraction,
        "duplicates": duplicate_groups(texts),
    }
