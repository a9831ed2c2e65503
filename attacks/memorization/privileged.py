"""Leakage of privileged context into a self-distilled student (kd.mode: self_privileged).

In privileged self-distillation (OPSD, SDFT/SDPO) the teacher reads a context the student never gets
as input (a document, a customer record). The audit puts canaries ONLY in that context and measures
them on the student, whose input never held them: exposure (the rank of the true secret among every
candidate of its space given the canary's prefix, Carlini et al. 2019; `apparatus.canaries`) and
greedy extraction (does greedy decoding from the prefix continue with exactly the secret). The
reference is a student trained the same way without the privileged field (the teacher shown no
context), so what the audit reports is what the privileged context added; an untrained model's
exposure is about 1.4 bits on average, whatever the space (the mean of log2(N / rank)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from apparatus.canaries import measure_canary
from attacks.memorization.extraction import targeted_canary_extraction
from secure_kd.data import Canary


class PrivilegedLeakage(BaseModel):
    """Exposure and greedy extraction of the privileged-context canaries in one model."""

    n_canaries: int
    n_candidates: int
    mean_exposure: float
    exposures: list[float]
    extracted: int
    extraction_rate: float


def privileged_leakage(
    model: nn.Module,
    tokenizer: Any,
    canaries: Sequence[Canary],
    space: Sequence[str],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 512,
) -> PrivilegedLeakage:
    """Exposure over `space` and greedy extraction of each canary in `model` (which should never have
    seen the canaries as input: they were in the privileged context only)."""
    if not canaries:
        raise ValueError("privileged_leakage needs at least one canary")
    model.eval()
    exposures = [
        float(measure_canary(model, tokenizer, c, space, batch_size=batch_size, device=device).exposure)
        for c in canaries
    ]
    extraction = targeted_canary_extraction(
        model, tokenizer, canaries, n_samples=0, top_k=0, temperature=1.0, seed=0, device=torch.device(device)
    )
    extracted = sum(e.greedy_extracted for e in extraction)
    return PrivilegedLeakage(
        n_canaries=len(canaries),
        n_candidates=len(space),
        mean_exposure=float(np.mean(exposures)),
        exposures=exposures,
        extracted=extracted,
        extraction_rate=extracted / len(canaries),
    )


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean and a Student-t interval over runs (seeds); no interval from one run."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "ci": None, "n": len(x)}
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return {"mean": mean, "ci": [mean - half, mean + half], "n": len(x)}
