"""attacks/federated.py: update inversion (bag of words from the embedding update) and the plugin."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from test_federation_apps import federate, tiny_job
from typer.testing import CliRunner

from attacks.federated import (
    FederatedAttackConfig,
    influential_tokens,
    invert_single_step,
    precision_recall,
    recover_token_set,
    server_visible_update,
)
from federation.client.workspace import OrgWorkspace
from federation.config import FederatedJob
from secure_kd.app.cli import app
from secure_kd.config import TinyModelConfig
from secure_kd.models import build_tiny


def _weights(model) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def test_token_set_from_a_single_adam_step_on_a_hand_made_batch():
    model = build_tiny(TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2), 64, seed=0)
    batch = torch.tensor([[5, 9, 12, 3], [7, 5, 20, 40]])
    before = _weights(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    recovered = recover_token_set(before, _weights(model))
    assert recovered == {5, 9, 12, 7, 20}  # by hand: every input but the last of each row (3, 40)
    assert precision_recall(recovered, influential_tokens(batch.tolist())) == (1.0, 1.0)


def test_precision_recall_by_hand():
    assert precision_recall({1, 2, 3, 4}, {2, 3, 5}) == (0.5, pytest.approx(2 / 3))


def test_server_sees_an_invertible_update_in_plaintext_and_nothing_under_ckks(tmp_path):
    job = tiny_job(tmp_path / "plain", n_organizations=2)
    _, grid = federate(job)
    (message, reply) = next((m, r) for m, r in grid.sent("train") if m.metadata.dst_node_id == 1000)
    update = server_visible_update(reply.content)
    assert update is not None
    global_model = server_visible_update(message.content)
    recovered = recover_token_set(global_model, update)
    own = OrgWorkspace(job, 0, tmp_path / "probe").train_examples
    precision, _ = precision_recall(recovered, influential_tokens([e.input_ids for e in own]))
    assert recovered and precision == 1.0  # every leaked token is in org-0's own records

    ckks = tiny_job(tmp_path / "ckks", n_organizations=2, protection="ckks", ckks={"max_abs_update": 1000.0})
    _, grid = federate(ckks)
    for _, reply in grid.sent("train"):
        assert server_visible_update(reply.content) is None
        assert set(reply.content["config"].keys()) == {"ciphertext"}
    assert invert_single_step(ckks, tmp_path / "x").update_visible is False


def test_single_step_inversion_of_a_real_client_recovers_its_token_set(tmp_path):
    report = invert_single_step(tiny_job(tmp_path, n_organizations=2), tmp_path / "inv")
    assert report.update_visible and report.recall == 1.0 and report.precision == 1.0
    assert report.true_tokens > 20


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="federation: drop \\['seed'\\]"):
        FederatedAttackConfig(federation={"seed": 3})
    with pytest.raises(ValidationError, match="poison_soft_labels attacks mode fed_distill"):
        FederatedAttackConfig(adversary={"kind": "poison_soft_labels"})
    assert FederatedAttackConfig().job("a", True).adversaries[2].kind == "scale"
    assert isinstance(FederatedAttackConfig().job("a", False), FederatedJob)


@pytest.mark.slow
def test_cli_sign_flip_attack_raises_the_loss(tmp_path):
    overrides = ["federation.rounds=1", "federation.data.synthetic.n_records=60"]
    args = ["attack", "federated", "--config", "configs/attacks/federated.yaml", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args + [item for o in overrides for item in ("--set", o)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["kind"] == "sign_flip" and data["adversary_org"] == "org-2"
    assert data["attacked"]["test_loss"] > data["honest"]["test_loss"]
    assert data["inversion"]["recall"] == 1.0
