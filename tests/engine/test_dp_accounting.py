"""Accounting against Opacus' own accountants, driven step by step (a different path than ours)."""

from __future__ import annotations

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from secure_kd.config import ConfigError, load_config
from secure_kd.dp.accounting import (
    PrivacyBudgetExhausted,
    default_delta,
    epsilon,
    epsilons,
    noise_multiplier_for_budget,
    resolve_delta,
    steps_within_budget,
)
from secure_kd.dp.config import PrivacyConfig


def stepped(accountant_class, runs, delta):
    """Epsilon from a fresh Opacus accountant fed one `step()` per DP step."""
    accountant = accountant_class()
    for sigma, q, steps in runs:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, 1e-1),
        (9, 1e-2),
        (10, 1e-2),
        (100, 1e-3),
        (120, 1e-4),
        (999, 1e-4),
        (1000, 1e-4),
        (1001, 1e-5),
        (60_000, 1e-6),
    ],
)
def test_default_delta_is_the_largest_power_of_ten_not_above_one_over_ten_n(n, expected):
    assert default_delta(n) == expected
    assert default_delta(n) <= 1 / (10 * n) < 10 * default_delta(n)


def test_delta_at_or_above_one_over_n_is_refused_with_the_default_offered():
    with pytest.raises(ValueError, match=r"not below 1/N = 1/100") as info:
        resolve_delta(0.01, 100)
    assert "0.001" in str(info.value)
    assert resolve_delta(0.0099, 100) == 0.0099
    assert resolve_delta(None, 100) == 1e-3


def test_epsilon_matches_opacus_accountants_stepped_one_step_at_a_time():
    runs = [(1.1, 0.05, 20), (0.9, 0.1, 7), (1.1, 0.05, 5)]
    assert epsilon(runs, 1e-5, "rdp") == pytest.approx(stepped(RDPAccountant, runs, 1e-5), rel=1e-9)
    assert epsilon(runs, 1e-5, "prv") == pytest.approx(stepped(PRVAccountant, runs, 1e-5), rel=1e-9)
    both = epsilons(runs, 1e-5)
    assert set(both) == {"rdp", "prv"} and both["prv"] < both["rdp"]  # PRV is the tighter here
    assert epsilon([], 1e-5) == 0.0 and epsilon([(1.0, 0.1, 0)], 1e-5) == 0.0


def test_gdp_is_not_offered():
    with pytest.raises(ValueError, match="can underestimate"):
        PrivacyConfig(target_epsilon=1.0, accountant="gdp")
    with pytest.raises(ValueError, match="unknown accountant"):
        epsilon([(1.0, 0.1, 3)], 1e-5, "gdp")


def test_privacy_config_needs_a_way_to_set_the_noise():
    with pytest.raises(ValueError, match="set target_epsilon"):
        PrivacyConfig()
    with pytest.raises(ValueError, match="ledger_key"):
        PrivacyConfig(noise_multiplier=1.0, ledger_key="../escape")


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_calibration_without_history_is_opacus_get_noise_multiplier():
    sigma = noise_multiplier_for_budget(target_epsilon=3.0, delta=1e-5, sample_rate=0.02, steps=50)
    assert sigma == get_noise_multiplier(
        target_epsilon=3.0,
        target_delta=1e-5,
        sample_rate=0.02,
        steps=50,
        accountant="rdp",
        epsilon_tolerance=0.01,
    )


def test_calibration_counts_what_the_ledger_already_spent():
    prior = [(1.5, 0.05, 30)]
    spent = stepped(RDPAccountant, prior, 1e-5)
    sigma = noise_multiplier_for_budget(
        target_epsilon=4.0, delta=1e-5, sample_rate=0.05, steps=40, prior=prior
    )
    total = stepped(RDPAccountant, [*prior, (sigma, 0.05, 40)], 1e-5)
    assert 4.0 - 0.01 <= total <= 4.0 and spent < total
    assert stepped(RDPAccountant, [*prior, (sigma * 0.98, 0.05, 40)], 1e-5) > 4.0  # not needlessly noisy
    with pytest.raises(PrivacyBudgetExhausted, match="already spent"):
        noise_multiplier_for_budget(target_epsilon=spent, delta=1e-5, sample_rate=0.05, steps=5, prior=prior)


def test_steps_within_budget_is_the_last_step_that_fits():
    prior = [(2.0, 0.1, 10)]
    allowed = steps_within_budget(
        target_epsilon=6.0, delta=1e-4, noise_multiplier=0.9, sample_rate=0.1, upper=500, prior=prior
    )
    assert stepped(RDPAccountant, [*prior, (0.9, 0.1, allowed)], 1e-4) <= 6.0
    assert stepped(RDPAccountant, [*prior, (0.9, 0.1, allowed + 1)], 1e-4) > 6.0
    assert (
        steps_within_budget(
            target_epsilon=6.0,
            delta=1e-4,
            noise_multiplier=0.9,
            sample_rate=0.1,
            upper=allowed - 3,
            prior=prior,
        )
        == allowed - 3
    )


def test_job_config_refuses_packing_fused_and_stateful_objectives_under_dp():
    base = ["train.privacy.target_epsilon=2.0"]
    refused = [
        ("data.packing=true", "data.packing: false"),
        ("kd.fused=true", "kd.fused: false"),
        ("kd.loss=taid", "stateless objective"),
    ]
    for override, needle in refused:
        with pytest.raises(ConfigError, match=needle):
            load_config("configs/tiny.yaml", [*base, override])
    job = load_config("configs/dp-tiny.yaml", [])
    assert job.train.privacy is not None and job.train.privacy.target_epsilon == 8.0
