"""KNEXA-FL style matchmaking: a non-aggregating server pairs clients with LinUCB over private profiles.

Each round the server holds one noisy profile per client (`federation.profiles.release_profile`),
scores every candidate pair with a LinUCB bandit over the pair's symmetric context (`pair_context`),
and greedily forms floor(N/2) disjoint pairs: the highest-scoring pair first, both clients removed,
repeat. With an odd number of clients the one left after the greedy pass sits the round out
(`Matchmaker.last_unpaired`); it is whoever scored worst with every remaining partner, not a random
pick. After the matched peers have exchanged knowledge, each pair's learner reports
`reward(loss_before, loss_after, kilobytes)` and `Matchmaker.report` updates the bandit.
`RandomPairing` has the same interface and is the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any, Protocol

import numpy as np

from federation.linucb import LinUCB, Schedule
from federation.profiles import PROFILE_DIM

__all__ = [
    "PAIR_CONTEXT_DIM",
    "LinUCB",
    "Matchmaker",
    "PairingPolicy",
    "RandomPairing",
    "pair_context",
    "reward",
]

PAIR_CONTEXT_DIM = 2 * PROFILE_DIM + 1
Pair = tuple[int, int]
STATE_FORMAT = "secure_kd.federation.matchmaker"
STATE_VERSION = 1


def pair_context(
    profile_i: Sequence[float] | np.ndarray, profile_j: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Symmetric context of a pair: `[|p_i - p_j|, p_i * p_j, 1]` (2d + 1 numbers, 33 for 16-dim profiles).

    Both halves are symmetric, so the pair (i, j) and the pair (j, i) get the same context and score.
    A plain concatenation `[p_i, p_j]` would be wrong twice over: it depends on the order, and a linear
    score over it is `theta_1 . p_i + theta_2 . p_j`, a sum of two per-client scores, so every client's
    best partner would be the same globally "good" client and the bandit could never learn that two
    clients complement each other (different topics) or clash. `|p_i - p_j|` carries dissimilarity,
    `p_i * p_j` co-occurrence (both large), and the constant 1 a bias (the average value of any pair).
    """
    p_i = np.asarray(profile_i, dtype=np.float64)
    p_j = np.asarray(profile_j, dtype=np.float64)
    if p_i.ndim != 1 or p_i.shape != p_j.shape:
        raise ValueError(
            f"pair_context needs two 1-D profiles of equal length, got {p_i.shape} and {p_j.shape}"
        )
    if not (np.all(np.isfinite(p_i)) and np.all(np.isfinite(p_j))):
        raise ValueError("pair_context got a profile with NaN or infinite values")
    return np.concatenate([np.abs(p_i - p_j), p_i * p_j, [1.0]])


