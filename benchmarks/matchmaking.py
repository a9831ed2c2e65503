"""Regret of LinUCB matchmaking vs random pairing on synthetic non-IID clients (KNEXA-FL style).

Setup (per seed): N clients with topic histograms drawn from Dirichlet(alpha) over K topics (alpha 0.1:
most clients hold one or two topics). When clients i and j exchange knowledge, each one's loss drops by
half the total-variation distance of their topic histograms (a peer helps more the more it knows what
you do not), plus Gaussian noise; the learner reports `reward(loss_before, loss_after, kilobytes)` with
a fixed payload. The expected reward of a pair is therefore linear in the |p_i - p_j| half of the exact
pair context, so LinUCB can learn it from exact profiles; whether it can from Laplace-noised profiles
is what the privacy modes measure:

* `exact`: the server sees the true 16-dim profiles (no privacy; the reference).
* `eps8_once`, `eps1_once`: each client releases its profile once (epsilon 8 or 1, whole vector, L1
  sensitivity 16) and the server reuses that noisy vector every round (post-processing: the total
  stays 8 or 1 per client).
* `eps1_every_round`: a fresh epsilon-1 release every round (total epsilon = rounds per client).

Regret per round = expected reward of the best perfect matching (exhaustive search) minus that of the
pairs chosen. `greedy_oracle` runs the same greedy pairing on the true expected rewards: the regret a
greedy matchmaker keeps even with perfect knowledge.

Client counts: 10 (45 candidate pairs) and 16 (120 pairs) by default. A noisy profile released once
is a fixed vector, so with few pairs a 33-dim linear model can partly fit each pair's reward from
its fixed noisy context even when the noise hides the profile's meaning; with more pairs than
dimensions it has to rely on what the profiles say, and the noise costs more.

Run: `python benchmarks/matchmaking.py` (under a minute); prints one JSON line and writes
benchmarks/results/matchmaking.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from functools import cache
from pathlib import Path

import numpy as np

from federation.matchmaking import Matchmaker, PairingPolicy, RandomPairing, reward
from federation.profiles import ClientProfile, ProfileLedger, profile_vector, release_profile

PRIVACY_MODES = {"exact": None, "eps8_once": 8.0, "eps1_once": 1.0, "eps1_every_round": 1.0}
LOSS_BEFORE = 3.0
KILOBYTES = 200.0


def make_clients(n_clients: int, n_topics: int, dirichlet_alpha: float, rng: np.random.Generator):
    histograms = rng.dirichlet(np.full(n_topics, dirichlet_alpha), size=n_clients)
    profiles = np.stack(
        [
            profile_vector(
                ClientProfile(
                    n_examples=int(rng.integers(500, 50_000)),
                    topic_histogram=h,
                    recent_loss=float(rng.uniform(2.0, 4.0)),
                    model_parameters=int(rng.choice([5_000_000, 30_000_000, 135_000_000])),
                    mean_sequence_length=float(rng.uniform(64, 512)),
                    bandwidth_kilobytes=float(rng.uniform(1e3, 1e5)),
                    participation_rate=1.0,
                )
            )
            for h in histograms
        ]
    )
    # Expected loss drop of i when paired with j: half the total-variation distance of their topics.
    gain = 0.25 * np.abs(histograms[:, None, :] - histograms[None, :, :]).sum(-1)
    return profiles, gain


def best_matching_value(weights: np.ndarray) -> float:
    """Maximum total weight of a perfect matching on an even number of clients (bitmask search)."""
    n = len(weights)

    @cache
    def best(mask: int) -> float:
        if mask == 0:
            return 0.0
        i = (mask & -mask).bit_length() - 1
        rest = mask & ~(1 << i)
        return max(weights[i, j] + best(rest & ~(1 << j)) for j in range(n) if rest >> j & 1)

    return best((1 << n) - 1)


def greedy_matching_value(weights: np.ndarray) -> float:
    n = len(weights)
    candidates = sorted((-weights[i, j], i, j) for i in range(n) for j in range(i + 1, n))
    used: set[int] = set()
    total = 0.0
    for negative, i, j in candidates:
        if i not in used and j not in used:
            total -= negative
            used.update((i, j))
    return total


def run_policy(
    policy: PairingPolicy,
    profiles: np.ndarray,
    gain: np.ndarray,
    rounds: int,
    epsilon: float | None,
    fresh_every_round: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[ProfileLedger]]:
    """Expected reward collected per round, and each client's profile-release ledger."""
    n_clients = len(profiles)
    ledgers = [ProfileLedger() for _ in range(n_clients)]
    client_rngs = [np.random.default_rng(rng.integers(2**63)) for _ in range(n_clients)]

    def released(round_index: int) -> np.ndarray:
        if epsilon is None:
            return profiles
        return np.stack(
            [
                release_profile(profiles[c], epsilon, rng_c, ledger=ledger, round_index=round_index)
                for c, (rng_c, ledger) in enumerate(zip(client_rngs, ledgers, strict=True))
            ]
        )

    seen = released(0)
    collected = np.zeros(rounds)
    for t in range(rounds):
        if fresh_every_round and t > 0:
            seen = released(t)
        for i, j in policy.propose(seen):
            expected = gain[i, j] - 0.001 * KILOBYTES
            observed_drop = gain[i, j] + rng.normal(scale=0.05)
            policy.report((i, j), reward(LOSS_BEFORE, LOSS_BEFORE - observed_drop, KILOBYTES))
            collected[t] += expected
    return collected, ledgers


