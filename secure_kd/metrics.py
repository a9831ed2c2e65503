"""Audit metrics: pure numbers in, floats and dicts out (no models).

Exposure of a canary (Carlini et al. 2019, "The Secret Sharer"), ROC and TPR at low FPR for
membership inference, calibration (ECE, Guo et al. 2017), top-1 agreement and accuracy, and
percentile-bootstrap confidence intervals for the audit report.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from secure_kd.one_run_audit import one_run_epsilon_lower_bound as one_run_epsilon_lower_bound
from secure_kd.topk import TopKLogits

IGNORE_INDEX = -100


def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _finite_1d(values: Any, name: str, *, allow_inf: bool = False) -> np.ndarray:
    array = _as_numpy(values).astype(np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per item), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty; pass at least one value")
    bad = np.isnan(array) if allow_inf else ~np.isfinite(array)
    if bad.any():
        what = "NaN" if allow_inf else "NaN or infinite"
        raise ValueError(f"{name} has {int(bad.sum())} {what} value(s), first at index {int(np.argmax(bad))}")
    return array


# --------------------------------------------------------------------------- exposure


def canary_rank(candidate_losses: Any, canary_index: int) -> int:
    """1 + the number of candidates with a strictly lower loss than the canary (ties favour the canary)."""
    losses = _finite_1d(candidate_losses, "candidate_losses", allow_inf=True)
    if isinstance(canary_index, bool) or not isinstance(canary_index, int | np.integer):
        raise ValueError(f"canary_index must be an int, got {type(canary_index).__name__}")
    if not 0 <= canary_index < losses.size:
        raise ValueError(
            f"canary_index={canary_index} is out of range for {losses.size} candidates; "
            f"use a position in [0, {losses.size - 1}]"
        )
    return 1 + int(np.count_nonzero(losses < losses[canary_index]))


def exposure(candidate_losses: Any, canary_index: int) -> float:
    """Exposure in bits of the canary at `canary_index` among all candidates of the secret space.

    `candidate_losses` holds the loss (lower = more likely, e.g. total NLL) of every candidate.
    exposure = log2(n_candidates) - log2(rank), rank = 1 + #candidates with strictly lower loss.
    It is log2(n) when the canary is the most likely candidate and 0 when it is the least likely.
    """
    n_candidates = _as_numpy(candidate_losses).size
    rank = canary_rank(candidate_losses, canary_index)
    return math.log2(n_candidates) - math.log2(rank)


class ExposureEstimate(BaseModel):
    """An exposure value extrapolated from a fitted loss distribution, not counted exactly."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: float
    method: Literal["skewnorm fit"] = "skewnorm fit"
    n_samples: int
    space_size: int
    is_estimate: Literal[True] = True
    fit_shape: float
    fit_loc: float
    fit_scale: float
    max_bits_supported_by_samples: float


def estimate_exposure(sampled_losses: Any, canary_loss: float, space_size: int) -> ExposureEstimate:
    """Estimate exposure for a secret space too large to enumerate (Secret Sharer, section 4.3).

    THIS IS AN ESTIMATE. A skew-normal distribution is fitted to the losses of candidates sampled
    uniformly from the space; the fraction of the space with a lower loss than the canary is read
    off its CDF. With F = CDF(canary_loss), the estimated rank is 1 + (space_size - 1) * F and the
    exposure log2(space_size) - log2(rank), which is about -log2(F) (the paper's formula) while
    space_size * F >> 1, and never exceeds log2(space_size).

    Sampling alone cannot show an exposure above log2(n_samples): beyond that no sampled
    candidate beats the canary and the value comes from the fitted tail (an extrapolation).
    `max_bits_supported_by_samples` records that limit next to the value.
    """
    losses = _finite_1d(sampled_losses, "sampled_losses")
    if losses.size < 20:
        raise ValueError(f"sampled_losses has {losses.size} values; fit a skew-normal on at least 20 samples")
    if np.ptp(losses) == 0.0:
        raise ValueError("sampled_losses are all identical; a distribution cannot be fitted to them")
    if not math.isfinite(canary_loss):
        raise ValueError(f"canary_loss must be finite, got {canary_loss}")
    if isinstance(space_size, bool) or not isinstance(space_size, int | np.integer) or space_size < 1:
        raise ValueError(f"space_size must be a positive int (number of secrets), got {space_size}")

    from scipy import stats as scipy_stats  # here: ~0.4 s to import, needed only for this estimate

    shape, loc, scale = scipy_stats.skewnorm.fit(losses)
    log_cdf = float(scipy_stats.skewnorm.logcdf(canary_loss, shape, loc=loc, scale=scale))
    # Work in logs: F can be far below float64's resolution of 1 - F for very exposed canaries.
    log_rank = float(np.logaddexp(0.0, math.log(space_size - 1) + log_cdf)) if space_size > 1 else 0.0
    value = (math.log(space_size) - log_rank) / math.log(2)
    return ExposureEstimate(
        value=value,
        n_samples=int(losses.size),
        space_size=int(space_size),
        fit_shape=float(shape),
        fit_loc=float(loc),
        fit_scale=float(scale),
        max_bits_supported_by_samples=math.log2(losses.size),
    )


