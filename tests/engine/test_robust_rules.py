"""secure_kd/robust_rules.py: each rule against values computed by hand, the honest-range bound of the
median and the trimmed mean under a poisoned row, renormalized distributions, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from secure_kd.robust_rules import combine, combine_distributions, trim_count

# three rows, two coordinates; by hand per coordinate:
#   column 0: 1, 4, 10 -> mean 5, median 4; weights 1,1,2 -> (1 + 4 + 20) / 4 = 6.25
#   column 1: 2, 8, -1 -> mean 3, median 2; weights 1,1,2 -> (2 + 8 - 2) / 4 = 2
ROWS = torch.tensor([[1.0, 2.0], [4.0, 8.0], [10.0, -1.0]], dtype=torch.float64)


def test_mean_weighted_median_by_hand():
    assert combine(ROWS, "mean").tolist() == [5.0, 3.0]
    assert combine(ROWS, "weighted_mean", weights=[1.0, 1.0, 2.0]).tolist() == [6.25, 2.0]
    assert combine(ROWS, "median").tolist() == [4.0, 2.0]
    # an even number of rows: the mean of the two middle values (as numpy.median)
    four = torch.tensor([[1.0], [3.0], [7.0], [100.0]], dtype=torch.float64)
    assert combine(four, "median").tolist() == [5.0]


def test_trimmed_mean_by_hand():
    five = torch.tensor([[0.0], [1.0], [2.0], [3.0], [50.0]], dtype=torch.float64)
    # floor(0.2 * 5) = 1 cut at each end: mean(1, 2, 3) = 2
    assert combine(five, "trimmed_mean", trim_fraction=0.2).tolist() == [2.0]
    # floor(0.1 * 5) = 0: the plain mean 56 / 5
    assert combine(five, "trimmed_mean", trim_fraction=0.1).tolist() == [pytest.approx(11.2)]
    # three rows, fraction 1/3: one cut at each end leaves the median
    assert combine(ROWS, "trimmed_mean", trim_fraction=0.34).tolist() == [4.0, 2.0]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 4, 3))
    got = combine(torch.from_numpy(x), "trimmed_mean", trim_fraction=0.25).numpy()
    np.testing.assert_allclose(got, scipy.stats.trim_mean(x, 0.25, axis=0), rtol=1e-12)


@pytest.mark.parametrize("rule,n,bad", [("median", 3, 1), ("median", 5, 2), ("trimmed_mean", 5, 1)])
def test_poisoned_rows_stay_within_the_honest_range(rule, n, bad):
    rng = np.random.default_rng(n + bad)
    honest = torch.from_numpy(rng.uniform(0.2, 0.4, size=(n - bad, 6)))
    low, high = honest.min(dim=0).values, honest.max(dim=0).values
    for poison in (1e6, -1e6, 0.0, 1.0):
        stacked = torch.cat([honest, torch.full((bad, 6), poison, dtype=torch.float64)])
        got = combine(stacked, rule, trim_fraction=0.2)
        assert bool((got >= low).all() and (got <= high).all()), (rule, poison)
    # the mean has no such bound: one row moves it anywhere
    stacked = torch.cat([honest, torch.full((bad, 6), 1e6, dtype=torch.float64)])
    assert bool((combine(stacked, "mean") > high).all())


def test_distributions_renormalized_by_hand():
    probs = torch.tensor(
        [[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]], dtype=torch.float64
    )  # three teachers over a vocabulary of 3, one position
    # coordinate medians 0.2, 0.3, 0.3 (sum 0.8) -> 0.25, 0.375, 0.375
    got = combine_distributions(probs, "median")
    np.testing.assert_allclose(got.numpy(), [0.25, 0.375, 0.375])
    # three rows with trim 1/3 = the median
    np.testing.assert_allclose(combine_distributions(probs, "trimmed_mean", trim_fraction=0.34).numpy(), got)
    np.testing.assert_allclose(combine_distributions(probs, "mean").numpy(), [0.8 / 3, 0.3, 1.3 / 3])
    weighted = combine_distributions(probs, "weighted_mean", weights=[2.0, 1.0, 1.0])
    np.testing.assert_allclose(weighted.numpy(), [0.325, 0.3, 0.375])
    # leading dims [batch, seq] are kept, and every position sums to 1
    many = torch.softmax(torch.randn(4, 2, 3, 11, dtype=torch.float64), dim=-1)
    out = combine_distributions(many, "median")
    assert out.shape == (2, 3, 11)
    np.testing.assert_allclose(out.sum(-1).numpy(), 1.0)


def test_all_zero_robust_result_falls_back_to_the_mean():
    sparse = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    np.testing.assert_allclose(combine_distributions(sparse, "median").numpy(), [1 / 3] * 3)


def test_refusals_name_the_problem():
    assert [trim_count(n, 0.2) for n in (3, 4, 5, 10)] == [0, 0, 1, 2]
    with pytest.raises(ValueError, match=r"in \[0, 0.5\)"):
        trim_count(3, 0.5)
    with pytest.raises(ValueError, match="needs weights"):
        combine(ROWS, "weighted_mean")
    with pytest.raises(ValueError, match="one weight per row"):
        combine(ROWS, "weighted_mean", weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="positive finite"):
        combine(ROWS, "weighted_mean", weights=[1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match="unknown rule"):
        combine(ROWS, "mode")  # type: ignore[arg-type]
