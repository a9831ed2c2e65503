"""Audit metrics against hand-computed numbers, scikit-learn and scipy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score, roc_curve

from secure_kd.metrics import (
    bootstrap_ci,
    canary_rank,
    estimate_exposure,
    expected_calibration_error,
    exposure,
    reliability_curve,
    roc_metrics,
    top1_accuracy,
    top1_agreement,
)
from secure_kd.topk import TopKLogits

# --------------------------------------------------------------------------- exposure


def test_exposure_hand_computed_middle_rank() -> None:
    # Only 0.5 is lower than the canary's 1.0: rank 2 of 4 -> log2(4) - log2(2).
    assert exposure([3.0, 1.0, 2.0, 0.5], 1) == pytest.approx(1.0)
    assert canary_rank([3.0, 1.0, 2.0, 0.5], 1) == 2


def test_exposure_best_and_worst_canary() -> None:
    assert exposure([3.0, 1.0, 2.0, 0.5], 3) == pytest.approx(2.0)  # most likely: log2(4)
    assert exposure([3.0, 1.0, 2.0, 0.5], 0) == pytest.approx(0.0)  # least likely: rank 4


def test_exposure_ties_count_only_strictly_lower() -> None:
    assert exposure([1.0, 1.0, 1.0, 2.0], 0) == pytest.approx(2.0)
    # 0.5 < 1.0 once; the other 1.0 is a tie and does not count: rank 2 of 3.
    assert exposure(np.array([0.5, 1.0, 1.0]), 2) == pytest.approx(math.log2(3) - 1.0)


def test_exposure_accepts_tensors() -> None:
    assert exposure(torch.tensor([3.0, 1.0, 2.0, 0.5]), 1) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-5, 5), min_size=1, max_size=40), st.data())
def test_exposure_matches_sorted_position(losses: list[int], data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(losses) - 1))
    # Rank read off the sorted array: the first position the canary's loss would take.
    rank = int(np.searchsorted(np.sort(losses), losses[index], side="left")) + 1
    assert exposure(losses, index) == pytest.approx(math.log2(len(losses) / rank))


@pytest.mark.parametrize(
    ("losses", "index", "message"),
    [
        ([], 0, "empty"),
        ([1.0, float("nan")], 0, "NaN"),
        ([1.0, 2.0], 2, "out of range"),
        ([1.0, 2.0], -1, "out of range"),
        ([1.0, 2.0], 1.0, "must be an int"),
        ([[1.0, 2.0]], 0, "1-D"),
    ],
)
def test_exposure_rejects_bad_input(losses: list, index: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        exposure(losses, index)  # type: ignore[arg-type]


def test_estimate_exposure_close_to_exact_exposure_at_about_10_bits() -> None:
    rng = np.random.default_rng(7)
    space = scipy_stats.skewnorm.rvs(4.0, loc=20.0, scale=3.0, size=2**17, random_state=rng)
    canary_loss = float(np.sort(space)[127])  # 127 candidates below it: rank 128 -> exposure 10
    exact = math.log2(space.size) - math.log2(1 + np.count_nonzero(space < canary_loss))
    assert exact == pytest.approx(10.0)

    sampled = rng.choice(space, size=20_000, replace=False)
    estimate = estimate_exposure(sampled, canary_loss, space.size)

    assert abs(estimate.value - exact) < 0.5
    assert estimate.is_estimate is True
    assert estimate.method == "skewnorm fit"
    assert estimate.n_samples == 20_000
    assert estimate.max_bits_supported_by_samples == pytest.approx(math.log2(20_000))
    assert '"is_estimate":true' in estimate.model_dump_json()


def test_estimate_exposure_never_exceeds_the_space_maximum() -> None:
    rng = np.random.default_rng(0)
    sampled = rng.normal(30.0, 2.0, size=500)
    estimate = estimate_exposure(sampled, canary_loss=0.0, space_size=10_000)  # 15 sigma below
    assert estimate.value <= math.log2(10_000) + 1e-12
    assert estimate.value > math.log2(10_000) - 0.01


def test_estimate_exposure_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 20"):
        estimate_exposure([1.0, 2.0, 3.0], 1.0, 100)
    with pytest.raises(ValueError, match="identical"):
        estimate_exposure([1.0] * 50, 1.0, 100)
    with pytest.raises(ValueError, match="space_size"):
        estimate_exposure(np.arange(50.0), 1.0, 0)


# --------------------------------------------------------------------------- ROC


def _sklearn_tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, level: float) -> float:
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(tpr[fpr <= level].max())


def test_roc_metrics_match_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=3000)
    scores = np.round(rng.normal(loc=0.8 * labels, scale=1.0), 1)  # rounding creates many ties
    result = roc_metrics(scores, labels.astype(bool), fpr_levels=(0.001, 0.01, 0.1))

    assert result["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    for level in (0.001, 0.01, 0.1):
        assert result["tpr_at_fpr"][level] == pytest.approx(_sklearn_tpr_at_fpr(labels, scores, level))
    sk_fpr, sk_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(result["fpr"], sk_fpr)
    np.testing.assert_allclose(result["tpr"], sk_tpr)
    assert result["n_members"] == int(labels.sum())
    assert result["n_nonmembers"] == int((1 - labels).sum())


def test_roc_metrics_hand_computed() -> None:
    # Thresholds 0.9, 0.8, 0.7, 0.6 give points (0, .5), (.5, .5), (.5, 1), (1, 1): AUC 0.75.
    with pytest.warns(UserWarning, match="non-members"):
        result = roc_metrics([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], fpr_levels=(0.001, 0.5))
    assert result["auc"] == pytest.approx(0.75)
    assert result["tpr_at_fpr"] == {0.001: pytest.approx(0.5), 0.5: pytest.approx(1.0)}


def test_roc_metrics_offers_lira_strict_fpr_rule() -> None:
    # 100 members above 99 of the 100 non-members; the 100th non-member sits between the 10th and the
    # 11th member, so the curve has (FPR 0, TPR .10) and then, after that one false positive, every
    # remaining member at exactly FPR 0.01: TPR 1.0 there by `<=`, 0.10 by LiRA's strict `<`.
    members = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    member_scores = np.linspace(200, 101, 100)
    nonmember_scores = np.r_[member_scores[9] - 0.5, np.linspace(50, 1, 99)]
    scores = np.r_[member_scores, nonmember_scores]
    fpr, tpr, _ = roc_curve(members, scores)
    lira = float(tpr[np.where(fpr < 0.01)[0][-1]])  # LiRA's plot.py, verbatim in form
    inclusive = float(tpr[fpr <= 0.01].max())
    assert (lira, inclusive) == (pytest.approx(0.10), pytest.approx(1.0))
    assert roc_metrics(scores, members, fpr_levels=(0.01,))["tpr_at_fpr"][0.01] == pytest.approx(inclusive)
    strict = roc_metrics(scores, members, fpr_levels=(0.01,), fpr_rule="<")
    assert strict["tpr_at_fpr"][0.01] == pytest.approx(lira)
    with pytest.raises(ValueError, match="fpr_rule"):
        roc_metrics(scores, members, fpr_levels=(0.01,), fpr_rule="lt")


def test_roc_metrics_perfectly_separable() -> None:
    scores = np.r_[np.linspace(10, 11, 1000), np.linspace(0, 1, 1000)]
    members = np.r_[np.ones(1000, bool), np.zeros(1000, bool)]
    result = roc_metrics(scores, members)
    assert result["auc"] == pytest.approx(1.0)
    assert result["tpr_at_fpr"] == {0.001: pytest.approx(1.0), 0.01: pytest.approx(1.0)}


def test_roc_metrics_identical_distributions_give_chance() -> None:
    rng = np.random.default_rng(11)
    members = rng.integers(0, 2, size=10_000).astype(bool)
    result = roc_metrics(rng.normal(size=10_000), members)
    assert abs(result["auc"] - 0.5) < 0.02
    assert result["tpr_at_fpr"][0.01] < 0.05


def test_roc_metrics_no_warning_with_enough_non_members() -> None:
    rng = np.random.default_rng(0)
    members = np.r_[np.ones(100, bool), np.zeros(1000, bool)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        roc_metrics(rng.normal(size=1100), members)


def test_roc_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="both members and non-members"):
        roc_metrics([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="must match"):
        roc_metrics([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(ValueError, match="0/1"):
        roc_metrics([0.1, 0.2], [2, 0])
    with pytest.raises(ValueError, match="NaN"):
        roc_metrics([0.1, float("nan")], [1, 0])
    with pytest.raises(ValueError, match="fpr_levels"):
        roc_metrics([0.1, 0.2], [1, 0], fpr_levels=(0.0,))


# --------------------------------------------------------------------------- calibration

# Two samples at confidence 0.95 (one right): gap 0.45. Three at 0.65, all right: gap 0.35.
HAND_PROBS = np.array(
    [[0.95, 0.03, 0.02], [0.95, 0.03, 0.02], [0.65, 0.35, 0.0], [0.65, 0.35, 0.0], [0.35, 0.65, 0.0]]
)
HAND_LABELS = np.array([0, 1, 0, 0, 1])


def test_ece_hand_computed() -> None:
    expected = (2 * 0.45 + 3 * 0.35) / 5
    assert expected_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=10) == pytest.approx(expected)


def test_reliability_curve_hand_computed() -> None:
    curve = reliability_curve(HAND_PROBS, HAND_LABELS, n_bins=10)
    assert curve["count"] == [3, 2]
    assert curve["confidence"] == pytest.approx([0.65, 0.95])
    assert curve["accuracy"] == pytest.approx([1.0, 0.5])
    assert curve["bin_lower"] == pytest.approx([0.6, 0.9])
    assert curve["bin_upper"] == pytest.approx([0.7, 1.0])


def test_ece_bin_edges_are_closed_on_the_right() -> None:
    # Confidence 0.7 belongs to (0.6, 0.7] with 0.65, so the two share a bin: |1 - 0.675| = 0.325.
    probs = np.array([[0.7, 0.3], [0.65, 0.35]])
    assert expected_calibration_error(probs, np.array([0, 0]), n_bins=10) == pytest.approx(0.325)


def test_ece_of_calibrated_predictions_is_near_zero_and_overconfidence_is_not() -> None:
    rng = np.random.default_rng(5)
    p_positive = rng.uniform(size=100_000)
    calibrated_labels = (rng.uniform(size=p_positive.size) < p_positive).astype(int)
    assert expected_calibration_error(p_positive, calibrated_labels) < 0.01

    coin_flips = rng.integers(0, 2, size=20_000)
    overconfident = np.full(coin_flips.size, 0.9)
    assert expected_calibration_error(overconfident, coin_flips) == pytest.approx(0.4, abs=0.02)


def test_ece_rejects_logits_and_bad_labels() -> None:
    with pytest.raises(ValueError, match="softmax"):
        expected_calibration_error(np.array([[2.0, -1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="softmax"):
        expected_calibration_error(np.array([[0.5, 0.2]]), np.array([0]))
    with pytest.raises(ValueError, match="class ids"):
        expected_calibration_error(np.array([[0.5, 0.5]]), np.array([2]))
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(np.array([[0.5, 0.5]]), np.array([0]), n_bins=0)


# --------------------------------------------------------------------------- agreement and accuracy

STUDENT = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # argmax 1, 0, 2
TEACHER = torch.tensor([[0.0, 5.0, 0.0], [0.0, 4.0, 0.0], [0.0, -1.0, 1.0]])  # argmax 1, 1, 2


def test_top1_agreement_hand_computed() -> None:
    assert top1_agreement(STUDENT, TEACHER) == pytest.approx(2 / 3)
    assert top1_agreement(STUDENT, TEACHER, mask=torch.tensor([True, True, False])) == pytest.approx(0.5)
    assert top1_agreement(STUDENT.unsqueeze(0), TEACHER.unsqueeze(0)) == pytest.approx(2 / 3)


def test_top1_agreement_with_topk_teacher() -> None:
    topk = TopKLogits.from_logits(TEACHER, k=2)
    unsorted = TopKLogits(topk.values.flip(-1), topk.indices.flip(-1))
    assert top1_agreement(STUDENT, topk) == pytest.approx(2 / 3)
    assert top1_agreement(STUDENT, unsorted) == pytest.approx(2 / 3)


def test_top1_agreement_rejects_empty_mask_and_vocab_mismatch() -> None:
    with pytest.raises(ValueError, match="no positions"):
        top1_agreement(STUDENT, TEACHER, mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="vocab"):
        top1_agreement(STUDENT, TEACHER[:, :2])


def test_top1_accuracy_ignores_minus_100() -> None:
    assert top1_accuracy(STUDENT, torch.tensor([1, 1, 2])) == pytest.approx(2 / 3)
    assert top1_accuracy(STUDENT, torch.tensor([1, -100, 0])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no positions"):
        top1_accuracy(STUDENT, torch.full((3,), -100))
    with pytest.raises(ValueError, match="labels shape"):
        top1_accuracy(STUDENT, torch.tensor([1, 1]))


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_matches_scipy_and_the_normal_approximation() -> None:
    rng = np.random.default_rng(2)
    values = rng.normal(10.0, 2.0, size=400)
    low, high = bootstrap_ci(values, n=2000)

    reference = scipy_stats.bootstrap(
        (values,), np.mean, n_resamples=2000, method="percentile", random_state=1
    ).confidence_interval
    assert low == pytest.approx(reference.low, abs=0.03)
    assert high == pytest.approx(reference.high, abs=0.03)
    half_width = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert low == pytest.approx(values.mean() - half_width, abs=0.03)
    assert high == pytest.approx(values.mean() + half_width, abs=0.03)


def test_bootstrap_ci_is_seeded_and_resamples_rows_together() -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, size=300)
    scores = rng.normal(loc=labels, scale=1.0)
    pairs = np.column_stack([scores, labels])

    def auc(rows: np.ndarray) -> float:
        return roc_auc_score(rows[:, 1], rows[:, 0])

    first = bootstrap_ci(pairs, stat=auc, n=200, seed=3)
    assert first == bootstrap_ci(pairs, stat=auc, n=200, seed=3)
    assert first != bootstrap_ci(pairs, stat=auc, n=200, seed=4)
    assert first[0] < roc_auc_score(labels, scores) < first[1]


def test_bootstrap_ci_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([1.0, 2.0], alpha=1.5)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_ci([1.0, 2.0], n=0)
