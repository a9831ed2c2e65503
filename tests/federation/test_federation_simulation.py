"""End to end through Flower's simulation engine (`run_simulation`, Ray backend): the apps exactly as
`secure-kd federate` runs them. One run covers CKKS aggregation with the key ceremony over Flower
messages, DP-SGD clients with their ledgers, and a malicious organization that is dropped every round."""

from __future__ import annotations

import json

from federation.config import FederatedJob
from federation.run import run_federation


def test_ckks_fed_distill_with_dp_clients_and_a_malicious_one(tmp_path):
    job = FederatedJob.model_validate(
        dict(
            seed=1,
            out=str(tmp_path / "run"),
            n_organizations=3,
            rounds=2,
            mode="fed_distill",
            protection="ckks",
            min_clients=2,
            tokenizer="tiny:300",
            round_timeout_s=300,
            simultaneous_clients=2,
            simulate_faults={2: "wrong_shape"},
            student={"source": "tiny", "tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2}},
            data={"synthetic": {"n_records": 90, "n_canaries": 1}, "heldout_fraction": 0.1, "max_length": 24},
            partition={"min_records": 6},
            kd={"loss": "forward_kl"},
            train={
                "max_steps": 2,
                "batch_size": 4,
                "lr": 3e-3,
                "schedule": "constant",
                "eval_batches": 1,
                "privacy": {"noise_multiplier": 1.5, "delta": 1e-3, "ledger_dir": str(tmp_path / "ledgers")},
            },
            transfer={"n_records": 6, "index_k": 16, "digest_steps": 1},
            ckks={"max_abs_update": 10.0},
        )
    )
    result = run_federation(job, progress=False)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["completed"] and saved == json.loads(result.model_dump_json())
    assert result.setup["key_ceremony"]["key_holders"] == 3
    assert len(result.rounds) == 2
    for record in result.rounds:
        assert record.answered == ["org-0", "org-1"]
        assert [d.org for d in record.dropped] == ["org-2"]
        assert "ciphertext" in record.dropped[0].reason
        assert record.aggregate["kind"] == "ckks-sum" and record.aggregate["contributors"] == 2
        assert {"test-loss", "heldout-loss", "train-loss", "epsilon"} <= set(record.summary)
    for org in ("org-0", "org-1"):
        eps = [next(c.metrics["epsilon"] for c in r.clients if c.org == org) for r in result.rounds]
        assert 0 < eps[0] < eps[1] == result.epsilon[org]
    assert result.final is not None and len(result.final.answered) == 3
