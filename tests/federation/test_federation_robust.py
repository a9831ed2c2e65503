"""Robust aggregation (federation/server/strategies/robust.py), the adversary role
(federation/simulation/adversary.py), and both in tiny federated runs through the real ServerApp /
ClientApp (the in-process grid of test_federation_apps)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from pydantic import ValidationError
from test_federation_apps import federate, tiny_job

from federation.client.workspace import SECRET_CONTEXT_FILE
from federation.clipping import clip_update
from federation.config import AggregationConfig
from federation.crypto.he import Keyring, decrypt_mean
from federation.job_data import job_data
from federation.roles import AdversaryConfig
from federation.server.aggregation import mean_soft_labels
from federation.server.strategies.robust import robust_aggregate
from federation.simulation.adversary import malicious_weights, poisoned_records, poisoned_soft_labels
from federation.students import build_student, flat_parameters


def _random_updates(rng, n=7):
    return [{"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)} for _ in range(n)]


@pytest.mark.parametrize("fraction", [0.0, 0.15, 0.3, 0.45])
def test_trimmed_mean_equals_scipy(fraction):
    updates = _random_updates(np.random.default_rng(1))
    got = robust_aggregate(
        updates, [1.0] * 7, None, AggregationConfig(rule="trimmed_mean", trim_fraction=fraction)
    )
    for name in ("a", "b"):
        expected = scipy.stats.trim_mean(np.stack([u[name] for u in updates]), fraction, axis=0)
        np.testing.assert_allclose(got[name], expected, rtol=1e-12)


def test_median_equals_numpy():
    updates = _random_updates(np.random.default_rng(2), n=6)
    got = robust_aggregate(updates, [3.0] * 6, None, AggregationConfig(rule="median"))
    for name in ("a", "b"):
        np.testing.assert_allclose(got[name], np.median(np.stack([u[name] for u in updates]), axis=0))


def test_norm_bounded_average_by_hand():
    glob = {"w": np.array([1.0, 1.0])}
    updates = [{"w": np.array([4.0, 5.0])}, {"w": np.array([1.5, 1.0])}]  # deltas (3,4) norm 5, (0.5,0)
    got = robust_aggregate(updates, [1.0, 3.0], glob, AggregationConfig(rule="norm_bounded", norm_bound=1.0))
    clipped = [np.array([1.0 + 0.6, 1.0 + 0.8]), np.array([1.5, 1.0])]  # (3,4)/5, then within the bound
    np.testing.assert_allclose(got["w"], (1 * clipped[0] + 3 * clipped[1]) / 4)
    np.testing.assert_allclose(clip_update(updates[0], glob, 10.0)["w"], updates[0]["w"])


def test_robust_rules_refused_under_ckks_naming_the_field(tmp_path):
    with pytest.raises(ValidationError, match="aggregation.rule=median .*client_clip_norm"):
        tiny_job(tmp_path, protection="ckks", aggregation={"rule": "median"})
    with pytest.raises(ValidationError, match="aggregation.norm_bound"):
        AggregationConfig(rule="norm_bounded")
    with pytest.raises(
        ValidationError, match="adversaries.1.kind=poison_soft_labels attacks mode fed_distill"
    ):
        tiny_job(tmp_path, adversaries={1: {"kind": "poison_soft_labels"}})


def test_malicious_weights_by_hand():
    glob, trained = {"w": np.array([1.0, 2.0])}, {"w": np.array([2.0, 1.0])}
    np.testing.assert_allclose(
        malicious_weights(AdversaryConfig(kind="scale", boost=3), trained, glob)["w"], [4, -1]
    )
    flipped = malicious_weights(AdversaryConfig(kind="sign_flip", boost=2), trained, glob)["w"]
    np.testing.assert_allclose(flipped, [-1.0, 4.0])


def test_poisoned_soft_labels_move_the_ensemble_as_computed_by_hand():
    honest = [np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]), np.array([[0.2, 0.2, 0.6], [0.3, 0.3, 0.4]])]
    bad = poisoned_soft_labels(
        AdversaryConfig(kind="poison_soft_labels", target_column=1, strength=0.5), honest[1]
    )
    np.testing.assert_allclose(bad, [[0.1, 0.6, 0.3], [0.15, 0.65, 0.2]])
    ensemble = mean_soft_labels([honest[0], bad])
    np.testing.assert_allclose(ensemble, [[0.3, 0.45, 0.25], [0.125, 0.375, 0.5]])


def test_backdoor_records_carry_trigger_then_target():
    adversary = AdversaryConfig(kind="backdoor", poison_fraction=0.5)
    records = [{"text": f"alpha beta gamma {i}"} for i in range(4)]
    poisoned = poisoned_records(adversary, records, "text", seed=0)
    carrying = [r["text"] for r in poisoned if "cf zz" in r["text"]]
    assert len(carrying) == 2 and all(
        t.replace("cf zz ", "").replace(" cf zz", "") in [r["text"] for r in records] for t in carrying
    )


def _final_test_loss(result) -> float:
    return result.final.summary["test-loss"]


def test_sign_flip_raises_the_loss_and_median_resists_it(tmp_path):
    common = dict(
        n_organizations=3,
        rounds=2,
        train={"max_steps": 4, "batch_size": 4, "lr": 1e-2, "schedule": "constant", "eval_batches": 1},
    )
    honest, _ = federate(tiny_job(tmp_path / "honest", **common))
    attack = {2: {"kind": "sign_flip", "boost": 5.0}}
    mean, _ = federate(tiny_job(tmp_path / "mean", adversaries=attack, **common))
    median, _ = federate(
        tiny_job(tmp_path / "median", adversaries=attack, aggregation={"rule": "median"}, **common)
    )
    assert _final_test_loss(mean) > _final_test_loss(honest) + 0.05
    assert _final_test_loss(median) < _final_test_loss(mean) - 0.05


def test_client_clip_norm_bounds_each_decrypted_contribution_under_ckks(tmp_path):
    # round 2: every client starts from the decrypted round-1 aggregate, which a key holder can rebuild
    # (round 1 starts from each client's own seeded model, built concurrently in the in-process grid)
    clip = 0.05
    job = tiny_job(
        tmp_path,
        n_organizations=2,
        rounds=2,
        protection="ckks",
        ckks={"max_abs_update": 1000.0},
        aggregation={"client_clip_norm": clip},
    )
    _, grid = federate(job)
    keyring = Keyring.from_secret_context(
        (tmp_path / "run" / "orgs" / "org-0" / SECRET_CONTEXT_FILE).read_bytes()
    )
    n = sum(t.numel() for t in flat_parameters(build_student(job, 0, job_data(job)))[1])
    second = [(m, r) for m, r in grid.sent("train") if "aggregate" in m.content["config"]]
    assert len(second) == 2
    for message, reply in second:
        start = decrypt_mean(keyring, message.content["config"]["aggregate"], n)
        weights = decrypt_mean(keyring, reply.content["config"]["ciphertext"], n)
        assert np.linalg.norm(weights - start) == pytest.approx(clip, abs=1e-3)


def test_fed_distill_adversary_uploads_one_hot_labels_and_the_ensemble_is_their_mean(tmp_path):
    adversary = {1: {"kind": "poison_soft_labels", "target_column": 2, "strength": 1.0}}
    job = tiny_job(tmp_path, n_organizations=2, mode="fed_distill", adversaries=adversary)
    _, grid = federate(job)
    uploads = {
        m.metadata.dst_node_id: r.content["arrays"]["soft-labels"].numpy() for m, r in grid.sent("train")
    }
    poisoned = uploads[1001]
    assert np.all(poisoned[:, 2] == 1.0) and np.all(np.delete(poisoned, 2, axis=1) == 0.0)
    ensemble = grid.sent("train.digest")[0][0].content["arrays"]["soft-labels"].numpy()
    np.testing.assert_allclose(ensemble, (uploads[1000] + poisoned) / 2, atol=1e-6)
    assert ensemble[:, 2].min() >= 0.5  # the target column holds at least half the mass everywhere
