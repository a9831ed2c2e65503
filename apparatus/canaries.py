"""Canaries (Carlini et al. 2019, "The Secret Sharer"): a synthetic canary corpus, and exposure counted
exactly or estimated.

The corpus (`CanaryCorpus`): the engine's synthetic records (Faker records with PII spans) with
canaries inserted, split into training and held-out records.

Exact: every secret of the canary's space completes the canary's prefix and is scored in one
batched pass that shares the prefix's KV cache (`secure_kd.evaluate.canary_exposure`); the rank
of the true secret among them gives the exposure (`secure_kd.metrics.exposure`). Spaces up to
10^6 secrets are practical this way (`progress=True` shows a bar).

Estimated: for larger spaces a uniform sample of secrets is scored and a skew-normal fitted to
their losses (`secure_kd.metrics.estimate_exposure`). The result says that it is an estimate and
how many bits the sample itself can support (log2 of the sample size).

What is scored: the secret's tokens given the text before it (the record's trailing words are not
part of the score). Byte-level BPE glues a space to the word after it, so the space at the end of
the canary's prefix is moved onto every candidate ("... is" + " 0449"); `canary_exposure` checks
that the split matches how the full text tokenizes.

Train a tokenizer without the canaries: a BPE vocabulary learned from data in which a canary
repeats can hold its secret as a single token, which makes that secret cheaper than the other
candidates under any model, trained or not (an untrained model then shows near-maximal exposure).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from secure_kd import metrics
from secure_kd.config import Strict
from secure_kd.data import Canary, SyntheticCorpus, generate_corpus
from secure_kd.data.synthetic import SecretSpace
from secure_kd.evaluate import canary_exposure, score_candidates


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

    def build(self, seed: int) -> tuple[SyntheticCorpus, SyntheticCorpus]:
        """(training records, held-out records) of the corpus generated with `seed`."""
        corpus = generate_corpus(
            self.n_records,
            seed=seed,
            n_canaries=self.n_canaries,
            canary_repeats=self.canary_repeats,
            secret_digits=self.secret_digits,
        )
        return corpus.split(self.heldout_fraction, seed=seed)


class LossHistogram(BaseModel):
    """Histogram of candidate-secret losses (total NLL, nats) with the true secret's loss marked."""

    edges: list[float]
    counts: list[int]
    canary_loss: float
    sampled: bool


class ExposureEstimateSummary(BaseModel):
    value: float
    is_estimate: bool = True
    method: str
    n_samples: int
    max_bits_supported_by_samples: float


class CanaryExposure(BaseModel):
    """Exposure of one canary; `exposure`/`rank` are None when the space was not enumerated."""

    prefix: str
    secret: str
    repeats: int
    n_candidates: int
    max_exposure: float
    exposure: float | None
    rank: int | None
    canary_loss: float
    estimate: ExposureEstimateSummary | None
    histogram: LossHistogram | None

    @property
    def best_value(self) -> float:
        """The exact exposure when there is one, else the estimate."""
        if self.exposure is not None:
            return self.exposure
        assert self.estimate is not None, "a canary report has an exact exposure or an estimate"
        return self.estimate.value


def split_at_token_boundary(prefix: str) -> tuple[str, str]:
    """(prefix without its trailing whitespace, that whitespace), which goes in front of every candidate."""
    head = prefix.rstrip()
    if not head:
        raise ValueError(f"canary prefix {prefix!r} is empty or only whitespace; exposure needs a context")
    return head, prefix[len(head) :]


def _candidate_suffix_ids(tokenizer: Any, head: str, head_ids: list[int], candidate: str) -> list[int]:
    full_ids = list(tokenizer(head + candidate)["input_ids"])
    if full_ids[: len(head_ids)] != head_ids or len(full_ids) == len(head_ids):
        raise ValueError(
            f"tokenizing {head!r} + {candidate!r} does not keep the prefix's own tokens {head_ids}; the "
            "tokenizer merges across the boundary, so a sampled candidate cannot be scored on its own tokens"
        )
    return full_ids[len(head_ids) :]


