"""Privacy accounting with Opacus' accountants (RDP, PRV); nothing here re-derives a bound.

A history is Opacus' own format: a list of `(noise_multiplier, sample_rate, steps)`, one entry per
stretch of DP-SGD steps of the Poisson-subsampled Gaussian mechanism. `epsilon(history, delta)`
hands it to a fresh Opacus accountant. GDP is not offered: Opacus warns that it can underestimate
epsilon for DP-SGD.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Opacus is imported where an accountant is made: ~1 s per Flower ClientApp process
    from opacus.accountants.accountant import IAccountant

History = list[tuple[float, float, int]]

ACCOUNTANTS = ("rdp", "prv")
EPSILON_TOLERANCE = 0.01
_MAX_SIGMA = 1e6


class PrivacyBudgetExhausted(ValueError):
    """The dataset's ledger has no budget left for another step."""


def make_accountant(name: str, history: Sequence[tuple[float, float, int]] = ()) -> IAccountant:
    """A fresh Opacus accountant holding `history` (entries with zero steps are dropped)."""
    if name not in ACCOUNTANTS:
        raise ValueError(
            f"unknown accountant {name!r}; choose one of {', '.join(ACCOUNTANTS)} (gdp is not offered)"
        )
    from opacus.accountants import PRVAccountant, RDPAccountant

    accountant = RDPAccountant() if name == "rdp" else PRVAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    return accountant


def epsilon(history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of the composition of `history`, by Opacus' `accountant` (0 for no steps)."""
    normalized = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    if not normalized:
        make_accountant(accountant)  # still reject an unknown accountant
        return 0.0
    return _epsilon(normalized, float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    # An RDP evaluation takes 0.1-0.5 s on a CPU core; budget searches and reports repeat histories.
    with _quiet_rdp():
        return float(make_accountant(accountant, history).get_epsilon(delta=delta))


@contextlib.contextmanager
def _quiet_rdp() -> Iterator[None]:
    """Silence Opacus' "Optimal order is the largest alpha": the RDP bound holds, only not the tightest."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def epsilons(history: Sequence[tuple[float, float, int]], delta: float) -> dict[str, float | None]:
    """Epsilon by every sound accountant; None where an accountant cannot evaluate this history."""
    out: dict[str, float | None] = {}
    for name in ACCOUNTANTS:
        try:
            out[name] = epsilon(history, delta, name)
        except (ValueError, ArithmeticError, RuntimeError):
            out[name] = None
    return out


def default_delta(n_records: int) -> float:
    """The largest power of ten not above 1/(10*N)."""
    if n_records < 1:
        raise ValueError(f"n_records must be >= 1, got {n_records}")
    exponent = 0
    while 10**exponent < 10 * n_records:  # integers: no rounding at exact powers of ten
        exponent += 1
    return 10.0**-exponent


def resolve_delta(delta: float | None, n_records: int) -> float:
    """`delta`, or the default for N records; refuse delta >= 1/N."""
    if delta is None:
        return default_delta(n_records)
    if delta * n_records >= 1:
        raise ValueError(
            f"privacy.delta={delta:g} is not below 1/N = 1/{n_records} = {1 / n_records:.3g}: with such a "
            f"delta the mechanism may publish a whole record outright. Use a smaller delta, e.g. "
            f"{default_delta(n_records):g} (the default: the largest power of ten not above 1/(10*N))"
        )
    return float(delta)


def noise_multiplier_for_budget(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    prior: Sequence[tuple[float, float, int]] = (),
) -> float:
    """The noise multiplier that makes `prior` plus `steps` new steps end at (or just under) target_epsilon.

    Without a prior history this is Opacus' `get_noise_multiplier`; with one (earlier runs on the same
    dataset) the same doubling-then-bisection search runs on the composed history.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 to calibrate the noise, got {steps}")
    spent = epsilon(prior, delta, accountant)
    if spent >= target_epsilon:
        raise PrivacyBudgetExhausted(
            f"the ledger of this dataset has already spent epsilon={spent:.3f} ({accountant}, "
            f"delta={delta:g}), which is not below target_epsilon={target_epsilon}; nothing is left to train"
        )
    if not prior:
        return _opacus_noise_multiplier(
            float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant
        )

    def eps_at(sigma: float) -> float:
        return epsilon([*prior, (sigma, sample_rate, steps)], delta, accountant)

    low, high, eps_high = 0.0, 10.0, float("inf")
    while eps_high > target_epsilon:
        high *= 2
        if high > _MAX_SIGMA:
            raise ValueError(_too_low(target_epsilon - spent, sample_rate, steps))
        eps_high = eps_at(high)
    while target_epsilon - eps_high > EPSILON_TOLERANCE:
        mid = (low + high) / 2
        eps_mid = eps_at(mid)
        if eps_mid < target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return high


@functools.lru_cache(maxsize=256)
def _opacus_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with _quiet_rdp():
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=EPSILON_TOLERANCE,
                )
            )
    except ValueError as exc:
        raise ValueError(_too_low(target_epsilon, sample_rate, steps)) from exc


def _too_low(budget: float, sample_rate: float, steps: int) -> str:
    return (
        f"an epsilon budget of {budget:.3g} cannot cover {steps} steps at sample rate {sample_rate:.3g} even "
        f"with a noise multiplier of {_MAX_SIGMA:g}; raise target_epsilon or train fewer steps"
    )


def steps_within_budget(
    *,
    target_epsilon: float,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    upper: int,
    accountant: str = "rdp",
    prior: Sequence[tuple[float, float, int]] = (),
) -> int:
    """The most steps s <= upper with epsilon(prior + s steps) <= target_epsilon (epsilon grows with s)."""

    def fits(s: int) -> bool:
        return epsilon([*prior, (noise_multiplier, sample_rate, s)], delta, accountant) <= target_epsilon

    if upper <= 0 or not fits(0):
        return 0
    if fits(upper):
        return upper
    low, high = 0, upper  # fits(low), not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low