def reward(
    loss_before: float, loss_after: float, kilobytes: float, gamma: float = 1.0, delta: float = 0.001
) -> float:
    """The learner's reward for one exchange: `gamma * (loss_before - loss_after) - delta * kilobytes`."""
    for name, value in (("loss_before", loss_before), ("loss_after", loss_after)):
        if not (isinstance(value, Real) and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    for name, value in (("kilobytes", kilobytes), ("gamma", gamma), ("delta", delta)):
        if not (isinstance(value, Real) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(gamma * (loss_before - loss_after) - delta * kilobytes)


class PairingPolicy(Protocol):
    """What the ServerApp needs from a pairing policy."""

    def propose(self, profiles: Any, available: Sequence[int] | None = None) -> list[Pair]: ...

    def report(self, pair: Sequence[int], reward: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...


def _check_profiles(profiles: Any, n_clients: int, profile_dim: int | None) -> np.ndarray:
    values = np.asarray(profiles, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != n_clients:
        raise ValueError(f"profiles must have shape [n_clients={n_clients}, profile_dim], got {values.shape}")
    if profile_dim is not None and values.shape[1] != profile_dim:
        raise ValueError(
            f"profiles have {values.shape[1]} dims but the matchmaker's context dim needs {profile_dim} "
            f"(context dim = 2 * profile_dim + 1)"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError("profiles hold NaN or infinite values")
    return values


def _check_available(available: Sequence[int] | None, n_clients: int) -> list[int]:
    if available is None:
        return list(range(n_clients))
    clients = [int(c) for c in available]
    if len(set(clients)) != len(clients):
        raise ValueError(f"available lists a client twice: {clients}")
    if any(c < 0 or c >= n_clients for c in clients):
        raise ValueError(f"available clients must lie in [0, {n_clients}), got {clients}")
    return sorted(clients)


def _normalize_pair(pair: Sequence[int]) -> Pair:
    if len(pair) != 2:
        raise ValueError(f"a pair is two client indices, got {pair!r}")
    i, j = (int(c) for c in pair)
    return (i, j) if i < j else (j, i)


def _check_n_clients(n_clients: int) -> int:
    if not isinstance(n_clients, int) or isinstance(n_clients, bool) or n_clients < 2:
        raise ValueError(f"n_clients must be an int >= 2, got {n_clients!r}")
    return n_clients


class Matchmaker:
    """Greedy disjoint pairing by LinUCB score over `pair_context`; one decision round per `propose`.

    With `schedule="decay"` the bandit's round t is the matchmaking round (1 for the first `propose`),
    as in KNEXA-FL, not the number of rewards observed.
    """

    def __init__(
        self,
        n_clients: int,
        dim: int = PAIR_CONTEXT_DIM,
        alpha: float = 1.0,
        *,
        schedule: Schedule = "constant",
        beta0: float = 1.0,
    ) -> None:
        self.n_clients = _check_n_clients(n_clients)
        if not isinstance(dim, int) or dim < 3 or dim % 2 == 0:
            raise ValueError(f"dim must be 2 * profile_dim + 1 (an odd int >= 3), got {dim!r}")
        self.bandit = LinUCB(dim, alpha, schedule=schedule, beta0=beta0)
        self.round = 0
        self.last_unpaired: list[int] = []
        self._pending: dict[Pair, np.ndarray] = {}

    @property
    def profile_dim(self) -> int:
        return (self.bandit.dim - 1) // 2

    def score_pairs(
        self, profiles: Any, available: Sequence[int] | None = None, t: int | None = None
    ) -> tuple[list[Pair], np.ndarray, np.ndarray]:
        """Every candidate pair (i < j) among `available`, its context and its UCB score (no side effects)."""
        values = _check_profiles(profiles, self.n_clients, self.profile_dim)
        clients = _check_available(available, self.n_clients)
        pairs = [(i, j) for a, i in enumerate(clients) for j in clients[a + 1 :]]
        if not pairs:
            return [], np.zeros((0, self.bandit.dim)), np.zeros(0)
        contexts = np.stack([pair_context(values[i], values[j]) for i, j in pairs])
        return pairs, contexts, self.bandit.scores(contexts, t=t if t is not None else max(self.round, 1))

    def propose(self, profiles: Any, available: Sequence[int] | None = None) -> list[Pair]:
        """Start a round: floor(N/2) disjoint pairs among `available` clients (default: all), best first.

        `profiles` is the [n_clients, profile_dim] array of released profiles (rows of clients that are
        not available are ignored). Rewards of the previous round that were never reported are dropped.
        """
        pairs, contexts, scores = self.score_pairs(profiles, available, t=self.round + 1)
        self.round += 1
        order = sorted(range(len(pairs)), key=lambda k: (-scores[k], pairs[k]))
        used: set[int] = set()
        chosen: list[Pair] = []
        self._pending = {}
        for k in order:
            i, j = pairs[k]
            if i in used or j in used:
                continue
            chosen.append((i, j))
            used.update((i, j))
            self._pending[(i, j)] = contexts[k]
        self.last_unpaired = [c for c in _check_available(available, self.n_clients) if c not in used]
        return chosen

    def report(self, pair: Sequence[int], reward: float) -> None:
        """Feed the reward of one pair proposed in the current round to the bandit (once per pair)."""
        key = _normalize_pair(pair)
        if key not in self._pending:
            raise ValueError(
                f"pair {key} was not proposed in round {self.round} or was already reported; "
                f"pending pairs: {sorted(self._pending)}"
            )
        self.bandit.update(self._pending.pop(key), reward)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "policy": "linucb",
            "n_clients": self.n_clients,
            "round": self.round,
            "last_unpaired": list(self.last_unpaired),
            "pending": [{"pair": list(p), "context": c.tolist()} for p, c in sorted(self._pending.items())],
            "bandit": self.bandit.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Matchmaker:
        _check_state_header(state, "linucb")
        bandit = LinUCB.from_state_dict(state.get("bandit"))
        matchmaker = cls(
            state["n_clients"], bandit.dim, bandit.alpha, schedule=bandit.schedule, beta0=bandit.beta0
        )
        matchmaker.bandit = bandit
        matchmaker.round = _check_round(state.get("round"))
        matchmaker.last_unpaired = [int(c) for c in state.get("last_unpaired", [])]
        for item in state.get("pending", []):
            context = np.asarray(item["context"], dtype=np.float64)
            if context.shape != (bandit.dim,) or not np.all(np.isfinite(context)):
                raise ValueError(
                    f"matchmaker state holds a malformed pending context for pair {item.get('pair')}"
                )
            matchmaker._pending[_normalize_pair(item["pair"])] = context
        return matchmaker


class RandomPairing:
    """Baseline: a uniformly random set of floor(N/2) disjoint pairs each round (seeded); learns nothing."""

    def __init__(self, n_clients: int, seed: int = 0) -> None:
        self.n_clients = _check_n_clients(n_clients)
        self.round = 0
        self.last_unpaired: list[int] = []
        self._rng = np.random.default_rng(seed)
        self._pending: set[Pair] = set()

    def propose(self, profiles: Any, available: Sequence[int] | None = None) -> list[Pair]:
        """Random disjoint pairs among `available`; `profiles` is checked for shape but not used."""
        _check_profiles(profiles, self.n_clients, None)
        clients = _check_available(available, self.n_clients)
        self.round += 1
        order = self._rng.permutation(clients).tolist()
        chosen = [_normalize_pair(order[k : k + 2]) for k in range(0, len(order) - 1, 2)]
        self.last_unpaired = order[len(chosen) * 2 :]
        self._pending = set(chosen)
        return chosen

    def report(self, pair: Sequence[int], reward: float) -> None:
        key = _normalize_pair(pair)
        if key not in self._pending:
            raise ValueError(f"pair {key} was not proposed in round {self.round} or was already reported")
        if not (isinstance(reward, Real) and math.isfinite(reward)):
            raise ValueError(f"reward must be a finite number, got {reward!r}")
        self._pending.discard(key)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "policy": "random",
            "n_clients": self.n_clients,
            "round": self.round,
            "last_unpaired": list(self.last_unpaired),
            "pending": [list(p) for p in sorted(self._pending)],
            "rng": self._rng.bit_generator.state,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> RandomPairing:
        _check_state_header(state, "random")
        pairing = cls(state["n_clients"])
        pairing.round = _check_round(state.get("round"))
        pairing.last_unpaired = [int(c) for c in state.get("last_unpaired", [])]
        pairing._pending = {_normalize_pair(p) for p in state.get("pending", [])}
        try:
            pairing._rng.bit_generator.state = state["rng"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError("random pairing state has a missing or malformed 'rng' entry") from err
        return pairing


def _check_state_header(state: Any, policy: str) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"not a pairing-policy state (expected format {STATE_FORMAT!r})")
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"unsupported pairing state version {state.get('version')!r}; expected {STATE_VERSION}"
        )
    if state.get("policy") != policy:
        raise ValueError(f"this state belongs to policy {state.get('policy')!r}, not {policy!r}")


def _check_round(value: Any) -> int:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"pairing state 'round' must be an int >= 0, got {value!r}")
    return value
