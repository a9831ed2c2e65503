"""ROC summaries of the reference-based membership attacks: AUC and TPR at 1% FPR with bootstrap
intervals, TPR at 0.1% FPR as a headline only with enough non-members, and the printed table.

Intervals are 95% percentile-bootstrap intervals over records, resampling members and non-members
separately (each resample keeps both classes at their sizes). TPR at FPR x is read off the empirical ROC
(`secure_kd.metrics.roc_metrics`: the best TPR among operating points with FPR <= x). With fewer than
`HEADLINE_NONMEMBERS` (10,000) non-members, TPR at 0.1% FPR rests on fewer than 10 false positives: it
is kept in results.json but not reported as a headline, and the table says so.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
from pydantic import BaseModel

from attacks.membership.config import HEADLINE_NONMEMBERS
from secure_kd import metrics

ATTACK_LABELS = {
    "loss": "loss",
    "reference": "reference (loss ratio)",
    "zlib": "zlib ratio",
    "min_k": "Min-K%",
    "min_k_plus_plus": "Min-K%++",
    "rmia": "RMIA (offline)",
}


class AttackSummary(BaseModel):
    name: str
    auc: float
    auc_ci: tuple[float, float]
    tpr_at_1pct_fpr: float
    tpr_at_1pct_fpr_ci: tuple[float, float]
    tpr_at_0_1pct_fpr: float
    tpr_at_0_1pct_fpr_headline: bool


class ReferenceAuditResult(BaseModel):
    kind: Literal["reference_membership"] = "reference_membership"
    model: str
    model_fingerprint: str
    references: list[str]
    reference_fingerprints: list[str]
    comparison: Literal["per-token", "per-byte"]
    comparison_note: str
    n_members: int
    n_nonmembers: int
    n_truncated: int
    max_length: int
    attacks: list[AttackSummary]
    low_fpr_note: str | None
    cache_hits: dict[str, bool]
    n_forwards: int
    seconds: float
    config: dict


def _roc(scores: np.ndarray, members: np.ndarray) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the low-FPR size warning: handled by the headline
        return metrics.roc_metrics(scores, members)


def summarize(
    name: str, scores: np.ndarray, members: np.ndarray, *, n_bootstrap: int = 1000, seed: int = 0
) -> AttackSummary:
    scores, members = np.asarray(scores, np.float64), np.asarray(members, bool)
    point = _roc(scores, members)
    member_rows, other_rows = np.flatnonzero(members), np.flatnonzero(~members)
    rng = np.random.default_rng([seed, 0xB007])
    aucs, tprs = np.empty(n_bootstrap), np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        rows = np.concatenate(
            [rng.choice(member_rows, member_rows.size), rng.choice(other_rows, other_rows.size)]
        )
        found = _roc(scores[rows], members[rows])
        aucs[b], tprs[b] = found["auc"], found["tpr_at_fpr"][0.01]

    def interval(values: np.ndarray) -> tuple[float, float]:
        low, high = np.quantile(values, [0.025, 0.975])
        return float(low), float(high)

    return AttackSummary(
        name=name,
        auc=point["auc"],
        auc_ci=interval(aucs),
        tpr_at_1pct_fpr=point["tpr_at_fpr"][0.01],
        tpr_at_1pct_fpr_ci=interval(tprs),
        tpr_at_0_1pct_fpr=point["tpr_at_fpr"][0.001],
        tpr_at_0_1pct_fpr_headline=int((~members).sum()) >= HEADLINE_NONMEMBERS,
    )


def low_fpr_note(n_nonmembers: int) -> str | None:
    if n_nonmembers >= HEADLINE_NONMEMBERS:
        return None
    return (
        f"TPR at 0.1% FPR is not a headline: {n_nonmembers:,} non-members (it needs >= "
        f"{HEADLINE_NONMEMBERS:,}); TPR at 1% FPR rests on {n_nonmembers // 100} false positives"
    )


def table(result: ReferenceAuditResult) -> list[str]:
    """The printed summary: one line per attack (no record content)."""
    lines = [
        f"membership audit of {result.model}: {result.n_members} members, {result.n_nonmembers} non-members, "
        f"reference {', '.join(result.references)} ({result.comparison} losses)",
        f"{'attack':<24}{'AUC [95% CI]':<24}{'TPR@1%FPR [95% CI]':<24}TPR@0.1%FPR",
    ]
    for a in result.attacks:
        low = f"{a.tpr_at_0_1pct_fpr:.3f}" if a.tpr_at_0_1pct_fpr_headline else "n/a (< 10,000 non-members)"
        lines.append(
            f"{ATTACK_LABELS.get(a.name, a.name):<24}"
            f"{f'{a.auc:.3f} [{a.auc_ci[0]:.3f}, {a.auc_ci[1]:.3f}]':<24}"
            f"{f'{a.tpr_at_1pct_fpr:.3f} [{a.tpr_at_1pct_fpr_ci[0]:.3f}, {a.tpr_at_1pct_fpr_ci[1]:.3f}]':<24}"
            f"{low}"
        )
    if result.comparison == "per-byte":
        lines.append(result.comparison_note)
    if result.low_fpr_note:
        lines.append(result.low_fpr_note)
    return lines
