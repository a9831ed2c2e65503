"""Client-side filtering wired into fed_distill rounds: weights per position, plaintext and CKKS.

The ensemble the server sends back is checked against the weighted mean computed here, position by
position, from what each organization uploaded (plaintext), or from each upload decrypted by a key
holder (CKKS)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from test_federation_apps import _arrays, federate, tiny_job

from federation.client.filtering import ensemble_from_weighted_sum, transfer_weights
from federation.client.workspace import SECRET_CONTEXT_FILE
from federation.config import FilteringConfig
from federation.crypto.he import Keyring, decrypt, decrypt_mean
from federation.job_data import job_data
from federation.soft_labels import build_layout
from secure_kd.config import TinyModelConfig
from secure_kd.data import TokenizedExample
from secure_kd.models import build_tiny

FILTERING = {"n_clusters": 2, "radius_quantile": 0.9, "density_ratio": 1.0, "floor_weight": 0.05}


def _by_hand(labels: list[np.ndarray], weights: list[np.ndarray]) -> np.ndarray:
    out = np.zeros_like(labels[0])
    for p in range(out.shape[0]):
        total = sum(w[p] for w in weights)
        out[p] = sum(w[p] * s[p] for s, w in zip(labels, weights, strict=True)) / total
    return out


def test_plaintext_ensemble_is_the_weighted_mean_of_the_uploads(tmp_path):
    job = tiny_job(
        tmp_path,
        mode="fed_distill",
        transfer={"n_records": 6, "index_k": 16, "digest_steps": 1, "filtering": FILTERING},
    )
    result, grid = federate(job)
    uploads = [_arrays(reply) for _, reply in grid.sent("train")]
    for upload in uploads:
        assert set(np.unique(upload["filter-weights"])) <= {1.0, FILTERING["floor_weight"]}
    ensemble = _arrays(grid.sent("train.digest")[0][0])["soft-labels"]
    expected = _by_hand([u["soft-labels"] for u in uploads], [u["filter-weights"] for u in uploads])
    np.testing.assert_allclose(ensemble, expected, atol=1e-9)
    kept = [c.metrics["kept-fraction"] for c in result.rounds[0].clients]
    assert len(kept) == 3 and all(0 <= k <= 1 for k in kept)


def _ckks_filtering_job(tmp_path, **changes):
    return tiny_job(
        tmp_path,
        mode="fed_distill",
        protection="ckks",
        ckks={"max_abs_update": 10.0},
        transfer={"n_records": 6, "index_k": 16, "digest_steps": 1, "filtering": FILTERING},
        **changes,
    )


def test_ckks_ensemble_matches_the_plaintext_weighted_mean(tmp_path):
    job = _ckks_filtering_job(tmp_path)
    result, grid = federate(job)
    keyring = Keyring.from_secret_context(
        (tmp_path / "run" / "orgs" / "org-0" / SECRET_CONTEXT_FILE).read_bytes()
    )
    layout = job_data(job).layout
    n, width = layout.n_positions, layout.width
    flat = [decrypt(keyring, r.content["config"]["ciphertext"], n * width + n) for _, r in grid.sent("train")]
    weights = [f[n * width :] for f in flat]
    labels = [f[: n * width].reshape(n, width) / w[:, None] for f, w in zip(flat, weights, strict=True)]
    expected = _by_hand(labels, weights)
    aggregate = grid.sent("train.digest")[0][0].content["config"]["aggregate"]
    ensemble = ensemble_from_weighted_sum(decrypt_mean(keyring, aggregate, n * width + n), layout)
    np.testing.assert_allclose(ensemble, expected, atol=1e-5)
    assert result.final is not None and all("digest-loss" in c.metrics for c in result.final.clients)
    # the share of transfer records an organization keeps is a function of its weights: it stays
    # encrypted with them (before, `kept-fraction` went out in clear beside the ciphertext)
    for _, reply in grid.sent("train"):
        assert set(reply.content["metrics"].keys()).isdisjoint({"kept-fraction", "num-examples"})


def test_a_poisoning_organization_poisons_the_encrypted_filtered_payload_too(tmp_path):
    job = _ckks_filtering_job(
        tmp_path,
        n_organizations=2,
        adversaries={1: {"kind": "poison_soft_labels", "target_column": 2, "strength": 1.0}},
    )
    _, grid = federate(job)
    keyring = Keyring.from_secret_context(
        (tmp_path / "run" / "orgs" / "org-0" / SECRET_CONTEXT_FILE).read_bytes()
    )
    layout = job_data(job).layout
    n, width = layout.n_positions, layout.width
    uploads = {
        m.metadata.dst_node_id: decrypt(keyring, r.content["config"]["ciphertext"], n * width + n)
        for m, r in grid.sent("train")
    }
    labels = {node: f[: n * width].reshape(n, width) / f[n * width :, None] for node, f in uploads.items()}
    np.testing.assert_allclose(labels[1001][:, 2], 1.0, atol=1e-4)
    np.testing.assert_allclose(np.delete(labels[1001], 2, axis=1), 0.0, atol=1e-4)
    assert labels[1000][:, 2].max() < 0.9  # the honest organization's labels are its own


def _example(tokens: list[int]) -> TokenizedExample:
    return TokenizedExample(tokens, [-100] + tokens[1:], 0, False)


def test_transfer_records_like_the_own_data_get_full_weight():
    torch.manual_seed(0)
    model = build_tiny(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2), 300, seed=0)
    rng = np.random.default_rng(0)
    own = [_example(list(rng.integers(0, 6, 12))) for _ in range(40)]
    near = [_example(list(rng.integers(0, 6, 12))) for _ in range(10)]
    far = [_example(list(rng.integers(200, 206, 12))) for _ in range(10)]
    transfer = near + far
    layout = build_layout(transfer, 8, 300)
    config = FilteringConfig(n_clusters=2, radius_quantile=1.0, density_ratio=1.0, floor_weight=0.0)
    weights, kept = transfer_weights(model, own, transfer, layout, config, seed=0)
    per_record = [weights[sum(len(p) for p in layout.positions[:i])] for i in range(len(transfer))]
    assert np.mean(per_record[:10]) >= 0.8 and np.mean(per_record[10:]) == 0.0
    assert kept == pytest.approx(np.mean(per_record))


def test_filtering_outside_fed_distill_or_with_zero_floor_under_ckks_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="use it with mode fed_distill"):
        tiny_job(tmp_path, mode="fedavg", transfer={"filtering": FILTERING})
    with pytest.raises(ValidationError, match="floor_weight must be > 0 under ckks"):
        tiny_job(
            tmp_path,
            mode="fed_distill",
            protection="ckks",
            transfer={"filtering": {**FILTERING, "floor_weight": 0.0}},
        )


def test_filtering_with_dp_training_is_refused(tmp_path):
    # the filter (KMeans on private records) would release per-record weights every round that the
    # DP-SGD epsilon does not cover; before, such a job ran and reported that epsilon
    privacy = {"noise_multiplier": 1.0, "delta": 1e-3}
    for protection in ("plaintext", "ckks"):
        with pytest.raises(
            ValidationError, match="transfer.filtering with train.privacy.*epsilon does not cover"
        ):
            tiny_job(
                tmp_path,
                mode="fed_distill",
                protection=protection,
                transfer={"n_records": 6, "index_k": 16, "digest_steps": 1, "filtering": FILTERING},
                train={"max_steps": 2, "batch_size": 4, "privacy": privacy},
            )
