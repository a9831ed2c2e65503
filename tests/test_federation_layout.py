"""The federation's layout by concern (issue 14 B): the stable names of DESIGN.md still import and work
from where they always were, whatever module implements them."""

from __future__ import annotations

import numpy as np


def test_the_stable_he_names_import_and_compute_a_weighted_sum():
    from federation import he
    from federation.crypto import he as implementation

    assert he.Keyring is implementation.Keyring
    ring = he.Keyring.generate()
    public = ring.public_context()
    a, b = np.array([1.0, -2.0, 0.5]), np.array([3.0, 4.0, -1.0])
    total = he.aggregate(public, [he.encrypt(ring, a, 2.0), he.encrypt(ring, b, 1.0)])
    # the weighted sum by hand: 2 * a + 1 * b
    np.testing.assert_allclose(he.decrypt(ring, total, 3), [5.0, 0.0, 0.0], atol=1e-4)


def test_the_stable_matchmaking_names_import_and_learn():
    from federation.matchmaking import LinUCB, Matchmaker

    bandit = LinUCB(2, 0.0)  # no exploration: picks the arm with the larger learned reward
    good, bad = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    for _ in range(5):
        bandit.update(good, 1.0)
        bandit.update(bad, 0.0)
    assert bandit.select(np.stack([bad, good])) == 1
    assert Matchmaker(4).n_clients == 4
