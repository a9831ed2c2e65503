"""LinUCB, private profiles and the pairing policies of federation.matchmaking."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from federation.linucb import LinUCB as LinUCBDirect
from federation.matchmaking import (
    PAIR_CONTEXT_DIM,
    LinUCB,
    Matchmaker,
    RandomPairing,
    pair_context,
    reward,
)
from federation.profiles import (
    PROFILE_DIM,
    ClientProfile,
    ProfileLedger,
    ProfileScales,
    profile_vector,
    release_profile,
    topic_sketch,
)

# ------------------------------------------------------------------------------------------ LinUCB


@pytest.mark.parametrize("inverse", ["sherman_morrison", "solve"])
def test_linucb_matches_hand_computed_two_arm_updates(inverse):
    arms = np.array([[1.0, 0.0], [1.0, 1.0]])
    bandit = LinUCB(2, alpha=1.0, inverse=inverse)

    # Step 1: A = I, b = 0, theta = 0; widths sqrt(1) and sqrt(2).
    np.testing.assert_allclose(bandit.scores(arms), [1.0, math.sqrt(2)], rtol=1e-12)
    assert bandit.select(arms) == 1

    # Step 2: reward 2 on [1, 1]: A = [[2, 1], [1, 2]], A^-1 = [[2, -1], [-1, 2]] / 3, b = [2, 2],
    # theta = [2/3, 2/3]; both arms have x'A^-1x = 2/3: scores 2/3 + 0.81650, 4/3 + 0.81650.
    bandit.update(arms[1], 2.0)
    np.testing.assert_allclose(bandit.A, [[2.0, 1.0], [1.0, 2.0]], rtol=1e-12)
    np.testing.assert_allclose(bandit.b, [2.0, 2.0], rtol=1e-12)
    np.testing.assert_allclose(bandit.A_inv, [[2 / 3, -1 / 3], [-1 / 3, 2 / 3]], rtol=1e-12)
    np.testing.assert_allclose(bandit.theta, [2 / 3, 2 / 3], rtol=1e-12)
    np.testing.assert_allclose(bandit.scores(arms), [1.4831632475943928, 2.1498299142610593], rtol=1e-12)
    assert bandit.select(arms) == 1

    # Step 3: reward 0 on [1, 0]: A = [[3, 1], [1, 2]] (det 5), A^-1 = [[2, -1], [-1, 3]] / 5,
    # theta = [0.4, 0.8]; scores 0.4 + sqrt(0.4) and 1.2 + sqrt(0.6).
    bandit.update(arms[0], 0.0)
    np.testing.assert_allclose(bandit.A, [[3.0, 1.0], [1.0, 2.0]], rtol=1e-12)
    np.testing.assert_allclose(bandit.A_inv, [[0.4, -0.2], [-0.2, 0.6]], rtol=1e-12)
    np.testing.assert_allclose(bandit.theta, [0.4, 0.8], rtol=1e-12)
    np.testing.assert_allclose(bandit.scores(arms), [1.032455532033676, 1.9745966692414834], rtol=1e-12)
    assert bandit.n_updates == 2


def test_decay_schedule_is_beta0_over_sqrt_t():
    arms = np.array([[1.0, 0.0], [1.0, 1.0]])
    bandit = LinUCB(2, schedule="decay", beta0=2.0)
    bandit.update(arms[1], 2.0)
    bandit.update(arms[0], 0.0)
    # Default t = updates + 1 = 3: alpha_3 = 2 / sqrt(3) = 1.1547005.
    np.testing.assert_allclose(bandit.scores(arms), [1.1302967433402218, 2.094427190999916], rtol=1e-12)
    assert bandit.exploration(4) == pytest.approx(1.0)
    assert bandit.exploration(16) == pytest.approx(0.5)
    # The constant schedule ignores t.
    assert LinUCB(2, alpha=0.7).exploration(100) == pytest.approx(0.7)


def test_ties_go_to_the_lowest_index():
    bandit = LinUCB(2)
    assert bandit.select([[1.0, 0.0], [0.0, 1.0]]) == 0
    assert bandit.select([[0.0, 1.0], [1.0, 0.0]]) == 0
    assert bandit.select([[0.0, 0.5], [0.5, 0.0], [0.0, 2.0], [2.0, 0.0]]) == 2


def test_sherman_morrison_agrees_with_direct_solve_after_many_updates():
    rng = np.random.default_rng(3)
    dim = 9
    fast, exact = LinUCB(dim, 0.8), LinUCB(dim, 0.8, inverse="solve")
    contexts = rng.normal(size=(400, dim)) * rng.uniform(0.1, 5.0, size=(400, 1))
    rewards = rng.normal(size=400)
    for x, r in zip(contexts, rewards, strict=True):
        fast.update(x, r)
        exact.update(x, r)
    probe = rng.normal(size=(50, dim))
    np.testing.assert_allclose(fast.scores(probe), exact.scores(probe), rtol=1e-9, atol=1e-12)
    # Independent reference: ridge regression with unit penalty, written from the data directly.
    gram = np.eye(dim) + contexts.T @ contexts
    ridge = np.linalg.lstsq(gram, contexts.T @ rewards, rcond=None)[0]
    np.testing.assert_allclose(fast.theta, ridge, rtol=1e-8)


def _bandit_regret(policy: str, seed: int, rounds: int = 300, dim: int = 6, n_arms: int = 20) -> float:
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=dim)
    theta /= np.linalg.norm(theta)
    bandit = LinUCB(dim, alpha=1.0)
    regret = 0.0
    for _ in range(rounds):
        arms = rng.normal(size=(n_arms, dim)) / math.sqrt(dim)
        means = arms @ theta
        choice = bandit.select(arms) if policy == "linucb" else int(rng.integers(n_arms))
        bandit.update(arms[choice], means[choice] + rng.normal(scale=0.1))
        regret += means.max() - means[choice]
    return regret


def test_linucb_regret_is_well_below_random_on_a_linear_bandit():
    for seed in range(3):
        linucb, random = _bandit_regret("linucb", seed), _bandit_regret("random", seed)
        assert linucb < 0.5 * random, (seed, linucb, random)


def test_linucb_state_dict_round_trip_through_json_gives_identical_scores():
    rng = np.random.default_rng(0)
    for inverse in ("sherman_morrison", "solve"):
        bandit = LinUCB(5, 0.3, schedule="decay", beta0=1.5, inverse=inverse)
        for _ in range(30):
            bandit.update(rng.normal(size=5), float(rng.normal()))
        restored = LinUCB.from_state_dict(json.loads(json.dumps(bandit.state_dict())))
        probe = rng.normal(size=(8, 5))
        assert np.array_equal(restored.scores(probe), bandit.scores(probe))
        assert restored.n_updates == 30
        same_config = LinUCB(5, 0.3, schedule="decay", beta0=1.5, inverse=inverse)
        same_config.load_state_dict(bandit.state_dict())
        assert np.array_equal(same_config.scores(probe), bandit.scores(probe))


def test_linucb_rejects_bad_input():
    bandit = LinUCB(3)
    with pytest.raises(ValueError, match="shape"):
        bandit.scores(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        bandit.select([[0.0, np.nan, 1.0]])
    with pytest.raises(ValueError, match="reward"):
        bandit.update([1.0, 0.0, 0.0], float("inf"))
    with pytest.raises(ValueError, match="schedule"):
        LinUCB(3, schedule="linear")
    with pytest.raises(ValueError, match="dim"):
        LinUCB(0)
    with pytest.raises(ValueError, match="alpha=0.5"):
        LinUCB(3, alpha=0.5).load_state_dict(LinUCB(3, alpha=1.0).state_dict())
    broken = LinUCB(3).state_dict()
    broken["A"] = [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="'A'"):
        LinUCB.from_state_dict(broken)
    assert LinUCBDirect is LinUCB


# ---------------------------------------------------------------------------------------- profiles


def test_profile_vector_matches_a_worked_example():
    scales = ProfileScales(
        max_examples=9999, loss_scale=10, max_parameters=99999, max_sequence_length=100, max_kilobytes=1000
    )
    profile = ClientProfile(
        n_examples=99,
        topic_histogram=[1, 1, 2, 0],
        recent_loss=5.0,
        previous_loss=6.0,
        model_parameters=999,
        mean_sequence_length=50,
        bandwidth_kilobytes=2000,  # above the maximum: clipped to 1
        participation_rate=0.25,
    )
    expected = [
        0.5,  # log10(100) / log10(10000)
        0.25,
        0.25,
        0.5,
        0,
        0,
        0,
        0,
        0,  # sketch of [1, 1, 2, 0]
        0.75,  # entropy of (1/4, 1/4, 1/2) = 1.5 ln 2, over ln 4
        0.5,
        0.1,  # loss 5 / 10, improvement (6 - 5) / 10
        0.6,  # log10(1000) / log10(100000)
        0.5,
        1.0,
        0.25,
    ]
    vector = profile_vector(profile, scales)
    assert vector.shape == (PROFILE_DIM,) == (16,)
    np.testing.assert_allclose(vector, expected, rtol=1e-12, atol=1e-15)


def test_topic_sketch_folds_many_topics_into_eight_bins():
    np.testing.assert_allclose(topic_sketch(np.ones(16)), np.full(8, 1 / 8))
    # 10 topics: topic k goes to bin floor(8k / 10) = 0,0,1,2,3,4,4,5,6,7.
    np.testing.assert_allclose(topic_sketch(np.ones(10)), [0.2, 0.1, 0.1, 0.1, 0.2, 0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="topic_histogram"):
        topic_sketch([0, 0])


def test_profile_vector_is_clipped_and_rejects_bad_statistics():
    huge = ClientProfile(n_examples=10**12, topic_histogram=[3], recent_loss=1e6, model_parameters=10**15)
    vector = profile_vector(huge)
    assert vector.min() >= 0.0 and vector.max() <= 1.0
    assert vector[0] == 1.0 and vector[10] == 1.0 and vector[12] == 1.0
    with pytest.raises(ValueError, match="recent_loss"):
        profile_vector(
            ClientProfile(n_examples=5, topic_histogram=[1], recent_loss=float("nan"), model_parameters=1)
        )
    with pytest.raises(ValueError, match="n_examples"):
        profile_vector(ClientProfile(n_examples=-1, topic_histogram=[1], recent_loss=1.0, model_parameters=1))


def test_laplace_release_noise_scale_is_sensitivity_over_epsilon():
    rng = np.random.default_rng(11)
    vector = np.full(16, 0.5)
    for epsilon, expected_scale in ((1.0, 16.0), (4.0, 4.0)):
        noise = np.stack([release_profile(vector, epsilon, rng) - 0.5 for _ in range(4000)])
        # Laplace(b): E|X| = b and E[X^2] = 2 b^2; 64,000 draws put both within a few percent.
        assert abs(np.abs(noise).mean() / expected_scale - 1) < 0.03
        assert abs(np.sqrt((noise**2).mean() / 2) / expected_scale - 1) < 0.05
        assert abs(noise.mean()) < 0.05 * expected_scale


def test_laplace_release_clips_before_adding_noise():
    raw = np.array([-3.0, 7.0] + [0.5] * 14)
    clipped = np.array([0.0, 1.0] + [0.5] * 14)
    a = release_profile(raw, 2.0, np.random.default_rng(5))
    b = release_profile(clipped, 2.0, np.random.default_rng(5))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="shape"):
        release_profile(np.zeros(15), 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="epsilon"):
        release_profile(clipped, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="rng"):
        release_profile(clipped, 1.0)


def test_profile_ledger_sums_epsilon_over_releases_and_persists():
    ledger = ProfileLedger()
    rng = np.random.default_rng(0)
    vector = np.zeros(16)
    for round_index, epsilon in enumerate((1.0, 0.5, 0.25)):
        release_profile(vector, epsilon, rng, ledger=ledger, round_index=round_index)
    assert ledger.total_epsilon == pytest.approx(1.75)
    assert [r.round_index for r in ledger.releases] == [0, 1, 2]
    restored = ProfileLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert restored.total_epsilon == pytest.approx(1.75) and len(restored.releases) == 3
    with pytest.raises(ValueError, match="epsilon"):
        ledger.record(-1.0, 3)


# ------------------------------------------------------------------------------------ pair context


def test_pair_context_is_symmetric_and_laid_out_as_documented():
    rng = np.random.default_rng(2)
    for _ in range(20):
        p, q = rng.uniform(size=16), rng.uniform(size=16)
        assert np.array_equal(pair_context(p, q), pair_context(q, p))
        assert pair_context(p, q).shape == (PAIR_CONTEXT_DIM,) == (33,)
    np.testing.assert_allclose(pair_context([0.2, 1.0], [0.5, 0.0]), [0.3, 1.0, 0.1, 0.0, 1.0])
    with pytest.raises(ValueError, match="equal length"):
        pair_context(np.zeros(3), np.zeros(4))


def test_reward_helper_matches_hand_computation():
    assert reward(2.0, 1.5, 100.0) == pytest.approx(0.5 - 0.1)
    assert reward(2.0, 1.5, 100.0, gamma=2.0, delta=0.01) == pytest.approx(0.0)
    assert reward(1.0, 1.2, 0.0) == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="kilobytes"):
        reward(1.0, 1.0, -5.0)


# -------------------------------------------------------------------------------------- matchmaker


def _trained_matchmaker(n_clients: int, seed: int = 0) -> tuple[Matchmaker, np.ndarray]:
    rng = np.random.default_rng(seed)
    profiles = rng.uniform(size=(n_clients, 16))
    matchmaker = Matchmaker(n_clients, alpha=0.5)
    for _ in range(5):
        for pair in matchmaker.propose(profiles):
            matchmaker.report(pair, float(rng.normal()))
    return matchmaker, profiles


@pytest.mark.parametrize("n_clients", [2, 7, 8])
def test_matchmaker_forms_floor_n_over_2_disjoint_pairs_greedily(n_clients):
    matchmaker, profiles = _trained_matchmaker(n_clients)
    candidates, _, scores = matchmaker.score_pairs(profiles, t=matchmaker.round + 1)
    pairs = matchmaker.propose(profiles)
    assert len(pairs) == n_clients // 2
    members = [c for pair in pairs for c in pair]
    assert len(set(members)) == len(members)
    assert len(matchmaker.last_unpaired) == n_clients % 2
    assert set(members) | set(matchmaker.last_unpaired) == set(range(n_clients))
    # Independent greedy: repeatedly take the best remaining candidate whose clients are both free.
    score_of = dict(zip(candidates, scores, strict=True))
    free, expected = set(range(n_clients)), []
    while len(free) >= 2:
        best = max(itertools.combinations(sorted(free), 2), key=lambda p: score_of[p])
        expected.append(best)
        free -= set(best)
    assert pairs == expected


def test_matchmaker_is_deterministic_and_respects_available_clients():
    first, profiles = _trained_matchmaker(9, seed=4)
    second, _ = _trained_matchmaker(9, seed=4)
    assert first.propose(profiles) == second.propose(profiles)
    pairs = first.propose(profiles, available=[8, 1, 4, 6, 2])
    assert len(pairs) == 2 and {c for p in pairs for c in p} <= {1, 2, 4, 6, 8}
    assert len(first.last_unpaired) == 1
    with pytest.raises(ValueError, match="available"):
        first.propose(profiles, available=[0, 0, 1])
    with pytest.raises(ValueError, match="profile_dim"):
        first.propose(profiles[:, :15])


def test_matchmaker_report_accepts_each_proposed_pair_once():
    matchmaker = Matchmaker(4)
    profiles = np.random.default_rng(0).uniform(size=(4, 16))
    (i, j), other = matchmaker.propose(profiles)
    matchmaker.report((j, i), 0.3)  # order does not matter
    with pytest.raises(ValueError, match="already reported"):
        matchmaker.report((i, j), 0.3)
    with pytest.raises(ValueError, match="not proposed"):
        matchmaker.report((i, other[0]), 0.3)
    assert matchmaker.bandit.n_updates == 1


def test_matchmaker_and_random_pairing_state_round_trips_through_json():
    matchmaker, profiles = _trained_matchmaker(6)
    matchmaker.propose(profiles)
    restored = Matchmaker.from_state_dict(json.loads(json.dumps(matchmaker.state_dict())))
    pending = sorted(matchmaker._pending)
    for pair in pending:
        matchmaker.report(pair, 0.1)
        restored.report(pair, 0.1)
    assert restored.propose(profiles) == matchmaker.propose(profiles)
    _, _, a = restored.score_pairs(profiles)
    _, _, b = matchmaker.score_pairs(profiles)
    assert np.array_equal(a, b)

    random = RandomPairing(6, seed=3)
    random.propose(profiles)
    clone = RandomPairing.from_state_dict(json.loads(json.dumps(random.state_dict())))
    assert [clone.propose(profiles) for _ in range(3)] == [random.propose(profiles) for _ in range(3)]


def test_random_pairing_is_seeded_and_disjoint():
    profiles = np.zeros((7, 16))
    runs = [[RandomPairing(7, seed=s).propose(profiles) for s in (1, 2)] for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]
    for pairs in runs[0]:
        members = [c for p in pairs for c in p]
        assert len(pairs) == 3 and len(set(members)) == 6


def _complementarity_run(
    policy, histograms: np.ndarray, profiles: np.ndarray, rounds: int, seed: int
) -> list[float]:
    """Mean reward per round; the loss drop of a pair is half the total-variation distance of its topics."""
    rng = np.random.default_rng(seed)
    per_round = []
    for _ in range(rounds):
        rewards = []
        for i, j in policy.propose(profiles):
            gain = 0.5 * np.abs(histograms[i] - histograms[j]).sum() * 0.5
            loss_before = 3.0
            value = reward(loss_before, loss_before - gain - rng.normal(scale=0.02), kilobytes=100.0)
            policy.report((i, j), value)
            rewards.append(value)
        per_round.append(np.mean(rewards))
    return per_round


def test_matchmaker_beats_random_pairing_on_complementary_topics():
    rng = np.random.default_rng(7)
    n_clients, warm_up, rounds = 8, 15, 45
    histograms = rng.dirichlet(np.full(8, 0.1), size=n_clients)
    profiles = np.stack(
        [
            profile_vector(
                ClientProfile(
                    n_examples=int(rng.integers(100, 10_000)),
                    topic_histogram=h,
                    recent_loss=3.0,
                    model_parameters=1_000_000,
                )
            )
            for h in histograms
        ]
    )
    learned = _complementarity_run(Matchmaker(n_clients, alpha=0.5), histograms, profiles, rounds, seed=1)
    random = _complementarity_run(RandomPairing(n_clients, seed=1), histograms, profiles, rounds, seed=1)
    # Oracle: the best perfect matching of the expected rewards (brute force over the 105 matchings).
    expected = 0.25 * np.abs(histograms[:, None] - histograms[None]).sum(-1) - 0.1

    def best(clients):
        if not clients:
            return 0.0
        first, rest = clients[0], clients[1:]
        return max(expected[first, k] + best([c for c in rest if c != k]) for k in rest)

    oracle = best(list(range(n_clients))) / (n_clients // 2)
    learned_avg, random_avg = np.mean(learned[warm_up:]), np.mean(random[warm_up:])
    assert learned_avg > random_avg + 0.3 * (oracle - random_avg), (learned_avg, random_avg, oracle)