def sampled_candidate_losses(
    model: nn.Module,
    tokenizer: Any,
    canary: Canary,
    space: Sequence[str],
    n_samples: int,
    *,
    seed: int,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, float]:
    """(losses of `n_samples` secrets drawn uniformly without replacement from `space` minus the
    canary's secret, the canary's own loss), all total NLL in nats given the canary's prefix."""
    if n_samples < 1 or n_samples >= len(space):
        raise ValueError(
            f"n_samples must be in [1, {len(space) - 1}] for a space of {len(space)}, got {n_samples}"
        )
    head, gap = split_at_token_boundary(canary.prefix)
    head_ids = list(tokenizer(head)["input_ids"])
    secret_index = space.index(canary.secret)
    rng = np.random.default_rng([seed, secret_index])
    # Draw from the space without the canary by shifting indices at or past it by one.
    drawn = rng.choice(len(space) - 1, size=n_samples, replace=False)
    drawn = drawn + (drawn >= secret_index)
    texts = [gap + space[int(i)] for i in drawn] + [gap + canary.secret]
    suffixes = [_candidate_suffix_ids(tokenizer, head, head_ids, text) for text in texts]
    losses = score_candidates(model, head_ids, suffixes, batch_size=batch_size, device=device).numpy()
    return losses[:-1], float(losses[-1])


def _histogram(losses: np.ndarray, canary_loss: float, bins: int, sampled: bool) -> LossHistogram:
    low, high = min(float(losses.min()), canary_loss), max(float(losses.max()), canary_loss)
    counts, edges = np.histogram(losses, bins=bins, range=(low, high if high > low else low + 1.0))
    return LossHistogram(
        edges=edges.tolist(), counts=counts.tolist(), canary_loss=canary_loss, sampled=sampled
    )


def measure_canary(
    model: nn.Module,
    tokenizer: Any,
    canary: Canary,
    space: Sequence[str],
    *,
    enumerate_space: bool = True,
    estimate_samples: int = 0,
    histogram_bins: int = 40,
    seed: int = 0,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> CanaryExposure:
    """Exposure of `canary` over `space` (every candidate secret, e.g. `corpus.secret_space()`).

    `enumerate_space` scores every secret (exact exposure and rank); `estimate_samples > 0` also
    fits the Secret Sharer estimate on that many sampled secrets, and the histogram is drawn from
    those samples. With both off there is nothing to report, which raises.
    """
    if not enumerate_space and estimate_samples < 20:
        raise ValueError(
            "a space that is not enumerated needs estimate_samples >= 20 for the Secret Sharer estimate; "
            "raise exposure.estimate_samples or allow enumeration"
        )
    if canary.secret not in space:
        raise ValueError(f"canary secret {canary.secret!r} is not in the secret space; check secret_digits")
    head, gap = split_at_token_boundary(canary.prefix)
    exposure = rank = None
    canary_loss = math.nan
    if enumerate_space:
        exact = canary_exposure(
            model,
            tokenizer,
            head,
            [gap + secret for secret in space],
            gap + canary.secret,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
        exposure, rank, canary_loss = (
            float(exact["exposure"]),
            int(exact["rank"]),
            float(exact["canary_loss"]),
        )
    estimate = histogram = None
    if estimate_samples > 0:
        sampled, sampled_canary_loss = sampled_candidate_losses(
            model,
            tokenizer,
            canary,
            space,
            min(estimate_samples, len(space) - 1),
            seed=seed,
            batch_size=batch_size,
            device=device,
        )
        canary_loss = sampled_canary_loss if math.isnan(canary_loss) else canary_loss
        fitted = metrics.estimate_exposure(sampled, canary_loss, len(space))
        estimate = ExposureEstimateSummary(
            value=fitted.value,
            method=fitted.method,
            n_samples=fitted.n_samples,
            max_bits_supported_by_samples=fitted.max_bits_supported_by_samples,
        )
        histogram = _histogram(sampled, canary_loss, histogram_bins, sampled=True)
    return CanaryExposure(
        prefix=canary.prefix,
        secret=canary.secret,
        repeats=canary.repeats,
        n_candidates=len(space),
        max_exposure=math.log2(len(space)),
        exposure=exposure,
        rank=rank,
        canary_loss=canary_loss,
        estimate=estimate,
        histogram=histogram,
    )


def exact_exposures(
    model: nn.Module,
    tokenizer: Any,
    canaries: Sequence[Canary],
    digits: int,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 512,
) -> list[float]:
    """Exact exposure (bits) of each canary over its whole space of `digits`-digit secrets."""
    space = SecretSpace(digits)
    reports = [
        measure_canary(model, tokenizer, c, space, batch_size=batch_size, device=device) for c in canaries
    ]
    return [float(report.exposure) for report in reports]


def mean_exposure_by_repeats(reports: Sequence[CanaryExposure]) -> dict[int, float]:
    """Mean exposure (exact where counted, else estimated) of the canaries inserted k times, per k."""
    groups: dict[int, list[float]] = {}
    for report in reports:
        groups.setdefault(report.repeats, []).append(report.best_value)
    return {repeats: float(np.mean(values)) for repeats, values in sorted(groups.items())}