def run_setting(args: argparse.Namespace, n_clients: int) -> tuple[dict, dict[str, float]]:
    """All policies and privacy modes for one client count, over every seed."""
    regrets: dict[str, list[float]] = {}
    final_share: dict[str, list[float]] = {}
    epsilon_spent: dict[str, float] = {}
    window = max(1, args.rounds // 4)
    for seed in range(args.seeds):
        rng = np.random.default_rng([n_clients, seed])
        profiles, gain = make_clients(n_clients, args.topics, args.dirichlet_alpha, rng)
        expected = gain - 0.001 * KILOBYTES
        oracle = best_matching_value(expected)
        runs: dict[str, np.ndarray] = {}
        for mode, epsilon in PRIVACY_MODES.items():
            fresh = mode.endswith("every_round")
            for name, policy in (
                ("linucb", Matchmaker(n_clients, alpha=args.alpha)),
                ("linucb_decay", Matchmaker(n_clients, schedule="decay", beta0=args.beta0)),
            ):
                collected, ledgers = run_policy(
                    policy, profiles, gain, args.rounds, epsilon, fresh, np.random.default_rng([seed, 1])
                )
                runs[f"{name}/{mode}"] = collected
                epsilon_spent[mode] = max(ledger.total_epsilon for ledger in ledgers)
        collected, _ = run_policy(
            RandomPairing(n_clients, seed=seed),
            profiles,
            gain,
            args.rounds,
            None,
            False,
            np.random.default_rng([seed, 1]),
        )
        runs["random"] = collected
        runs["greedy_oracle"] = np.full(args.rounds, greedy_matching_value(expected))
        for key, per_round in runs.items():
            regrets.setdefault(key, []).append(float((oracle - per_round).sum()))
            final_share.setdefault(key, []).append(float(per_round[-window:].mean() / oracle))

    random_regret = float(np.mean(regrets["random"]))
    conditions = {
        key: {
            "cumulative_regret_mean": float(np.mean(values)),
            "cumulative_regret_std": float(np.std(values)),
            "regret_ratio_vs_random": float(np.mean(values) / random_regret),
            "final_reward_share_of_oracle": float(np.mean(final_share[key])),
        }
        for key, values in regrets.items()
    }
    return conditions, epsilon_spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 16])
    parser.add_argument("--topics", type=int, default=8)
    parser.add_argument("--dirichlet-alpha", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=1.0, help="LinUCB constant exploration")
    parser.add_argument("--beta0", type=float, default=1.0, help="LinUCB decay: alpha_t = beta0 / sqrt(t)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "matchmaking.json")
    args = parser.parse_args()
    if any(n < 2 or n % 2 or n > 16 for n in args.clients):
        parser.error("each --clients value must be even and in [2, 16] (the oracle is an exhaustive search)")

    started = time.perf_counter()
    by_clients = {}
    for n_clients in args.clients:
        conditions, epsilon_spent = run_setting(args, n_clients)
        by_clients[str(n_clients)] = {
            "pairs_per_round": n_clients // 2,
            "candidate_pairs": n_clients * (n_clients - 1) // 2,
            "epsilon_per_client": epsilon_spent,
            "conditions": conditions,
        }
    results = {
        "schema_version": 1,
        "benchmark": "matchmaking",
        "config": {
            "clients": args.clients,
            "topics": args.topics,
            "dirichlet_alpha": args.dirichlet_alpha,
            "rounds": args.rounds,
            "seeds": args.seeds,
            "alpha": args.alpha,
            "beta0": args.beta0,
            "reward_noise_std": 0.05,
            "kilobytes_per_exchange": KILOBYTES,
            "final_window_rounds": max(1, args.rounds // 4),
            "context_dim": 33,
        },
        "by_clients": by_clients,
        "seconds": round(time.perf_counter() - started, 2),
        "environment": {"python": platform.python_version(), "numpy": np.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, suffix=".tmp", delete=False) as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    os.replace(handle.name, args.out)
    summary = {
        n: {key: round(value["regret_ratio_vs_random"], 3) for key, value in setting["conditions"].items()}
        for n, setting in by_clients.items()
    }
    print(json.dumps({"benchmark": "matchmaking", "regret_ratio_vs_random": summary, "out": str(args.out)}))


if __name__ == "__main__":
    main()
