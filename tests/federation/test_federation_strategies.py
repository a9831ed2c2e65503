"""The server's arithmetic against independent references: hand-computed averages, an encrypted sum vs
the plaintext one, GNMax vote counts and accounting vs closed forms, soft labels vs a direct softmax."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from federation.crypto.he import Keyring, decrypt, decrypt_weight, encrypt, load_public_context
from federation.server.aggregation import (
    aggregate_encrypted,
    gnmax,
    gnmax_epsilon,
    mean_soft_labels,
    vote_counts,
    weighted_average,
)
from federation.soft_labels import EnsembleTargets, build_layout, relabeled, soft_labels, votes
from secure_kd.data import TokenizedExample


def test_weighted_average_matches_hand_computation():
    a = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([[0.0]], np.float32)}
    b = {"w": np.array([3.0, 6.0], np.float32), "b": np.array([[4.0]], np.float32)}
    out = weighted_average([a, b], [1, 3])
    # (1*1 + 3*3) / 4 = 2.5, (1*2 + 3*6) / 4 = 5, (0 + 12) / 4 = 3
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    np.testing.assert_allclose(out["b"], [[3.0]])
    assert out["w"].dtype == np.float32
    with pytest.raises(ValueError, match="positive finite"):
        weighted_average([a, b], [1, 0])


def test_ensemble_is_the_mean_of_soft_labels():
    p = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = np.array([[0.1, 0.3, 0.6], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(mean_soft_labels([p, q]), [[0.3, 0.4, 0.3], [0.5, 0.0, 0.5]])


def test_encrypted_sum_equals_plaintext_weighted_sum_and_drops_a_bad_payload():
    rng = np.random.default_rng(0)
    keyring = Keyring.for_payload(300, max_abs_update=1e3, abs_error=1e-6, max_clients=4)
    public = load_public_context(keyring.public_context())
    updates = [rng.normal(size=300) for _ in range(3)]
    weights = [5.0, 7.0, 11.0]
    pairs = enumerate(zip(updates, weights, strict=True))
    payloads = {f"org-{i}": encrypt(keyring, u, weight=w) for i, (u, w) in pairs}
    payloads["evil"] = payloads["org-0"][:-40]  # truncated ciphertext
    total, rejected = aggregate_encrypted(public, payloads)
    assert list(rejected) == ["evil"] and "ciphertext" in rejected["evil"]
    expected = sum(w * u for w, u in zip(weights, updates, strict=True))
    bound = keyring.noise_bound(3)
    assert np.max(np.abs(decrypt(keyring, total, 300) - expected)) < bound
    assert abs(decrypt_weight(keyring, total) - 23.0) < bound


def test_vote_counts_match_a_hand_count():
    # three teachers, four queries, five classes
    votes_ = [np.array([0, 1, 4, 2]), np.array([0, 3, 4, 2]), np.array([1, 3, 4, 0])]
    counts = vote_counts(votes_, 5)
    assert counts.tolist() == [[2, 1, 0, 0, 0], [0, 1, 0, 2, 0], [0, 0, 0, 0, 3], [1, 0, 2, 0, 0]]
    # with negligible noise GNMax releases the plurality vote
    released = gnmax(counts, 1e-6, np.random.default_rng(0))
    assert released.tolist() == [0, 3, 4, 2]


def test_gnmax_accounting_matches_the_closed_form():
    # Q queries of the Gaussian mechanism with sensitivity sqrt(2): RDP(l) = Q l / sigma^2 = rho l.
    # min_l rho l + log(1/delta) / (l - 1) is reached at l* = 1 + sqrt(log(1/delta) / rho), where it is
    # rho + 2 sqrt(rho log(1/delta)). Q = 4, sigma = 10, delta = 1e-5: rho = 0.04, log(1e5) = 11.5129,
    # epsilon = 0.04 + 2 * sqrt(0.460517) = 0.04 + 2 * 0.678614 = 1.397228.
    eps, order = gnmax_epsilon(4, 10.0, 1e-5)
    assert eps == pytest.approx(1.397228, rel=1e-4)
    assert order == pytest.approx(1 + math.sqrt(11.512925 / 0.04), rel=0.01)
    # twice the queries at sqrt(2) times the noise: the same rho, the same epsilon
    assert gnmax_epsilon(8, 10.0 * math.sqrt(2), 1e-5)[0] == pytest.approx(eps, rel=1e-4)
    assert gnmax_epsilon(0, 1.0, 1e-5)[0] == 0.0


class _Bigram(torch.nn.Module):
    """A tiny causal 'LM' whose logits at t depend on the token at t only: easy to reproduce by hand."""

    def __init__(self, vocab):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def _examples():
    ids = [[1, 2, 3, 2, 2], [3, 2, 1], [4, 4]]
    return [TokenizedExample(x, list(x), i) for i, x in enumerate(ids)]


def test_layout_index_set_is_the_most_frequent_targets():
    layout = build_layout(_examples(), k=2, vocab_size=6)
    # next tokens: 2,3,2,2 | 2,1 | 4  ->  2 (x4) first, then 1, 3, 4 once each: the smallest id wins
    assert layout.index.tolist() == [[2, 1]] * 7 and layout.kind == "unigram"
    assert layout.positions == ((0, 1, 2, 3), (0, 1), (0,))
    assert layout.shape == (7, 3)
    assert build_layout(_examples(), k=2, vocab_size=6).fingerprint == layout.fingerprint
    assert build_layout(_examples()[:2], k=2, vocab_size=6).fingerprint != layout.fingerprint


def test_soft_labels_are_the_restricted_softmax_plus_tail():
    model, examples = _Bigram(6), _examples()
    layout = build_layout(examples, k=2, vocab_size=6)
    soft = soft_labels(model, examples, layout, pad_id=0, batch_size=2)
    # position (example 1, t=1) reads token 2: its row is softmax(table[2]) at tokens 2 and 1, then the rest
    probs = torch.softmax(model.table[2].double(), -1).detach().numpy()
    np.testing.assert_allclose(soft[5], [probs[2], probs[1], 1 - probs[2] - probs[1]], atol=1e-6)
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-9)
    top = votes(model, examples, layout, pad_id=0)
    assert top[5] == int(np.argmax(probs))


def test_ensemble_targets_feed_topk_log_probabilities_to_the_trainer():
    examples = _examples()
    layout = build_layout(examples, k=2, vocab_size=6)
    soft = np.tile([0.5, 0.25, 0.25], (layout.n_positions, 1))
    soft[6] = [0.1, 0.7, 0.2]  # example 2, position 0
    targets = EnsembleTargets(soft, layout)
    batch = {"example_index": torch.tensor([2, 0]), "input_ids": torch.zeros(2, 5, dtype=torch.long)}
    topk = targets(batch)
    assert topk.values.shape == (2, 5, 2) and topk.indices[0, 0].tolist() == [2, 1]
    np.testing.assert_allclose(topk.values[0, 0].exp().numpy(), [0.1, 0.7], rtol=1e-6)
    np.testing.assert_allclose(topk.missing_mass()[0, 0].item(), 0.2, rtol=1e-5)


def test_relabeled_examples_train_on_the_released_tokens():
    examples = _examples()
    layout = build_layout(examples, k=2, vocab_size=6)
    out = relabeled(examples, layout, np.array([5, 5, 5, 5, 0, 1, 2]))
    assert (
        out[0].labels == [-100, 5, 5, 5, 5] and out[1].labels == [-100, 0, 1] and out[2].labels == [-100, 2]
    )
    assert out[0].input_ids == examples[0].input_ids