# --------------------------------------------------------------------------- ROC


def _empirical_roc(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and TPR at every distinct score threshold (score >= threshold = member), from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_members = scores[order], is_member[order]
    true_positives = np.cumsum(sorted_members)
    false_positives = np.cumsum(~sorted_members)
    # Only the last position of each run of tied scores is a reachable operating point.
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    tpr = np.r_[0.0, true_positives[last_of_tie] / true_positives[-1]]
    fpr = np.r_[0.0, false_positives[last_of_tie] / false_positives[-1]]
    return fpr, tpr


def roc_metrics(
    scores: Any,
    is_member: Any,
    fpr_levels: Sequence[float] = (0.001, 0.01),
    *,
    fpr_rule: Literal["<=", "<"] = "<=",
) -> dict[str, Any]:
    """ROC summary of a membership-inference score (higher score = more likely a member).

    Returns `auc`, `tpr_at_fpr` ({fpr_level: tpr}), the empirical curve `fpr` and `tpr` (lists,
    one point per distinct threshold), `n_members` and `n_nonmembers`.

    TPR at FPR x is the highest TPR among the empirical ROC's operating points whose FPR is <= x
    (`fpr_rule="<="`, the default: an operating point exactly at the requested FPR counts), without
    interpolation. LiRA's reference code (Carlini et al. 2022, `tpr[np.where(fpr < .001)[0][-1]]`
    over scikit-learn's `roc_curve`) uses a strict `<`; `fpr_rule="<"` reproduces it. The two
    differ only when an operating point lies exactly at FPR x (possible when the number of
    non-members is a multiple of 1/x), where `<` reports the point before it.
    With fewer than 1/x non-members the only point with FPR <= x is FPR = 0, so the number is not
    meaningful at that level; a warning says so.
    """
    score_array = _finite_1d(scores, "scores")
    labels = _as_numpy(is_member)
    if labels.shape != score_array.shape:
        raise ValueError(f"is_member shape {labels.shape} must match scores shape {score_array.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("is_member must be booleans or 0/1 (1 = member, 0 = non-member)")
    members = labels.astype(bool)
    n_members, n_nonmembers = int(members.sum()), int((~members).sum())
    if n_members == 0 or n_nonmembers == 0:
        raise ValueError(
            f"need both members and non-members, got {n_members} members and {n_nonmembers} non-members"
        )
    levels = [float(level) for level in fpr_levels]
    if any(not 0.0 < level < 1.0 for level in levels):
        raise ValueError(f"fpr_levels must lie in (0, 1), got {list(fpr_levels)}")
    if levels and n_nonmembers < 1.0 / min(levels):
        warnings.warn(
            f"only {n_nonmembers} non-members: TPR at FPR {min(levels)} needs at least "
            f"{math.ceil(1.0 / min(levels))} to be meaningful",
            stacklevel=2,
        )

    fpr, tpr = _empirical_roc(score_array, members)
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    if fpr_rule not in ("<=", "<"):
        raise ValueError(f"fpr_rule must be '<=' or '<' (LiRA's code), got {fpr_rule!r}")
    within = (lambda level: fpr <= level) if fpr_rule == "<=" else (lambda level: fpr < level)
    tpr_at_fpr = {level: float(tpr[within(level)].max()) for level in levels}
    return {
        "auc": auc,
        "tpr_at_fpr": tpr_at_fpr,
        "fpr": fpr.tolist(),
        "tpr": tpr.tolist(),
        "n_members": n_members,
        "n_nonmembers": n_nonmembers,
    }


# --------------------------------------------------------------------------- calibration


def _confidence_and_correct(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    prob_array = _as_numpy(probs).astype(np.float64)
    label_array = _as_numpy(labels)
    if prob_array.ndim == 1:  # binary: probability of class 1
        prob_array = np.stack([1.0 - prob_array, prob_array], axis=1)
    if prob_array.ndim != 2 or prob_array.shape[0] == 0:
        raise ValueError(f"probs must be [n, classes] (or [n] for binary), got shape {prob_array.shape}")
    if label_array.shape != (prob_array.shape[0],):
        raise ValueError(f"labels must have shape ({prob_array.shape[0]},), got {label_array.shape}")
    if not np.isfinite(prob_array).all() or prob_array.min() < 0.0 or prob_array.max() > 1.0:
        raise ValueError("probs must be probabilities in [0, 1]; apply softmax to logits first")
    if not np.allclose(prob_array.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("each row of probs must sum to 1; apply softmax to logits first")
    if not np.issubdtype(label_array.dtype, np.integer) and not np.issubdtype(label_array.dtype, np.bool_):
        raise ValueError(f"labels must be integer class ids, got dtype {label_array.dtype}")
    if label_array.min() < 0 or label_array.max() >= prob_array.shape[1]:
        raise ValueError(f"labels must be class ids in [0, {prob_array.shape[1] - 1}]")
    confidence = prob_array.max(axis=1)
    correct = prob_array.argmax(axis=1) == label_array
    return confidence, correct


def reliability_curve(probs: Any, labels: Any, n_bins: int = 15) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count for a reliability diagram.

    Equal-width bins over the top-1 probability: bin m covers ((m-1)/M, m/M], the first also
    includes 0. Only non-empty bins are returned, with their edges (`bin_lower`, `bin_upper`).
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins}")
    confidence, correct = _confidence_and_correct(probs, labels)
    bin_index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    curve: dict[str, list[float]] = {key: [] for key in ("bin_lower", "bin_upper", "confidence", "accuracy")}
    counts: list[int] = []
    for m in range(n_bins):
        in_bin = bin_index == m
        if not in_bin.any():
            continue
        curve["bin_lower"].append(m / n_bins)
        curve["bin_upper"].append((m + 1) / n_bins)
        curve["confidence"].append(float(confidence[in_bin].mean()))
        curve["accuracy"].append(float(correct[in_bin].mean()))
        counts.append(int(in_bin.sum()))
    return {**curve, "count": counts}


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over bins of |accuracy - confidence| weighted by the bin's share of samples.

    `probs` is [n, classes] (rows sum to 1) or [n] for binary (probability of class 1); the bins
    are those of `reliability_curve`.
    """
    curve = reliability_curve(probs, labels, n_bins)
    counts = np.asarray(curve["count"], dtype=np.float64)
    gaps = np.abs(np.asarray(curve["accuracy"]) - np.asarray(curve["confidence"]))
    return float(np.sum(counts * gaps) / counts.sum())


# --------------------------------------------------------------------------- agreement and accuracy


def _kept_fraction(matches: Tensor, keep: Tensor, what: str) -> float:
    kept = int(keep.sum())
    if kept == 0:
        raise ValueError(f"no positions left to compute {what}: the mask/labels exclude every position")
    return float((matches & keep).sum()) / kept


def top1_agreement(
    student_logits: Tensor, teacher_logits: Tensor | TopKLogits, mask: Tensor | None = None
) -> float:
    """Fraction of kept positions where the student's argmax equals the teacher's.

    Logits are [..., vocab]; `teacher_logits` may be a `TopKLogits`. `mask` ([...], bool) keeps
    the positions where it is True; without it every position counts.
    """
    student_top1 = torch.as_tensor(student_logits).argmax(dim=-1)
    if isinstance(teacher_logits, TopKLogits):
        best_in_topk = teacher_logits.values.argmax(dim=-1, keepdim=True)
        teacher_top1 = teacher_logits.indices.gather(-1, best_in_topk).squeeze(-1)
    else:
        teacher_logits = torch.as_tensor(teacher_logits)
        if teacher_logits.shape[-1] != student_logits.shape[-1]:
            raise ValueError(
                f"student vocab {student_logits.shape[-1]} != teacher vocab {teacher_logits.shape[-1]}; "
                "agreement needs a shared vocabulary"
            )
        teacher_top1 = teacher_logits.argmax(dim=-1)
    if teacher_top1.shape != student_top1.shape:
        raise ValueError(
            f"student positions {tuple(student_top1.shape)} != teacher positions {tuple(teacher_top1.shape)}"
        )
    keep = torch.ones_like(student_top1, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    if keep.shape != student_top1.shape:
        raise ValueError(
            f"mask shape {tuple(keep.shape)} must be the logits' shape without vocab, "
            f"{tuple(student_top1.shape)}"
        )
    return _kept_fraction(
        student_top1 == teacher_top1.to(student_top1.device), keep.to(student_top1.device), "top-1 agreement"
    )


def top1_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of positions whose argmax equals the label; labels of -100 are ignored.

    `logits` [..., classes] and `labels` [...] are aligned as given: a causal LM's caller
    shifts them first (logits[:, :-1] against labels[:, 1:]).
    """
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must be logits shape without the last axis, "
            f"{tuple(logits.shape[:-1])}"
        )
    return _kept_fraction(logits.argmax(dim=-1) == labels, labels != IGNORE_INDEX, "top-1 accuracy")


# --------------------------------------------------------------------------- confidence intervals


def bootstrap_ci(
    values: Any,
    stat: Callable[[np.ndarray], float] = np.mean,
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap (1 - alpha) confidence interval of `stat(values)`.

    Rows (axis 0) of `values` are resampled with replacement `n` times, so paired data such as
    (score, is_member) columns stay together: `stat` receives an array shaped like `values`.
    """
    data = _as_numpy(values)
    if data.ndim == 0 or data.shape[0] == 0:
        raise ValueError("values must hold at least one row to bootstrap")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of bootstrap resamples) must be a positive int, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), e.g. 0.05 for a 95% interval; got {alpha}")
    rng = np.random.default_rng(seed)
    resampled_rows = rng.integers(0, data.shape[0], size=(n, data.shape[0]))
    statistics = np.array([float(stat(data[rows])) for rows in resampled_rows])
    low, high = np.quantile(statistics, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)
