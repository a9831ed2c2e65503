"""FederatedJob: the shipped configs load, and inconsistent jobs fail early naming the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation.config import load_federated_job
from secure_kd.config import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    "name, mode, protection",
    [
        ("federated-plain.yaml", "fedavg", "plaintext"),
        ("federated-he.yaml", "fed_distill", "ckks"),
        ("federated-p2p.yaml", "p2p", "plaintext"),
    ],
)
def test_shipped_configs_load(name, mode, protection):
    job = load_federated_job(CONFIGS / name)
    assert (job.mode, job.protection) == (mode, protection)
    assert job.n_organizations == 4
    if name == "federated-he.yaml":
        assert job.train.privacy is not None and job.train.privacy.noise_multiplier == 1.0


def test_overrides_apply():
    job = load_federated_job(CONFIGS / "federated-plain.yaml", ["rounds=5", "partition.alpha=0.1"])
    assert job.rounds == 5 and job.partition.alpha == 0.1
    assert job.required_clients == 3


@pytest.mark.parametrize(
    "overrides, field, words",
    [
        (["bogus=1"], "bogus", "unknown key"),
        (["partition.kind=random"], "partition.kind", "iid"),
        (["min_clients=9"], "(top level)", "min_clients=9 exceeds n_organizations=4"),
        (["mode=pate", "protection=ckks"], "(top level)", "set protection: plaintext"),
        (["mode=fed_distill", "protection=secagg+"], "(top level)", "use it with mode fedavg"),
        (["simulate_faults={7: crash}"], "(top level)", "outside 0..3"),
        (["simulate_faults={1: explode}"], "simulate_faults.1", "crash"),
        (["mode=fed_distill", "kd.kd_weight=0", "kd.ce_weight=1"], "(top level)", "kd.kd_weight > 0"),
        (["data.packing=true"], "(top level)", "data.packing: false"),
    ],
)
def test_inconsistent_jobs_are_refused(overrides, field, words):
    with pytest.raises(ConfigError) as info:
        load_federated_job(CONFIGS / "federated-plain.yaml", overrides)
    problems = dict(info.value.problems)
    assert field in problems, problems
    assert words in problems[field]


def test_fedavg_needs_one_architecture():
    heterogeneous = (
        "students=[{source: tiny, tiny: {hidden_size: 32, num_layers: 1, num_heads: 2}}, "
        "{source: tiny, tiny: {hidden_size: 16, num_layers: 1, num_heads: 2}}]"
    )
    with pytest.raises(ConfigError, match="same student"):
        load_federated_job(CONFIGS / "federated-plain.yaml", [heterogeneous])
    job = load_federated_job(CONFIGS / "federated-plain.yaml", [heterogeneous, "mode=fed_distill"])
    assert job.student_for(1).tiny.hidden_size == 16 and job.student_for(2).tiny.hidden_size == 32


def test_write_flwr_config_adds_a_connection_and_keeps_the_others(tmp_path):
    import tomli

    from federation.run import write_flwr_config

    existing = '[superlink]\ndefault = "mine"\n\n[superlink.mine]\naddress = "10.0.0.1:8000"\n'
    (tmp_path / "config.toml").write_text(existing)
    path = write_flwr_config(home=tmp_path)
    config = tomli.loads(path.read_text())
    assert config["superlink"]["default"] == "mine"
    assert config["superlink"]["mine"] == {"address": "10.0.0.1:8000"}
    assert config["superlink"]["secure-kd"] == {"address": "127.0.0.1:8000", "insecure": True}
