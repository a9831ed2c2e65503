"""`secure-kd distill --config configs/dp-tiny.yaml`, reduced to a few steps: privacy.json, the ledger."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from opacus.accountants import RDPAccountant
from typer.testing import CliRunner

from secure_kd.app.cli import app

SMALL = [
    "--set",
    "train.max_steps=3",
    "--set",
    "data.synthetic.n_records=60",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.eval_batches=1",
    "--set",
    "train.privacy.target_epsilon=4.0",
]


CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "dp-tiny.yaml")


def distill(out, *extra):
    args = ["distill", "--config", CONFIG, "--out", str(out), "--no-progress", *SMALL, *extra]
    return CliRunner().invoke(app, args)


def test_dp_tiny_config_writes_privacy_json_and_a_second_run_adds_to_the_ledger(tmp_path, monkeypatch):
    monkeypatch.setenv("SECURE_KD_HOME", str(tmp_path / "home"))
    first = distill(tmp_path / "first")
    assert first.exit_code == 0, first.output
    report = json.loads((tmp_path / "first" / "privacy.json").read_text())
    for field in ("noise_multiplier", "sample_rate", "steps", "delta", "epsilon", "accountant"):
        assert field in report
    assert report["steps"] == 3 and report["delta"] == 1e-3  # 54 training records: 1/(10*54) -> 1e-3
    assert any("tokenizer was trained on the private training text" in c for c in report["caveats"])
    reference = RDPAccountant()
    for _ in range(3):
        reference.step(noise_multiplier=report["noise_multiplier"], sample_rate=report["sample_rate"])
    assert report["epsilons"]["rdp"] <= 4.0
    assert abs(report["epsilons"]["rdp"] - reference.get_epsilon(delta=1e-3)) < 1e-9
    results = json.loads((tmp_path / "first" / "results.json").read_text())
    assert results["privacy"]["epsilon"] == report["epsilon"]
    for private in ("results.json", "privacy.json"):  # results.json holds uncovered losses on private text
        assert stat.S_IMODE((tmp_path / "first" / private).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "first").stat().st_mode) == 0o700  # a new run directory
    ledgers = list((tmp_path / "home" / "privacy-ledgers").glob("*.jsonl"))
    assert len(ledgers) == 1

    # same corpus, same budget: the budget is the dataset's, so nothing is left for a second run
    refused = distill(tmp_path / "second")
    assert refused.exit_code == 2 and "already spent epsilon" in refused.output
    # with fixed noise and no budget, a second run trains and the ledger counts both runs
    second = distill(
        tmp_path / "second",
        "--set",
        "train.privacy.target_epsilon=null",
        "--set",
        "train.privacy.noise_multiplier=1.5",
    )
    assert second.exit_code == 0, second.output
    again = json.loads((tmp_path / "second" / "privacy.json").read_text())
    assert again["ledger"]["entries"] == 2 and again["ledger"]["path"] == str(ledgers[0])
    assert again["epsilons"]["rdp"] > report["epsilons"]["rdp"] and again["run_epsilon"] < again["epsilon"]


def test_dp_config_errors_exit_2_with_the_fix(tmp_path):
    packed = distill(tmp_path / "x", "--set", "data.packing=true")
    assert packed.exit_code == 2 and "data.packing: false" in packed.output
    gdp = distill(tmp_path / "x", "--set", "train.privacy.accountant=gdp")
    assert gdp.exit_code == 2 and "can underestimate" in gdp.output
    big_delta = distill(tmp_path / "x", "--set", "train.privacy.delta=0.05")
    assert big_delta.exit_code == 2 and "not below 1/N" in big_delta.output


def test_a_new_seed_or_heldout_fraction_on_the_same_data_draws_on_the_same_budget(tmp_path, monkeypatch):
    """The ledger key is the data before the seed-dependent split, not the training side of it."""
    monkeypatch.setenv("SECURE_KD_HOME", str(tmp_path / "home"))
    records = tmp_path / "private.jsonl"
    records.write_text(
        "".join(
            json.dumps({"text": f"patient {i} was seen on day {i % 28} for {i * 7 % 13}"}) + "\n"
            for i in range(60)
        )
    )
    local = ["--set", f"data.train={records}"]
    first = distill(tmp_path / "first", *local)
    assert first.exit_code == 0, first.output
    spent = json.loads((tmp_path / "first" / "privacy.json").read_text())
    assert spent["epsilons"]["rdp"] <= 4.0 and spent["ledger"]["entries"] == 1
    changes = (["seed=1"], ["data.heldout_fraction=0.3"], ["data.max_records=40"])
    for index, (change,) in enumerate(changes):
        again = distill(tmp_path / f"again-{index}", *local, "--set", change)
        assert again.exit_code == 2 and "already spent epsilon" in again.output, (change, again.output)
    assert len(list((tmp_path / "home" / "privacy-ledgers").glob("*.jsonl"))) == 1


def test_a_dollar_in_the_ledger_path_is_a_clear_error_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = distill(tmp_path / "x", "--set", "train.privacy.ledger_dir=$HOME$/ledgers")
    assert result.exit_code == 2, result.output
    assert "does not expand environment variables" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "$HOME$").exists()
