"""defenses/robust_aggregation.py: configuration errors and the CLI run of the example config."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from defenses import get_defense
from defenses.robust_aggregation import RobustAggregationConfig
from secure_kd.app.cli import app


def test_registered_and_config_errors_name_the_field():
    assert get_defense("robust_aggregation").Config is RobustAggregationConfig
    with pytest.raises(ValidationError, match="federation: drop \\['aggregation'\\]"):
        RobustAggregationConfig(federation={"aggregation": {"rule": "median"}})
    with pytest.raises(ValidationError, match="aggregation.rule=median needs each client's plaintext"):
        RobustAggregationConfig(
            federation={**RobustAggregationConfig().federation, "protection": "ckks"},
            rules=[{"rule": "median"}],
        )
    job = RobustAggregationConfig().job(RobustAggregationConfig().rules[1], None, "x")
    assert job.aggregation.rule == "median" and job.adversaries == {}


@pytest.mark.slow
def test_cli_median_beats_mean_under_sign_flip(tmp_path):
    overrides = ["federation.data.synthetic.n_records=60"]
    args = ["defend", "robust_aggregation", "--config", "configs/defenses/robust_aggregation.yaml"]
    args += ["--out", str(tmp_path)]
    result = CliRunner().invoke(app, args + [item for o in overrides for item in ("--set", o)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "results.json").read_text())
    loss = {(c["rule"], c["attack"]): c["test_loss"] for c in data["cells"]}
    assert set(loss) == {("mean", "none"), ("mean", "sign_flip"), ("median", "none"), ("median", "sign_flip")}
    assert loss[("median", "sign_flip")] < loss[("mean", "sign_flip")]
    assert data["honest_cost"]["mean"] == 0.0
